/* norm.cu — BatchNorm and LayerNorm on CUDA, as cpu/norm.c defines them. BatchNorm: one block
 * per channel computes the batch mean and biased variance (two passes, double) and normalizes in
 * the same kernel; they are saved for backward and for commit, which folds them into the running
 * statistics only when the device decided the step is applied. A channel of many values is split
 * over blocks instead (below; $MPSCY_CUDA_BN_SPLIT=0 keeps one block a channel). LayerNorm: one
 * warp per row, statistics in double; its parameter gradients sum rows in the cpu's order. */
#include <algorithm>

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

/* ---------------------------------------------------------------- BatchNorm over parts
 * One block a channel leaves most of the GPU idle where a channel holds many values: a U-Net's
 * BatchNorm over (16, 32, 64, 64) took 122 us a call, each of 32 blocks reading 65,536 values
 * three times (bench/cuda_segment.py --profile, H100); over parts, 6-18 us a kernel and the U-Net's
 * step 4.56 -> 2.71 ms (fortieth session). The default; $MPSCY_CUDA_BN_SPLIT=0 (read when a graph
 * is built and captured) keeps one block a channel. Each channel's (sample, position) values,
 * flattened, are cut into P parts of L (bn_parts: about four blocks a multiprocessor, at least
 * BN_PART_MIN values a part, at most BN_PARTS_MAX parts); a block a (channel, part) writes its
 * part's statistics in double to the workspace (forward: its count, mean and sum of squared
 * deviations, two passes over the part; backward: its sums of dy and dy x-hat), then a block a
 * (channel, part) merges its channel's parts in part order (Chan's pairwise update, in double: the
 * same result in every block) and normalizes, or takes dx of, its own part. */
#define BN_PART_MIN 2048
#define BN_PARTS_MAX 64
#define BN_INNER_MIN 128

/* f(k) for the element index k of channel ch of every flattened (sample, position) e in [e0, e1),
 * the block's threads along each sample's run of positions */
template <class F>
static __device__ __forceinline__ void bn_each(int64_t e0, int64_t e1, int64_t c, int64_t inner, int64_t ch, F f) {
    int64_t s = e0 / inner, p = e0 - s * inner;
    for (int64_t e = e0; e < e1;) {
        const int64_t run = min(inner - p, e1 - e), base = (s * c + ch) * inner + p;
#pragma unroll 4
        for (int64_t t = threadIdx.x; t < run; t += blockDim.x) f(base + t);
        e += run;
        s++;
        p = 0;
    }
}

/* Block (ch, j): part j's count, mean and sum of squared deviations, in double, at
 * parts[(ch P + j) 3 ...] */
__global__ void bn_stats_part(double *parts, const float *x, int64_t b, int64_t c, int64_t inner, int64_t len) {
    cu_pdl_enter();
    __shared__ double sh;
    const int64_t ch = blockIdx.x, j = blockIdx.y, P = gridDim.y, count = b * inner;
    const int64_t e0 = min(j * len, count), e1 = min(e0 + len, count);
    double s = 0.0;
    bn_each(e0, e1, c, inner, ch, [&](int64_t k) { s += x[k]; });
    s = block_sum(s);
    if (threadIdx.x == 0) sh = e1 > e0 ? s / (double)(e1 - e0) : 0.0;
    __syncthreads();
    const double m = sh;
    double q = 0.0;
    bn_each(e0, e1, c, inner, ch, [&](int64_t k) {
        const double d = x[k] - m;
        q += d * d;
    });
    q = block_sum(q);
    if (threadIdx.x == 0) {
        double *o = parts + (ch * P + j) * 3;
        o[0] = (double)(e1 - e0);
        o[1] = m;
        o[2] = q;
    }
}

/* channel ch's parts merged in part order (Chan's update): its mean and (biased) variance. Every
 * thread calls it: the parts are staged in shared memory by the first P threads, thread 0 merges
 * them, the result goes to all (the same arithmetic in every block of the channel). */
static __device__ void bn_merge(const double *parts, int64_t ch, int64_t P, double *mean, double *var) {
    __shared__ double st[BN_PARTS_MAX * 3], res[2];
    for (int64_t t = threadIdx.x; t < P * 3; t += blockDim.x) st[t] = parts[ch * P * 3 + t];
    __syncthreads();
    if (threadIdx.x == 0) {
        double n = 0.0, m = 0.0, q = 0.0;
        for (int64_t j = 0; j < P; j++) {
            const double *o = st + j * 3;
            if (o[0] == 0.0) continue;
            const double nn = n + o[0], d = o[1] - m, r = o[0] / nn;
            m += d * r;
            q += o[2] + d * d * n * r;
            n = nn;
        }
        res[0] = m;
        res[1] = n > 0.0 ? q / n : 0.0;
    }
    __syncthreads();
    *mean = res[0];
    *var = res[1];
}

/* Block (ch, j): channel ch's statistics (train: merged from parts; block j = 0 saves them as
 * batchnorm_forward does) or the running ones, then y over part j */
__global__ void bn_norm_part(float *y, float *mean, float *var, float *invs, const double *parts, const float *x,
                             const float *rmean, const float *rvar, const float *gamma, const float *beta, double eps,
                             int64_t b, int64_t c, int64_t inner, int64_t len, int train) {
    cu_pdl_enter();
    __shared__ float sc[2];
    const int64_t ch = blockIdx.x, j = blockIdx.y, count = b * inner;
    double m = 0.0, v = 0.0;
    if (train) bn_merge(parts, ch, gridDim.y, &m, &v);   /* every thread: it has barriers */
    if (threadIdx.x == 0) {
        float mv, inv;
        if (train) {
            mv = (float)m;
            inv = (float)(1.0 / sqrt(v + eps));
            if (j == 0) {
                mean[ch] = mv;
                var[ch] = (float)v;
                invs[ch] = inv;
            }
        } else {
            mv = rmean[ch];
            inv = (float)(1.0 / sqrt((double)rvar[ch] + eps));
        }
        const float scale = gamma ? gamma[ch] * inv : inv;
        sc[0] = scale;
        sc[1] = (beta ? beta[ch] : 0.0f) - mv * scale;
    }
    __syncthreads();
    const float scale = sc[0], shift = sc[1];
    const int64_t e0 = min(j * len, count), e1 = min(e0 + len, count);
    bn_each(e0, e1, c, inner, ch, [&](int64_t k) { y[k] = x[k] * scale + shift; });
}

/* Block (ch, j): part j's sums of dy and dy x-hat, in double, at parts[(ch P + j) 2 ...] */
__global__ void bn_grad_part(double *parts, const float *dy, const float *x, const float *mean, const float *invs,
                             int64_t b, int64_t c, int64_t inner, int64_t len) {
    cu_pdl_enter();
    const int64_t ch = blockIdx.x, j = blockIdx.y, P = gridDim.y, count = b * inner;
    const int64_t e0 = min(j * len, count), e1 = min(e0 + len, count);
    const double inv = invs[ch], m = mean[ch];
    double sdy = 0.0, sdyx = 0.0;
    bn_each(e0, e1, c, inner, ch, [&](int64_t k) {
        sdy += dy[k];
        sdyx += dy[k] * ((x[k] - m) * inv);
    });
    sdy = block_sum(sdy);
    sdyx = block_sum(sdyx);
    if (threadIdx.x == 0) {
        parts[(ch * P + j) * 2] = sdy;
        parts[(ch * P + j) * 2 + 1] = sdyx;
    }
}

/* Block (ch, j): channel ch's sums added in part order (block j = 0 writes dgamma and dbeta), then
 * dx over part j as batchnorm_backward takes it */
__global__ void bn_dx_part(float *dx, float *dgamma, float *dbeta, const double *parts, const float *dy,
                           const float *x, const float *mean, const float *invs, const float *gamma, int64_t b,
                           int64_t c, int64_t inner, int64_t len, int accum) {
    cu_pdl_enter();
    __shared__ float k[3];
    __shared__ double st[BN_PARTS_MAX * 2];
    const int64_t ch = blockIdx.x, j = blockIdx.y, P = gridDim.y, count = b * inner;
    for (int64_t t = threadIdx.x; t < P * 2; t += blockDim.x) st[t] = parts[ch * P * 2 + t];
    __syncthreads();
    if (threadIdx.x == 0) {
        double sdy = 0.0, sdyx = 0.0;
        for (int64_t q = 0; q < P; q++) {   /* in part order */
            sdy += st[q * 2];
            sdyx += st[q * 2 + 1];
        }
        if (j == 0) {
            if (dgamma) dgamma[ch] = (float)sdyx;
            if (dbeta) dbeta[ch] = (float)sdy;
        }
        const double inv = invs[ch], gm = gamma ? gamma[ch] : 1.0;
        k[0] = (float)(gm * inv);
        k[1] = (float)(gm * inv * sdy / (double)count);
        k[2] = (float)(gm * inv * sdyx / (double)count);
    }
    __syncthreads();
    if (!dx) return;
    const float k1 = k[0], k2 = k[1], k3 = k[2], fm = mean[ch], finv = invs[ch];
    const int64_t e0 = min(j * len, count), e1 = min(e0 + len, count);
    bn_each(e0, e1, c, inner, ch, [&](int64_t e) {
        const float v = k1 * dy[e] - k2 - k3 * ((x[e] - fm) * finv);
        dx[e] = accum ? dx[e] + v : v;
    });
}

/* The parts of a channel of b x inner values (1: one block a channel, the kernels above): about
 * four blocks a multiprocessor over the c channels (eight measured the same: the U-Net's step
 * 2.27 against 2.25 ms, H100), unless the knob is 0 (at build or at capture),
 * where a sample's run of positions fills a block's threads (bn_each walks a part run by run: an
 * inner of 1, a BatchNorm after a Dense, would leave all but one thread idle) */
static int64_t bn_parts(int sms, int64_t c, int64_t inner, int64_t count) {
    if (cu_knob_int("MPSCY_CUDA_BN_SPLIT", 1) == 0 || inner < BN_INNER_MIN) return 1;
    const int64_t want = (4 * (int64_t)sms + c - 1) / c, most = count / BN_PART_MIN;
    return std::max<int64_t>(1, std::min({want, most, (int64_t)BN_PARTS_MAX}));
}

/* floats of workspace for c channels' parts of `per` doubles each, at the most parts any device
 * takes (a batch of `count` values a channel) */
static int64_t parts_floats(int64_t c, int64_t inner, int64_t count, int per) {
    return c * bn_parts(1 << 20, c, inner, count) * per * 2;
}

int64_t cu_batchnorm_workspace(const mpscy_plan *p, const mpscy_node *n) {
    const mpscy_node *a = &p->nodes[n->in[0]];
    const int64_t c = a->shape[0], inner = a->rank == 3 ? a->shape[1] * a->shape[2] : 1;
    if (bn_parts(1 << 20, c, inner, p->batch * inner) < 2) return 0;   /* one block a channel needs none */
    return parts_floats(c, inner, p->batch * inner, 3);   /* forward's 3 doubles a part; backward's 2 */
}

/* the parts this launch takes (of `per` doubles each): 1 where the workspace (sized at build, the
 * knob as it was then) is short */
static int64_t bn_parts_on(const cu_graph *g, int64_t c, int64_t inner, int64_t count, int per) {
    const int64_t P = bn_parts(g->dev->sms, c, inner, count);
    return P > 1 && c * P * per * 2 <= g->ws_floats ? P : 1;
}

/* ------------------------------------------------------------- a channel's sum over parts
 * out[ch] = the sum of x[:, ch, :] over samples and positions, in double, for a bias gradient (a
 * ConvTranspose2D's: one block a channel took 49 us a call for (16, 64, 64, 64) on an H100): block
 * (ch, j) sums part j (bn_parts' cut) into parts[ch P + j], then thread ch adds its P parts in
 * order (the same bits every run). */
__global__ void chan_sum_part(double *parts, const float *x, int64_t b, int64_t c, int64_t inner, int64_t len) {
    cu_pdl_enter();
    const int64_t ch = blockIdx.x, j = blockIdx.y, count = b * inner;
    const int64_t e0 = min(j * len, count), e1 = min(e0 + len, count);
    double s = 0.0;
    if (inner >= 32) {
        bn_each(e0, e1, c, inner, ch, [&](int64_t k) { s += x[k]; });
    } else {  /* runs shorter than a warp (a 2x2 output: 4 of 256 threads busy): every value's own index */
        for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) s += x[((e / inner) * c + ch) * inner + e % inner];
    }
    s = block_sum(s);
    if (threadIdx.x == 0) parts[ch * gridDim.y + j] = s;
}

__global__ void chan_sum_merge(float *out, const double *parts, int64_t c, int64_t P) {
    cu_pdl_enter();
    for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c; ch += (int64_t)gridDim.x * blockDim.x) {
        double s = 0.0;
        for (int64_t j = 0; j < P; j++) s += parts[ch * P + j];
        out[ch] = (float)s;
    }
}

int64_t cu_channel_sums_workspace(int64_t c, int64_t inner, int64_t batch) {
    return parts_floats(c, inner, batch * inner, 1);   /* one part too: its sums go through it */
}

int cu_channel_sums(cu_graph *g, cudaStream_t s, float *out, const float *x, int64_t b, int64_t c, int64_t inner,
                    char *err, size_t en) {
    const int64_t P = bn_parts_on(g, c, inner, b * inner, 1), len = (b * inner + P - 1) / P;
    double *parts = (double *)g->ws;
    CU_TRY(cu_launch(g, chan_sum_part, dim3((unsigned)c, (unsigned)P), CU_THREADS, s, parts, x, b, c, inner, len),
           "chan_sum_part");
    const int st = CU_LAUNCHED("chan_sum_part");
    if (st != MPSCY_OK) return st;
    CU_TRY(cu_launch(g, chan_sum_merge, cu_blocks(c, CU_THREADS, 64), CU_THREADS, s, out, (const double *)parts, c, P),
           "chan_sum_merge");
    return CU_LAUNCHED("chan_sum_merge");
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
    const int64_t P = bn_parts_on(g, c, inner, b * inner, 3);
    if (P > 1) {
        const int64_t len = (b * inner + P - 1) / P;
        const float *x = g->y[n->in[0]];
        double *parts = (double *)g->ws;
        if (train) {
            CU_TRY(cu_launch(g, bn_stats_part, dim3((unsigned)c, (unsigned)P), CU_THREADS, g->stream, parts, x, b, c,
                             inner, len),
                   "bn_stats_part");
            const int st = CU_LAUNCHED("bn_stats_part");
            if (st != MPSCY_OK) return st;
        }
        CU_TRY(cu_launch(g, bn_norm_part, dim3((unsigned)c, (unsigned)P), CU_THREADS, g->stream,
                         g->y[cu_node_index(g, n)], mean, var, invs, (const double *)parts, x,
                         (const float *)cu_tensor(g, n, MPSCY_ROLE_BUFFER, 0),
                         (const float *)cu_tensor(g, n, MPSCY_ROLE_BUFFER, 1),
                         (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                         (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 1), n->reals[1], b, c, inner, len, train),
               "bn_norm_part");
        return CU_LAUNCHED("bn_norm_part");
    }
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
    const int64_t P = bn_parts_on(g, c, inner, b * inner, 3);
    if (P > 1) {
        const int64_t len = (b * inner + P - 1) / P;
        const float *dy = g->dy[cu_node_index(g, n)], *x = g->y[n->in[0]];
        double *parts = (double *)g->ws;
        CU_TRY(cu_launch(g, bn_grad_part, dim3((unsigned)c, (unsigned)P), CU_THREADS, g->stream, parts, dy, x, mean,
                         invs, b, c, inner, len),
               "bn_grad_part");
        const int st = CU_LAUNCHED("bn_grad_part");
        if (st != MPSCY_OK) return st;
        CU_TRY(cu_launch(g, bn_dx_part, dim3((unsigned)c, (unsigned)P), CU_THREADS, g->stream, g->dy[n->in[0]],
                         cu_tensor_grad(g, n, 0), cu_tensor_grad(g, n, 1), (const double *)parts, dy, x, mean, invs,
                         (const float *)cu_tensor(g, n, MPSCY_ROLE_PARAM, 0), b, c, inner, len, (int)n->accum[0]),
               "bn_dx_part");
        return CU_LAUNCHED("bn_dx_part");
    }
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
