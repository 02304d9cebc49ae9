/* pool.c — MaxPool2D, AvgPool2D, GlobalAvgPool2D and Upsample2D on the CPU, NCHW, as torch.nn
 * defines them (floor mode; max pooling pads with -inf and sends each gradient to the first
 * maximum, a NaN winning as in PyTorch; average pooling divides by KH*KW or, without
 * count_include_pad, by the number of in-bounds taps; nearest upsampling repeats each pixel over an
 * sh x sw block, and its gradient sums the block's; bilinear resizing as common/resize_math.h,
 * its gradient gathered there in the cuda backend's order). MaxPool saves the argmax of every
 * output element; the others save nothing. */
#include "cpu.h"
#include "../common/resize_math.h"

#include <math.h>
#include <string.h>

typedef struct pool_geom {
    int64_t planes, h, w, oh, ow;  /* planes = batch * C */
    int64_t kh, kw, sh, sw, ph, pw;
    int include_pad;
    int bilinear;            /* Upsample2D's mode */
    const mpscy_lerp *th, *tw;     /* bilinear: each output row's and column's taps (oh, ow) */
    const int64_t *ra, *rb;        /* bilinear: input row i's run of output rows ra[i]..ra[h + i], columns rb alike */
} pool_geom;

static pool_geom geom(const cpu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    const int32_t *q = n->ints;  /* kh, kw, sh, sw, ph, pw [, count_include_pad] */
    pool_geom p = {.planes = b * a->shape[0], .h = a->shape[1], .w = a->shape[2], .oh = n->shape[1], .ow = n->shape[2],
                   .kh = q[0], .kw = q[1], .sh = q[2], .sw = q[3], .ph = q[4], .pw = q[5], .include_pad = q[6]};
    return p;
}

static void maxpool_forward(float *y, int32_t *arg, const float *x, const pool_geom *p) {
    // y (planes, OH, OW), arg (planes, OH, OW) flat index into the input plane, x (planes, H, W)
    for (int64_t c = 0; c < p->planes; c++) {
        const float *xc = x + c * p->h * p->w;
        for (int64_t oh = 0; oh < p->oh; oh++)
            for (int64_t ow = 0; ow < p->ow; ow++) {
                int64_t h0 = oh * p->sh - p->ph, w0 = ow * p->sw - p->pw;
                float m = -INFINITY;
                int64_t best = -1;
                for (int64_t i = h0 < 0 ? 0 : h0; i < h0 + p->kh && i < p->h; i++)
                    for (int64_t j = w0 < 0 ? 0 : w0; j < w0 + p->kw && j < p->w; j++) {
                        float v = xc[i * p->w + j];
                        if (best < 0 || v > m || isnan(v)) {
                            m = v;
                            best = i * p->w + j;
                        }
                    }
                y[(c * p->oh + oh) * p->ow + ow] = m;
                arg[(c * p->oh + oh) * p->ow + ow] = (int32_t)best;
            }
    }
}

static void maxpool_backward(float *dx, const float *dy, const int32_t *arg, const pool_geom *p, int accum) {
    // dx (planes, H, W), dy (planes, OH, OW), arg (planes, OH, OW)
    int64_t hw = p->h * p->w, ohw = p->oh * p->ow;
    if (!accum) memset(dx, 0, (size_t)(p->planes * hw) * sizeof(float));
    for (int64_t c = 0; c < p->planes; c++)
        for (int64_t k = 0; k < ohw; k++) dx[c * hw + arg[c * ohw + k]] += dy[c * ohw + k];
}

/* the window of output (oh, ow) clipped to the input, and its divisor */
static float avg_window(const pool_geom *p, int64_t oh, int64_t ow, int64_t *h0, int64_t *h1, int64_t *w0, int64_t *w1) {
    int64_t hs = oh * p->sh - p->ph, ws = ow * p->sw - p->pw;
    *h0 = hs < 0 ? 0 : hs;
    *w0 = ws < 0 ? 0 : ws;
    *h1 = hs + p->kh < p->h ? hs + p->kh : p->h;
    *w1 = ws + p->kw < p->w ? ws + p->kw : p->w;
    int64_t count = p->include_pad ? p->kh * p->kw : (*h1 - *h0) * (*w1 - *w0);
    return 1.0f / (float)count;
}

static void avgpool_forward(float *y, const float *x, const pool_geom *p) {
    // y (planes, OH, OW), x (planes, H, W)
    for (int64_t c = 0; c < p->planes; c++) {
        const float *xc = x + c * p->h * p->w;
        for (int64_t oh = 0; oh < p->oh; oh++)
            for (int64_t ow = 0; ow < p->ow; ow++) {
                int64_t h0, h1, w0, w1;
                float inv = avg_window(p, oh, ow, &h0, &h1, &w0, &w1), s = 0.0f;
                for (int64_t i = h0; i < h1; i++)
                    for (int64_t j = w0; j < w1; j++) s += xc[i * p->w + j];
                y[(c * p->oh + oh) * p->ow + ow] = s * inv;
            }
    }
}

static void avgpool_backward(float *dx, const float *dy, const pool_geom *p, int accum) {
    // dx (planes, H, W), dy (planes, OH, OW)
    int64_t hw = p->h * p->w;
    if (!accum) memset(dx, 0, (size_t)(p->planes * hw) * sizeof(float));
    for (int64_t c = 0; c < p->planes; c++) {
        float *dc = dx + c * hw;
        for (int64_t oh = 0; oh < p->oh; oh++)
            for (int64_t ow = 0; ow < p->ow; ow++) {
                int64_t h0, h1, w0, w1;
                float d = dy[(c * p->oh + oh) * p->ow + ow] * avg_window(p, oh, ow, &h0, &h1, &w0, &w1);
                for (int64_t i = h0; i < h1; i++)
                    for (int64_t j = w0; j < w1; j++) dc[i * p->w + j] += d;
            }
    }
}

CPU_SIMD static void global_avgpool_forward(float *y, const float *x, int64_t planes, int64_t hw) {
    // y (planes), x (planes, HW); summed in double lanes: a float running sum over a 224 x 224
    // plane was 5e-4 off (torch's pairwise float sum is ~1e-7)
    for (int64_t c = 0; c < planes; c++) {
        double s[CPU_LANES] = {0};
        cpu_lanes_sum(s, x + c * hw, hw);
        y[c] = (float)(cpu_lanes_total(s) / (double)hw);
    }
}

CPU_SIMD static void global_avgpool_backward(float *dx, const float *dy, int64_t planes, int64_t hw, int accum) {
    // dx (planes, HW), dy (planes)
    for (int64_t c = 0; c < planes; c++) {
        float d = dy[c] / (float)hw, *o = dx + c * hw;
        if (accum)
            for (int64_t k = 0; k < hw; k++) o[k] += d;
        else
            for (int64_t k = 0; k < hw; k++) o[k] = d;
    }
}

/* Upsample2D, nearest: y[c, i, j] = x[c, i / sh, j / sw]; one output row built, then copied to
 * the block's other sh - 1 rows */
static void upsample_forward(float *y, const float *x, const pool_geom *p) {
    // y (planes, H sh, W sw), x (planes, H, W)
    for (int64_t c = 0; c < p->planes; c++)
        for (int64_t h = 0; h < p->h; h++) {
            const float *xr = x + (c * p->h + h) * p->w;
            float *yr = y + (c * p->oh + h * p->sh) * p->ow;
            for (int64_t w = 0; w < p->w; w++)
                for (int64_t k = 0; k < p->sw; k++) yr[w * p->sw + k] = xr[w];
            for (int64_t k = 1; k < p->sh; k++) memcpy(yr + k * p->ow, yr, (size_t)p->ow * sizeof(float));
        }
}

/* dx[c, h, w] = the sum of its block of dy, row by row of the block, left to right */
static void upsample_backward(float *dx, const float *dy, const pool_geom *p, int accum) {
    // dx (planes, H, W), dy (planes, H sh, W sw)
    for (int64_t c = 0; c < p->planes; c++)
        for (int64_t h = 0; h < p->h; h++) {
            float *dr = dx + (c * p->h + h) * p->w;
            const float *yr = dy + (c * p->oh + h * p->sh) * p->ow;
            for (int64_t w = 0; w < p->w; w++) {
                float s = 0.0f;
                for (int64_t i = 0; i < p->sh; i++)
                    for (int64_t k = 0; k < p->sw; k++) s += yr[i * p->ow + w * p->sw + k];
                dr[w] = accum ? dr[w] + s : s;
            }
        }
}

/* Upsample2D, bilinear, from the taps pool_run tabulated */
static void bilinear_forward(float *y, const float *x, const pool_geom *p) {
    // y (planes, OH, OW), x (planes, H, W)
    for (int64_t c = 0; c < p->planes; c++) {
        const float *xc = x + c * p->h * p->w;
        for (int64_t a = 0; a < p->oh; a++) {
            float *yr = y + (c * p->oh + a) * p->ow;
            for (int64_t b = 0; b < p->ow; b++) yr[b] = mpscy_bilinear_at(xc, p->w, p->th[a], p->tw[b]);
        }
    }
}

/* dx[c, i, j]: mpscy_bilinear_grad_at's sum, its runs and taps read from the tables */
static void bilinear_backward(float *dx, const float *dy, const pool_geom *p, int accum) {
    // dx (planes, H, W), dy (planes, OH, OW)
    for (int64_t c = 0; c < p->planes; c++) {
        const float *dc = dy + c * p->oh * p->ow;
        for (int64_t i = 0; i < p->h; i++) {
            float *dr = dx + (c * p->h + i) * p->w;
            for (int64_t j = 0; j < p->w; j++) {
                float s = 0.0f;
                for (int64_t a = p->ra[i]; a < p->ra[p->h + i]; a++) {
                    const float *row = dc + a * p->ow;
                    float t = 0.0f;
                    for (int64_t b = p->rb[j]; b < p->rb[p->w + j]; b++)
                        t += mpscy_resize_weight(p->tw[b], j) * row[b];
                    s += mpscy_resize_weight(p->th[a], i) * t;
                }
                dr[j] = accum ? dr[j] + s : s;
            }
        }
    }
}

/* the taps of every output index of an axis, then each input index's run of outputs: the first
 * whose i0 >= i - 1 in run[i], the first whose i0 >= i + 1 in run[in + i] */
static void bilinear_axis(mpscy_lerp *t, int64_t *run, int64_t in, int64_t out, int align) {
    float r = mpscy_resize_ratio(in, out, align);
    for (int64_t o = 0; o < out; o++) t[o] = mpscy_resize_lerp(o, in, r, align);
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < in; i++) {
        while (lo < out && t[lo].i0 < i - 1) lo++;
        if (hi < lo) hi = lo;
        while (hi < out && t[hi].i0 < i + 1) hi++;
        run[i] = lo;
        run[in + i] = hi;
    }
}

/* the tables' floats: taps of OH + OW outputs, two run ends of H + W inputs */
static int64_t bilinear_tables(int64_t h, int64_t w, int64_t oh, int64_t ow) {
    return ((oh + ow) * (int64_t)sizeof(mpscy_lerp) + 2 * (h + w) * (int64_t)sizeof(int64_t)) / (int64_t)sizeof(float);
}

int64_t cpu_pool_workspace(const mpscy_plan *p, const mpscy_node *n) {
    if (n->kind != MPSCY_LAYER_UPSAMPLE2D || n->ints[2] != 1) return 0;
    const mpscy_node *a = &p->nodes[n->in[0]];
    return bilinear_tables(a->shape[1], a->shape[2], n->shape[1], n->shape[2]);
}

/* One pooling pass over the pool, a share of the planes (batch x channels) per thread. */
typedef struct pool_job {
    const mpscy_node *n;
    pool_geom p;                 /* planes, and for GlobalAvgPool2D h * w = HW, oh = ow = 1 */
    float *out;                  /* forward: y (planes, OH, OW); backward: dx (planes, H, W) */
    const float *in;             /* forward: x; backward: dy */
    int32_t *arg;                /* MaxPool2D's saved argmax (planes, OH, OW) */
    int backward, accum;
} pool_job;

static void pool_task(void *ctx, int32_t t, int32_t nt) {
    const pool_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->p.planes, t, nt, &lo, &hi);
    if (hi <= lo) return;
    pool_geom q = j->p;
    q.planes = hi - lo;
    int64_t hw = q.h * q.w, ohw = q.oh * q.ow;
    int32_t *arg = j->arg ? j->arg + lo * ohw : NULL;
    if (j->backward) {
        float *dx = j->out + lo * hw;
        const float *dy = j->in + lo * ohw;
        if (j->n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) global_avgpool_backward(dx, dy, q.planes, hw, j->accum);
        else if (j->n->kind == MPSCY_LAYER_UPSAMPLE2D && q.bilinear) bilinear_backward(dx, dy, &q, j->accum);
        else if (j->n->kind == MPSCY_LAYER_UPSAMPLE2D) upsample_backward(dx, dy, &q, j->accum);
        else if (j->n->kind == MPSCY_LAYER_MAXPOOL2D) maxpool_backward(dx, dy, arg, &q, j->accum);
        else avgpool_backward(dx, dy, &q, j->accum);
        return;
    }
    float *y = j->out + lo * ohw;
    const float *x = j->in + lo * hw;
    if (j->n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) global_avgpool_forward(y, x, q.planes, hw);
    else if (j->n->kind == MPSCY_LAYER_UPSAMPLE2D && q.bilinear) bilinear_forward(y, x, &q);
    else if (j->n->kind == MPSCY_LAYER_UPSAMPLE2D) upsample_forward(y, x, &q);
    else if (j->n->kind == MPSCY_LAYER_MAXPOOL2D) maxpool_forward(y, arg, x, &q);
    else avgpool_forward(y, x, &q);
}

static void pool_run(cpu_graph *g, const mpscy_node *n, int64_t b, float *out, const float *in, int backward) {
    pool_job j = {n, {0}, out, in, NULL, backward, backward ? n->accum[0] : 0};
    if (n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D || n->kind == MPSCY_LAYER_UPSAMPLE2D) {  /* no window */
        const mpscy_node *src = &g->plan.nodes[n->in[0]];
        int up = n->kind == MPSCY_LAYER_UPSAMPLE2D;
        j.p.planes = b * src->shape[0];
        j.p.h = src->shape[1];
        j.p.w = src->shape[2];
        j.p.oh = up ? n->shape[1] : 1;
        j.p.ow = up ? n->shape[2] : 1;
        j.p.sh = up ? n->ints[0] : 1;
        j.p.sw = up ? n->ints[1] : 1;
        if (up && n->ints[2] == 1) {  /* bilinear: the tables in the workspace, built once for every thread */
            mpscy_lerp *th = (mpscy_lerp *)g->ws, *tw = th + j.p.oh;
            int64_t *ra = (int64_t *)(tw + j.p.ow), *rb = ra + 2 * j.p.h;
            bilinear_axis(th, ra, j.p.h, j.p.oh, n->ints[3]);
            bilinear_axis(tw, rb, j.p.w, j.p.ow, n->ints[3]);
            j.p.bilinear = 1;
            j.p.th = th;
            j.p.tw = tw;
            j.p.ra = ra;
            j.p.rb = rb;
        }
    } else {
        j.p = geom(g, n, b);
    }
    if (n->kind == MPSCY_LAYER_MAXPOOL2D) {
        j.p.include_pad = 0;
        j.arg = (int32_t *)(g->save + n->save);
    }
    cpu_parallel_over(g->pool, pool_task, &j, j.p.planes * (j.p.h * j.p.w > j.p.oh * j.p.ow ? j.p.h * j.p.w
                                                                                           : j.p.oh * j.p.ow),
                      j.p.planes);
}

void cpu_pool_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    pool_run(g, n, b, g->y[n - g->plan.nodes], g->y[n->in[0]], 0);
}

void cpu_pool_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    float *dx = g->dy[n->in[0]];
    if (dx) pool_run(g, n, b, dx, g->dy[n - g->plan.nodes], 1);
}
