/* pool.c — MaxPool2D, AvgPool2D and GlobalAvgPool2D on the CPU, NCHW, as torch.nn defines them
 * (floor mode; max pooling pads with -inf and sends each gradient to the first maximum, a NaN
 * winning as in PyTorch; average pooling divides by KH*KW or, without count_include_pad, by the number of
 * in-bounds taps). MaxPool saves the argmax of every output element; the others save nothing. */
#include "cpu.h"

#include <math.h>
#include <string.h>

typedef struct pool_geom {
    int64_t planes, h, w, oh, ow;  /* planes = batch * C */
    int64_t kh, kw, sh, sw, ph, pw;
    int include_pad;
} pool_geom;

static pool_geom geom(const cpu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    const int32_t *q = n->ints;  /* kh, kw, sh, sw, ph, pw [, count_include_pad] */
    pool_geom p = {b * a->shape[0], a->shape[1], a->shape[2], n->shape[1], n->shape[2],
                   q[0], q[1], q[2], q[3], q[4], q[5], q[6]};
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

/* GlobalAvgPool2D over the pool, a share of the planes per thread */
typedef struct gap_job {
    float *out;
    const float *in;
    int64_t planes, hw;
    int accum;
} gap_job;

CPU_SIMD static void gap_forward_task(void *ctx, int32_t t, int32_t nt) {
    // out (planes) = mean of in (planes, HW), summed in double lanes: a float running sum over a
    // 224 x 224 plane was 5e-4 off (torch's pairwise float sum is ~1e-7)
    const gap_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->planes, t, nt, &lo, &hi);
    for (int64_t c = lo; c < hi; c++) {
        double s[CPU_LANES] = {0};
        cpu_lanes_sum(s, j->in + c * j->hw, j->hw);
        j->out[c] = (float)(cpu_lanes_total(s) / (double)j->hw);
    }
}

CPU_SIMD static void gap_backward_task(void *ctx, int32_t t, int32_t nt) {
    // out (planes, HW) (+)= in (planes) / HW
    const gap_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->planes, t, nt, &lo, &hi);
    for (int64_t c = lo; c < hi; c++) {
        float d = j->in[c] / (float)j->hw, *o = j->out + c * j->hw;
        if (j->accum)
            for (int64_t k = 0; k < j->hw; k++) o[k] += d;
        else
            for (int64_t k = 0; k < j->hw; k++) o[k] = d;
    }
}

static void gap_run(cpu_graph *g, cpu_task fn, gap_job *j) {
    if (j->planes * j->hw >= CPU_PARALLEL_MIN && j->planes > 1) cpu_parallel(g->pool, fn, j);
    else fn(j, 0, 1);
}

void cpu_pool_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t i = n - g->plan.nodes;
    const float *x = g->y[n->in[0]];
    if (n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) {
        const mpscy_node *src = &g->plan.nodes[n->in[0]];
        gap_job j = {g->y[i], x, b * src->shape[0], src->shape[1] * src->shape[2], 0};
        gap_run(g, gap_forward_task, &j);
        return;
    }
    pool_geom p = geom(g, n, b);
    if (n->kind == MPSCY_LAYER_MAXPOOL2D) {
        p.include_pad = 0;
        maxpool_forward(g->y[i], (int32_t *)(g->save + n->save), x, &p);
    } else {
        avgpool_forward(g->y[i], x, &p);
    }
}

void cpu_pool_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t i = n - g->plan.nodes;
    float *dx = g->dy[n->in[0]];
    if (!dx) return;
    if (n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) {
        const mpscy_node *src = &g->plan.nodes[n->in[0]];
        gap_job j = {dx, g->dy[i], b * src->shape[0], src->shape[1] * src->shape[2], n->accum[0]};
        gap_run(g, gap_backward_task, &j);
        return;
    }
    pool_geom p = geom(g, n, b);
    if (n->kind == MPSCY_LAYER_MAXPOOL2D)
        maxpool_backward(dx, g->dy[i], (const int32_t *)(g->save + n->save), &p, n->accum[0]);
    else
        avgpool_backward(dx, g->dy[i], &p, n->accum[0]);
}
