/* conv.cu — Conv2D on CUDA (NCHW, weight (OC, C / groups, KH, KW) as in PyTorch) as im2col +
 * GEMM: the columns (K, b*OHW), K = C*KH*KW rows ordered (c, ki, kj), are built once per step
 * and kept for backward (one buffer per convolution); one product per group gives (OC, b*OHW),
 * and one kernel scatters it to NCHW with the bias and, when a ReLU is the only consumer, the
 * ReLU. Backward: one kernel gathers dz (masked by that ReLU) to (OC, b*OHW) with chunk sums
 * for the bias gradient, then dW = dz col^T (a long K as a batch of chunks) and dcol = W^T dz,
 * and col2im gathers dx (no atomics: sums are deterministic). Products run as the own kernel
 * or cuBLASLt by size, as Dense's. */
#include "cuda.h"
#include "blas.h"
#include "reduce.h"

typedef mpscy_conv_geom conv_geom;

static conv_geom geom(const mpscy_plan *p, const mpscy_node *n) { return mpscy_conv_geometry(p, n); }

/* Index arithmetic in 32 bits (64-bit division costs dozens of instructions): graph build
 * refuses a convolution whose tensors reach 2^31 elements (cu_conv_fits). */
__global__ void im2col_kernel(float *col, const float *x, conv_geom g, int64_t b) {
    // col (K, b*OHW), x (b, C, H, W); blockIdx.y walks the channels, x the columns. A thread
    // resolves its column (sample, oh, ow) once and writes that column of all KH*KW rows of the
    // channel (each row's write coalesced across the block), its taps' loads issued together.
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw), ohw = (unsigned)g.ohw, ow_ = (unsigned)g.ow;
    const unsigned khw = (unsigned)(g.kh * g.kw), H = (unsigned)g.h, W = (unsigned)g.w, C = (unsigned)g.c;
    for (unsigned c = blockIdx.y; c < C; c += gridDim.y) {
        float *rows = col + (size_t)c * khw * nb;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < nb; j += gridDim.x * blockDim.x) {
            const unsigned s = j / ohw, o = j - s * ohw, oh = o / ow_, ow = o - oh * ow_;
            const float *xp = x + ((size_t)s * C + c) * H * W;
            const int ih0 = (int)(oh * g.sh) - (int)g.ph, iw0 = (int)(ow * g.sw) - (int)g.pw;
            for (int ki = 0; ki < (int)g.kh; ki++) {
                const int ih = ih0 + ki * (int)g.dh;
                const bool rin = ih >= 0 && ih < (int)H;
                for (int kj = 0; kj < (int)g.kw; kj++) {
                    const int iw = iw0 + kj * (int)g.dw;
                    rows[(size_t)(ki * (int)g.kw + kj) * nb + j] =
                        rin && iw >= 0 && iw < (int)W ? xp[(unsigned)ih * W + (unsigned)iw] : 0.0f;
                }
            }
        }
    }
}

/* dx (b, C, H, W) from dcol (K, b*OHW): each input element sums the taps that read it;
 * blockIdx.y walks the (sample, channel) planes, x the positions of a plane. */
__global__ void col2im_kernel(float *dx, const float *dcol, conv_geom g, int64_t b, int accum) {
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw), W = (unsigned)g.w, hw = (unsigned)(g.h * g.w), C = (unsigned)g.c;
    for (unsigned plane = blockIdx.y; plane < (unsigned)b * C; plane += gridDim.y) {
        const unsigned s = plane / C, c = plane - s * C;
        const float *base = dcol + (size_t)c * g.kh * g.kw * nb + s * (unsigned)g.ohw;
        float *dxp = dx + (size_t)plane * hw;
        for (unsigned p = blockIdx.x * blockDim.x + threadIdx.x; p < hw; p += gridDim.x * blockDim.x) {
            const int ih = (int)(p / W), iw = (int)(p - (unsigned)ih * W);
            float v = 0.0f;
            for (int ki = 0; ki < (int)g.kh; ki++) {
                int th = ih + (int)g.ph - ki * (int)g.dh;
                if (th < 0) break;  /* th falls as ki grows */
                int oh = th / (int)g.sh;
                if (oh * (int)g.sh != th || oh >= (int)g.oh) continue;
                for (int kj = 0; kj < (int)g.kw; kj++) {
                    int tw = iw + (int)g.pw - kj * (int)g.dw;
                    if (tw < 0) break;
                    int ow = tw / (int)g.sw;
                    if (ow * (int)g.sw != tw || ow >= (int)g.ow) continue;
                    v += base[(size_t)(ki * (int)g.kw + kj) * nb + (unsigned)(oh * (int)g.ow + ow)];
                }
            }
            dxp[p] = accum ? dxp[p] + v : v;
        }
    }
}

/* out (count) = the sum of `splits` partials part (splits, count), in order: the weight
 * gradient's split-K partials, and the bias gradient's chunk sums */
__global__ void conv_sum_parts(float *out, const float *part, int64_t count, int64_t splits) {
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int64_t s = 0; s < splits; s++) v += part[s * count + e];
        out[e] = v;
    }
}

/* y (b, OC, OHW) = yt (OC, b*OHW) + bias, through the fused ReLU when relu. */
__global__ void conv_out_kernel(float *y, const float *yt, const float *bias, int64_t b, int64_t oc, int64_t ohw, int relu) {
    cu_pdl_enter();
    const unsigned OHW = (unsigned)ohw, OC = (unsigned)oc, nb = (unsigned)(b * ohw), total = (unsigned)(b * oc * ohw);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        unsigned i = e % OHW, o = (e / OHW) % OC, s = e / (OHW * OC);
        float v = yt[o * nb + s * OHW + i] + (bias ? bias[o] : 0.0f);
        y[e] = relu && !(v > 0.0f) ? 0.0f : v;
    }
}

/* dzt (OC, b*OHW) from dy (b, OC, OHW), zeroed where the fused ReLU's output ry <= 0; block
 * (x, o) takes chunk x of channel o and leaves its sum in dbp (chunks, OC) for the bias gradient. */
__global__ void conv_dz_kernel(float *dzt, float *dbp, const float *dy, const float *ry, int64_t b, int64_t oc,
                               int64_t ohw, int64_t chunk) {
    cu_pdl_enter();
    const unsigned OHW = (unsigned)ohw, OC = (unsigned)oc, nb = (unsigned)(b * ohw), o = blockIdx.y;
    const unsigned j0 = blockIdx.x * (unsigned)chunk, j1 = min(nb, j0 + (unsigned)chunk);
    float sum = 0.0f;
    for (unsigned j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        unsigned s = j / OHW, i = j - s * OHW, src = (s * OC + o) * OHW + i;
        float v = dy[src];
        v = ry && !(ry[src] > 0.0f) ? 0.0f : v;
        dzt[o * nb + j] = v;
        sum += v;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) dbp[blockIdx.x * OC + o] = sum;
}

#define DZ_CHUNK 4096  /* elements of one channel per conv_dz block */

int cu_conv_fits(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    double lim = 2147483647.0, nb = (double)p->batch * (double)g.ohw;
    return (double)g.k * nb < lim && (double)g.oc * nb < lim && (double)p->batch * g.c * g.h * g.w < lim;
}

#define DW_CHUNK 1024  /* K per product of the split weight gradient */

int64_t cu_conv_workspace(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    int64_t nb = p->batch * g.ohw, splits = (nb + DW_CHUNK - 1) / DW_CHUNK;
    /* yt or dzt (OC, B*OHW), dcol (K, B*OHW), the weight gradient's split-K partials, then the
     * bias gradient's chunk sums */
    return (g.oc + g.k) * nb + splits * g.kg * g.ocg + (nb + DZ_CHUNK - 1) / DZ_CHUNK * g.oc;
}

/* the three products of a group, as the own kernel or cuBLASLt (decided by the built batch) */
enum { CONV_FWD, CONV_DW, CONV_DCOL };

static int conv_gemm(cu_graph *gr, int which, const conv_geom &g, int64_t nb, int64_t nb_built, float *c,
                     const float *w, const float *col, const float *dzt, char *err, size_t en) {
    int64_t M, N, K;
    if (which == CONV_FWD) { M = g.ocg; N = nb; K = g.kg; }
    else if (which == CONV_DW) { M = g.ocg; N = g.kg; K = nb; }
    else { M = g.kg; N = nb; K = g.ocg; }
    /* decided at the built batch, as graph.cu planned the partials */
    int64_t Nb = which == CONV_DW ? N : nb_built, Kb = which == CONV_DW ? nb_built : K;
    if (cu_gemm_small_wanted(gr, M, Nb, Kb) && !(which == CONV_DW && nb_built >= 4 * DW_CHUNK && gr->gemm_mode == 2)) {
        cu_small_gemm q = {};
        q.c = c; q.m = M; q.n = N; q.k = K;
        if (which == CONV_FWD) {  /* yt (ocg, nb) = W (ocg, kg) col (kg, nb) */
            q.a = w; q.am = g.kg; q.ak = 1; q.b = col; q.bk = nb; q.bn = 1; q.ldc = nb;
        } else if (which == CONV_DW) {  /* dW (ocg, kg) = dzt (ocg, nb) col^T (nb, kg) */
            q.a = dzt; q.am = nb; q.ak = 1; q.b = col; q.bk = 1; q.bn = nb; q.ldc = g.kg;
        } else {  /* dcol (kg, nb) = W^T (kg, ocg) dzt (ocg, nb) */
            q.a = w; q.am = 1; q.ak = g.kg; q.b = dzt; q.bk = nb; q.bn = 1; q.ldc = nb;
        }
        return cu_gemm_small(gr, gr->stream, &q, err, en);
    }
    /* column-major views: a row-major (r, cols) matrix is (cols x r) with ld = cols */
    cu_gemm q = {};
    q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    if (which == CONV_DW && nb >= 4 * DW_CHUNK && gr->gemm_mode == 2) {
        /* K = b*OHW is long: equal chunks as one strided batch of products into partials (after
         * dcol in the workspace), the tail chunk as one more, then one ordered sum */
        int64_t full = nb / DW_CHUNK, tail = nb - full * DW_CHUNK, kgo = g.kg * g.ocg;
        float *part = gr->ws + (g.oc + g.k) * nb;
        q.transa = 1; q.m = g.kg; q.n = g.ocg; q.k = DW_CHUNK; q.a = col; q.lda = nb; q.b = dzt; q.ldb = nb;
        q.d = part; q.ldd = g.kg; q.batch = (int32_t)full; q.sa = DW_CHUNK; q.sb = DW_CHUNK; q.sd = kgo;
        int st = cu_gemm_run(gr, &q, 0, err, en);
        if (st == MPSCY_OK && tail) {
            cu_gemm t = q;
            t.batch = 0; t.k = tail; t.a = col + full * DW_CHUNK; t.b = dzt + full * DW_CHUNK; t.d = part + full * kgo;
            st = cu_gemm_run(gr, &t, 0, err, en);
        }
        if (st == MPSCY_OK) {
            int64_t splits = full + (tail ? 1 : 0);
            CU_TRY(cu_launch(gr, conv_sum_parts, cu_blocks(kgo, CU_THREADS, 4096), CU_THREADS, gr->stream, c,
                             (const float *)part, kgo, splits),
                   "conv_dw_reduce");
            return CU_LAUNCHED("conv_dw_reduce");
        }
        if (st != MPSCY_UNSUPPORTED) return st;
        q = cu_gemm{};  /* no batched algorithm: one long product below */
        q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    }
    if (which == CONV_FWD) {  /* D (nb x ocg) = col (nb x kg) . W (kg x ocg) */
        q.m = nb; q.n = g.ocg; q.k = g.kg; q.a = col; q.lda = nb; q.b = w; q.ldb = g.kg; q.ldd = nb;
    } else if (which == CONV_DW) {  /* D (kg x ocg) = col^T (kg x nb) . dzt (nb x ocg) */
        q.transa = 1; q.m = g.kg; q.n = g.ocg; q.k = nb; q.a = col; q.lda = nb; q.b = dzt; q.ldb = nb; q.ldd = g.kg;
    } else {  /* D (nb x kg) = dzt (nb x ocg) . W^T (ocg x kg) */
        q.transb = 1; q.m = nb; q.n = g.kg; q.k = g.ocg; q.a = dzt; q.lda = nb; q.b = w; q.ldb = g.kg; q.ldd = nb;
    }
    q.d = c;
    return cu_gemm_run(gr, &q, 0, err, en);
}

int cu_conv_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const mpscy_plan *p = &gr->plan;
    int64_t i = cu_node_index(gr, n);
    conv_geom g = geom(p, n);
    int64_t nb = b * g.ohw;
    float *col = gr->colbuf + gr->col_off[i];                 // (K, nb)
    float *yt = gr->ws;                                        // (OC, nb)
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);    // (OC, kg)
    const float *bias = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1); // (OC) or NULL
    CU_TRY(cu_launch(gr, im2col_kernel, dim3(cu_blocks(nb, CU_THREADS, 1024), (unsigned)(g.c < 65535 ? g.c : 65535)),
                     CU_THREADS, gr->stream, col,
                     (const float *)gr->y[n->in[0]], g, b),
           "im2col");
    int st = CU_LAUNCHED("im2col");
    for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++)
        st = conv_gemm(gr, CONV_FWD, g, nb, p->batch * g.ohw, yt + gi * g.ocg * nb, w + gi * g.ocg * g.kg,
                       col + gi * g.kg * nb, NULL, err, en);
    if (st != MPSCY_OK) return st;
    int relu = (gr->fuse[i] & CU_FUSE_RELU) != 0;
    CU_TRY(cu_launch(gr, conv_out_kernel, cu_blocks(b * g.oc * g.ohw, CU_THREADS, 16384), CU_THREADS, gr->stream,
                     gr->y[i], (const float *)yt, bias, b, g.oc, g.ohw, relu),
           "conv_out");
    return CU_LAUNCHED("conv_out");
}

int cu_conv_backward(cu_graph *gr, const mpscy_node *n, int64_t b, char *err, size_t en) {
    const mpscy_plan *p = &gr->plan;
    int64_t i = cu_node_index(gr, n);
    conv_geom g = geom(p, n);
    int64_t nb = b * g.ohw;
    const float *col = gr->colbuf + gr->col_off[i];            // (K, nb)
    float *dzt = gr->ws, *dcol = gr->ws + g.oc * nb;           // (OC, nb), (K, nb)
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    float *dw = cu_tensor_grad(gr, n, 0), *db = cu_tensor_grad(gr, n, 1);
    float *dx = gr->dy[n->in[0]];
    /* a fused ReLU: the gradient arrives at the ReLU node, masked by its output (aliased to ours) */
    int32_t r = -1;
    if ((gr->fuse[i] & CU_FUSE_RELU) && !gr->dz_ready[i])  /* else a Dense above wrote our dz, masked */
        for (int32_t k = (int32_t)i + 1; k < p->n_nodes && r < 0; k++)
            if (p->nodes[k].kind == MPSCY_LAYER_RELU && p->nodes[k].in[0] == i) r = k;
    const float *dy = gr->dy[r >= 0 ? r : i], *ry = r >= 0 ? gr->y[r] : NULL;
    int64_t chunks = (nb + DZ_CHUNK - 1) / DZ_CHUNK, splits = (p->batch * g.ohw + DW_CHUNK - 1) / DW_CHUNK;
    float *dbp = gr->ws + (g.oc + g.k) * nb + splits * g.kg * g.ocg;  // (chunks, OC)
    CU_TRY(cu_launch(gr, conv_dz_kernel, dim3((unsigned)chunks, (unsigned)g.oc), CU_THREADS, gr->stream, dzt, dbp, dy, ry,
                     b, g.oc, g.ohw, (int64_t)DZ_CHUNK),
           "conv_dz");
    int st = CU_LAUNCHED("conv_dz");
    if (st == MPSCY_OK && db) {
        CU_TRY(cu_launch(gr, conv_sum_parts, cu_blocks(g.oc, CU_THREADS, 64), CU_THREADS, gr->stream, db,
                         (const float *)dbp, g.oc, chunks),
               "conv_db");
        st = CU_LAUNCHED("conv_db");
    }
    for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++) {
        st = conv_gemm(gr, CONV_DW, g, nb, p->batch * g.ohw, dw + gi * g.ocg * g.kg, NULL, col + gi * g.kg * nb,
                       dzt + gi * g.ocg * nb, err, en);
        if (st == MPSCY_OK && dx)
            st = conv_gemm(gr, CONV_DCOL, g, nb, p->batch * g.ohw, dcol + gi * g.kg * nb, w + gi * g.ocg * g.kg, NULL,
                           dzt + gi * g.ocg * nb, err, en);
    }
    if (st != MPSCY_OK || !dx) return st;
    CU_TRY(cu_launch(gr, col2im_kernel, dim3(cu_blocks(g.h * g.w, CU_THREADS, 64),
                                             (unsigned)(b * g.c < 65535 ? b * g.c : 65535)),
                     CU_THREADS, gr->stream, dx,
                     (const float *)dcol, g, b, (int)n->accum[0]),
           "col2im");
    return CU_LAUNCHED("col2im");
}

/* floats of split-K partials (and counters) the own-kernel products of a convolution may take */
void cu_conv_gemm_need(const cu_graph *gr, const mpscy_node *n, int64_t *floats, int64_t *counters) {
    conv_geom g = geom(&gr->plan, n);
    int64_t nb = gr->plan.batch * g.ohw, f, c;
    int64_t shapes[3][3] = {{g.ocg, nb, g.kg}, {g.ocg, g.kg, nb}, {g.kg, nb, g.ocg}};
    *floats = *counters = 0;
    for (int k = 0; k < 3; k++)
        if (cu_gemm_small_wanted(gr, shapes[k][0], shapes[k][1], shapes[k][2]) &&
            !(k == 1 && nb >= 4 * DW_CHUNK && gr->gemm_mode == 2)) {
            cu_gemm_small_need(gr->dev->sms, shapes[k][0], shapes[k][1], shapes[k][2], 0, &f, &c);
            *floats += f * g.groups;
            *counters += c * g.groups;
        }
}

int64_t cu_conv_columns(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    return g.k * p->batch * g.ohw;
}
