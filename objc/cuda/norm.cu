/* norm.cu — BatchNorm and LayerNorm on CUDA, as cpu/norm.c defines them. BatchNorm: one block
 * per channel computes the batch mean and biased variance (two passes, double) and normalizes in
 * the same kernel; they are saved for backward and for commit, which folds them into the running
 * statistics only when the device decided the step is applied. LayerNorm: one warp per row,
 * statistics in double; its parameter gradients sum rows in the cpu's order. */
#include "cuda.h"
#include "reduce.h"

#include <math.h>

static void bn_dims(const cu_graph *g, const mpscy_node *n, int64_t *c, int64_t *inner) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    *c = a->shape[0];
    *inner = a->rank == 3 ? a->shape[1] * a->shape[2] : 1;
}

/* Block ch: statistics of channel ch over (b, inner) when train (else the running ones), then y. */
__global__ void batchnorm_forward(float *y, float *mean, float *var, float *invs, const float *x, const float *rmean,
                                  const float *rvar, const float *gamma, const float *beta, double eps, int64_t b,
                                  int64_t c, int64_t inner, int train) {
    // y, x (b, C, inner); mean, var, invs (C) saved batch statistics (invs = 1/sqrt(var + eps) from
    // the double variance, as torch's invstd); rmean, rvar (C); gamma, beta (C) or NULL
    cu_pdl_enter();
    __shared__ double sh[2];
    int64_t ch = blockIdx.x, count = b * inner;
    if (train) {
        double s = 0.0;
        for (int64_t e = threadIdx.x; e < count; e += blockDim.x) s += x[((e / inner) * c + ch) * inner + e % inner];
        s = block_sum(s);
        if (threadIdx.x == 0) sh[0] = s / (double)count;
        __syncthreads();
        double m = sh[0], q = 0.0;
        for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
            double d = x[((e / inner) * c + ch) * inner + e % inner] - m;
            q += d * d;
        }
        q = block_sum(q);
        if (threadIdx.x == 0) {
            mean[ch] = (float)m;
            var[ch] = (float)(q / (double)count);
            invs[ch] = (float)(1.0 / sqrt(q / (double)count + eps));
        }
        __syncthreads();
    }
    float mv = train ? mean[ch] : rmean[ch];
    float inv = train ? invs[ch] : (float)(1.0 / sqrt((double)rvar[ch] + eps));
    float scale = gamma ? gamma[ch] * inv : inv;
    float shift = (beta ? beta[ch] : 0.0f) - mv * scale;
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
        int64_t k = ((e / inner) * c + ch) * inner + e % inner;
        y[k] = x[k] * scale + shift;
    }
}

__global__ void batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                                   const float *mean, const float *invs, const float *gamma, int64_t b,
                                   int64_t c, int64_t inner, int accum) {
    // dx (b, C, inner) or NULL, dgamma, dbeta (C) or NULL, dy, x (b, C, inner), mean, invs (C) the
    // batch's statistics, gamma (C) or NULL
    cu_pdl_enter();
    __shared__ double sh[2];
    int64_t ch = blockIdx.x, count = b * inner;
    double inv = invs[ch], m = mean[ch], sdy = 0.0, sdyx = 0.0;
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
        int64_t k = ((e / inner) * c + ch) * inner + e % inner;
        sdy += dy[k];
        sdyx += dy[k] * ((x[k] - m) * inv);
    }
    sdy = block_sum(sdy);
    if (threadIdx.x == 0) sh[0] = sdy;
    sdyx = block_sum(sdyx);
    if (threadIdx.x == 0) sh[1] = sdyx;
    __syncthreads();
    sdy = sh[0];
    sdyx = sh[1];
    if (threadIdx.x == 0) {
        if (dgamma) dgamma[ch] = (float)sdyx;
        if (dbeta) dbeta[ch] = (float)sdy;
    }
    if (!dx) return;
    double gm = gamma ? gamma[ch] : 1.0;
    float k1 = (float)(gm * inv), k2 = (float)(gm * inv * sdy / (double)count), k3 = (float)(gm * inv * sdyx / (double)count);
    float fm = (float)m, finv = (float)inv;
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
        int64_t k = ((e / inner) * c + ch) * inner + e % inner;
        float v = k1 * dy[k] - k2 - k3 * ((x[k] - fm) * finv);
        dx[k] = accum ? dx[k] + v : v;
    }
}

/* running = (1 - momentum) running + momentum batch (unbiased variance), on applied steps */
__global__ void batchnorm_commit(float *rm, float *rv, const float *mean, const float *var, const cu_scratch *S,
                                 double momentum, double count, int64_t c, int always) {
    cu_pdl_enter();
    if (!always && !S->applied) return;
    double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c; ch += (int64_t)gridDim.x * blockDim.x) {
        rm[ch] = (float)((1.0 - momentum) * rm[ch] + momentum * mean[ch]);
        rv[ch] = (float)((1.0 - momentum) * rv[ch] + momentum * var[ch] * unbias);
    }
}

int cu_batchnorm_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    float *mean = g->save + n->save, *var = mean + c, *invs = var + c;
    CU_TRY(cu_launch(g, batchnorm_forward, dim3((unsigned)c), CU_THREADS, g->stream, g->y[cu_node_index(g, n)], mean, var,
                     invs, (const float *)g->y[n->in[0]], (const float *)cu_tensor(g, n, MPSCY_ROLE_BUFFER, 0),
                     (const float *)cu_tensor(g, n, MPSCY_ROLE_BUFFER, 1),
                     (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0), (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 1),
                     n->reals[1], b, c, inner, train),
           "batchnorm_forward");
    return CU_LAUNCHED("batchnorm_forward");
}

int cu_batchnorm_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    const float *mean = g->save + n->save, *invs = mean + 2 * c;
    CU_TRY(cu_launch(g, batchnorm_backward, dim3((unsigned)c), CU_THREADS, g->stream, g->dy[n->in[0]],
                     cu_tensor_grad(g, n, 0), cu_tensor_grad(g, n, 1), (const float *)g->dy[cu_node_index(g, n)],
                     (const float *)g->y[n->in[0]], mean, invs, (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                     b, c, inner, (int)n->accum[0]),
           "batchnorm_backward");
    return CU_LAUNCHED("batchnorm_backward");
}

int cu_batchnorm_commit(cu_graph *g, const mpscy_node *n, int64_t b, int always, char *err, size_t en) {
    int64_t c, inner;
    bn_dims(g, n, &c, &inner);
    const float *mean = g->save + n->save, *var = mean + c;
    CU_TRY(cu_launch(g, batchnorm_commit, cu_blocks(c, CU_THREADS, 64), CU_THREADS, g->stream,
                     cu_tensor(g, n, MPSCY_ROLE_BUFFER, 0), cu_tensor(g, n, MPSCY_ROLE_BUFFER, 1), mean, var,
                     (const cu_scratch *)g->scratch, n->reals[0], (double)(b * inner), c, always),
           "batchnorm_commit");
    return CU_LAUNCHED("batchnorm_commit");
}

/* ------------------------------------------------------------------ LayerNorm */

__global__ void layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *w,
                                  const float *bias, int64_t rows, int64_t d, double eps) {
    // y, x (rows, D); mean, rstd (rows); w, bias (D) or NULL; one warp per row
    cu_pdl_enter();
    int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float *xr = x + r * d;
    double s = 0.0, q = 0.0;
    for (int64_t k = lane; k < d; k += 32) s += xr[k];
    double m = warp_allsum(s) / (double)d;
    for (int64_t k = lane; k < d; k += 32) q += (xr[k] - m) * (xr[k] - m);
    double inv = 1.0 / sqrt(warp_allsum(q) / (double)d + eps);
    if (lane == 0) {
        mean[r] = (float)m;
        rstd[r] = (float)inv;
    }
    float fm = (float)m, fi = (float)inv;
    for (int64_t k = lane; k < d; k += 32) {
        float h = (xr[k] - fm) * fi;
        y[r * d + k] = w ? h * w[k] + bias[k] : h;
    }
}

__global__ void layernorm_backward(float *dx, const float *dy, const float *x, const float *mean, const float *rstd,
                                   const float *w, int64_t rows, int64_t d, int accum) {
    // dx, dy, x (rows, D); mean, rstd (rows); w (D) or NULL; one warp per row
    cu_pdl_enter();
    int64_t r = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float *xr = x + r * d, *dr = dy + r * d;
    float m = mean[r], inv = rstd[r];
    double sg = 0.0, sgx = 0.0;
    for (int64_t k = lane; k < d; k += 32) {
        float h = (xr[k] - m) * inv, gk = w ? dr[k] * w[k] : dr[k];
        sg += gk;
        sgx += gk * h;
    }
    float a = (float)(warp_allsum(sg) / (double)d), c = (float)(warp_allsum(sgx) / (double)d);
    for (int64_t k = lane; k < d; k += 32) {
        float h = (xr[k] - m) * inv, gk = w ? dr[k] * w[k] : dr[k];
        float v = inv * (gk - a - h * c);
        dx[r * d + k] = accum ? dx[r * d + k] + v : v;
    }
}

/* dw (D) = sum over rows of dy * h, db (D) = sum of dy: one thread per column, rows in order */
__global__ void layernorm_param_grad(float *dw, float *db, const float *dy, const float *x, const float *mean,
                                     const float *rstd, int64_t rows, int64_t d) {
    cu_pdl_enter();
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < d; k += (int64_t)gridDim.x * blockDim.x) {
        float sw = 0.0f, sb = 0.0f;
        for (int64_t r = 0; r < rows; r++) {
            float dr = dy[r * d + k], h = (x[r * d + k] - mean[r]) * rstd[r];
            sw += dr * h;
            sb += dr;
        }
        if (dw) dw[k] = sw;
        if (db) db[k] = sb;
    }
}

static int64_t ln_width(const cu_graph *g, const mpscy_node *n) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    return mpscy_shape_count(n->ints[0], a->shape + (a->rank - n->ints[0]));
}

int cu_layernorm_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    int64_t d = ln_width(g, n), rows = b * n->size / d, half = n->save_size / 2;
    CU_TRY(cu_launch(g, layernorm_forward, cu_blocks(rows, CU_THREADS / 32, 1 << 30), CU_THREADS, g->stream,
                     g->y[cu_node_index(g, n)], g->save + n->save, g->save + n->save + half, (const float *)g->y[n->in[0]],
                     (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0), (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 1),
                     rows, d, n->reals[1]),
           "layernorm_forward");
    return CU_LAUNCHED("layernorm_forward");
}

int cu_layernorm_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t d = ln_width(g, n), rows = b * n->size / d, half = n->save_size / 2;
    const float *mean = g->save + n->save, *rstd = mean + half, *x = g->y[n->in[0]], *dy = g->dy[cu_node_index(g, n)];
    float *dw = cu_tensor_grad(g, n, 0), *db = cu_tensor_grad(g, n, 1);
    if (dw || db) {
        CU_TRY(cu_launch(g, layernorm_param_grad, cu_blocks(d, CU_THREADS, 1 << 30), CU_THREADS, g->stream, dw, db, dy, x,
                         mean, rstd, rows, d),
               "layernorm_param_grad");
        int st = CU_LAUNCHED("layernorm_param_grad");
        if (st != MPSCY_OK) return st;
    }
    if (!g->dy[n->in[0]]) return MPSCY_OK;
    CU_TRY(cu_launch(g, layernorm_backward, cu_blocks(rows, CU_THREADS / 32, 1 << 30), CU_THREADS, g->stream,
                     g->dy[n->in[0]], dy, x, mean, rstd, (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0), rows, d,
                     (int)n->accum[0]),
           "layernorm_backward");
    return CU_LAUNCHED("layernorm_backward");
}
