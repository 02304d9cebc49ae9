/* gemm.cu — mpscy's own matrix product for the small GEMMs of a training step, where a library
 * call would cost several kernels (split-K, reduction, epilogue) of a few microseconds each:
 * one kernel per product, with the Dense epilogues fused — bias and ReLU (forward), the ReLU
 * mask of the layer below and accumulation (dX), the bias gradient as row sums of dz (dW) — and
 * a deterministic split over K (each split writes its partial tile; the last block of a tile
 * adds them in a fixed order). TF32 graphs round the operands to TF32 as tensor cores do.
 * Large products go to cuBLASLt (blas.cu); cu_gemm_small decides. */
#include "cuda.h"

#include <stdlib.h>
#include <string.h>

#define BM 32
#define BN 32
#define KC 128             /* K per load round: a whole slice is loaded at once, one latency */
#define MAX_SPLITS 256     /* blocks along K; beyond that each block takes several slices */

struct sg_args {
    float *c;                  // (M, N) row-major, ldc
    const float *a, *b;        // A(m, k) = a[m * am + k * ak], B(k, n) = b[k * bk + n * bn]
    int64_t m, n, k, am, ak, bk, bn, ldc;
    const float *bias;         // (N) added before relu, or NULL
    const float *mask;         // (M, N) with ldc: the result is zeroed where mask <= 0, or NULL
    const float *scale;        // (M, N) with ldc: the result is multiplied by it first, or NULL
    float *rowsum;             // (M): sum over k of A(m, k), or NULL
    float *part;               // (S, M, N) then (S, M) partials when S > 1
    unsigned int *count;       // one per tile when S > 1
    int64_t kchunk;            // K per block (a multiple of KC)
    int relu, accum, tf32;
};

static __device__ __forceinline__ float tf32_round(float x) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
}

static __device__ __forceinline__ float epilogue(const sg_args &p, int64_t m, int64_t n, float v) {
    if (p.bias) v += p.bias[n];
    if (p.relu) v = mpscy_relu(v);
    if (p.scale) v *= p.scale[m * p.ldc + n];
    if (p.mask && mpscy_relu_zeroes(p.mask[m * p.ldc + n])) v = 0.0f;
    if (p.accum) v += p.c[m * p.ldc + n];
    return v;
}

/* A 32 x 32 tile of C over one K slice of at most KC: every load of the slice is issued before
 * the one barrier, so a block waits for memory once; each thread then owns a 2 x 2 micro-tile. */
__global__ void __launch_bounds__(256) gemm_small(sg_args p) {
    __shared__ float As[KC][BM + 1];
    __shared__ float Bs[KC][BN + 1];
    __shared__ bool last;
    cu_pdl_enter();
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int64_t m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
    const int64_t kb0 = (int64_t)blockIdx.z * p.kchunk, kb1 = min(p.k, kb0 + p.kchunk);
    const bool a_kfast = p.ak == 1, b_nfast = p.bn == 1;
    const bool want_rows = p.rowsum && blockIdx.x == 0;
    float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    float rs = 0.0f;
    for (int64_t k0 = kb0; k0 < kb1; k0 += KC) {
        const int kn = (int)min((int64_t)KC, kb1 - k0);
        /* all loads of the slice first, into registers (independent, so one memory latency),
         * then into shared memory; tiles stay unrounded so the row sums are exact */
        float ra[KC * BM / 256], rb[KC * BN / 256];
#pragma unroll
        for (int r = 0; r < KC * BM / 256; r++) {
            int e = tid + 256 * r, mm = a_kfast ? e / KC : e % BM, kk = a_kfast ? e % KC : e / BM;
            int64_t gm = m0 + mm;
            ra[r] = gm < p.m && kk < kn ? __ldg(&p.a[gm * p.am + (k0 + kk) * p.ak]) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < KC * BN / 256; r++) {
            int e = tid + 256 * r, nn = b_nfast ? e % BN : e / KC, kk = b_nfast ? e / BN : e % KC;
            int64_t gn = n0 + nn;
            rb[r] = gn < p.n && kk < kn ? __ldg(&p.b[(k0 + kk) * p.bk + gn * p.bn]) : 0.0f;
        }
        if (k0 > kb0) __syncthreads();  /* the previous slice is fully consumed */
#pragma unroll
        for (int r = 0; r < KC * BM / 256; r++) {
            int e = tid + 256 * r, mm = a_kfast ? e / KC : e % BM, kk = a_kfast ? e % KC : e / BM;
            As[kk][mm] = ra[r];
        }
#pragma unroll
        for (int r = 0; r < KC * BN / 256; r++) {
            int e = tid + 256 * r, nn = b_nfast ? e % BN : e / KC, kk = b_nfast ? e / BN : e % KC;
            Bs[kk][nn] = rb[r];
        }
        __syncthreads();
        if (want_rows && tid < BM)
            for (int kk = 0; kk < kn; kk++) rs += As[kk][tid];
        if (p.tf32) {
            for (int kk = 0; kk < kn; kk++) {
                float a0 = tf32_round(As[kk][ty]), a1 = tf32_round(As[kk][ty + 16]);
                float b0 = tf32_round(Bs[kk][tx]), b1 = tf32_round(Bs[kk][tx + 16]);
                acc[0][0] = fmaf(a0, b0, acc[0][0]);
                acc[0][1] = fmaf(a0, b1, acc[0][1]);
                acc[1][0] = fmaf(a1, b0, acc[1][0]);
                acc[1][1] = fmaf(a1, b1, acc[1][1]);
            }
        } else {
#pragma unroll 8
            for (int kk = 0; kk < kn; kk++) {
                float a0 = As[kk][ty], a1 = As[kk][ty + 16], b0 = Bs[kk][tx], b1 = Bs[kk][tx + 16];
                acc[0][0] = fmaf(a0, b0, acc[0][0]);
                acc[0][1] = fmaf(a0, b1, acc[0][1]);
                acc[1][0] = fmaf(a1, b0, acc[1][0]);
                acc[1][1] = fmaf(a1, b1, acc[1][1]);
            }
        }
    }
    if (gridDim.z == 1) {
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
                if (m < p.m && n < p.n) p.c[m * p.ldc + n] = epilogue(p, m, n, acc[i][j]);
            }
        if (want_rows && tid < BM && m0 + tid < p.m) p.rowsum[m0 + tid] = rs;
        return;
    }
    /* split K: store this slice's partial tile; the last block of the tile finishes it */
    const int64_t mn = p.m * p.n;
    float *part = p.part + blockIdx.z * mn;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < p.m && n < p.n) part[m * p.n + n] = acc[i][j];
        }
    float *rpart = p.part + gridDim.z * mn;
    if (want_rows && tid < BM && m0 + tid < p.m) rpart[blockIdx.z * p.m + m0 + tid] = rs;
    __threadfence();
    __syncthreads();
    unsigned int *cnt = p.count + blockIdx.y * gridDim.x + blockIdx.x;
    if (tid == 0) last = atomicAdd(cnt, 1u) == gridDim.z - 1;
    __syncthreads();
    if (!last) return;
    /* the other slices' partials are in L2 (written before their atomic): __ldcg skips L1, and
     * unlike volatile lets loads be in flight together. The thread's four outputs take their
     * partials eight slices at a time, all 32 loads issued before the first add (a loop of
     * dependent loads left one block per tile waiting ~S latencies: a long tail on few SMs);
     * each output still adds its slices in order 0 .. S - 1 */
    bool ok[4];
    int64_t at[4];
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int64_t m = m0 + ty + 16 * (e >> 1), n = n0 + tx + 16 * (e & 1);
        ok[e] = m < p.m && n < p.n;
        at[e] = ok[e] ? m * p.n + n : 0;
    }
    const unsigned S = gridDim.z;
    unsigned s = 0;
    for (; s + 8 <= S; s += 8) {
        float r[4][8];
#pragma unroll
        for (int e = 0; e < 4; e++)
#pragma unroll
            for (int q = 0; q < 8; q++) r[e][q] = __ldcg(&p.part[(s + q) * mn + at[e]]);
#pragma unroll
        for (int e = 0; e < 4; e++)
#pragma unroll
            for (int q = 0; q < 8; q++) v[e] += r[e][q];
    }
    for (; s < S; s++)
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] += __ldcg(&p.part[s * mn + at[e]]);
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int64_t m = m0 + ty + 16 * (e >> 1), n = n0 + tx + 16 * (e & 1);
        if (ok[e]) p.c[m * p.ldc + n] = epilogue(p, m, n, v[e]);
    }
    if (want_rows && tid < BM && m0 + tid < p.m) {
        float v = 0.0f;
        for (unsigned s = 0; s < gridDim.z; s++) v += __ldcg(&rpart[s * p.m + m0 + tid]);
        p.rowsum[m0 + tid] = v;
    }
    if (tid == 0) *cnt = 0;
}

/* Own kernel for small products, and for any product with a small output (its K is split over
 * blocks: a library kernel there often runs one tile down the whole K). Measured on the H100 (the
 * CNN's 4096 -> 128 Dense at batch 64, 2^25 multiply-adds each): the forward product (8,192
 * outputs, K 4,096) 16.2 us here against 31.3 in cuBLASLt; its weight and input gradients
 * (524,288 and 262,144 outputs, K 64 and 128) 13.5 and 10.2 us here against 6.2 and 7.1. */
int cu_gemm_small_wanted(const cu_graph *g, int64_t m, int64_t n, int64_t k) {
    if (g->gemm_mode != 2) return g->gemm_mode;
    return (double)m * (double)n * (double)k < (double)(1 << 24) || (double)m * (double)n <= 65536.0;
}

static int64_t splits(int64_t k, int64_t *kchunk) {
    int64_t slices = (k + KC - 1) / KC, s = slices < MAX_SPLITS ? slices : MAX_SPLITS;
    if (s < 1) s = 1;
    *kchunk = (slices + s - 1) / s * KC;
    return (k + *kchunk - 1) / *kchunk;
}

/* Floats (and tile counters) a product's split-K partials need: K is cut in slices of KC. */
void cu_gemm_small_need(int sms, int64_t m, int64_t n, int64_t k, int rows, int64_t *floats, int64_t *counters) {
    (void)sms;
    int64_t tiles = ((m + BM - 1) / BM) * ((n + BN - 1) / BN), kchunk, s = splits(k, &kchunk);
    *floats = s > 1 ? s * (m * n + (rows ? m : 0)) : 0;
    *counters = s > 1 ? tiles : 0;
}

int cu_gemm_small(cu_graph *g, cudaStream_t st, const cu_small_gemm *q, char *err, size_t en) {
    sg_args p;
    memset(&p, 0, sizeof p);
    p.c = q->c; p.a = q->a; p.b = q->b;
    p.m = q->m; p.n = q->n; p.k = q->k;
    p.am = q->am; p.ak = q->ak; p.bk = q->bk; p.bn = q->bn; p.ldc = q->ldc;
    p.bias = q->bias; p.mask = q->mask; p.scale = q->scale; p.rowsum = q->rowsum;
    p.relu = q->relu; p.accum = q->accum; p.tf32 = g->plan.precision == MPSCY_PRECISION_TF32;
    int64_t tm = (q->m + BM - 1) / BM, tn = (q->n + BN - 1) / BN, s = splits(q->k, &p.kchunk);
    if (s > 1) {
        int64_t floats = s * (q->m * q->n + (q->rowsum ? q->m : 0));
        if (floats > g->gws_floats - g->gws_used || tm * tn > g->gcount_n - g->gcount_used)
            return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "small GEMM workspace exhausted (%lld floats wanted)",
                              (long long)floats);
        p.part = g->gws + g->gws_used;
        g->gws_used += floats;
        p.count = g->gcount + g->gcount_used;
        g->gcount_used += tm * tn;
    }
    /* a block row of the grid per 32 rows of C, and a grid's y is at most 65,535: past 2M rows,
     * one launch per 65,535 block rows, each the product of its rows of A and C alone (its own
     * share of the partials and counters) */
    const int64_t most = 65535 * (int64_t)BM;
    for (int64_t r0 = 0; r0 < q->m; r0 += most) {
        sg_args c = p;
        c.m = std::min(most, q->m - r0);
        c.a = p.a + r0 * p.am;
        c.c = p.c + r0 * p.ldc;
        if (p.mask) c.mask = p.mask + r0 * p.ldc;
        if (p.scale) c.scale = p.scale + r0 * p.ldc;
        if (p.rowsum) c.rowsum = p.rowsum + r0;
        if (s > 1) {
            c.part = p.part + s * (r0 * q->n + (q->rowsum ? r0 : 0));
            c.count = p.count + r0 / BM * tn;
        }
        dim3 grid((unsigned)tn, (unsigned)((c.m + BM - 1) / BM), (unsigned)s);
        CU_TRY(cu_launch(g, gemm_small, grid, dim3(256), st, c), "gemm_small");
        int lst = CU_LAUNCHED("gemm_small");
        if (lst != MPSCY_OK) return lst;
    }
    return MPSCY_OK;
}
