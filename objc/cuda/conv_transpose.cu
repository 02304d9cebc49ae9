/* conv_transpose.cu — ConvTranspose2D on CUDA as the convolution it transposes (mpscy_conv_geometry:
 * from the node's output (g.c, g.h, g.w) back to its input (g.oc, g.oh, g.ow), weight (g.oc, g.c /
 * groups, kh, kw)), sums in a fixed order (no atomics), in three forms: by default (sm_80 and
 * newer) its three products as 3xTF32 tensor-core products (below); with MPSCY_CUDA_CONVT_MMA=0,
 * or where those do not fit, as one tiled fp32 kernel gathering its operands (no columns, no
 * tensor cores); with MPSCY_CUDA_CONVT_MMA=0 and MPSCY_CUDA_CONVT_TILED=0 the direct kernels of
 * this file, the reference. Speed against PyTorch: bench/cuda_convt.py. */
#include <algorithm>

#include "cuda.h"
#include "mma.cuh"
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

template <class P>
static cudaError_t convt_launch(cu_graph *gr, const P &p) {
    dim3 grid((unsigned)((p.N + CT_BN - 1) / CT_BN), (unsigned)((p.M + CT_BM - 1) / CT_BM),
              (unsigned)(p.g.groups * p.splits));
    return cu_launch(gr, convt_tiled<P>, grid, dim3(256), gr->stream, p);
}

#define CT_BLOCKS 264   /* two blocks a multiprocessor of an H100: the weight gradients' split target */

/* the weight gradient's K splits at batch b: enough blocks for two a multiprocessor of an H100,
 * no more splits than K / 512 rounded up, at most 64 (the workspace holds that many partials) */
static int64_t convt_splits(const conv_geom &g, int64_t b) {
    const int64_t n = g.c / g.groups * g.kh * g.kw, tiles = ((g.ocg + CT_BM - 1) / CT_BM) * ((n + CT_BN - 1) / CT_BN) *
                                                             g.groups;
    const int64_t want = (CT_BLOCKS + tiles - 1) / tiles, most = (b * g.oh * g.ow + 511) / 512;
    return std::max<int64_t>(1, std::min<int64_t>({64, want, most}));
}

/* ------------------------------------------------------------------ tensor-core products (sm_80)
 * The three products on mma.cuh's 3xTF32 path (fp32's accuracy), sums in a fixed order:
 *  - forward: for each sample and group, dcol (kg, OH'W') = W_grp^T (kg, C' / groups) x (C' / groups,
 *    OH'W'), every tap of every input position as one dense product (no zero taps multiplied), then
 *    convt_gather adds each output's taps from dcol in tap order, and the bias; samples in chunks
 *    whose columns fit CT_COLS_CAP floats of the workspace;
 *  - input gradient: dx (C', b OH'W') = W dy's windows, the windows gathered by cp.async as the B
 *    operand (zero outside dy), a thread's 8 positions fixed and its tap decoded once a step;
 *  - weight gradient: dW (C', kg) = x dy's windows^T over the batch's positions, split over them into
 *    partials summed in split order (cu_sum_parts).
 * The default where one sample's tensors and columns index in 32 bits (convt_mma_fits), on sm_80
 * and newer; $MPSCY_CUDA_CONVT_MMA=0 takes the tiled fp32 kernel above instead. On the H100 these
 * products run a training step 2–3.5x faster than the tiled kernel (bench/cuda_convt.py). The
 * tensor cores round their accumulation toward zero, a bias that grows with K: before RESUM their
 * gradients strayed 2e-6 to 1.8e-5 relative from the cpu's, and one wide layer's weight gradient
 * (256 channels to 64, 2x2 stride 2, 33 of 64 rows) past 1e-4, the contract's bound (a NumPy model
 * of it gives the measured 2e-5, bench/tc_rounding.py). These products add the accumulator into
 * an IEEE sum every MMA_BK step (mma.cuh's RESUM), 4e-7 in that model; on the H100 (thirty-ninth
 * session) every ConvTranspose2D test then passed at the tiled kernel's bounds, the wide layer's
 * among them. */
#define CT_COLS_CAP ((int64_t)1 << 26)

/* where one sample's tensors and columns index in 32 bits, and every grid's y and z (at most
 * 65535) hold the tiles of kg or C' / groups rows and the groups (the weight gradient's 64 splits
 * of each) */
static bool convt_mma_fits(const conv_geom &g) {
    const int64_t lim = INT32_MAX;
    return g.c * g.h * g.w < lim && g.oc * g.ohw < lim && g.k * g.ohw <= CT_COLS_CAP &&
           g.h + 2 * g.ph + g.kh * g.dh < lim && g.w + 2 * g.pw + g.kw * g.dw < lim && g.oh * g.sh < lim &&
           g.ow * g.sw < lim && (g.kg + 31) / 32 <= 65535 && (g.ocg + 31) / 32 <= 65535 && 64 * g.groups <= 65535;
}

/* read when a graph is captured (each batch size's), so that tests can run every form in one process */
static bool convt_mma_wanted(const conv_geom &g) {
    return cu_knob_int("MPSCY_CUDA_CONVT_MMA", 1) != 0 && convt_mma_fits(g);
}

static int64_t convt_dw_most(const conv_geom &g, int64_t b);

/* ... and only where the workspace, sized when the graph was built (with the knob as it was then),
 * holds one sample's columns and the weight gradient's partials at the built batch */
static bool convt_mma_on(const cu_graph *gr, const conv_geom &g) {
    if (!convt_mma_wanted(g) || gr->dev->prop.major < 8 || gr->ws_floats < g.k * g.ohw) return false;
    const int64_t most = convt_dw_most(g, gr->plan.batch);
    return most < 2 || most * g.oc * g.kg <= gr->ws_floats;
}

/* samples whose forward columns are built at once: as many as fit CT_COLS_CAP floats (a smaller cap
 * with $MPSCY_CUDA_CONVT_COLS, for testing the chunks), at least one */
static int64_t convt_cols_chunk(const conv_geom &g, int64_t b) {
    const int64_t cap = std::min<int64_t>(CT_COLS_CAP, cu_knob_int("MPSCY_CUDA_CONVT_COLS", (int)CT_COLS_CAP));
    /* a (sample, group) a blockIdx.z: at most 65535 of them a launch */
    return std::max<int64_t>(1, std::min<int64_t>({b, cap / (g.k * g.ohw), 65535 / g.groups}));
}

/* the weight gradient's splits at batch b (at least 4 steps of MMA_BK positions each, at most 64):
 * the partials written, each of `chunk` positions; *most: the splits asked for, never fewer at a
 * larger b and never fewer than the partials written at any b up to this one, so the built
 * batch's `most` sizes the workspace for every smaller one (the partials written are not
 * monotone: 16 at b = 64 and 17 at b = 33 for 2x2 taps from 256 channels over 8x8) */
static int64_t convt_dw_splits(const conv_geom &g, int64_t b, int64_t *chunk, int64_t *most) {
    const int64_t tm = g.ocg > 32 ? 64 : 32, tiles = ((g.ocg + tm - 1) / tm) * ((g.kg + 63) / 64) * g.groups;
    const int64_t steps = (b * g.ohw + MMA_BK - 1) / MMA_BK;
    *most = std::max<int64_t>(1, std::min<int64_t>({64, (CT_BLOCKS + tiles - 1) / tiles, (steps + 3) / 4}));
    int64_t per;
    const int64_t used = cu_split_units(steps, *most, &per);
    *chunk = per * MMA_BK;
    return used;
}

static int64_t convt_dw_most(const conv_geom &g, int64_t b) {
    int64_t chunk, most;
    convt_dw_splits(g, b, &chunk, &most);
    return most;
}

/* forward, step 1: dcol[sl] (g.k, OH'W') rows grp kg .. = W_grp^T x[s0 + sl, grp]; blockIdx.z = (sample
 * of the chunk, group). A = W (C', kg) read down its columns, B = x's (C' / groups, OH'W') block. */
template <int TM, bool VA, bool VB>
__global__ void __launch_bounds__(256, 2) convt_cols_kernel(float *__restrict__ dcol, const float *__restrict__ x,
                                                            const float *__restrict__ w, conv_geom g, int64_t s0) {
    extern __shared__ __align__(16) float mma_smem[];
    cu_pdl_enter();
    const int64_t grp = blockIdx.z % g.groups, sl = blockIdx.z / g.groups;
    const int M = (int)g.kg, N = (int)g.ohw, m0 = blockIdx.y * 16 * TM, n0 = blockIdx.x * 64;
    float acc[TM * 4];
    mma_product<TM, 4, false, false, VA, VB, true>(acc, mma_smem, w + grp * g.ocg * g.kg, g.kg, m0, M,
                                             x + ((s0 + sl) * g.oc + grp * g.ocg) * g.ohw, g.ohw, n0, N, 0, g.ocg);
    mma_store<TM, 4>(acc, dcol + (sl * g.k + grp * g.kg) * g.ohw, g.ohw, m0, M, n0, N);
}

/* forward, step 2: y[s0 + sl, o, u, v] = the sum, in tap order, over the taps (ki, kj) whose input
 * position i = (u + ph - ki dh) / sh, j = (v + pw - kj dw) / sw is whole and inside, of
 * dcol[sl, grp kg + o' taps + ki kw + kj, i OW' + j], plus bias[o] */
__global__ void convt_gather(float *__restrict__ y, const float *__restrict__ dcol, const float *__restrict__ bias,
                             conv_geom g, int64_t count) {
    cu_pdl_enter();
    const int W = (int)g.w, OH = (int)g.oh, OW = (int)g.ow, kh = (int)g.kh, kw = (int)g.kw, sh = (int)g.sh,
              sw = (int)g.sw, ph = (int)g.ph, pw = (int)g.pw, dh = (int)g.dh, dwl = (int)g.dw;
    const int64_t hw = g.h * g.w, cog = g.c / g.groups, taps = g.kh * g.kw;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count * g.c * hw;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t plane = e / hw, sl = plane / g.c, o = plane - sl * g.c, grp = o / cog;
        const int pix = (int)(e - plane * hw), u = pix / W, v = pix - u * W;
        const float *dc = dcol + (sl * g.k + grp * g.kg + (o - grp * cog) * taps) * g.ohw;
        float acc = 0.0f;
        for (int ki = 0; ki < kh; ki++) {
            const int t = u + ph - ki * dh;
            if (t < 0) break;  /* and for every later tap */
            const int i = t / sh;
            if (t - i * sh || i >= OH) continue;
            for (int kj = 0; kj < kw; kj++) {
                const int r = v + pw - kj * dwl;
                if (r < 0) break;
                const int j = r / sw;
                if (r - j * sw || j >= OW) continue;
                acc += dc[(int64_t)(ki * kw + kj) * g.ohw + i * OW + j];
            }
        }
        y[e] = bias ? acc + bias[o] : acc;
    }
}

/* input gradient: dx[s, grp ocg + m, p] (+= when accum) = sum over k = (o', ki, kj) of W[grp ocg + m, k]
 * dy[s, grp cog + o', i sh - ph + ki dh, j sw - pw + kj dw] for the batch's input position n = (s, p = (i,
 * j)); blockIdx.z = group. A = W's rows (K-contiguous), B = the windows (N = b OH'W', K = kg),
 * gathered: this thread's 8 positions r0 + 8q of the tile, its tap kb + lane. */
template <int TM, bool VA>
__global__ void __launch_bounds__(256, 2) convt_dx_kernel(float *__restrict__ dx, const float *__restrict__ dy,
                                                          const float *__restrict__ w, conv_geom g, int64_t b,
                                                          int accum) {
    extern __shared__ __align__(16) float mma_smem[];
    typedef mma_tile<true, 64> TB;
    cu_pdl_trigger();
    const int64_t grp = blockIdx.z, cog = g.c / g.groups, hw = g.h * g.w, N = b * g.ohw;
    const int M = (int)g.ocg, m0 = blockIdx.y * 16 * TM, lane = threadIdx.x & 31, r0 = threadIdx.x >> 5;
    const int64_t n0 = (int64_t)blockIdx.x * 64;
    const int H = (int)g.h, W = (int)g.w, kw = (int)g.kw, taps = (int)(g.kh * g.kw), kg = (int)g.kg;
    const float *src[8];  /* the position's sample's dy at the group's first channel, or NULL past N */
    int ub[8], vb[8];
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const int64_t n = n0 + r0 + 8 * q, s = n < N ? n / g.ohw : 0;
        const int p = n < N ? (int)(n - s * g.ohw) : 0, i = p / (int)g.ow, j = p - i * (int)g.ow;
        src[q] = n < N ? dy + (s * g.c + grp * cog) * hw : NULL;
        ub[q] = i * (int)g.sh - (int)g.ph;
        vb[q] = j * (int)g.sw - (int)g.pw;
    }
    cu_pdl_wait();
    auto load_b = [&](float *sm, int64_t kb) {
        const int k = (int)kb + lane, c = k / taps, t = k - c * taps, ki = t / kw, kj = t - ki * kw;
        const int du = ki * (int)g.dh, dv = kj * (int)g.dw;
        const int64_t coff = (int64_t)c * hw;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            const int u = ub[q] + du, v = vb[q] + dv;
            const bool ok = k < kg && src[q] && (unsigned)u < (unsigned)H && (unsigned)v < (unsigned)W;
            cp_async4(sm + TB::at(r0 + 8 * q, lane), ok ? src[q] + coff + (int64_t)u * W + v : dy, ok);
        }
    };
    float acc[TM * 4];
    mma_product_by<TM, 4, true, true, VA, true>(acc, mma_smem, w + grp * g.ocg * g.kg, g.kg, m0, M, load_b, 0,
                                                g.kg);
#pragma unroll
    for (int e = 0; e < TM * 4; e++) {
        int r, c;
        mma_pos<TM, 4>(e, r, c);
        const int m = m0 + r;
        const int64_t n = n0 + c;
        if (m >= M || n >= N) continue;
        const int64_t s = n / g.ohw;
        float *d = dx + (s * g.oc + grp * g.ocg + m) * g.ohw + (n - s * g.ohw);
        *d = accum ? *d + acc[e] : acc[e];
    }
}

/* weight gradient: out[z] (C', kg) rows grp ocg .. = the sum over the batch's input positions k =
 * (s, p = (i, j)) in [z chunk, (z + 1) chunk) of x[s, grp ocg + m, p] dy[s, grp cog + o', i sh - ph +
 * ki dh, j sw - pw + kj dw] for n = (o', ki, kj); blockIdx.z = (split z, group). Both operands
 * K-contiguous and gathered: A's rows of x (16-byte copies when VA: OH'W' % 4 == 0, so that 4
 * positions lie in one sample), B's windows with this thread's 8 rows r0 + 8q of the tile fixed and
 * its position kb + lane decoded once a step. */
template <int TM, bool VA>
__global__ void __launch_bounds__(256, 2) convt_dw_kernel(float *__restrict__ out, const float *__restrict__ x,
                                                          const float *__restrict__ dy, conv_geom g, int64_t b,
                                                          int64_t chunk) {
    extern __shared__ __align__(16) float mma_smem[];
    constexpr int BM = 16 * TM;
    typedef mma_tile<true, BM> TA;
    typedef mma_tile<true, 64> TB;
    cu_pdl_trigger();
    const int64_t grp = blockIdx.z % g.groups, z = blockIdx.z / g.groups, cog = g.c / g.groups, hw = g.h * g.w;
    const int M = (int)g.ocg, N = (int)g.kg, m0 = blockIdx.y * BM, n0 = blockIdx.x * 64;
    const int tid = threadIdx.x, lane = tid & 31, r0 = tid >> 5;
    const int64_t K = b * g.ohw, k0 = z * chunk, k1 = min(K, k0 + chunk);
    const int H = (int)g.h, W = (int)g.w, OW = (int)g.ow, taps = (int)(g.kh * g.kw), kw = (int)g.kw;
    int64_t coff[8];  /* row n's channel in a sample's dy (from the group's first), its window shift */
    int du[8], dv[8];
    bool nok[8];
#pragma unroll
    for (int q = 0; q < 8; q++) {
        const int n = n0 + r0 + 8 * q, o = n / taps, t = n - o * taps, ki = t / kw, kj = t - ki * kw;
        nok[q] = n < N;
        coff[q] = (grp * cog + o) * hw;
        du[q] = ki * (int)g.dh - (int)g.ph;
        dv[q] = kj * (int)g.dw - (int)g.pw;
    }
    cu_pdl_wait();
    auto load_a = [&](float *sm, int64_t kb) {
        if constexpr (VA) { /* 8 chunks of 4 positions per row */
#pragma unroll
            for (int q = 0; q < BM * 8 / 256; q++) {
                const int e = tid + 256 * q, r = e / 8, kk = (e % 8) * 4;
                const int64_t k = kb + kk, s = k / g.ohw;
                const bool ok = m0 + r < M && k < k1;
                cp_async16(sm + TA::at(r, kk), ok ? x + (s * g.oc + grp * g.ocg + m0 + r) * g.ohw + (k - s * g.ohw) : x,
                           ok);
            }
        } else {
#pragma unroll
            for (int q = 0; q < BM / 8; q++) {
                const int e = tid + 256 * q, r = e / 32, kk = e % 32;
                const int64_t k = kb + kk, s = k / g.ohw;
                const bool ok = m0 + r < M && k < k1;
                cp_async4(sm + TA::at(r, kk), ok ? x + (s * g.oc + grp * g.ocg + m0 + r) * g.ohw + (k - s * g.ohw) : x,
                          ok);
            }
        }
    };
    auto load_b = [&](float *sm, int64_t kb) {
        const int64_t k = kb + lane, s = k < k1 ? k / g.ohw : 0;
        const int p = k < k1 ? (int)(k - s * g.ohw) : 0, i = p / OW, ui = i * (int)g.sh, vj = (p - i * OW) * (int)g.sw;
        const float *base = dy + s * g.c * hw;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            const int u = ui + du[q], v = vj + dv[q];
            const bool ok = k < k1 && nok[q] && (unsigned)u < (unsigned)H && (unsigned)v < (unsigned)W;
            cp_async4(sm + TB::at(r0 + 8 * q, lane), ok ? base + coff[q] + (int64_t)u * W + v : dy, ok);
        }
    };
    float acc[TM * 4];
    mma_product_ab<TM, 4, true, true, true>(acc, mma_smem, load_a, load_b, k0, k1);
    mma_store<TM, 4>(acc, out + (z * g.oc + grp * g.ocg) * g.kg, g.kg, m0, M, n0, N);
}

static int convt_mma_forward(cu_graph *gr, const conv_geom &g, float *y, const float *x, const float *w,
                             const float *bias, int64_t b, char *err, size_t en) {
    typedef void (*cols_fn)(float *, const float *, const float *, conv_geom, int64_t);
    static const cols_fn kinds[2][2][2] = {
        {{convt_cols_kernel<2, false, false>, convt_cols_kernel<2, false, true>},
         {convt_cols_kernel<2, true, false>, convt_cols_kernel<2, true, true>}},
        {{convt_cols_kernel<4, false, false>, convt_cols_kernel<4, false, true>},
         {convt_cols_kernel<4, true, false>, convt_cols_kernel<4, true, true>}}};
    const bool tm4 = g.kg > 32, va = g.kg % 4 == 0 && cu_aligned16(w), vb = g.ohw % 4 == 0 && cu_aligned16(x);
    const int bytes = tm4 ? mma_smem_bytes<4, 4, false, false>() : mma_smem_bytes<2, 4, false, false>();
    /* never more than the workspace sized at build holds (the knob may have changed since) */
    const int64_t chunk = std::max<int64_t>(1, std::min(convt_cols_chunk(g, gr->plan.batch), gr->ws_floats / (g.k * g.ohw)));
    const int64_t ys = g.c * g.h * g.w;
    float *dcol = gr->ws;
    for (int64_t s0 = 0; s0 < b; s0 += chunk) {
        const int64_t cnt = std::min(chunk, b - s0);
        dim3 grid((unsigned)((g.ohw + 63) / 64), (unsigned)((g.kg + (tm4 ? 63 : 31)) / (tm4 ? 64 : 32)),
                  (unsigned)(cnt * g.groups));
        CU_TRY(mma_launch(gr, gr->stream, kinds[tm4][va][vb], grid, bytes, dcol, x, w, g, s0), "convt_cols");
        int st = CU_LAUNCHED("convt_cols");
        if (st != MPSCY_OK) return st;
        CU_TRY(cu_launch(gr, convt_gather, cu_blocks(cnt * ys, CU_THREADS, 8192), CU_THREADS, gr->stream, y + s0 * ys,
                         (const float *)dcol, bias, g, cnt),
               "convt_gather");
        st = CU_LAUNCHED("convt_gather");
        if (st != MPSCY_OK) return st;
    }
    return MPSCY_OK;
}

static int convt_mma_dx(cu_graph *gr, const conv_geom &g, float *dx, const float *dy, const float *w, int64_t b,
                        int accum, char *err, size_t en) {
    typedef void (*dx_fn)(float *, const float *, const float *, conv_geom, int64_t, int);
    static const dx_fn kinds[2][2] = {{convt_dx_kernel<2, false>, convt_dx_kernel<2, true>},
                                      {convt_dx_kernel<4, false>, convt_dx_kernel<4, true>}};
    const bool tm4 = g.ocg > 32, va = g.kg % 4 == 0 && cu_aligned16(w);
    const int bytes = tm4 ? mma_smem_bytes<4, 4, true, true>() : mma_smem_bytes<2, 4, true, true>();
    dim3 grid((unsigned)((b * g.ohw + 63) / 64), (unsigned)((g.ocg + (tm4 ? 63 : 31)) / (tm4 ? 64 : 32)),
              (unsigned)g.groups);
    CU_TRY(mma_launch(gr, gr->stream, kinds[tm4][va], grid, bytes, dx, dy, w, g, b, accum), "convt_dx");
    return CU_LAUNCHED("convt_dx");
}

static int convt_mma_dw(cu_graph *gr, const conv_geom &g, float *dw, const float *x, const float *dy, int64_t b,
                        char *err, size_t en) {
    typedef void (*dw_fn)(float *, const float *, const float *, conv_geom, int64_t, int64_t);
    static const dw_fn kinds[2][2] = {{convt_dw_kernel<2, false>, convt_dw_kernel<2, true>},
                                      {convt_dw_kernel<4, false>, convt_dw_kernel<4, true>}};
    const bool tm4 = g.ocg > 32, va = g.ohw % 4 == 0 && cu_aligned16(x);
    const int bytes = tm4 ? mma_smem_bytes<4, 4, true, true>() : mma_smem_bytes<2, 4, true, true>();
    int64_t chunk, most;
    const int64_t splits = convt_dw_splits(g, b, &chunk, &most), count = g.oc * g.kg;
    if (splits > 1 && splits * count > gr->ws_floats)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "ConvTranspose2D workspace too small (%lld floats wanted)",
                          (long long)(splits * count));
    dim3 grid((unsigned)((g.kg + 63) / 64), (unsigned)((g.ocg + (tm4 ? 63 : 31)) / (tm4 ? 64 : 32)),
              (unsigned)(splits * g.groups));
    CU_TRY(mma_launch(gr, gr->stream, kinds[tm4][va], grid, bytes, splits > 1 ? gr->ws : dw, x, dy, g, b, chunk),
           "convt_dw");
    int st = CU_LAUNCHED("convt_dw");
    if (st != MPSCY_OK || splits == 1) return st;
    CU_TRY(cu_sum_parts(gr, gr->stream, dw, gr->ws, count, splits, NULL, 1, 0), "convt_dw_sum");
    return CU_LAUNCHED("convt_dw_sum");
}

int64_t cu_convt_workspace(const mpscy_plan *p, const mpscy_node *n) {
    const conv_geom g = mpscy_conv_geometry(p, n);
    const int64_t splits = convt_splits(g, p->batch);
    int64_t floats = splits > 1 ? splits * g.oc * (g.c / g.groups) * g.kh * g.kw : 0, chunk, most;
    if (convt_mma_wanted(g)) {  /* the tensor-core products': the forward's columns, the weight gradient's partials */
        convt_dw_splits(g, p->batch, &chunk, &most);
        floats = std::max({floats, convt_cols_chunk(g, p->batch) * g.k * g.ohw, most > 1 ? most * g.oc * g.kg : 0});
    }
    return std::max(floats, cu_channel_sums_workspace(g.c, g.h * g.w, p->batch));  /* and the bias gradient's */
}

/* MPSCY_CUDA_CONVT_TILED=0 (with the tensor-core products not taken, MPSCY_CUDA_CONVT_MMA=0): the
 * direct kernels above instead (an A/B and a reference) */
static bool convt_tiled_on() { return cu_knob_on("MPSCY_CUDA_CONVT_TILED"); }

int cu_convt_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const int64_t i = cu_node_index(gr, n);
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const float *x = gr->y[n->in[0]], *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    const float *bias = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1);
    if (convt_mma_on(gr, g)) return convt_mma_forward(gr, g, gr->y[i], x, w, bias, b, err, en);
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
    const bool mma = convt_mma_on(gr, g), tiled = convt_tiled_on();
    const int64_t taps = g.kh * g.kw, cog = g.c / g.groups;
    if (dx && mma) {
        const int st = convt_mma_dx(gr, g, dx, dy, w, b, (int)n->accum[0], err, en);
        if (st != MPSCY_OK) return st;
    } else if (dx && tiled) {
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
    if (dw && mma) {
        const int st = convt_mma_dw(gr, g, dw, x, dy, b, err, en);
        if (st != MPSCY_OK) return st;
    } else if (dw && tiled) {
        const int64_t K = b * g.oh * g.ow;
        int64_t per;
        const int64_t used = cu_split_units((K + CT_BK - 1) / CT_BK, convt_splits(g, b), &per);
        ct_wgrad p = {g, x, dy, dw, gr->ws, b, g.ocg, cog * taps, K, per * CT_BK, used};
        CU_TRY(convt_launch(gr, p), "convt_tiled_wgrad");
        int st = CU_LAUNCHED("convt_tiled_wgrad");
        if (st != MPSCY_OK) return st;
        if (used > 1) {
            const int64_t count = g.oc * cog * taps;
            CU_TRY(cu_sum_parts(gr, gr->stream, dw, gr->ws, count, used, NULL, 1, 0), "convt_wgrad_sum");
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
    /* db[o] = the sum of dy[:, o] over samples and positions, in double (b x h x w values a
     * channel: 131,072 for a U-Net's, in float 2.5e-6 off); after the weight gradient's sums of
     * the workspace on this stream */
    return db ? cu_channel_sums(gr, gr->stream, db, dy, b, g.c, g.h * g.w, err, en) : MPSCY_OK;
}
