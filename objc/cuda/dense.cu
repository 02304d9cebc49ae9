/* dense.cu — the fully connected layer: y = x W^T + b with W stored (out, in) as in PyTorch,
 * inputs of higher rank read row-major as (b, in). Small products run as mpscy's own kernel with
 * the bias and a following ReLU fused (gemm.cu; opt-in: a long K on tensor cores, below); large
 * ones through cuBLASLt, with the bias (and
 * ReLU) in its epilogue where an algorithm exists, else a small kernel. Backward: dW = dz^T x on
 * the side stream with the bias gradient fused (own kernel, BGRADB epilogue or a column sum),
 * and dx = dz W on the main stream, written or accumulated; when x is a fused ReLU's output
 * read by this layer alone, the own kernel applies that ReLU's mask and writes the lower
 * Dense's dz directly, so no separate ReLU backward runs. */
#include <algorithm>

#include "cuda.h"
#include "blas.h"
#include "mma.cuh"

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Opt-in (MPSCY_CUDA_DENSE_MMA=1): the forward product of a long K (in >= DENSE_MMA_MIN_K) and
 * a small output (rows * out <= 65,536) in fp32 on mma.cuh's 3xTF32 tensor-core pipeline, x
 * (rows, in) and W (out, in) both K-contiguous, 32 x 64 tiles, K split over the GPU; block z
 * writes its partial (rows, out) to part[z], and cu_sum_parts adds them in order with the bias
 * and ReLU. One split writes y. On the H200 it took the CNN's 4096 -> 128 product from 16.0 to
 * 6.1 + 2.9 us (step 362.1 -> 358.5 us), but its ~2^-21 relative error per product (fp32's is
 * 2^-24) left a 1024- and a 512-input layer 1.8e-3 and 3.3e-3 from the cpu after Adam steps,
 * over the 1e-4 that the default paths keep; so it is off unless asked for. */
#define DENSE_MMA_MIN_K 512
#define DENSE_MMA_MAX_SPLITS 32

template <bool V>
__global__ void __launch_bounds__(256, 2) dense_mma_forward(float *__restrict__ y, float *__restrict__ part,
                                                            const float *__restrict__ x, const float *__restrict__ w,
                                                            const float *__restrict__ bias, int rows, int out, int in,
                                                            int relu, int chunk) {
    extern __shared__ __align__(16) float mma_smem[];
    cu_pdl_enter();
    const int m0 = blockIdx.y * 32, n0 = blockIdx.x * 64, k0 = blockIdx.z * chunk;
    float acc[8];
    mma_product<2, 4, true, true, V, V>(acc, mma_smem, x, in, m0, rows, w, in, n0, out, k0, min(in, k0 + chunk));
    float *o = part ? part + (size_t)blockIdx.z * rows * out : y;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int r, c;
        mma_pos<2, 4>(e, r, c);
        const int m = m0 + r, n = n0 + c;
        if (m >= rows || n >= out) continue;
        float v = acc[e];
        if (!part) {
            v += bias ? bias[n] : 0.0f;
            v = relu && !(v > 0.0f) ? 0.0f : v;
        }
        o[(size_t)m * out + n] = v;
    }
}

/* K chunks (multiples of MMA_BK, at least 4 steps) for about two blocks per multiprocessor */
static int64_t dense_splits(int64_t tiles, int64_t in, int sms, int64_t *chunk) {
    const int64_t nk = (in + MMA_BK - 1) / MMA_BK;
    int64_t s = std::min({2 * (int64_t)sms / tiles, nk / 4, (int64_t)DENSE_MMA_MAX_SPLITS});
    if (s < 1) s = 1;
    *chunk = (nk + s - 1) / s * MMA_BK;
    return (in + *chunk - 1) / *chunk;
}

int cu_dense_mma_wanted(const cu_graph *g, int64_t rows, int64_t out, int64_t in) {
    return g->dense_mma && cu_own_mma(g) && in >= DENSE_MMA_MIN_K && rows * out <= 65536;
}

/* the split partials in the shared workspace: at most DENSE_MMA_MAX_SPLITS of (batch, out) */
int64_t cu_dense_workspace(const mpscy_plan *p, const mpscy_node *n) {
    const int64_t in = p->nodes[n->in[0]].size, out = n->size;
    if (in < DENSE_MMA_MIN_K || p->batch * out > 65536) return 0;
    return std::min((int64_t)DENSE_MMA_MAX_SPLITS, (in + 4 * MMA_BK - 1) / (4 * MMA_BK)) * p->batch * out;
}

static int dense_mma(cu_graph *g, float *y, const float *x, const float *w, const float *bias, int64_t b, int64_t in,
                     int64_t out, int relu, char *err, size_t en) {
    const int64_t tn = (out + 63) / 64, tm = (b + 31) / 32;
    int64_t chunk, s = dense_splits(((g->plan.batch + 31) / 32) * tn, in, g->dev->sms, &chunk);
    float *part = s > 1 ? g->ws : NULL;  /* s <= cu_dense_workspace's splits: same rule, built batch */
    const bool v = in % 4 == 0 && aligned16(x) && aligned16(w);
    void (*k)(float *, float *, const float *, const float *, const float *, int, int, int, int, int) =
        v ? dense_mma_forward<true> : dense_mma_forward<false>;
    CU_TRY(mma_launch(g, g->stream, k, dim3((unsigned)tn, (unsigned)tm, (unsigned)s), mma_smem_bytes<2, 4, true, true>(),
                      y, part, x, w, bias, (int)b, (int)out, (int)in, relu, (int)chunk),
           "dense_mma_forward");
    int st = CU_LAUNCHED("dense_mma_forward");
    if (st != MPSCY_OK || !part) return st;
    CU_TRY(cu_launch(g, cu_sum_parts, cu_blocks(b * out, 32, 4096), CU_THREADS, g->stream, y, (const float *)part,
                     b * out, s, bias, out, relu),
           "dense_sum");
    return CU_LAUNCHED("dense_sum");
}

int cu_dense_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    int64_t in = src->size, out = n->size;
    float *y = g->y[cu_node_index(g, n)];                  // (b, out)
    const float *x = g->y[n->in[0]];                       // (b, in)
    const float *w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0); // (out, in)
    float *bias = cu_tensor(g, n, MPSCY_ROLE_PARAM, 1);    // (out) or NULL
    int relu = (g->fuse[cu_node_index(g, n)] & CU_FUSE_RELU) != 0;
    const int64_t B = g->plan.batch;  /* decisions by the built batch: the same at every batch size */
    if (cu_dense_mma_wanted(g, B, out, in)) return dense_mma(g, y, x, w, bias, b, in, out, relu, err, en);
    if (cu_gemm_small_wanted(g, B, out, in)) {
        /* C (b, out) = x (b, in) . W^T: A(m, k) = x[m in + k], B(k, n) = W[n in + k] */
        cu_small_gemm q = {y, x, w, b, out, in, in, 1, 1, in, out, bias, relu, NULL, 0, NULL};
        return cu_gemm_small(g, g->stream, &q, err, en);
    }
    /* row-major (rows, cols) tensors are column-major (cols x rows) with ld = cols */
    cu_gemm q = {1, 0, out, b, in, w, in, x, in, y, out, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    if (bias && aligned16(bias)) {
        q.epilogue = relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
        q.bias = bias;
    } else if (relu && !bias) {
        q.epilogue = CUBLASLT_EPILOGUE_RELU;
    }
    int st = cu_gemm_run(g, &q, 0, err, en);
    if (st == MPSCY_OK && q.epilogue != CUBLASLT_EPILOGUE_DEFAULT) return MPSCY_OK;
    if (st == MPSCY_UNSUPPORTED) {
        q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        q.bias = NULL;
        st = cu_gemm_run(g, &q, 0, err, en);
    }
    if (st != MPSCY_OK) return st;
    if (!bias && !relu) return MPSCY_OK;
    return cu_bias_act_forward(g, g->stream, y, bias, b, out, relu, err, en);
}

/* When this Dense reads a ReLU fused into the Dense below it and is that ReLU's only reader,
 * the Dense below's index (its dz is then written here, masked), else -1. */
static int32_t masked_target(const cu_graph *g, const mpscy_node *n) {
    const mpscy_plan *p = &g->plan;
    int32_t j = n->in[0];
    const mpscy_node *r = &p->nodes[j];
    if (r->kind != MPSCY_LAYER_RELU || !(g->fuse[j] & CU_SKIP) || r->consumers != 1 || j == p->output ||
        n->accum[0])
        return -1;
    int32_t k = r->in[0];
    return (g->fuse[k] & CU_FUSE_RELU) && g->dy[k] ? k : -1;
}

int cu_dense_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t i = cu_node_index(g, n);
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    int64_t in = src->size, out = n->size;
    const float *x = g->y[n->in[0]];                       // (b, in)
    const float *w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0); // (out, in)
    float *dw = cu_tensor_grad(g, n, 0);                   // (out, in)
    float *db = cu_tensor_grad(g, n, 1);                   // (out) or NULL
    float *dz = g->dy[i];                                  // (b, out): d(pre-activation)
    float *dx = g->dy[n->in[0]];                           // (b, in) or NULL
    int st, db_done = !db;
    if ((g->fuse[i] & CU_FUSE_RELU) && !g->dz_ready[i]) {
        /* the fused ReLU's backward: dz = dy_relu * (y_relu > 0), and db in the same pass */
        int32_t j = -1;
        for (int32_t k = (int32_t)i + 1; k < g->plan.n_nodes && j < 0; k++)
            if (g->plan.nodes[k].kind == MPSCY_LAYER_RELU && g->plan.nodes[k].in[0] == i) j = k;
        if ((st = cu_bias_act_backward(g, g->stream, dz, db, g->dy[j], g->y[j], b, out, err, en)) != MPSCY_OK)
            return st;
        db_done = 1;
    }
    if ((st = cu_fork(g, err, en)) != MPSCY_OK) return st;
    const int64_t B = g->plan.batch;  /* decisions by the built batch, as planned in graph.cu */
    if (cu_gemm_small_wanted(g, out, in, B)) {
        /* dW (out, in) = dz^T x: A(m, k) = dz[k out + m], B(k, n) = x[k in + n]; db = rows of A */
        cu_small_gemm q = {dw, dz, x, out, in, b, 1, out, in, 1, in, NULL, 0, NULL, 0, db_done ? NULL : db};
        if ((st = cu_gemm_small(g, g->side, &q, err, en)) != MPSCY_OK) return st;
    } else {
        /* dW (in x out, col-major) = x (in x b) * dz^T (b x out); BGRADB sums dz over the batch */
        cu_gemm q = {0, 1, in, out, b, x, in, dz, out, dw, in, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
        int dw_done = 0;
        if (!db_done && aligned16(db)) {
            q.epilogue = CUBLASLT_EPILOGUE_BGRADB;
            q.bias = db;
            st = cu_gemm_run(g, &q, 1, err, en);
            if (st == MPSCY_OK) db_done = dw_done = 1;
            else if (st != MPSCY_UNSUPPORTED) return st;
            q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
            q.bias = NULL;
        }
        if (!dw_done && (st = cu_gemm_run(g, &q, 1, err, en)) != MPSCY_OK) return st;
        if (!db_done && (st = cu_bias_act_backward(g, g->side, NULL, db, dz, NULL, b, out, err, en)) != MPSCY_OK)
            return st;
    }
    if (!dx) return MPSCY_OK;
    if (cu_gemm_small_wanted(g, B, in, out)) {
        /* dx (b, in) = dz W: A(m, k) = dz[m out + k], B(k, n) = W[k in + n] */
        int32_t k = masked_target(g, n);
        cu_small_gemm q = {dx, dz, w, b, in, out, out, 1, in, 1, in, NULL, 0, NULL, n->accum[0], NULL};
        if (k >= 0) {
            q.c = g->dy[k];               /* the Dense below's dz, with its ReLU's mask */
            q.mask = g->y[n->in[0]];
            g->dz_ready[k] = 1;
        }
        return cu_gemm_small(g, g->stream, &q, err, en);
    }
    /* dx (in x b) = W (in x out) * dz (out x b) */
    cu_gemm d = {0, 0, in, b, out, w, in, dz, out, dx, in, n->accum[0] ? 1.0f : 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    return cu_gemm_run(g, &d, 0, err, en);
}
