/* gemm.c — matrix products with few rows or a short inner dimension, done here instead of by
 * BLAS where the CPU has AVX-512 and FMA: C (m, n) = A (m, k) B (k, n) with B and C row-major
 * and n long (a convolution's columns of a chunk of samples; a Dense's outputs or inputs), and
 * C = A B^T with rows of A and B contiguous along k (weight gradients, a Dense's forward).
 * OpenBLAS packs B before every product, and with a few dozen rows of A that copy costs as much
 * as the arithmetic (a 16-filter 3x3 convolution's products ran at ~75-110 GFLOP/s a core
 * against 230-280 here); these kernels read B where it lies, a panel of columns at a time that
 * stays in L1 while every row block of A passes over it. They do not block for the caches
 * beyond that, so large products stay with BLAS (cpu_sgemm's caller says which may come here).
 *
 * C = A B^T comes in two forms: the dot form (16 lanes a product, for few rows of A), and for
 * products the caller marks packed (a Dense forward in a graph of many rows) panels of B^T
 * packed on the stack and read by the first form's kernels.
 *
 * Every element of C sums its k in fixed blocks (GEMM_KC), each block one chain of fused
 * multiply-adds in k order, added to C; a dot-form element sums 16 lanes of chains in a fixed
 * tree. Its bits therefore depend on neither the blocking of rows and columns nor the thread
 * that computes it. Where these kernels do not run (no AVX-512 with FMA, another
 * architecture, $MPSCY_CPU_GEMM=0: read once per process, fewer than 32 columns, or a
 * B^T product over k < 256 not marked packed) cpu_sgemm calls BLAS. */
#include "cpu.h"
#include "blas.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GEMM_X86 1
#include <immintrin.h>
#endif

/* whether these kernels run: AVX-512 with FMA, $MPSCY_CPU_GEMM not 0 (read once) */
int cpu_fma_gemm_path(void) {
    static volatile int on = -1;  /* a race writes the same value */
    if (on >= 0) return on;
    int found = 0;
#ifdef GEMM_X86
    __builtin_cpu_init();
    const char *knob = getenv("MPSCY_CPU_GEMM");
    found = !(knob && strcmp(knob, "0") == 0) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
    on = found;
    return found;
}

#ifdef GEMM_X86
/* Rows 0..MR-1 of a block, as a list the kernels below expand once per row (named
 * accumulators: an array of vectors was kept on the stack, stored back every step). */
#define ROWS_1(X) X(0)
#define ROWS_2(X) X(0) X(1)
#define ROWS_4(X) X(0) X(1) X(2) X(3)
#define ROWS_8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

/* One block of MR rows of C and two vectors of columns (masked at the right edge: a masked
 * load never touches, nor faults on, the lanes it leaves out). a points at A (row 0 of the
 * block, k = 0), its element (i, p) at a[i * ars + p * acs]. */
#define INIT_512(r) __m512 x##r = _mm512_setzero_ps(), y##r = x##r;
#define STEP_512(r)                                                                               \
    {                                                                                             \
        const __m512 av = _mm512_set1_ps(a[r * ars + p * acs]);                                   \
        x##r = _mm512_fmadd_ps(av, b0, x##r);                                                     \
        y##r = _mm512_fmadd_ps(av, b1, y##r);                                                     \
    }
#define STORE_512(r)                                                                              \
    if (acc) {                                                                                    \
        x##r = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c + r * ldc), x##r);                       \
        y##r = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + r * ldc + 16), y##r);                  \
    }                                                                                             \
    _mm512_mask_storeu_ps(c + r * ldc, m0, x##r);                                                 \
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, y##r);
#define KERNEL_512(MR)                                                                            \
    __attribute__((target("avx512f,fma"))) static void k512_##MR(                                 \
        int64_t k, const float *a, int64_t ars, int64_t acs, const float *b, int64_t ldb, float *c, \
        int64_t ldc, int acc, __mmask16 m0, __mmask16 m1) {                                       \
        ROWS_##MR(INIT_512)                                                                       \
        for (int64_t p = 0; p < k; p++) {                                                         \
            const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + p * ldb);                             \
            const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + p * ldb + 16);                        \
            ROWS_##MR(STEP_512)                                                                   \
        }                                                                                         \
        ROWS_##MR(STORE_512)                                                                      \
    }
KERNEL_512(8) KERNEL_512(4) KERNEL_512(2) KERNEL_512(1)

static __mmask16 mask16(int64_t lanes) {
    return lanes >= 16 ? (__mmask16)0xffff : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
}

/* k in blocks of GEMM_KC: each block's sums start from 0 and are then added to C (to C's
 * earlier value as well when accumulating), as BLAS's blocked products do, so a long k is not
 * one long chain of roundings (k = 4096: mean relative error 1.0e-6 as one chain, 3e-7 in
 * blocks, as OpenBLAS's); the blocks are fixed, so the bits still depend on nothing else. A
 * block's panel of B (GEMM_KC rows, 32 columns: 32 KB) stays in L1 while every row block of A
 * passes over it. */
#define GEMM_KC 256

__attribute__((target("avx512f,fma"))) static void gemm512(int64_t m, int64_t n, int64_t k, const float *a,
                                                           int64_t ars, int64_t acs, const float *b, int64_t ldb,
                                                           float *c, int64_t ldc, int acc) {
    for (int64_t p = 0; p < k; p += GEMM_KC) {
        const int64_t kc = k - p < GEMM_KC ? k - p : GEMM_KC;
        const int add = acc || p > 0;
        const float *ap = a + p * acs, *bp = b + p * ldb;
        for (int64_t j = 0; j < n; j += 32) {
            const __mmask16 m0 = mask16(n - j), m1 = mask16(n - j - 16);
            int64_t i = 0;
            for (; i + 8 <= m; i += 8)
                k512_8(kc, ap + i * ars, ars, acs, bp + j, ldb, c + i * ldc + j, ldc, add, m0, m1);
            if (i + 4 <= m) k512_4(kc, ap + i * ars, ars, acs, bp + j, ldb, c + i * ldc + j, ldc, add, m0, m1), i += 4;
            if (i + 2 <= m) k512_2(kc, ap + i * ars, ars, acs, bp + j, ldb, c + i * ldc + j, ldc, add, m0, m1), i += 2;
            if (i < m) k512_1(kc, ap + i * ars, ars, acs, bp + j, ldb, c + i * ldc + j, ldc, add, m0, m1);
        }
    }
}

#endif

#ifdef GEMM_X86
/* C (m, n) = A (m, k) B (n, k)^T [+ C]: rows of A and of B both contiguous along k (a weight
 * gradient: dz (OC, cols) against the columns (K, cols)). A block of 4 rows of A by 4 rows of
 * B keeps 16 sums of 16 lanes each, one lane per k mod 16 (masked at the end of k), each lane
 * one chain of fused multiply-adds in k order; then the lanes are summed in a fixed tree
 * (_mm512_reduce_add_ps) and added to C when accumulating. */
#define DOT_INIT(r) __m512 s##r##0 = _mm512_setzero_ps(), s##r##1 = s##r##0, s##r##2 = s##r##0, s##r##3 = s##r##0;
#define DOT_STEP(r)                                                                               \
    {                                                                                             \
        const __m512 av = _mm512_maskz_loadu_ps(mk, a + r * lda + p);                             \
        s##r##0 = _mm512_fmadd_ps(av, b0, s##r##0);                                               \
        s##r##1 = _mm512_fmadd_ps(av, b1, s##r##1);                                               \
        s##r##2 = _mm512_fmadd_ps(av, b2, s##r##2);                                               \
        s##r##3 = _mm512_fmadd_ps(av, b3, s##r##3);                                               \
    }
#define DOT_PUT(r, q)                                                                             \
    if (q < nc) c[r * ldc + q] = (acc ? c[r * ldc + q] : 0.0f) + _mm512_reduce_add_ps(s##r##q);
#define DOT_STORE(r) DOT_PUT(r, 0) DOT_PUT(r, 1) DOT_PUT(r, 2) DOT_PUT(r, 3)
#define DOT_KERNEL(MR)                                                                            \
    __attribute__((target("avx512f,fma"))) static void d512_##MR(                                 \
        int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb, int64_t nc, float *c, \
        int64_t ldc, int acc) {                                                                   \
        ROWS_##MR(DOT_INIT)                                                                       \
        const float *b0p = b, *b1p = b + (nc > 1 ? ldb : 0), *b2p = b + (nc > 2 ? 2 * ldb : 0),   \
                    *b3p = b + (nc > 3 ? 3 * ldb : 0);                                            \
        for (int64_t p = 0; p < k; p += 16) {                                                     \
            const __mmask16 mk = mask16(k - p);                                                   \
            const __m512 b0 = _mm512_maskz_loadu_ps(mk, b0p + p), b1 = _mm512_maskz_loadu_ps(mk, b1p + p), \
                         b2 = _mm512_maskz_loadu_ps(mk, b2p + p), b3 = _mm512_maskz_loadu_ps(mk, b3p + p); \
            ROWS_##MR(DOT_STEP)                                                                   \
        }                                                                                         \
        ROWS_##MR(DOT_STORE)                                                                      \
    }
DOT_KERNEL(4) DOT_KERNEL(2) DOT_KERNEL(1)

__attribute__((target("avx512f,fma"))) static void gemm512_nt(int64_t m, int64_t n, int64_t k, const float *a,
                                                              int64_t lda, const float *b, int64_t ldb, float *c,
                                                              int64_t ldc, int acc) {
    for (int64_t j = 0; j < n; j += 4) {
        const int64_t nc = n - j < 4 ? n - j : 4;
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) d512_4(k, a + i * lda, lda, b + j * ldb, ldb, nc, c + i * ldc + j, ldc, acc);
        if (i + 2 <= m) d512_2(k, a + i * lda, lda, b + j * ldb, ldb, nc, c + i * ldc + j, ldc, acc), i += 2;
        if (i < m) d512_1(k, a + i * lda, lda, b + j * ldb, ldb, nc, c + i * ldc + j, ldc, acc);
    }
}
#endif

#ifdef GEMM_X86
/* out[q * ldo + c] = in[c * ldi + q] for a 16 x 16 tile: in-register transposition in four
 * rounds of shuffles (pairs of floats, of pairs, then of 128-bit and 256-bit lanes) */
__attribute__((target("avx512f"))) static void transpose16(float *out, int64_t ldo, const float *in, int64_t ldi) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(in + i * ldi);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 16; i += 8)
        for (int q = 0; q < 4; q++) {
            t[i + q] = _mm512_shuffle_f32x4(r[i + q], r[i + 4 + q], 0x88);
            t[i + 4 + q] = _mm512_shuffle_f32x4(r[i + q], r[i + 4 + q], 0xdd);
        }
    for (int q = 0; q < 8; q++) {
        r[q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0x88);
        r[8 + q] = _mm512_shuffle_f32x4(t[q], t[8 + q], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(out + i * ldo, r[i]);
}

/* panel[q * 32 + c] = b[c * ldb + q]: kc of B's rows' k values, for nc <= 32 rows of B, as the
 * (kc, 32) row-major panel of B^T that gemm512's kernels read (columns past nc are not read:
 * the kernels' loads mask them); 16 x 16 tiles transposed in registers, the edges one by one */
__attribute__((target("avx512f"))) static void pack_bt(float *panel, const float *b, int64_t ldb, int64_t kc,
                                                      int64_t nc) {
    const int64_t c16 = nc & ~(int64_t)15, q16 = kc & ~(int64_t)15;
    for (int64_t c = 0; c < c16; c += 16)
        for (int64_t q = 0; q < q16; q += 16) transpose16(panel + q * 32 + c, 32, b + c * ldb + q, ldb);
    for (int64_t c = 0; c < nc; c++)
        for (int64_t q = c < c16 ? q16 : 0; q < kc; q++) panel[q * 32 + c] = b[c * ldb + q];
}

/* C (m, n) = A (m, k) B (n, k)^T [+ C] in gemm512's form: for each block of k (GEMM_KC) and of 32
 * rows of B, that panel of B^T packed on the stack (32 KB, in L1) and every 8-row block of A
 * passed over it, so A is read n / 32 times, not n / 4 as by gemm512_nt's dot form (which
 * reads A from L2 for every 4 rows of B). For many rows of A: the packing costs a pass over B
 * per part, as much as 8 rows of the product. Each element of C is summed as gemm512 sums it
 * (blocks of GEMM_KC, each one chain of fused multiply-adds in k order). */
__attribute__((target("avx512f,fma"))) static void gemm512_ntp(int64_t m, int64_t n, int64_t k, const float *a,
                                                               int64_t lda, const float *b, int64_t ldb, float *c,
                                                               int64_t ldc, int acc) {
    float panel[GEMM_KC * 32] __attribute__((aligned(64)));
    for (int64_t p = 0; p < k; p += GEMM_KC) {
        const int64_t kc = k - p < GEMM_KC ? k - p : GEMM_KC;
        const int add = acc || p > 0;
        const float *ap = a + p;
        for (int64_t j = 0; j < n; j += 32) {
            const int64_t nc = n - j < 32 ? n - j : 32;
            const __mmask16 m0 = mask16(nc), m1 = mask16(nc - 16);
            pack_bt(panel, b + j * ldb + p, ldb, kc, nc);
            int64_t i = 0;
            for (; i + 8 <= m; i += 8) k512_8(kc, ap + i * lda, lda, 1, panel, 32, c + i * ldc + j, ldc, add, m0, m1);
            if (i + 4 <= m) k512_4(kc, ap + i * lda, lda, 1, panel, 32, c + i * ldc + j, ldc, add, m0, m1), i += 4;
            if (i + 2 <= m) k512_2(kc, ap + i * lda, lda, 1, panel, 32, c + i * ldc + j, ldc, add, m0, m1), i += 2;
            if (i < m) k512_1(kc, ap + i * lda, lda, 1, panel, 32, c + i * ldc + j, ldc, add, m0, m1);
        }
    }
}
#endif

/* C (m, n) = A (m, k) B (n, k)^T [+ C]; 0, having done nothing, where these kernels do not run.
 * packed: gemm512_ntp's form (the caller's choice, for the whole product, so that its bits do not
 * depend on how its rows are split over threads) */
static int fma_gemm_nt(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb,
                       float *c, int64_t ldc, int accumulate, int packed) {
#ifdef GEMM_X86
    if (cpu_fma_gemm_path() && packed && n >= 32) {
        gemm512_ntp(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
        return 1;
    }
    if (cpu_fma_gemm_path() && k >= 256) {  /* shorter: the lanes' sums cost more than BLAS */
        gemm512_nt(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
        return 1;
    }
#else
    (void)m; (void)n; (void)k; (void)a; (void)lda; (void)b; (void)ldb; (void)c; (void)ldc; (void)accumulate;
    (void)packed;
#endif
    return 0;
}

/* C (m, n) = A (m, k) B (k, n) [+ C], A's element (i, p) at a[i * ars + p * acs]; 0, having done
 * nothing, where these kernels do not run */
static int fma_gemm(int64_t m, int64_t n, int64_t k, const float *a, int64_t ars, int64_t acs, const float *b,
                    int64_t ldb, float *c, int64_t ldc, int accumulate) {
#ifdef GEMM_X86
    if (cpu_fma_gemm_path() && n >= 32) {  /* fewer: one block of columns, half of it masked: BLAS was faster */
        gemm512(m, n, k, a, ars, acs, b, ldb, c, ldc, accumulate);
        return 1;
    }
#else
    (void)m; (void)n; (void)k; (void)a; (void)ars; (void)acs; (void)b; (void)ldb; (void)c; (void)ldc; (void)accumulate;
#endif
    return 0;
}

void cpu_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
               const float *b, int64_t ldb, float beta, float *c, int64_t ldc, int own) {
    if ((own & CPU_GEMM_OWN) && alpha == 1.0f && (beta == 0.0f || beta == 1.0f)) {
        const int acc = beta != 0.0f;
        if (!ta && tb && fma_gemm_nt(m, n, k, a, lda, b, ldb, c, ldc, acc, (own & CPU_GEMM_PACKED) != 0)) return;
        if (!tb && fma_gemm(m, n, k, a, ta ? 1 : lda, ta ? lda : 1, b, ldb, c, ldc, acc)) return;
    }
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)m,
                (blasint)n, (blasint)k, alpha, a, (blasint)lda, b, (blasint)ldb, beta, c, (blasint)ldc);
}
