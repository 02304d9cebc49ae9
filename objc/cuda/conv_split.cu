/* conv_split.cu — a Conv2D whose input, output or im2col columns reach 2^31 - 1 elements at the
 * built batch (conv.cu's kernels index in 32 bits) runs over sub-batches of samples, each under
 * that and with its columns within CONV_SPLIT_FLOATS (1 GiB) where one sample's are less:
 * forward im2col, cuBLASLt's product and conv.cu's output scatter; backward conv.cu's dz pass,
 * the columns again, dW added up over the sub-batches (cuBLASLt's beta), dcol and col2im. All on
 * the main stream, in the shared workspace, nothing kept from forward to backward; the bias
 * gradient's chunk sums of every sub-batch in the convolution's slab, added in one ordered sum.
 * $MPSCY_CUDA_CONV_SPLIT=N splits every convolution, or with $MPSCY_CUDA_CONV_SPLIT_ONLY=k only
 * the k-th (testing). */
#include <algorithm>

#include "cuda.h"
#include "blas.h"

typedef mpscy_conv_geom conv_geom;

#define CONV_SPLIT_FLOATS ((int64_t)1 << 28)

int64_t cu_conv_split(const cu_graph *gr, const mpscy_node *n) {
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const int64_t lim = INT32_MAX, out = g.oc * g.ohw, in = g.c * g.h * g.w, cols = g.k * g.ohw;
    const int64_t most = std::max({out, in, cols});
    int64_t s = 0;  /* every tensor under lim at the built batch */
    if (most > (lim - 1) / gr->plan.batch) {
        if (most >= lim) return -1;  /* one sample's tensors or columns: no sub-batch fits */
        s = std::max<int64_t>(1, std::min((lim - 1) / most, CONV_SPLIT_FLOATS / std::max(cols, out)));
    }
    if (gr->conv_split <= 0) return s;
    if (gr->conv_split_only >= 0) {  /* this convolution's index among them */
        int index = 0;
        for (const mpscy_node *m = gr->plan.nodes; m < n; m++) index += m->kind == MPSCY_LAYER_CONV2D;
        if (index != gr->conv_split_only) return s;
    }
    const int64_t knob = std::min<int64_t>(gr->conv_split, gr->plan.batch);  /* sizes the workspace: no more */
    return s ? std::min(s, knob) : knob;
}

/* the shared workspace: dz or the forward's result (OC, s*OHW), then the columns and dcol
 * (K, s*OHW) each */
int64_t cu_conv_split_workspace(const cu_graph *gr, const mpscy_node *n) {
    const int64_t s = cu_conv_split(gr, n);
    if (s <= 0) return 0;
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    return cu_round4(g.oc * s * g.ohw) + 2 * cu_round4(g.k * s * g.ohw);
}

/* conv_dz's chunk sums of b samples taken s at a time: each sub-batch's rows follow the last
 * one's, so that one ordered sum adds them all */
static int64_t split_rows(int64_t b, int64_t s, int64_t ohw) {
    return b / s * cu_dz_chunks(s * ohw) + cu_dz_chunks(b % s * ohw);
}

int64_t cu_conv_split_columns(const cu_graph *gr, const mpscy_node *n, int64_t s) {
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    return cu_round4(split_rows(gr->plan.batch, s, g.ohw) * g.oc);
}

int cu_conv_split_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int64_t s, char *err, size_t en) {
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const int64_t i = cu_node_index(gr, n);
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);    // (OC, kg)
    const float *bias = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1); // (OC) or NULL
    const int relu = (gr->fuse[i] & CU_FUSE_RELU) != 0;
    float *yt = gr->ws;                                        // (OC, sb*OHW)
    float *col = yt + cu_round4(g.oc * s * g.ohw);             // (K, sb*OHW)
    int st = MPSCY_OK;
    for (int64_t s0 = 0; s0 < b && st == MPSCY_OK; s0 += s) {
        const int64_t sb = std::min(s, b - s0), nb = sb * g.ohw;
        st = cu_im2col(gr, gr->stream, &g, col, gr->y[n->in[0]] + s0 * g.c * g.h * g.w, sb, err, en);
        for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++) {
            /* column-major: D (nb x ocg) = col (nb x kg) . W (kg x ocg), as conv.cu's conv_gemm */
            cu_gemm q = {};
            q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
            q.m = nb; q.n = g.ocg; q.k = g.kg; q.a = col + gi * g.kg * nb; q.lda = nb;
            q.b = w + gi * g.ocg * g.kg; q.ldb = g.kg; q.d = yt + gi * g.ocg * nb; q.ldd = nb;
            st = cu_gemm_run(gr, &q, 0, err, en);
        }
        if (st == MPSCY_OK)
            st = cu_conv_out(gr, gr->stream, &g, gr->y[i] + s0 * g.oc * g.ohw, yt, bias, sb, relu, err, en);
    }
    return st;
}

int cu_conv_split_backward(cu_graph *gr, const mpscy_node *n, int64_t b, int64_t s, const float *dy, const float *ry,
                           char *err, size_t en) {
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    float *dw = cu_tensor_grad(gr, n, 0), *db = cu_tensor_grad(gr, n, 1), *dx = gr->dy[n->in[0]];
    float *dbp = gr->colbuf + gr->col_off[cu_node_index(gr, n)];  // (split_rows, OC): the slab
    float *dzt = gr->ws;                                       // (OC, sb*OHW)
    float *col = dzt + cu_round4(g.oc * s * g.ohw);            // (K, sb*OHW)
    float *dcol = col + cu_round4(g.k * s * g.ohw);            // (K, sb*OHW)
    int64_t rows = 0;
    int st = MPSCY_OK;
    for (int64_t s0 = 0; s0 < b && st == MPSCY_OK; s0 += s) {
        const int64_t sb = std::min(s, b - s0), nb = sb * g.ohw, at = s0 * g.oc * g.ohw;
        const float *dys = dy + at, *rys = ry ? ry + at : NULL;
        st = cu_conv_dz(gr, gr->stream, &g, dzt, dbp + rows * g.oc, dys, rys, sb, cu_conv_dz_vec(&g, dzt, dys, rys), 0,
                        err, en);
        rows += cu_dz_chunks(nb);
        if (st == MPSCY_OK)
            st = cu_im2col(gr, gr->stream, &g, col, gr->y[n->in[0]] + s0 * g.c * g.h * g.w, sb, err, en);
        for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++) {
            /* column-major, as conv_gemm: D (kg x ocg) = col^T (kg x nb) . dzt (nb x ocg), added from the
             * second sub-batch on */
            cu_gemm q = {};
            q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
            q.transa = 1; q.m = g.kg; q.n = g.ocg; q.k = nb; q.a = col + gi * g.kg * nb; q.lda = nb;
            q.b = dzt + gi * g.ocg * nb; q.ldb = nb; q.d = dw + gi * g.ocg * g.kg; q.ldd = g.kg;
            q.beta = s0 > 0 ? 1.0f : 0.0f;
            st = cu_gemm_run(gr, &q, 0, err, en);
            if (st != MPSCY_OK || !dx) continue;
            /* D (nb x kg) = dzt (nb x ocg) . W^T (ocg x kg) */
            cu_gemm t = {};
            t.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
            t.transb = 1; t.m = nb; t.n = g.kg; t.k = g.ocg; t.a = dzt + gi * g.ocg * nb; t.lda = nb;
            t.b = w + gi * g.ocg * g.kg; t.ldb = g.kg; t.d = dcol + gi * g.kg * nb; t.ldd = nb;
            st = cu_gemm_run(gr, &t, 0, err, en);
        }
        if (st == MPSCY_OK && dx)
            st = cu_col2im(gr, &g, dx + s0 * g.c * g.h * g.w, dcol, sb, (int)n->accum[0], err, en);
    }
    if (st != MPSCY_OK || !db) return st;
    CU_TRY(cu_sum_parts(gr, gr->stream, db, dbp, g.oc, rows, NULL, 1, 0), "conv_db");
    return CU_LAUNCHED("conv_db");
}
