/* conv_transpose.cu — ConvTranspose2D on CUDA as the convolution it transposes (mpscy_conv_geometry:
 * from the node's output (g.c, g.h, g.w) back to its input (g.oc, g.oh, g.ow), weight (g.oc, g.c /
 * groups, kh, kw)): its three products as one tiled fp32 kernel gathering its operands (no columns,
 * no tensor cores), sums in a fixed order (no atomics). MPSCY_CUDA_CONVT_TILED=0 runs the direct
 * kernels of this file instead, the reference. Speed against cuDNN: bench/cuda_convt.py. */
#include <algorithm>

#include "cuda.h"
#include "reduce.h"

typedef mpscy_conv_geom conv_geom;

/* y[s, o, u, v] = bias[o] + sum over (ki, kj) with u = i sh - ph + ki dh, v = j sw - pw + kj dw for
 * an input position (i, j), and over the group's input channels c, of x[s, c, i, j] W[c, o', ki, kj] */
__global__ void convt_forward(float *y, const float *x, const float *w, const float *bias, conv_geom g, int64_t b) {
    // y (b, g.c, g.h, g.w), x (b, g.oc, g.oh, g.ow)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, ohw = g.oh * g.ow;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < b * g.c * g.h * g.w;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = e % g.w, u = e / g.w % g.h, o = e / (g.w * g.h) % g.c, s = e / (g.w * g.h * g.c);
        const int64_t grp = o / cog, ol = o % cog;
        float acc = 0.0f;
        for (int64_t ki = 0; ki < g.kh; ki++) {
            const int64_t t = u + g.ph - ki * g.dh;
            if (t < 0 || t % g.sh) continue;
            const int64_t i = t / g.sh;
            if (i >= g.oh) continue;
            for (int64_t kj = 0; kj < g.kw; kj++) {
                const int64_t r = v + g.pw - kj * g.dw;
                if (r < 0 || r % g.sw) continue;
                const int64_t j = r / g.sw;
                if (j >= g.ow) continue;
                const float *xs = x + (s * g.oc + grp * g.ocg) * ohw + i * g.ow + j;
                const float *ws = w + (grp * g.ocg * cog + ol) * taps + ki * g.kw + kj;
                for (int64_t c = 0; c < g.ocg; c++) acc += xs[c * ohw] * ws[c * cog * taps];
            }
        }
        y[e] = bias ? acc + bias[o] : acc;
    }
}

/* dx[s, c, i, j] = sum over (ki, kj) and the group's output channels o of W[c, o', ki, kj]
 * dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw] (inside the output), added to dx when accumulating */
__global__ void convt_dgrad(float *dx, const float *dy, const float *w, conv_geom g, int64_t b, int accum) {
    // dx (b, g.oc, g.oh, g.ow), dy (b, g.c, g.h, g.w)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, hw = g.h * g.w;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < b * g.oc * g.oh * g.ow;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = e % g.ow, i = e / g.ow % g.oh, c = e / (g.ow * g.oh) % g.oc, s = e / (g.ow * g.oh * g.oc);
        const int64_t grp = c / g.ocg;
        float acc = 0.0f;
        for (int64_t ki = 0; ki < g.kh; ki++) {
            const int64_t u = i * g.sh - g.ph + ki * g.dh;
            if (u < 0 || u >= g.h) continue;
            for (int64_t kj = 0; kj < g.kw; kj++) {
                const int64_t v = j * g.sw - g.pw + kj * g.dw;
                if (v < 0 || v >= g.w) continue;
                const float *ds = dy + (s * g.c + grp * cog) * hw + u * g.w + v;
                const float *ws = w + c * cog * taps + ki * g.kw + kj;
                for (int64_t o = 0; o < cog; o++) acc += ds[o * hw] * ws[o * taps];
            }
        }
        dx[e] = accum ? dx[e] + acc : acc;
    }
}

/* a block per weight element (c, o', ki, kj): the sum over samples and input positions of
 * x[s, c, i, j] dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw], each thread's positions in order,
 * then the block's sum (reduce.h, a fixed order) */
__global__ void convt_wgrad(float *dw, const float *x, const float *dy, conv_geom g, int64_t b) {
    // dw (g.oc, g.c / groups, kh, kw), x (b, g.oc, g.oh, g.ow), dy (b, g.c, g.h, g.w)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w;
    for (int64_t k = blockIdx.x; k < g.oc * cog * taps; k += gridDim.x) {
        const int64_t kj = k % g.kw, ki = k / g.kw % g.kh, ol = k / taps % cog, c = k / (taps * cog);
        const int64_t o = c / g.ocg * cog + ol;
        float acc = 0.0f;
        for (int64_t p = threadIdx.x; p < b * ohw; p += blockDim.x) {
            const int64_t s = p / ohw, i = p % ohw / g.ow, j = p % g.ow;
            const int64_t u = i * g.sh - g.ph + ki * g.dh, v = j * g.sw - g.pw + kj * g.dw;
            if (u < 0 || u >= g.h || v < 0 || v >= g.w) continue;
            acc += x[(s * g.oc + c) * ohw + i * g.ow + j] * dy[(s * g.c + o) * hw + u * g.w + v];
        }
        acc = block_sum(acc);
        if (threadIdx.x == 0) dw[k] = acc;
    }
}

/* a block per output channel: db[o] = the sum of dy[:, o] over samples and positions */
__global__ void convt_bgrad(float *db, const float *dy, conv_geom g, int64_t b) {
    cu_pdl_enter();
    const int64_t hw = g.h * g.w;
    for (int64_t o = blockIdx.x; o < g.c; o += gridDim.x) {
        float acc = 0.0f;
        for (int64_t p = threadIdx.x; p < b * hw; p += blockDim.x) acc += dy[(p / hw * g.c + o) * hw + p % hw];
        acc = block_sum(acc);
        if (threadIdx.x == 0) db[o] = acc;
    }
}

/* ---------------------------------------------------------------------------- tiled products
 * The three products as one tiled kernel (64 x 64 outputs a block, K in steps of 16 through shared
 * memory, 4 x 4 outputs a thread), each operand element gathered by a problem struct: the forward
 * y (OC', b OH' OW') = W^T x over the taps whose input lands on each output (the others read as 0),
 * the input gradient dx (C', b H' W') = W dy's windows (the convolution's forward), the weight
 * gradient dW (C', OC' / groups kh kw) = x dy's windows^T over the batch's positions, split over K
 * into partials summed in a fixed order. Each output sums its K in order within one thread, so
 * the result does not depend on the grid. blockIdx.z is the group (and the split). Names below:
 * the node's own, C' = g.oc input channels (H', W') = (g.oh, g.ow), OC' = g.c output channels
 * (OH', OW') = (g.h, g.w). */
#define CT_BM 64
#define CT_BN 64
#define CT_BK 16

struct ct_pix { int64_t s, r, c; bool ok; };  /* a column's sample and position */

static __device__ __forceinline__ ct_pix ct_pixel(int64_t n, int64_t nmax, int64_t h, int64_t w) {
    ct_pix q;
    q.ok = n < nmax;
    const int64_t hw = h * w, k = q.ok ? n : 0;
    q.s = k / hw;
    q.r = k % hw / w;
    q.c = k % w;
    return q;
}

/* forward: M = OC' / groups, N = b OH' OW', K = C' / groups x taps; A[m, k] = W[c, m, tap], B[k, n] =
 * x[s, c, i, j] where (i sh - ph + ki dh, j sw - pw + kj dw) is output n's position */
struct ct_fwd {
    conv_geom g;
    const float *x, *w, *bias;
    float *y;
    int64_t b, M, N, K, kchunk, splits;
    __device__ float a(int64_t m, int64_t k, int grp) const {  /* k < K < 2^31 (plan_node.c): 32-bit division */
        const unsigned taps = (unsigned)(g.kh * g.kw), kk = (unsigned)k;
        const int64_t cog = g.c / g.groups, c = grp * g.ocg + kk / taps;
        return w[(c * cog + m) * taps + kk % taps];
    }
    __device__ ct_pix col(int64_t n) const { return ct_pixel(n, N, g.h, g.w); }
    __device__ float bv(int64_t k, const ct_pix &q, int grp) const {
        const unsigned taps = (unsigned)(g.kh * g.kw), kk = (unsigned)k, t = kk % taps;
        const int64_t ki = t / (unsigned)g.kw, kj = t % (unsigned)g.kw;
        const int64_t tu = q.r + g.ph - ki * g.dh, tv = q.c + g.pw - kj * g.dw;
        if (tu < 0 || tv < 0) return 0.0f;
        const unsigned ur = (unsigned)tu, vr = (unsigned)tv, sh = (unsigned)g.sh, sw = (unsigned)g.sw;
        if (ur % sh || vr % sw) return 0.0f;
        const int64_t i = ur / sh, j = vr / sw;
        if (i >= g.oh || j >= g.ow) return 0.0f;
        return x[((q.s * g.oc + grp * g.ocg + kk / taps) * g.oh + i) * g.ow + j];
    }
    __device__ void store(int64_t m, int64_t n, float v, int grp, int64_t) const {
        const ct_pix q = col(n);
        const int64_t o = grp * (g.c / g.groups) + m;
        y[((q.s * g.c + o) * g.h + q.r) * g.w + q.c] = bias ? v + bias[o] : v;
    }
};

/* input gradient: M = C' / groups, N = b H' W', K = OC' / groups x taps; A[m, k] = W[c, o, tap],
 * B[k, n] = dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw] (0 outside) */
struct ct_dgrad {
    conv_geom g;
    const float *dy, *w;
    float *dx;
    int accum;
    int64_t b, M, N, K, kchunk, splits;
    __device__ float a(int64_t m, int64_t k, int grp) const {
        const int64_t taps = g.kh * g.kw, cog = g.c / g.groups;
        return w[(grp * g.ocg + m) * cog * taps + k];
    }
    __device__ ct_pix col(int64_t n) const { return ct_pixel(n, N, g.oh, g.ow); }
    __device__ float bv(int64_t k, const ct_pix &q, int grp) const {
        const unsigned taps = (unsigned)(g.kh * g.kw), kk = (unsigned)k, t = kk % taps, kw = (unsigned)g.kw;
        const int64_t cog = g.c / g.groups;
        const int64_t u = q.r * g.sh - g.ph + (int64_t)(t / kw) * g.dh;
        const int64_t v = q.c * g.sw - g.pw + (int64_t)(t % kw) * g.dw;
        if (u < 0 || v < 0 || u >= g.h || v >= g.w) return 0.0f;
        return dy[((q.s * g.c + grp * cog + kk / taps) * g.h + u) * g.w + v];
    }
    __device__ void store(int64_t m, int64_t n, float v, int grp, int64_t) const {
        const ct_pix q = col(n);
        float *d = dx + ((q.s * g.oc + grp * g.ocg + m) * g.oh + q.r) * g.ow + q.c;
        *d = accum ? *d + v : v;
    }
};

/* weight gradient: M = C' / groups, N = OC' / groups x taps, K = b H' W'; A[m, k] = x[s, c, i, j],
 * B[k, n] = dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw] (0 outside); split z's partial in
 * part[z] when split */
struct ct_wgrad {
    conv_geom g;
    const float *x, *dy;
    float *dw, *part;
    int64_t b, M, N, K, kchunk, splits;
    __device__ float a(int64_t m, int64_t k, int grp) const {
        const int64_t ohw = g.oh * g.ow;
        return x[(k / ohw * g.oc + grp * g.ocg + m) * ohw + k % ohw];
    }
    __device__ ct_pix col(int64_t n) const {  /* (o, ki, kj) in (s, r, c) */
        ct_pix q;
        const int64_t taps = g.kh * g.kw;
        q.ok = n < N;
        q.s = n / taps;
        q.r = n % taps / g.kw;
        q.c = n % g.kw;
        return q;
    }
    __device__ float bv(int64_t k, const ct_pix &q, int grp) const {
        const int64_t ohw = g.oh * g.ow, s = k / ohw, i = k % ohw / g.ow, j = k % g.ow;
        const int64_t u = i * g.sh - g.ph + q.r * g.dh, v = j * g.sw - g.pw + q.c * g.dw;
        if (u < 0 || v < 0 || u >= g.h || v >= g.w) return 0.0f;
        return dy[((s * g.c + grp * (g.c / g.groups) + q.s) * g.h + u) * g.w + v];
    }
    __device__ void store(int64_t m, int64_t n, float v, int grp, int64_t split) const {
        const int64_t at = (grp * g.ocg + m) * N + n;   /* dW's (C', OC' / groups x taps) layout */
        if (splits > 1) part[split * g.oc * N + at] = v;
        else dw[at] = v;
    }
};

template <class P>
__global__ void __launch_bounds__(256) convt_tiled(P p) {
    __shared__ float as[CT_BK][CT_BM + 1], bs[CT_BK][CT_BN + 1];
    cu_pdl_enter();
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int grp = (int)(blockIdx.z % p.g.groups);
    const int64_t split = blockIdx.z / p.g.groups, m0 = (int64_t)blockIdx.y * CT_BM, n0 = (int64_t)blockIdx.x * CT_BN;
    const int64_t k_lo = split * p.kchunk, k_hi = min(p.K, k_lo + p.kchunk);
    const ct_pix q = p.col(n0 + tid % 64);   /* the column this thread loads into bs */
    float acc[4][4] = {};
    for (int64_t k0 = k_lo; k0 < k_hi; k0 += CT_BK) {
        const int64_t ka = k0 + tid % 16;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int64_t m = m0 + tid / 16 + 16 * r;
            as[tid % 16][tid / 16 + 16 * r] = m < p.M && ka < k_hi ? p.a(m, ka, grp) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int kl = tid / 64 + 4 * r;
            bs[kl][tid % 64] = q.ok && k0 + kl < k_hi ? p.bv(k0 + kl, q, grp) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CT_BK; kk++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) av[i] = as[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (m < p.M && n < p.N) p.store(m, n, acc[i][j], grp, split);
        }
}

/* dw[e] = the sum of the splits' partials, in split order */
__global__ void convt_wgrad_sum(float *dw, const float *part, int64_t count, int64_t splits) {
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int64_t z = 0; z < splits; z++) acc += part[z * count + e];
        dw[e] = acc;
    }
}

template <class P>
static cudaError_t convt_launch(cu_graph *gr, const P &p) {
    dim3 grid((unsigned)((p.N + CT_BN - 1) / CT_BN), (unsigned)((p.M + CT_BM - 1) / CT_BM),
              (unsigned)(p.g.groups * p.splits));
    return cu_launch(gr, convt_tiled<P>, grid, dim3(256), gr->stream, p);
}

/* the weight gradient's K splits at batch b: enough blocks for two a multiprocessor of an H100,
 * no more splits than K / 512 rounded up, at most 64 (the workspace holds that many partials) */
static int64_t convt_splits(const conv_geom &g, int64_t b) {
    const int64_t n = g.c / g.groups * g.kh * g.kw, tiles = ((g.ocg + CT_BM - 1) / CT_BM) * ((n + CT_BN - 1) / CT_BN) *
                                                             g.groups;
    const int64_t want = (264 + tiles - 1) / tiles, most = (b * g.oh * g.ow + 511) / 512;
    return std::max<int64_t>(1, std::min<int64_t>({64, want, most}));
}

int64_t cu_convt_workspace(const mpscy_plan *p, const mpscy_node *n) {
    const conv_geom g = mpscy_conv_geometry(p, n);
    const int64_t splits = convt_splits(g, p->batch);
    return splits > 1 ? splits * g.oc * (g.c / g.groups) * g.kh * g.kw : 0;
}

/* MPSCY_CUDA_CONVT_TILED=0: the direct kernels above instead (an A/B and a reference) */
static bool convt_tiled_on() {
    static const bool on = cu_knob_on("MPSCY_CUDA_CONVT_TILED");
    return on;
}

int cu_convt_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const int64_t i = cu_node_index(gr, n);
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const float *x = gr->y[n->in[0]], *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    const float *bias = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1);
    if (convt_tiled_on()) {
        const int64_t taps = g.kh * g.kw;
        ct_fwd p = {g, x, w, bias, gr->y[i], b, g.c / g.groups, b * g.h * g.w, g.ocg * taps, g.ocg * taps, 1};
        CU_TRY(convt_launch(gr, p), "convt_tiled_fwd");
        return CU_LAUNCHED("convt_tiled_fwd");
    }
    CU_TRY(cu_launch(gr, convt_forward, cu_blocks(b * g.c * g.h * g.w, CU_THREADS, 8192), CU_THREADS, gr->stream,
                     gr->y[i], x, w, bias, g, b),
           "convt_forward");
    return CU_LAUNCHED("convt_forward");
}

int cu_convt_backward(cu_graph *gr, const mpscy_node *n, int64_t b, char *err, size_t en) {
    const int64_t i = cu_node_index(gr, n);
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const float *dy = gr->dy[i], *x = gr->y[n->in[0]], *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    float *dx = gr->dy[n->in[0]], *dw = cu_tensor_grad(gr, n, 0), *db = cu_tensor_grad(gr, n, 1);
    const bool tiled = convt_tiled_on();
    const int64_t taps = g.kh * g.kw, cog = g.c / g.groups;
    if (dx && tiled) {
        ct_dgrad p = {g, dy, w, dx, (int)n->accum[0], b, g.ocg, b * g.oh * g.ow, cog * taps, cog * taps, 1};
        CU_TRY(convt_launch(gr, p), "convt_tiled_dgrad");
        const int st = CU_LAUNCHED("convt_tiled_dgrad");
        if (st != MPSCY_OK) return st;
    } else if (dx) {
        CU_TRY(cu_launch(gr, convt_dgrad, cu_blocks(b * g.oc * g.oh * g.ow, CU_THREADS, 8192), CU_THREADS, gr->stream,
                         dx, dy, w, g, b, (int)n->accum[0]),
               "convt_dgrad");
        const int st = CU_LAUNCHED("convt_dgrad");
        if (st != MPSCY_OK) return st;
    }
    if (dw && tiled) {
        const int64_t K = b * g.oh * g.ow, splits = convt_splits(g, b), steps = (K + CT_BK - 1) / CT_BK;
        const int64_t per = (steps + splits - 1) / splits * CT_BK, used = (K + per - 1) / per;
        ct_wgrad p = {g, x, dy, dw, gr->ws, b, g.ocg, cog * taps, K, per, used};
        CU_TRY(convt_launch(gr, p), "convt_tiled_wgrad");
        int st = CU_LAUNCHED("convt_tiled_wgrad");
        if (st != MPSCY_OK) return st;
        if (used > 1) {
            const int64_t count = g.oc * cog * taps;
            CU_TRY(cu_launch(gr, convt_wgrad_sum, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, gr->stream, dw,
                             (const float *)gr->ws, count, used),
                   "convt_wgrad_sum");
            st = CU_LAUNCHED("convt_wgrad_sum");
            if (st != MPSCY_OK) return st;
        }
    } else if (dw) {
        CU_TRY(cu_launch(gr, convt_wgrad, cu_blocks(g.oc * cog * taps, 1, 65535), CU_THREADS, gr->stream, dw, x, dy, g,
                         b),
               "convt_wgrad");
        const int st = CU_LAUNCHED("convt_wgrad");
        if (st != MPSCY_OK) return st;
    }
    if (db) {
        CU_TRY(cu_launch(gr, convt_bgrad, cu_blocks(g.c, 1, 65535), CU_THREADS, gr->stream, db, dy, g, b),
               "convt_bgrad");
        return CU_LAUNCHED("convt_bgrad");
    }
    return MPSCY_OK;
}
