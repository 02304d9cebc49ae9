/* dense.cu — the fully connected layer: y = x W^T + b with W stored (out, in) as in PyTorch,
 * inputs of higher rank read row-major as (b, in). Small products run as mpscy's own kernel with
 * the bias and a following ReLU fused (gemm.cu); large ones through cuBLASLt, with the bias (and
 * ReLU) in its epilogue where an algorithm exists, else a small kernel. Backward: dW = dz^T x on
 * the side stream with the bias gradient fused (own kernel, BGRADB epilogue or a column sum),
 * and dx = dz W on the main stream, written or accumulated; when x is a fused ReLU's output
 * read by this layer alone (or that output through one Dropout), the own kernel applies the
 * Dropout's multipliers and the ReLU's mask and writes the lower Dense's dz directly, so no
 * separate Dropout or ReLU backward runs. In fp32 on sm_80 and newer, a forward with a long K
 * (>= 1024) and a small output, and a plain dx with a short K and a large output, run as conv.cu's
 * 3xTF32 tensor-core product instead (mma.cuh; dense_mma_fits, dense_mma_dx_fits below); an
 * output Dense under cross-entropy may run with the loss (head.cu). */
#include <algorithm>

#include "cuda.h"
#include "blas.h"
#include "mma.cuh"

/* ---- the forward with a long K and a small output: y (b, out) = x W^T as mma.cuh's 3xTF32
 * product split over K, then conv.cu's cu_sum_parts adds the partials in order with the bias
 * and the fused ReLU. Measured before (H200, the README CNN's 4096 -> 128 at batch
 * 64): 13.2 us in the step's timeline as the small-GEMM kernel's 2x2 FMA tiles. */

#define DENSE_MMA_MIN_K 1024     /* K from which a Dense forward with a small output takes it */
#define DENSE_MMA_STEPS 4        /* MMA_BK steps a block takes, at least (README CNN, H200: 2 read the
                                    same, 8 3.5-4 us slower a step) */

/* the product's tile sides: 64 or 32 rows of x, 64 or 32 units */
static int dense_tm(int64_t b) { return b > 32 ? 4 : 2; }
static int dense_tn(int64_t out) { return out > 32 ? 4 : 2; }

/* K chunks of a (b, out) product over K = in: about two blocks per multiprocessor, each chunk at
 * least DENSE_MMA_STEPS steps; by the built batch, so every batch size splits alike */
static int64_t dense_mma_splits(int64_t b, int64_t out, int64_t in, int sms, int64_t *chunk) {
    const int64_t tiles = ((b + 16 * dense_tm(b) - 1) / (16 * dense_tm(b))) *
                          ((out + 16 * dense_tn(out) - 1) / (16 * dense_tn(out)));
    const int64_t nk = (in + MMA_BK - 1) / MMA_BK;
    int64_t s = std::min(2 * (int64_t)sms / tiles, nk / DENSE_MMA_STEPS);
    if (s < 1) s = 1;
    *chunk = (nk + s - 1) / s * MMA_BK;
    return (in + *chunk - 1) / *chunk;
}

/* a product large enough for it (smaller ones stay fp32 FMA: under Adam, 3xTF32's ~2^-21 rounding
 * of a 1500 -> 5 layer ended 1.17e-4 from the cpu against the 1e-4 contract), whose rows index
 * within int32 */
static bool dense_mma_big(int64_t b, int64_t out, int64_t in) {
    return (double)b * out * in >= (double)(1 << 22) && b <= INT32_MAX / in;
}

static bool dense_mma_shape(int64_t b, int64_t out, int64_t in) {
    return in >= DENSE_MMA_MIN_K && b * out <= 65536 && dense_mma_big(b, out, in);
}

static bool dense_mma_fits(const cu_graph *gr, int64_t b, int64_t out, int64_t in) {
    return gr->dense_mma && cu_mma_own(gr) && dense_mma_shape(b, out, in);
}

static int64_t dense_mma_workspace(int64_t b, int64_t out, int64_t in) {
    /* dense_mma_splits's largest result (one chunk per DENSE_MMA_STEPS steps), or 0: not this shape */
    return dense_mma_shape(b, out, in) ? std::max<int64_t>(1, (in + MMA_BK - 1) / MMA_BK / DENSE_MMA_STEPS) * b * out : 0;
}

static int dense_mma_forward(cu_graph *gr, float *y, const float *x, const float *w, const float *bias, int64_t b,
                         int64_t out, int64_t in, int relu, char *err, size_t en) {
    int64_t chunk, splits = dense_mma_splits(gr->plan.batch, out, in, gr->dev->sms, &chunk);
    if (splits * b * out > gr->ws_floats)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "Dense workspace too small (%lld floats wanted)",
                          (long long)(splits * b * out));
    int bytes;
    /* A = x (b, in), B = W (out, in), both K-contiguous; 16-byte copies when rows and bases allow */
    const int tm = dense_tm(gr->plan.batch), tn = dense_tn(out);
    mma_fn k = mma_kk_kind(tm == 4, tn == 4, in % 4 == 0 && cu_aligned16(x) && cu_aligned16(w), &bytes);
    dim3 grid((unsigned)((out + 16 * tn - 1) / (16 * tn)), (unsigned)((b + 16 * tm - 1) / (16 * tm)), (unsigned)splits);
    float *part = gr->ws;
    CU_TRY(mma_launch(gr, gr->stream, k, grid, bytes, part, out, b * out, x, in, w, in, (int)b, (int)out, in, chunk),
           "dense_mma");
    int st = CU_LAUNCHED("dense_mma");
    if (st != MPSCY_OK) return st;
    CU_TRY(cu_sum_parts(gr, gr->stream, y, part, b * out, splits, bias, out, relu), "dense_mma sum");
    return CU_LAUNCHED("dense_mma sum");
}

/* ---- dx (b, in) = dz (b, out) W with a short K (out) and a large output, written plain (no
 * accumulation, no mask: cu_dense_backward decides), as the same product: A =
 * dz K-contiguous, B = W read as (in, out) row-contiguous. Measured before (H200, the README
 * CNN's 4096 -> 128 at batch 64): 11.2 us in the step's timeline as cuBLASLt's fp32 kernel. */
static mma_fn dx_kind(bool va, bool vb, int *bytes) {
    static const mma_fn kinds[2][2] = {
        {conv_mma_kernel<2, 4, true, false, false, false>, conv_mma_kernel<2, 4, true, false, false, true>},
        {conv_mma_kernel<2, 4, true, false, true, false>, conv_mma_kernel<2, 4, true, false, true, true>}};
    *bytes = mma_smem_bytes<2, 4, true, false>();
    return kinds[va][vb];
}

static bool dense_mma_dx_fits(const cu_graph *gr, int64_t b, int64_t out, int64_t in) {
    /* a block row per 32 rows of x: a grid's y is at most 65,535 */
    return gr->dense_mma && cu_mma_own(gr) && out <= 256 && b * in >= 65536 && b <= 32 * 65535 &&
           dense_mma_big(b, out, in);
}

static int dense_mma_dx(cu_graph *gr, float *dx, const float *dz, const float *w, int64_t b, int64_t out, int64_t in,
                    char *err, size_t en) {
    int bytes;
    mma_fn k = dx_kind(out % 4 == 0 && cu_aligned16(dz), in % 4 == 0 && cu_aligned16(w), &bytes);
    dim3 grid((unsigned)((in + 63) / 64), (unsigned)((b + 31) / 32), 1);
    CU_TRY(mma_launch(gr, gr->stream, k, grid, bytes, dx, in, (int64_t)0, dz, out, w, in, (int)b, (int)in, out, out),
           "dense_mma_dx");
    return CU_LAUNCHED("dense_mma_dx");
}

int64_t cu_dense_workspace(const mpscy_plan *p, const mpscy_node *n) {
    return dense_mma_workspace(p->batch, n->size, p->nodes[n->in[0]].size);
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
    if (dense_mma_fits(g, B, out, in))  /* fp32, a long K and a small output */
        return dense_mma_forward(g, y, x, w, bias, b, out, in, relu, err, en);
    if (cu_gemm_small_wanted(g, B, out, in)) {
        /* C (b, out) = x (b, in) . W^T: A(m, k) = x[m in + k], B(k, n) = W[n in + k] */
        cu_small_gemm q = {y, x, w, b, out, in, in, 1, 1, in, out, bias, relu, NULL, 0, NULL};
        return cu_gemm_small(g, g->stream, &q, err, en);
    }
    /* row-major (rows, cols) tensors are column-major (cols x rows) with ld = cols */
    cu_gemm q = {1, 0, out, b, in, w, in, x, in, y, out, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    if (bias && cu_aligned16(bias)) {
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
 * directly or through one Dropout (train mode's multipliers; the Dropout read by this layer
 * alone, the ReLU by the Dropout alone), the Dense below's index (its dz is then written here:
 * times the Dropout's multipliers, then masked), else -1. *drop: the Dropout's index, or -1. */
static int32_t masked_target(const cu_graph *g, const mpscy_node *n, int32_t *drop) {
    const mpscy_plan *p = &g->plan;
    *drop = -1;
    int32_t j = n->in[0];
    if (n->accum[0]) return -1;
    if (p->nodes[j].kind == MPSCY_LAYER_DROPOUT) {
        const mpscy_node *d = &p->nodes[j];
        if (d->consumers != 1 || j == p->output || d->accum[0] || !g->dy[j]) return -1;
        *drop = j;
        j = d->in[0];
    }
    return cu_relu_product(g, j);
}

/* Where the Dense n's dx goes, for a kernel that applies the epilogue: the lower Dense's dz,
 * zeroed where its ReLU's output is not positive and times the Dropout's multipliers between
 * them (masked_target; their backward is then marked done for this capture), else d(input)
 * plain. */
void cu_dense_dx_target(cu_graph *g, const mpscy_node *n, cu_dx_target *t) {
    int32_t drop, k = masked_target(g, n, &drop);
    t->dx = g->dy[n->in[0]];
    t->mask = t->scale = NULL;
    if (k < 0) return;
    t->dx = g->dy[k];
    t->mask = g->y[drop >= 0 ? g->plan.nodes[drop].in[0] : n->in[0]];  /* the ReLU's output */
    g->dz_ready[k] = 1;
    if (drop >= 0) {  /* the Dropout's backward, done by that kernel */
        t->scale = g->save + g->plan.nodes[drop].save;
        g->dz_ready[drop] = 1;
    }
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
    const int64_t B = g->plan.batch;  /* decisions by the built batch, as planned in graph.cu */
    int32_t drop;
    const bool mma_dx = dx && !n->accum[0] && masked_target(g, n, &drop) < 0 && dense_mma_dx_fits(g, B, out, in);
    if (mma_dx && g->dx_first) {
        /* the side stream's dW may start with dx, but dx's product is enqueued (and in the graph
         * ordered) before it, so that its blocks are not queued behind dW's */
        if ((st = cu_fork_mark(g, err, en)) != MPSCY_OK ||
            (st = dense_mma_dx(g, dx, dz, w, b, out, in, err, en)) != MPSCY_OK ||
            (st = cu_fork_follow(g, g->side, err, en)) != MPSCY_OK)
            return st;
    } else if ((st = cu_fork(g, g->side, err, en)) != MPSCY_OK) {
        return st;
    }
    if (cu_gemm_small_wanted(g, out, in, B)) {
        /* dW (out, in) = dz^T x: A(m, k) = dz[k out + m], B(k, n) = x[k in + n]; db = rows of A */
        cu_small_gemm q = {dw, dz, x, out, in, b, 1, out, in, 1, in, NULL, 0, NULL, 0, db_done ? NULL : db};
        if ((st = cu_gemm_small(g, g->side, &q, err, en)) != MPSCY_OK) return st;
    } else {
        /* dW (in x out, col-major) = x (in x b) * dz^T (b x out); BGRADB sums dz over the batch */
        cu_gemm q = {0, 1, in, out, b, x, in, dz, out, dw, in, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
        int dw_done = 0;
        if (!db_done && cu_aligned16(db)) {
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
    if (!dx || (mma_dx && g->dx_first)) return MPSCY_OK;
    if (mma_dx) return dense_mma_dx(g, dx, dz, w, b, out, in, err, en);  /* fp32, plain dx */
    if (cu_gemm_small_wanted(g, B, in, out)) {
        /* dx (b, in) = dz W: A(m, k) = dz[m out + k], B(k, n) = W[k in + n] */
        cu_dx_target t;
        cu_dense_dx_target(g, n, &t);
        cu_small_gemm q = {t.dx, dz, w, b, in, out, out, 1, in, 1, in, NULL, 0, t.mask, n->accum[0], NULL, t.scale};
        return cu_gemm_small(g, g->stream, &q, err, en);
    }
    /* dx (in x b) = W (in x out) * dz (out x b) */
    cu_gemm d = {0, 0, in, b, out, w, in, dz, out, dx, in, n->accum[0] ? 1.0f : 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    return cu_gemm_run(g, &d, 0, err, en);
}
