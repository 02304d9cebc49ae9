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

static void batchnorm_stats(float *mean, float *var, float *inv, const float *x, double eps, int64_t b, int64_t c,
                            int64_t inner) {
    // mean (C), var (C) biased, inv (C) 1/sqrt(var + eps) from the double variance (as torch's
    // invstd: values past ~1.8e19 make the float variance inf, not the normalization), x (b, C,
    // inner); two passes in double
    double count = (double)(b * inner);
    for (int64_t ch = 0; ch < c; ch++) {
        double s = 0.0, q = 0.0;
        for (int64_t i = 0; i < b; i++) {
            const float *xr = x + (i * c + ch) * inner;
            for (int64_t k = 0; k < inner; k++) s += xr[k];
        }
        double m = s / count;
        for (int64_t i = 0; i < b; i++) {
            const float *xr = x + (i * c + ch) * inner;
            for (int64_t k = 0; k < inner; k++) {
                double d = xr[k] - m;
                q += d * d;
            }
        }
        mean[ch] = (float)m;
        var[ch] = (float)(q / count);
        inv[ch] = (float)(1.0 / sqrt(q / count + eps));
    }
}

static void batchnorm_apply(float *y, const float *x, const float *mean, const float *var, const float *invs,
                            const float *gamma, const float *beta, double eps, int64_t b, int64_t c, int64_t inner) {
    // y (b, C, inner), x (b, C, inner), mean (C), var (C) or invs (C) (the batch's, when train),
    // gamma (C) or NULL, beta (C) or NULL
    for (int64_t ch = 0; ch < c; ch++) {
        float inv = invs ? invs[ch] : (float)(1.0 / sqrt((double)var[ch] + eps));
        float scale = gamma ? gamma[ch] * inv : inv;
        float shift = (beta ? beta[ch] : 0.0f) - mean[ch] * scale;
        for (int64_t i = 0; i < b; i++) {
            const float *xr = x + (i * c + ch) * inner;
            float *yr = y + (i * c + ch) * inner;
            for (int64_t k = 0; k < inner; k++) yr[k] = xr[k] * scale + shift;
        }
    }
}

static void batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                               const float *mean, const float *invs, const float *gamma,
                               int64_t b, int64_t c, int64_t inner, int accum) {
    // dx (b, C, inner) or NULL, dgamma (C) or NULL, dbeta (C) or NULL, dy (b, C, inner),
    // x (b, C, inner), mean (C), invs (C) the batch's statistics, gamma (C) or NULL
    double count = (double)(b * inner);
    for (int64_t ch = 0; ch < c; ch++) {
        double inv = invs[ch], m = mean[ch], sdy = 0.0, sdyx = 0.0;
        for (int64_t i = 0; i < b; i++) {
            const float *xr = x + (i * c + ch) * inner, *dr = dy + (i * c + ch) * inner;
            for (int64_t k = 0; k < inner; k++) {
                sdy += dr[k];
                sdyx += dr[k] * ((xr[k] - m) * inv);
            }
        }
        if (dgamma) dgamma[ch] = (float)sdyx;
        if (dbeta) dbeta[ch] = (float)sdy;
        if (!dx) continue;
        double gm = gamma ? gamma[ch] : 1.0;
        float k1 = (float)(gm * inv), k2 = (float)(gm * inv * sdy / count), k3 = (float)(gm * inv * sdyx / count);
        float fm = (float)m, finv = (float)inv;
        for (int64_t i = 0; i < b; i++) {
            const float *xr = x + (i * c + ch) * inner, *dr = dy + (i * c + ch) * inner;
            float *o = dx + (i * c + ch) * inner;
            for (int64_t k = 0; k < inner; k++) {
                float v = k1 * dr[k] - k2 - k3 * ((xr[k] - fm) * finv);
                o[k] = accum ? o[k] + v : v;
            }
        }
    }
}

void cpu_batchnorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)a;
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    const float *x = g->y[n->in[0]];
    float *mean = g->save + n->save, *var = mean + c, *inv = var + c;  // (C) each
    if (train) batchnorm_stats(mean, var, inv, x, n->reals[1], b, c, inner);
    const float *m = train ? mean : cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 0);
    batchnorm_apply(g->y[n - g->plan.nodes], x, m, cpu_tensor(g, n, MPSCY_ROLE_BUFFER, 1), train ? inv : NULL,
                    cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0), cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1), n->reals[1], b, c,
                    inner);
}

void cpu_batchnorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    const float *mean = g->save + n->save, *inv = mean + 2 * c;
    batchnorm_backward(g->dy[n->in[0]], cpu_tensor_grad(g, n, 0), cpu_tensor_grad(g, n, 1), g->dy[n - g->plan.nodes],
                       g->y[n->in[0]], mean, inv, cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0), b, c, inner, n->accum[0]);
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

static void layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *w, const float *bias,
                              int64_t rows, int64_t d, double eps) {
    // y (rows, D), mean (rows), rstd (rows), x (rows, D), w (D) or NULL, bias (D) or NULL
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        double s = 0.0, q = 0.0;
        for (int64_t k = 0; k < d; k++) s += xr[k];
        double m = s / (double)d;
        for (int64_t k = 0; k < d; k++) q += (xr[k] - m) * (xr[k] - m);
        double inv = 1.0 / sqrt(q / (double)d + eps);
        mean[r] = (float)m;
        rstd[r] = (float)inv;
        float fm = (float)m, fi = (float)inv;
        for (int64_t k = 0; k < d; k++) {
            float h = (xr[k] - fm) * fi;
            yr[k] = w ? h * w[k] + bias[k] : h;
        }
    }
}

static void layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *mean,
                               const float *rstd, const float *w, int64_t rows, int64_t d, int accum) {
    // dx (rows, D) or NULL, dw (D) or NULL, db (D) or NULL, dy (rows, D), x (rows, D),
    // mean (rows), rstd (rows), w (D) or NULL
    if (dw) memset(dw, 0, (size_t)d * sizeof(float));
    if (db) memset(db, 0, (size_t)d * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d, *dr = dy + r * d;
        float m = mean[r], inv = rstd[r];
        double sg = 0.0, sgx = 0.0;
        for (int64_t k = 0; k < d; k++) {
            float h = (xr[k] - m) * inv, gk = w ? dr[k] * w[k] : dr[k];
            if (dw) dw[k] += dr[k] * h;
            if (db) db[k] += dr[k];
            sg += gk;
            sgx += gk * h;
        }
        if (!dx) continue;
        float a = (float)(sg / (double)d), c = (float)(sgx / (double)d);
        float *o = dx + r * d;
        for (int64_t k = 0; k < d; k++) {
            float h = (xr[k] - m) * inv, gk = w ? dr[k] * w[k] : dr[k];
            float v = inv * (gk - a - h * c);
            o[k] = accum ? o[k] + v : v;
        }
    }
}

static int64_t ln_width(const cpu_graph *g, const mpscy_node *n) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    return mpscy_shape_count(n->ints[0], a->shape + (a->rank - n->ints[0]));
}

void cpu_layernorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t d = ln_width(g, n), rows = b * n->size / d, half = n->save_size / 2;
    layernorm_forward(g->y[n - g->plan.nodes], g->save + n->save, g->save + n->save + half, g->y[n->in[0]],
                      cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0), cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1), rows, d,
                      n->reals[1]);
}

void cpu_layernorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t d = ln_width(g, n), rows = b * n->size / d, half = n->save_size / 2;
    layernorm_backward(g->dy[n->in[0]], cpu_tensor_grad(g, n, 0), cpu_tensor_grad(g, n, 1), g->dy[n - g->plan.nodes],
                       g->y[n->in[0]], g->save + n->save, g->save + n->save + half,
                       cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0), rows, d, n->accum[0]);
}
