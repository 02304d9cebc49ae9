/* norm.c — BatchNorm and LayerNorm on the CPU, as torch.nn defines them. BatchNorm normalizes
 * each feature (F input) or channel (C, H, W input) with the batch's mean and biased variance in
 * train mode, saved for backward and for commit, which folds them into the running statistics
 * (unbiased variance) only after the step proved finite; eval mode uses the running statistics.
 * LayerNorm normalizes each sample over its trailing dims and behaves the same in both modes. */
#include "cpu.h"

#include <math.h>
#include <string.h>

/* (outer, C, inner) view of a BatchNorm input: batch, channels, spatial positions */
static void bn_dims(const cpu_graph *g, const mpscy_node *n, int64_t *c, int64_t *inner) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    *c = a->shape[0];
    *inner = a->rank == 3 ? a->shape[1] * a->shape[2] : 1;
}

/* s += dy, sx += dy * (x - m) * inv, in cpu.h's lanes: BatchNorm's backward sums (two loops:
 * one loop of both sums does not vectorize) */
static inline void lanes_dot_centered(double *restrict s, double *restrict sx, const float *restrict dy,
                                      const float *restrict x, int64_t n, double m, double inv) {
    double a[CPU_LANES];
    int64_t i = 0;
    cpu_lanes_sum(s, dy, n);
    for (int k = 0; k < CPU_LANES; k++) a[k] = sx[k];
    for (; i + CPU_LANES <= n; i += CPU_LANES)
        for (int k = 0; k < CPU_LANES; k++) a[k] += dy[i + k] * ((x[i + k] - m) * inv);
    for (; i < n; i++) a[i % CPU_LANES] += dy[i] * ((x[i] - m) * inv);
    for (int k = 0; k < CPU_LANES; k++) sx[k] = a[k];
}

/* One BatchNorm pass over the pool, a share of the channels per thread (each channel's values
 * do not depend on the split). */
typedef struct bn_job {
    float *y, *dx, *dgamma, *dbeta;        /* forward output; backward outputs, each or NULL */
    float *mean, *var, *inv;               /* the batch's statistics (C) each: written in train */
    const float *x, *dy, *gamma, *beta;    /* gamma, beta (C) or NULL */
    const float *rmean, *rvar;             /* eval: the running statistics */
    double eps;
    int64_t b, c, inner;
    int train, accum;
} bn_job;

/* Channels [lo, hi) of a spatial input (inner > 1): the sums in 8 double lanes, so that they do
 * not wait on one another (cpu.h). */
static inline void bn_stats_spatial(const bn_job *j, int64_t lo, int64_t hi) {
    double count = (double)(j->b * j->inner);
    for (int64_t ch = lo; ch < hi; ch++) {
        double s[CPU_LANES] = {0}, q[CPU_LANES] = {0};
        for (int64_t i = 0; i < j->b; i++) cpu_lanes_sum(s, j->x + (i * j->c + ch) * j->inner, j->inner);
        double m = cpu_lanes_total(s) / count;
        for (int64_t i = 0; i < j->b; i++) cpu_lanes_sq(q, j->x + (i * j->c + ch) * j->inner, j->inner, m);
        double v = cpu_lanes_total(q) / count;
        j->mean[ch] = (float)m;
        j->var[ch] = (float)v;
        j->inv[ch] = (float)(1.0 / sqrt(v + j->eps));
    }
}

/* Channels [lo, hi) of a feature input (inner 1): a channel's values are strided by C, so the
 * channels are the vector, BN_CHANNELS at a time; each channel's sums run in row order. */
#define BN_CHANNELS 64
static inline void bn_stats_features(const bn_job *j, int64_t lo, int64_t hi) {
    double count = (double)j->b;
    for (int64_t c0 = lo; c0 < hi; c0 += BN_CHANNELS) {
        int64_t nc = hi - c0 < BN_CHANNELS ? hi - c0 : BN_CHANNELS;
        double s[BN_CHANNELS] = {0}, q[BN_CHANNELS] = {0};
        for (int64_t i = 0; i < j->b; i++)
            for (int64_t k = 0; k < nc; k++) s[k] += j->x[i * j->c + c0 + k];
        for (int64_t k = 0; k < nc; k++) s[k] /= count;
        for (int64_t i = 0; i < j->b; i++)
            for (int64_t k = 0; k < nc; k++) {
                double d = j->x[i * j->c + c0 + k] - s[k];
                q[k] += d * d;
            }
        for (int64_t k = 0; k < nc; k++) {
            j->mean[c0 + k] = (float)s[k];
            j->var[c0 + k] = (float)(q[k] / count);
            j->inv[c0 + k] = (float)(1.0 / sqrt(q[k] / count + j->eps));
        }
    }
}

CPU_SIMD static void bn_forward_task(void *ctx, int32_t t, int32_t nt) {
    // y (b, C, inner) = x normalized by the batch's statistics (train: computed here into mean,
    // var, inv, as torch's: 1/sqrt(var + eps) from the double variance, so values past ~1.8e19
    // make the float variance inf, not the normalization) or the running ones (eval)
    const bn_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->c, t, nt, &lo, &hi);
    if (j->train) {
        if (j->inner > 1) bn_stats_spatial(j, lo, hi);
        else bn_stats_features(j, lo, hi);
    }
    const float *mean = j->train ? j->mean : j->rmean;
    for (int64_t ch = lo; ch < hi; ch++) {
        float inv = j->train ? j->inv[ch] : (float)(1.0 / sqrt((double)j->rvar[ch] + j->eps));
        float scale = j->gamma ? j->gamma[ch] * inv : inv;
        float shift = (j->beta ? j->beta[ch] : 0.0f) - mean[ch] * scale;
        for (int64_t i = 0; i < j->b; i++) {
            const float *xr = j->x + (i * j->c + ch) * j->inner;
            float *yr = j->y + (i * j->c + ch) * j->inner;
            for (int64_t k = 0; k < j->inner; k++) yr[k] = xr[k] * scale + shift;
        }
    }
}

CPU_SIMD static void bn_backward_task(void *ctx, int32_t t, int32_t nt) {
    // dx (b, C, inner) or NULL, dgamma (C) or NULL, dbeta (C) or NULL, from dy (b, C, inner),
    // x, and the batch's mean and inv (C)
    const bn_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->c, t, nt, &lo, &hi);
    double count = (double)(j->b * j->inner);
    for (int64_t ch = lo; ch < hi; ch++) {
        double inv = j->inv[ch], m = j->mean[ch], sdy[CPU_LANES] = {0}, sdyx[CPU_LANES] = {0};
        for (int64_t i = 0; i < j->b; i++)
            lanes_dot_centered(sdy, sdyx, j->dy + (i * j->c + ch) * j->inner, j->x + (i * j->c + ch) * j->inner,
                                   j->inner, m, inv);
        double s1 = cpu_lanes_total(sdy), s2 = cpu_lanes_total(sdyx);
        if (j->dgamma) j->dgamma[ch] = (float)s2;
        if (j->dbeta) j->dbeta[ch] = (float)s1;
        if (!j->dx) continue;
        double gm = j->gamma ? j->gamma[ch] : 1.0;
        float k1 = (float)(gm * inv), k2 = (float)(gm * inv * s1 / count), k3 = (float)(gm * inv * s2 / count);
        float fm = (float)m, finv = (float)inv;
        for (int64_t i = 0; i < j->b; i++) {
            const float *xr = j->x + (i * j->c + ch) * j->inner, *dr = j->dy + (i * j->c + ch) * j->inner;
            float *o = j->dx + (i * j->c + ch) * j->inner;
            if (j->accum)
                for (int64_t k = 0; k < j->inner; k++) o[k] += k1 * dr[k] - k2 - k3 * ((xr[k] - fm) * finv);
            else
                for (int64_t k = 0; k < j->inner; k++) o[k] = k1 * dr[k] - k2 - k3 * ((xr[k] - fm) * finv);
        }
    }
}

void cpu_batchnorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)a;
    bn_job j = {0};
    bn_dims(g, n, &j.c, &j.inner);
    j.mean = g->save + n->save; j.var = j.mean + j.c; j.inv = j.var + j.c;  // (C) each
    j.y = g->y[n - g->plan.nodes]; j.x = g->y[n->in[0]];
    j.gamma = cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0); j.beta = cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1);
    j.rmean = cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 0); j.rvar = cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 1);
    j.eps = n->reals[1]; j.b = b; j.train = train;
    cpu_parallel_over(g->pool, bn_forward_task, &j, j.b * j.c * j.inner, j.c);
}

void cpu_batchnorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    bn_job j = {0};
    bn_dims(g, n, &j.c, &j.inner);
    j.mean = g->save + n->save; j.inv = j.mean + 2 * j.c;
    j.dx = g->dy[n->in[0]]; j.dgamma = cpu_tensor_grad(g, n, 0); j.dbeta = cpu_tensor_grad(g, n, 1);
    j.dy = g->dy[n - g->plan.nodes]; j.x = g->y[n->in[0]]; j.gamma = cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0);
    j.b = b; j.accum = n->accum[0];
    cpu_parallel_over(g->pool, bn_backward_task, &j, j.b * j.c * j.inner, j.c);
}

/* running = (1 - momentum) running + momentum batch, with the unbiased batch variance */
void cpu_batchnorm_commit(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    const float *mean = g->save + n->save, *var = mean + c;
    float *rm = cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 0), *rv = cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 1);
    double m = n->reals[0], count = (double)(b * inner);
    double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;  /* count 1 is refused before the step */
    for (int64_t ch = 0; ch < c; ch++) {
        rm[ch] = (float)((1.0 - m) * rm[ch] + m * mean[ch]);
        rv[ch] = (float)((1.0 - m) * rv[ch] + m * var[ch] * unbias);
    }
}

/* ------------------------------------------------------------------ LayerNorm */

/* LayerNorm over the pool, a share of the rows per thread. Backward sums the weight and bias
 * gradients over blocks of rows whose size depends on the built batch alone (at most
 * LN_BLOCKS blocks), each block's partial sums in the workspace, then the blocks in order: the
 * result does not depend on the thread count. */
#define LN_BLOCKS 64
typedef struct ln_job {
    float *y, *mean, *rstd;                /* (rows, D), (rows), (rows) */
    const float *x, *w, *bias;             /* (rows, D), (D) or NULL, (D) or NULL */
    int64_t rows, d;
    double eps;
    /* backward */
    float *dx, *part;                      /* (rows, D) or NULL; (blocks, 2, D) partial dw, db */
    const float *dy;
    int64_t block;                         /* rows per block */
    int accum;
} ln_job;

CPU_SIMD static void ln_forward_task(void *ctx, int32_t t, int32_t nt) {
    const ln_job *j = ctx;
    int64_t lo, hi, d = j->d;
    cpu_split(j->rows, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = j->x + r * d;
        float *yr = j->y + r * d;
        double s[CPU_LANES] = {0}, q[CPU_LANES] = {0};
        cpu_lanes_sum(s, xr, d);
        double m = cpu_lanes_total(s) / (double)d;
        cpu_lanes_sq(q, xr, d, m);
        double inv = 1.0 / sqrt(cpu_lanes_total(q) / (double)d + j->eps);
        j->mean[r] = (float)m;
        j->rstd[r] = (float)inv;
        float fm = (float)m, fi = (float)inv;
        if (j->w)
            for (int64_t k = 0; k < d; k++) yr[k] = ((xr[k] - fm) * fi) * j->w[k] + j->bias[k];
        else
            for (int64_t k = 0; k < d; k++) yr[k] = (xr[k] - fm) * fi;
    }
}

CPU_SIMD static void ln_backward_task(void *ctx, int32_t t, int32_t nt) {
    // blocks [lo, hi) of rows: dx (rows, D) or NULL, and each block's partial dw and db (D each,
    // when there is a weight) summed in row order, from dy (rows, D), x (rows, D), mean and rstd (rows)
    const ln_job *j = ctx;
    int64_t lo, hi, d = j->d, blocks = (j->rows + j->block - 1) / j->block;
    cpu_split(blocks, t, nt, &lo, &hi);
    for (int64_t bk = lo; bk < hi; bk++) {
        float *pw = j->part + bk * 2 * d, *pb = pw + d;
        if (j->w) memset(pw, 0, (size_t)(2 * d) * sizeof(float));
        int64_t r1 = (bk + 1) * j->block < j->rows ? (bk + 1) * j->block : j->rows;
        for (int64_t r = bk * j->block; r < r1; r++) {
            const float *xr = j->x + r * d, *dr = j->dy + r * d;
            float m = j->mean[r], inv = j->rstd[r];
            double sg[CPU_LANES] = {0}, sgx[CPU_LANES] = {0};
            for (int64_t k = 0; k < d; k++) {
                float h = (xr[k] - m) * inv, gk = j->w ? dr[k] * j->w[k] : dr[k];
                if (j->w) {
                    pw[k] += dr[k] * h;
                    pb[k] += dr[k];
                }
                sg[k % CPU_LANES] += gk;
                sgx[k % CPU_LANES] += gk * h;
            }
            if (!j->dx) continue;
            float a = (float)(cpu_lanes_total(sg) / (double)d), c = (float)(cpu_lanes_total(sgx) / (double)d);
            float *o = j->dx + r * d;
            for (int64_t k = 0; k < d; k++) {
                float h = (xr[k] - m) * inv, gk = j->w ? dr[k] * j->w[k] : dr[k];
                float v = inv * (gk - a - h * c);
                o[k] = j->accum ? o[k] + v : v;
            }
        }
    }
}

/* D, the normalized width of LayerNorm node n, and its rows per backward block at the built batch */
static int64_t ln_width(const mpscy_plan *p, const mpscy_node *n) {
    const mpscy_node *a = &p->nodes[n->in[0]];
    return mpscy_shape_count(n->ints[0], a->shape + (a->rank - n->ints[0]));
}

static int64_t ln_block(const mpscy_plan *p, const mpscy_node *n) {
    int64_t rows = p->batch * (n->size / ln_width(p, n)), per = (rows + LN_BLOCKS - 1) / LN_BLOCKS;
    return per < 16 ? 16 : per;
}

int64_t cpu_layernorm_workspace(const mpscy_plan *p, const mpscy_node *n) {
    int64_t d = ln_width(p, n), rows = p->batch * (n->size / d), block = ln_block(p, n);
    return (rows + block - 1) / block * 2 * d;
}

void cpu_layernorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t d = ln_width(&g->plan, n), rows = b * n->size / d, half = n->save_size / 2;
    ln_job j = {g->y[n - g->plan.nodes], g->save + n->save, g->save + n->save + half, g->y[n->in[0]],
                cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0), cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1), rows, d, n->reals[1]};
    cpu_parallel_over(g->pool, ln_forward_task, &j, rows * d, rows);
}

void cpu_layernorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t d = ln_width(&g->plan, n), rows = b * n->size / d, half = n->save_size / 2;
    float *dw = cpu_tensor_grad(g, n, 0), *db = cpu_tensor_grad(g, n, 1);
    ln_job j = {0};
    j.mean = g->save + n->save; j.rstd = j.mean + half;
    j.x = g->y[n->in[0]]; j.w = cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0); j.rows = rows; j.d = d;
    j.dx = g->dy[n->in[0]]; j.part = g->ws; j.dy = g->dy[n - g->plan.nodes];
    j.block = ln_block(&g->plan, n); j.accum = n->accum[0];
    int64_t blocks = (rows + j.block - 1) / j.block;
    cpu_parallel_over(g->pool, ln_backward_task, &j, rows * d, blocks);
    if (!dw) return;  /* no weight (elementwise_affine=False): no weight or bias gradient */
    for (int64_t k = 0; k < d; k++) dw[k] = db[k] = 0.0f;
    for (int64_t bk = 0; bk < blocks; bk++) {  /* the blocks' partial sums, in order */
        const float *pw = j.part + bk * 2 * d, *pb = pw + d;
        for (int64_t k = 0; k < d; k++) {
            dw[k] += pw[k];
            db[k] += pb[k];
        }
    }
}
