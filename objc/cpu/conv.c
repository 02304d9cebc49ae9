/* conv.c — Conv2D on the CPU (NCHW, weight (OC, C / groups, KH, KW) as in PyTorch). Each worker
 * thread takes a share of the batch and, a chunk of samples at a time, builds the im2col matrix
 * (C*KH*KW, chunk*OH*OW), runs one single-threaded sgemm per group and scatters the result to
 * NCHW with the bias; backward recomputes the columns instead of saving them and sums per-thread
 * weight gradients. A ReLU that is the convolution's only consumer is computed here, on data
 * already in cache. Stride, padding, dilation and groups are general; no Winograd, no direct
 * convolution. */
#include "cpu.h"
#include "blas.h"
#include "../common/activation_math.h"

#include <string.h>

/* Columns per GEMM: whole samples, about this many floats of im2col matrix at most, so that
 * one chunk's columns stay in L2 between im2col and the GEMM (measured: larger is slower). */
#define CONV_COL_FLOATS (1 << 17)

typedef mpscy_conv_geom conv_geom;

static conv_geom geom(const mpscy_plan *p, const mpscy_node *n) { return mpscy_conv_geometry(p, n); }

/* Samples per chunk when `threads` share a built batch of `batch`. */
static int64_t conv_chunk(const conv_geom *g, int64_t batch, int32_t threads) {
    int64_t per = g->k * g->ohw, chunk = CONV_COL_FLOATS / (per > 0 ? per : 1);
    int64_t t = threads > 1 ? threads : 1, share = (batch + t - 1) / t;
    if (chunk < 1) chunk = 1;
    return chunk < share ? chunk : share;
}

/* First and one-past-last output index o with 0 <= o*s - p + off < in (off = kernel tap * d). */
static void valid_range(int64_t *lo, int64_t *hi, int64_t out, int64_t in, int64_t s, int64_t p, int64_t off) {
    int64_t a = p - off;                       /* need o*s >= a */
    int64_t l = a <= 0 ? 0 : (a + s - 1) / s;
    int64_t b = in + p - off;                  /* need o*s < b */
    int64_t h = b <= 0 ? 0 : (b + s - 1) / s;
    *lo = l < out ? l : out;
    *hi = h < out ? h : out;
    if (*hi < *lo) *hi = *lo;
}

/* d[i] = s[i * stride]; strides 1 and 2 get their own loops, which the compiler vectorizes */
static inline void gather_row(float *restrict d, const float *restrict s, int64_t n, int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; i++) d[i] = s[i];
    else if (stride == 2)
        for (int64_t i = 0; i < n; i++) d[i] = s[2 * i];
    else
        for (int64_t i = 0; i < n; i++) d[i] = s[i * stride];
}

/* d[i * stride] += s[i], likewise */
static inline void scatter_add_row(float *restrict d, const float *restrict s, int64_t n, int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; i++) d[i] += s[i];
    else if (stride == 2)
        for (int64_t i = 0; i < n; i++) d[2 * i] += s[i];
    else
        for (int64_t i = 0; i < n; i++) d[i * stride] += s[i];
}

/* Stride 1 with output rows as wide as input rows: the rows of one tap are one contiguous run
 * in both the columns and the input, edge columns aside. */
static int contiguous(const conv_geom *g) { return g->sw == 1 && g->sh == 1 && g->ow == g->w; }

/* One tap (c, ki, kj) of the columns: its row, and the output columns [lo, hi) and rows [olo, ohi)
 * whose input lies inside the (unpadded) image. */
typedef struct {
    float *row;
    int64_t ki, kj, lo, hi, olo, ohi;
} conv_tap;

static conv_tap tap_at(const conv_geom *g, float *col, int64_t n, int64_t c, int64_t ki, int64_t kj) {
    conv_tap t = {col + ((c * g->kh + ki) * g->kw + kj) * n, ki, kj, 0, 0, 0, 0};
    valid_range(&t.lo, &t.hi, g->ow, g->w, g->sw, g->pw, kj * g->dw);
    valid_range(&t.olo, &t.ohi, g->oh, g->h, g->sh, g->ph, ki * g->dh);
    return t;
}

/* where output row oh's first valid column reads in an input plane (H, W) */
static inline int64_t tap_src(const conv_geom *g, const conv_tap *t, int64_t oh) {
    return (oh * g->sh - g->ph + t->ki * g->dh) * g->w + t->lo * g->sw - g->pw + t->kj * g->dw;
}

/* zeroes the columns outside [lo, hi) of the valid rows of one sample's (OH, OW) block */
static void zero_edge_columns(float *blk, const conv_geom *g, const conv_tap *t) {
    for (int64_t oh = t->olo; oh < t->ohi; oh++) {
        for (int64_t o = 0; o < t->lo; o++) blk[oh * g->ow + o] = 0.0f;
        for (int64_t o = t->hi; o < g->ow; o++) blk[oh * g->ow + o] = 0.0f;
    }
}

static void im2col(float *col, const float *x, const conv_geom *g, int64_t bc) {
    // col (K, bc*OHW) rows ordered (c, ki, kj); x (bc, C, H, W)
    int64_t n = bc * g->ohw, hw = g->h * g->w;
    for (int64_t c = 0; c < g->c; c++)
        for (int64_t ki = 0; ki < g->kh; ki++)
            for (int64_t kj = 0; kj < g->kw; kj++) {
                conv_tap t = tap_at(g, col, n, c, ki, kj);
                for (int64_t b = 0; b < bc; b++) {
                    const float *xc = x + (b * g->c + c) * hw;  // (H, W)
                    float *dst = t.row + b * g->ohw;
                    if (t.olo > 0) memset(dst, 0, (size_t)(t.olo * g->ow) * sizeof(float));
                    if (contiguous(g) && t.ohi > t.olo && t.hi > t.lo) {
                        /* one copy from the first to the last valid element, then zero the edge columns */
                        memcpy(dst + t.olo * g->ow + t.lo, xc + tap_src(g, &t, t.olo),
                               (size_t)((t.ohi - t.olo - 1) * g->ow + t.hi - t.lo) * sizeof(float));
                        zero_edge_columns(dst, g, &t);
                    } else
                    for (int64_t oh = t.olo; oh < t.ohi; oh++) {
                        float *d = dst + oh * g->ow;
                        for (int64_t o = 0; o < t.lo; o++) d[o] = 0.0f;
                        gather_row(d + t.lo, xc + tap_src(g, &t, oh), t.hi - t.lo, g->sw);
                        for (int64_t o = t.hi; o < g->ow; o++) d[o] = 0.0f;
                    }
                    if (t.ohi < g->oh) memset(dst + t.ohi * g->ow, 0, (size_t)((g->oh - t.ohi) * g->ow) * sizeof(float));
                }
            }
}

static void col2im(float *dx, float *col, const conv_geom *g, int64_t bc) {
    // dx (bc, C, H, W) accumulated into; col (K, bc*OHW), scratch: its edge columns are zeroed
    int64_t n = bc * g->ohw, hw = g->h * g->w;
    for (int64_t c = 0; c < g->c; c++)
        for (int64_t ki = 0; ki < g->kh; ki++)
            for (int64_t kj = 0; kj < g->kw; kj++) {
                conv_tap t = tap_at(g, col, n, c, ki, kj);
                for (int64_t b = 0; b < bc; b++) {
                    float *xc = dx + (b * g->c + c) * hw;  // (H, W)
                    float *srow = t.row + b * g->ohw;
                    if (contiguous(g) && t.ohi > t.olo && t.hi > t.lo) {
                        /* zero the edge columns, then one add over the span: they add 0 elsewhere */
                        zero_edge_columns(srow, g, &t);
                        scatter_add_row(xc + tap_src(g, &t, t.olo), srow + t.olo * g->ow + t.lo,
                                        (t.ohi - t.olo - 1) * g->ow + t.hi - t.lo, 1);
                        continue;
                    }
                    for (int64_t oh = t.olo; oh < t.ohi; oh++)
                        scatter_add_row(xc + tap_src(g, &t, oh), srow + oh * g->ow + t.lo, t.hi - t.lo, g->sw);
                }
            }
}

/* ReLU's value and gradient rule (mpscy_relu_pass); both operands are loaded, so loops of it
 * vectorize */
static inline float select_pos(float m, float v) { return mpscy_relu_pass(m, v); }

/* dout (OC, bc*OHW) from dy (bc, OC, OHW), zeroed where the fused ReLU's output ry (bc, OC, OHW)
 * is not positive (ry NULL: no ReLU), adding each channel's sum into db (OC) when given. Sixteen
 * partial sums keep the reduction vectorizable without reassociating floats. */
static void gather_rows(float *dout, float *db, const float *dy, const float *ry, int64_t oc, int64_t bc,
                        int64_t ohw) {
    int64_t n = bc * ohw;
    for (int64_t o = 0; o < oc; o++) {
        float acc[16] = {0};
        for (int64_t s = 0; s < bc; s++) {
            const float *restrict src = dy + (s * oc + o) * ohw;
            float *restrict dst = dout + o * n + s * ohw;
            if (ry) {
                const float *restrict m = ry + (s * oc + o) * ohw;
                for (int64_t i = 0; i < ohw; i++) dst[i] = select_pos(m[i], src[i]);
            } else {
                for (int64_t i = 0; i < ohw; i++) dst[i] = src[i];
            }
            int64_t i = 0;
            for (; i + 16 <= ohw; i += 16)
                for (int k = 0; k < 16; k++) acc[k] += dst[i + k];
            for (; i < ohw; i++) acc[0] += dst[i];
        }
        if (db) {
            float t = 0.0f;
            for (int k = 0; k < 16; k++) t += acc[k];
            db[o] += t;
        }
    }
}

/* Work of one thread: samples [lo, hi) in chunks, with its own slice of the workspace. */
typedef struct conv_job {
    const conv_geom *g;
    float *y, *dx, *dw, *db, *ws;   /* ws: per-thread slices of wst floats */
    const float *x, *w, *bias, *dy;
    const float *ry;                /* backward with a fused ReLU: its output, the gradient mask */
    int64_t b, chunk, wst;
    int accum, relu;
} conv_job;

/* y (bc, OC, OHW) from out (OC, bc*OHW) plus the bias, through ReLU when it is fused here; out
 * may already be y (one sample), then the bias and ReLU apply in place. */
static void scatter_rows(float *y, const float *out, const float *bias, int64_t oc, int64_t bc, int64_t ohw, int relu) {
    int64_t n = bc * ohw;
    for (int64_t o = 0; o < oc; o++) {
        float bo = bias ? bias[o] : 0.0f;
        for (int64_t s = 0; s < bc; s++) {
            float *dst = y + (s * oc + o) * ohw;  // (OHW); may be src itself, so not restrict
            const float *src = out + o * n + s * ohw;
            if (dst == src && !bias && !relu) continue;
            if (relu)
                for (int64_t i = 0; i < ohw; i++) dst[i] = select_pos(src[i] + bo, src[i] + bo);
            else
                for (int64_t i = 0; i < ohw; i++) dst[i] = src[i] + bo;
        }
    }
}

static void conv_forward_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    int64_t lo, hi;
    cpu_split(j->b, t, nt, &lo, &hi);
    for (int64_t b0 = lo; b0 < hi; b0 += j->chunk) {
        int64_t bc = hi - b0 < j->chunk ? hi - b0 : j->chunk, n = bc * g->ohw;
        float *col = j->ws + t * j->wst, *out = col + g->k * n;  // (K, n), (OC, n)
        float *y = j->y + b0 * g->oc * g->ohw;                     // (bc, OC, OHW)
        im2col(col, j->x + b0 * g->c * g->h * g->w, g, bc);
        if (bc == 1) out = y;  /* one sample: (OC, OHW) is already NCHW */
        for (int64_t gi = 0; gi < g->groups; gi++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)g->ocg, (blasint)n, (blasint)g->kg,
                        1.0f, j->w + gi * g->ocg * g->kg, (blasint)g->kg, col + gi * g->kg * n, (blasint)n,
                        0.0f, out + gi * g->ocg * n, (blasint)n);
        scatter_rows(y, out, j->bias, g->oc, bc, g->ohw, j->relu);
    }
}

/* Thread t > 0 leaves its partial dW (OC, K/groups) and db (OC) after its columns. */
static float *partial_dw(const conv_job *j, int32_t t) {
    return t == 0 ? j->dw : j->ws + t * j->wst + (j->g->k + j->g->oc) * j->chunk * j->g->ohw;
}

static float *partial_db(const conv_job *j, int32_t t) {
    return t == 0 ? j->db : partial_dw(j, t) + j->g->oc * j->g->kg;
}

static void conv_backward_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    int64_t lo, hi;
    cpu_split(j->b, t, nt, &lo, &hi);
    float *dw = partial_dw(j, t), *db = j->db ? partial_db(j, t) : NULL;
    if (db) memset(db, 0, (size_t)g->oc * sizeof(float));
    if (hi == lo) memset(dw, 0, (size_t)(g->oc * g->kg) * sizeof(float));
    for (int64_t b0 = lo; b0 < hi; b0 += j->chunk) {
        int64_t bc = hi - b0 < j->chunk ? hi - b0 : j->chunk, n = bc * g->ohw;
        float *col = j->ws + t * j->wst, *dout = col + g->k * n;  // (K, n), (OC, n)
        const float *dyc = j->dy + b0 * g->oc * g->ohw;            // (bc, OC, OHW)
        gather_rows(dout, db, dyc, j->relu ? j->ry + b0 * g->oc * g->ohw : NULL, g->oc, bc, g->ohw);
        im2col(col, j->x + b0 * g->c * g->h * g->w, g, bc);
        for (int64_t gi = 0; gi < g->groups; gi++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)g->ocg, (blasint)g->kg, (blasint)n,
                        1.0f, dout + gi * g->ocg * n, (blasint)n, col + gi * g->kg * n, (blasint)n,
                        b0 == lo ? 0.0f : 1.0f, dw + gi * g->ocg * g->kg, (blasint)g->kg);
        if (!j->dx) continue;
        float *dxc = j->dx + b0 * g->c * g->h * g->w;  // (bc, C, H, W)
        for (int64_t gi = 0; gi < g->groups; gi++)  /* the columns are spent: reuse them for dcol */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)g->kg, (blasint)n, (blasint)g->ocg,
                        1.0f, j->w + gi * g->ocg * g->kg, (blasint)g->kg, dout + gi * g->ocg * n, (blasint)n,
                        0.0f, col + gi * g->kg * n, (blasint)n);
        if (!j->accum) memset(dxc, 0, (size_t)(bc * g->c * g->h * g->w) * sizeof(float));
        col2im(dxc, col, g, bc);
    }
}

/* floats of one thread's workspace slice: columns (K, chunk*OHW), the output or its gradient
 * as (OC, chunk*OHW), then a partial dW and db */
static int64_t conv_slice(const conv_geom *g, int64_t chunk) {
    return (g->k + g->oc) * chunk * g->ohw + g->oc * g->kg + g->oc;
}

int64_t cpu_conv_workspace(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    return (p->threads > 1 ? p->threads : 1) * conv_slice(&g, conv_chunk(&g, p->batch, p->threads));
}

/* The ReLU node that is the only consumer of conv node i, or -1. Such a ReLU is computed inside
 * the convolution (forward: into the ReLU's output, the convolution's own output stays unwritten;
 * backward: the ReLU's gradient mask applied while gathering), and the ReLU node does nothing. */
int32_t cpu_conv_fused_relu(const mpscy_plan *p, int32_t i) {
    if (p->nodes[i].kind != MPSCY_LAYER_CONV2D || p->nodes[i].consumers != 1 || i == p->output) return -1;
    for (int32_t k = i + 1; k < p->n_nodes; k++)
        if (p->nodes[k].in[0] == i && p->nodes[k].n_in == 1)
            return p->nodes[k].kind == MPSCY_LAYER_RELU ? k : -1;
    return -1;
}

void cpu_conv_forward(cpu_graph *gr, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    // y (b, OC, OH, OW), x (b, C, H, W), w (OC, C/groups, KH, KW), bias (OC) or NULL
    (void)train; (void)a;
    int32_t i = (int32_t)(n - gr->plan.nodes), r = cpu_conv_fused_relu(&gr->plan, i);
    conv_geom g = geom(&gr->plan, n);
    conv_job j = {&g, gr->y[r >= 0 ? r : i], NULL, NULL, NULL, gr->ws, gr->y[n->in[0]],
                  cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0), cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 1), NULL, NULL,
                  b, conv_chunk(&g, gr->plan.batch, gr->plan.threads), 0, 0, r >= 0};
    j.wst = conv_slice(&g, j.chunk);
    cpu_parallel(gr->pool, conv_forward_task, &j);
}

void cpu_conv_backward(cpu_graph *gr, const mpscy_node *n, int64_t b) {
    // dx (b, C, H, W) or NULL, dw (OC, C/groups, KH, KW), db (OC) or NULL, dy (b, OC, OH, OW)
    int32_t i = (int32_t)(n - gr->plan.nodes), r = cpu_conv_fused_relu(&gr->plan, i);
    conv_geom g = geom(&gr->plan, n);
    conv_job j = {&g, NULL, gr->dy[n->in[0]], cpu_tensor_grad(gr, n, 0), cpu_tensor_grad(gr, n, 1), gr->ws,
                  gr->y[n->in[0]], cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0), NULL, gr->dy[r >= 0 ? r : i],
                  r >= 0 ? gr->y[r] : NULL, b, conv_chunk(&g, gr->plan.batch, gr->plan.threads), 0, n->accum[0],
                  r >= 0};
    j.wst = conv_slice(&g, j.chunk);
    int32_t nt = cpu_parallel(gr->pool, conv_backward_task, &j);
    for (int32_t t = 1; t < nt; t++) {  /* sum the partial weight and bias gradients */
        const float *pw = partial_dw(&j, t), *pb = j.db ? partial_db(&j, t) : NULL;
        for (int64_t k = 0; k < g.oc * g.kg; k++) j.dw[k] += pw[k];
        for (int64_t k = 0; pb && k < g.oc; k++) j.db[k] += pb[k];
    }
}
