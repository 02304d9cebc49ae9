/* parallel.c — the CPU backend's use of mpscy's worker threads (common/pool.c): a pool started
 * when a graph is built and joined when it is destroyed, and a GEMM split over it, each part a
 * single-threaded product (gemm.c's where it runs and the part is small, else BLAS's).
 * OpenBLAS itself is kept single-threaded, so its idle threads never spin against ours
 * (Accelerate manages its own). */
#include "cpu.h"
#include "blas.h"

int cpu_pool_create(mpscy_device dev, int32_t threads, cpu_pool **out) {
    mpscy_blas_set_threads(1);  /* all parallelism is ours, with or without a pool */
    return mpscy_pool_create(&dev->stats, threads, out);
}

/* ------------------------------------------------------------------ GEMM over the pool */

typedef struct gemm_job {
    int ta, tb, form;
    int64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
} gemm_job;

/* Products up to this many multiply-adds (a part's) may take gemm.c's kernels: faster than
 * OpenBLAS's SkylakeX kernels below it (a Dense of 784 inputs and 128 outputs at 32 rows: 242
 * against 149 GFLOP/s a core) and slower above it (1024^3: 178 against 266), as they do not
 * block for the caches. */
#define FMA_MOST ((int64_t)1 << 25)

static void gemm_part(void *ctx, int32_t t, int32_t nt) {
    const gemm_job *j = ctx;
    /* packed A B^T (the caller's form, CPU_GEMM_PACKED with or without CPU_GEMM_OWN, the same for
     * every part whatever its rows, so that the bits do not depend on the split): split by rows
     * of A, each part packing every panel of B^T for its own rows (by B's rows, two parts packing
     * half the panels each: 342-358 us against 289-302 for the predict of a 784-128-64-10 MLP at
     * 256 rows on 2 cores) */
    const int packed = !j->ta && j->tb && (j->form & CPU_GEMM_PACKED);
    int split_m = packed || j->m >= j->n;
    int64_t lo, hi, total = split_m ? j->m : j->n, align = total >= 16 * nt ? 16 : 1;
    cpu_split(total / align, t, nt, &lo, &hi);
    lo *= align;
    hi = t == nt - 1 ? total : hi * align;
    if (hi <= lo) return;
    const float *a = j->a, *b = j->b;
    float *c = j->c;
    int64_t m = j->m, n = j->n;
    if (split_m) {  /* rows [lo, hi) of C: rows of op(A) */
        a += j->ta ? lo : lo * j->lda;
        c += lo * j->ldc;
        m = hi - lo;
    } else {        /* columns [lo, hi) of C: columns of op(B) */
        b += j->tb ? lo * j->ldb : lo;
        c += lo;
        n = hi - lo;
    }
    cpu_sgemm(j->ta, j->tb, m, n, j->k, j->alpha, a, j->lda, b, j->ldb, j->beta, c, j->ldc,
              (packed ? j->form : m * n * j->k <= FMA_MOST ? CPU_GEMM_OWN : 0));
}

void cpu_gemm(cpu_pool *p, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc, int form) {
    // c (m, n) row-major = alpha op(a) op(b) + beta c; op(a) (m, k), op(b) (k, n)
    gemm_job j = {ta, tb, form, m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
    if (!p || mpscy_pool_in_region() || m * n * k < (int64_t)1 << 18) gemm_part(&j, 0, 1);
    else cpu_parallel(p, gemm_part, &j);
}
