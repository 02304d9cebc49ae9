/* conv_implicit.cu — a 3x3 convolution (stride 1 or 2, any padding, groups 1, dilation 1) as an
 * implicit GEMM for conv.cu's own fp32 path: 3xTF32 products (mma.cuh's arithmetic) whose B
 * operand is read from a patch of the input staged in shared memory, so no columns are built or
 * read on the critical path. conv.cu uses it for the forward of such a convolution (the columns
 * for the weight gradient are then built on the side stream) and for the data gradient of a
 * stride-1 one, which is the same product over dz (channel-major, (OC, b*OHW)) with W flipped and
 * transposed into (C, OC*9), re-laid by the training forward on the side stream.
 *
 * A block computes a (16 TM) x 64 tile of y (M, b*OHW): 64 output pixels that are R = 64 / OW
 * whole rows of one image (OW divides 64, OHW a multiple of 64), over K = 9 C in stages of 8
 * input channels (72 of K). Each stage brings, by cp.async, W's (16 TM) x 72 slice and the 8
 * channels' patch of the input ((R - 1) S + 3 rows of (OW - 1) S + 3 columns; zero outside the
 * image and past C), MMA_STAGES of them in flight. Tap (c, ki, kj) of output pixel (r, q) is the
 * patch's element (c, r S + ki, q S + kj): an offset of k's plus an offset of n's. The patch's
 * offsets in the input depend on the geometry only, so a block tabulates them once, before it
 * waits on the kernel before it (programmatic dependent launch).
 *
 * The epilogue writes NCHW with the bias and the fused ReLU (or adds to y, for a data gradient
 * into a shared dx). A grid under one block per multiprocessor splits the stages over
 * blockIdx.z into partials (splits, M, nb), which conv.cu's conv_fwd_sum adds in order.
 *
 * The weight gradient as the same kind of product from x (no columns at all) was measured on the
 * H200 and is not here: 81 us of products against 53.5 + 25.5 of im2col, and the step did not
 * move (bench/cuda_notes.md; branch exp/implicit-dw). */
#include <algorithm>

#include "cuda.h"
#include "mma.cuh"

typedef mpscy_conv_geom conv_geom;

#define IG_CB 8                 /* input channels per stage */
#define IG_KS (IG_CB * 9)       /* K per stage */
#define IG_WLD (IG_KS + 4)      /* W's row in shared memory: a warp's fragment reads hit 32 banks */
#define IG_PATCH 3104           /* floats of one stage's patch: 8 channels of at most 387 (S <= 2, OW | 64) */

struct ig_args {
    float *y, *part;
    const float *x, *w, *bias;
    int c, h, w_in, sxc, sxs;   /* input: channel c of sample s at x + s sxs + c sxc, rows of w_in */
    int m, ohw, ow, nb, k;      /* output channels, pixels per sample, row length, columns; K = 9 c */
    int ih0, iw0;               /* the input position of output (0, 0)'s first tap: -padding */
    int pr, pc;                 /* the patch's rows and columns */
    int relu, accum, per;       /* per: stages per split */
};

template <int TM>
constexpr int ig_smem_bytes() {
    return (MMA_STAGES * (16 * TM * IG_WLD + IG_PATCH) + IG_PATCH) * (int)sizeof(float);
}

/* patch element e = (c, row, column) at this offset from the stage's first channel; -1 outside
 * the image or past C (only C < 8 has such channels). oh0: the block's first output row. */
template <int S>
static __device__ __forceinline__ void ig_patch_table(int *ptab, const ig_args &a, int oh0) {
    const int prpc = a.pr * a.pc, pe = IG_CB * prpc;
    for (int e = threadIdx.x; e < pe; e += 256) {  /* blocks of 256 threads */
        const int c = e / prpc, r = e - c * prpc, pr = r / a.pc, pc = r - pr * a.pc;
        const int ih = oh0 * S + a.ih0 + pr, iw = a.iw0 + pc;
        ptab[e] = c < a.c && (unsigned)ih < (unsigned)a.h && (unsigned)iw < (unsigned)a.w_in
                      ? c * a.sxc + ih * a.w_in + iw
                      : -1;
    }
}

/* the patch offsets of tap k of a stage (channel k / 9, then the 3x3 window's row and column) and
 * of the block's output column n (row n / OW of the block's rows, at stride S) */
static __device__ __forceinline__ int ig_tap(const ig_args &a, int k) {
    const int c = k / 9, tap = k - 9 * c, ki = tap / 3, kj = tap - 3 * ki;
    return c * (a.pr * a.pc) + ki * a.pc + kj;
}
template <int S>
static __device__ __forceinline__ int ig_col(const ig_args &a, int n) {
    const int r = n / a.ow, q = n - r * a.ow;
    return r * S * a.pc + q * S;
}

/* columns n, n + 1 (n even, one image s) of output row m: the split's partials, or y with the
 * bias and the fused ReLU (added to y for a data gradient into a shared dx) */
static __device__ __forceinline__ void ig_store(const ig_args &a, int m, int n, int s, float x0, float x1) {
    if (a.part) {
        *reinterpret_cast<float2 *>(&a.part[((size_t)blockIdx.z * a.m + m) * a.nb + n]) = make_float2(x0, x1);
        return;
    }
    const float bo = a.bias ? a.bias[m] : 0.0f;
    float v0 = x0 + bo, v1 = x1 + bo;
    if (a.relu) {
        v0 = mpscy_relu(v0);
        v1 = mpscy_relu(v1);
    }
    float2 *yo = reinterpret_cast<float2 *>(&a.y[((size_t)s * a.m + m) * a.ohw + (n - s * a.ohw)]);
    if (a.accum) {
        const float2 o = *yo;
        v0 = o.x + v0;
        v1 = o.y + v1;
    }
    *yo = make_float2(v0, v1);
}

/* VA: W's rows 16-byte aligned (K % 4 == 0 and W aligned): 16-byte copies */
template <int TM, int S, bool VA>
__global__ void __launch_bounds__(256, 2) conv_implicit_kernel(ig_args a) {
    constexpr int BM = 16 * TM, MI = TM / 2, NI = 2;
    extern __shared__ __align__(16) float mma_smem[];
    float *wsm = mma_smem, *psm = wsm + MMA_STAGES * BM * IG_WLD;
    int *ptab = reinterpret_cast<int *>(psm + MMA_STAGES * IG_PATCH);
    const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int wm = (wp & 1) * 8 * TM, wn = (wp >> 1) * 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * 64;
    const int s = n0 / a.ohw, oh0 = (n0 - s * a.ohw) / a.ow;
    const int prpc = a.pr * a.pc, pe = IG_CB * prpc;
    cu_pdl_trigger();
    ig_patch_table<S>(ptab, a, oh0);
    cu_pdl_wait();
    __syncthreads();
    const int nst = (a.c + IG_CB - 1) / IG_CB, st0 = (int)blockIdx.z * a.per, ns = min(nst, st0 + a.per) - st0;
    const float *xs = a.x + (size_t)s * a.sxs;

    /* stage st's W slice and patch into slot `slot` */
    auto load = [&](int st, int slot) {
        float *ws = wsm + slot * BM * IG_WLD, *ps = psm + slot * IG_PATCH;
        const int kb = st * IG_KS;
        if constexpr (VA) {
            for (int e = tid; e < BM * (IG_KS / 4); e += 256) {
                const int r = e / (IG_KS / 4), kq = (e - r * (IG_KS / 4)) * 4;
                const bool ok = m0 + r < a.m && kb + kq < a.k;
                cp_async16(ws + r * IG_WLD + kq, ok ? a.w + (size_t)(m0 + r) * a.k + kb + kq : a.w, ok);
            }
        } else {
            for (int e = tid; e < BM * IG_KS; e += 256) {
                const int r = e / IG_KS, kq = e - r * IG_KS;
                const bool ok = m0 + r < a.m && kb + kq < a.k;
                cp_async4(ws + r * IG_WLD + kq, ok ? a.w + (size_t)(m0 + r) * a.k + kb + kq : a.w, ok);
            }
        }
        const float *xb = xs + (size_t)st * IG_CB * a.sxc;
        const int lim = (a.c - st * IG_CB) * prpc;  /* elements of channels below C */
        for (int e = tid; e < pe; e += 256) {
            const int o = ptab[e];
            const bool ok = o >= 0 && e < lim;
            cp_async4(ps + e, ok ? xb + o : a.x, ok);
        }
    };

    float acc[TM * 4];
#pragma unroll
    for (int e = 0; e < TM * 4; e++) acc[e] = 0.0f;
#pragma unroll
    for (int q = 0; q < MMA_STAGES - 1; q++) {
        if (q < ns) load(st0 + q, q);
        cp_async_commit();
    }
    /* this thread's B reads: column n = wn + 8 j + g at patch offset nofs[j]; k = 8 kk + t (+ 4)
     * at kofs[kk][0] ([1]) */
    int nofs[NI], kofs[IG_KS / 8][2];
#pragma unroll
    for (int j = 0; j < NI; j++) nofs[j] = ig_col<S>(a, wn + j * 8 + g);
#pragma unroll
    for (int kk = 0; kk < IG_KS / 8; kk++)
#pragma unroll
        for (int h = 0; h < 2; h++) kofs[kk][h] = ig_tap(a, kk * 8 + t + 4 * h);
    for (int i = 0; i < ns; i++) {
        cp_async_wait<MMA_STAGES - 2>();
        __syncthreads();
        const int nx = i + MMA_STAGES - 1;
        if (nx < ns) load(st0 + nx, nx % MMA_STAGES);
        cp_async_commit();
        const float *sa = wsm + (i % MMA_STAGES) * BM * IG_WLD, *sp = psm + (i % MMA_STAGES) * IG_PATCH;
#pragma unroll
        for (int kk = 0; kk < IG_KS / 8; kk++) {
            const int k = kk * 8;
            uint32_t ab[MI][4], as[MI][4], bb[NI][2], bs[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                const int m = wm + mi * 16 + g;
                tf32_split(sa[m * IG_WLD + k + t], ab[mi][0], as[mi][0]);
                tf32_split(sa[(m + 8) * IG_WLD + k + t], ab[mi][1], as[mi][1]);
                tf32_split(sa[m * IG_WLD + k + t + 4], ab[mi][2], as[mi][2]);
                tf32_split(sa[(m + 8) * IG_WLD + k + t + 4], ab[mi][3], as[mi][3]);
            }
#pragma unroll
            for (int j = 0; j < NI; j++) {
                tf32_split(sp[kofs[kk][0] + nofs[j]], bb[j][0], bs[j][0]);
                tf32_split(sp[kofs[kk][1] + nofs[j]], bb[j][1], bs[j][1]);
            }
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int j = 0; j < NI; j++) {
                    float *c = &acc[(mi * NI + j) * 4];
                    mma_tf32(c, as[mi], bb[j]);
                    mma_tf32(c, ab[mi], bs[j]);
                    mma_tf32(c, ab[mi], bb[j]);
                }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int e = 0; e < TM * 4; e += 2) { /* (e, e + 1): columns n, n + 1 of row m, n even, one image */
        int r, c;
        mma_pos<TM, 4>(e, r, c);
        const int m = m0 + r, n = n0 + c;
        if (m >= a.m) continue;
        ig_store(a, m, n, s, acc[e], acc[e + 1]);
    }
}

/* The flipped, transposed weights of a stride-1 convolution's data gradient: wt (C, OC*9) with
 * wt[c, o*9 + 8 - tap] = W[o, c*9 + tap] (tap = 3 ki + kj), so that dx is the forward product of
 * dz with wt and padding 2 - p. Launched by a training forward on the side stream (conv.cu). */
__global__ void conv_w_flip(float *wt, const float *w, int64_t oc, int64_t c) {
    cu_pdl_enter();
    const unsigned C = (unsigned)c, total = (unsigned)(oc * c * 9);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        const unsigned o = e / (C * 9), r = e - o * C * 9, ci = r / 9, tap = r - ci * 9;
        wt[((size_t)ci * (unsigned)oc + o) * 9 + 8 - tap] = w[e];
    }
}

int cu_conv_implicit_fits(const mpscy_conv_geom *g) {
    return g->groups == 1 && g->kh == 3 && g->kw == 3 && g->dh == 1 && g->dw == 1 && g->sh == g->sw &&
           (g->sh == 1 || g->sh == 2) && g->ow <= 64 && 64 % g->ow == 0 && g->ohw % 64 == 0;
}

int cu_conv_implicit_dgrad_fits(const mpscy_conv_geom *g) {
    return g->groups == 1 && g->kh == 3 && g->kw == 3 && g->dh == 1 && g->dw == 1 && g->sh == 1 && g->sw == 1 &&
           g->ph <= 2 && g->pw <= 2 && g->w <= 64 && 64 % g->w == 0 && (g->h * g->w) % 64 == 0;
}

int cu_conv_flip_weights(cu_graph *gr, cudaStream_t s, const mpscy_conv_geom *g, float *wt, const float *w, char *err,
                         size_t en) {
    CU_TRY(cu_launch(gr, conv_w_flip, cu_blocks(9 * g->oc * g->c, CU_THREADS, 1024), CU_THREADS, s, wt, w, g->oc,
                     g->c),
           "conv_w_flip");
    return CU_LAUNCHED("conv_w_flip");
}

typedef void (*ig_fn)(ig_args);

int cu_conv_implicit(cu_graph *gr, cudaStream_t stream, const cu_implicit *q, char *err, size_t en) {
    static const ig_fn kinds[2][2][2] = {
        {{conv_implicit_kernel<2, 1, false>, conv_implicit_kernel<2, 1, true>},
         {conv_implicit_kernel<2, 2, false>, conv_implicit_kernel<2, 2, true>}},
        {{conv_implicit_kernel<4, 1, false>, conv_implicit_kernel<4, 1, true>},
         {conv_implicit_kernel<4, 2, false>, conv_implicit_kernel<4, 2, true>}}};
    /* 64-row tiles where a block may have their 105.5 KB of shared memory, else 32-row ones
     * (77 KB): sm_86, sm_89 and sm_120 grant a block 99 KB, and mma_launch's opt-in would fail */
    const bool tm4 = q->m > 32 && (size_t)ig_smem_bytes<4>() <= gr->dev->prop.sharedMemPerBlockOptin;
    const int bm = tm4 ? 64 : 32, bytes = tm4 ? ig_smem_bytes<4>() : ig_smem_bytes<2>();
    ig_args a = {};
    a.y = q->y; a.x = q->x; a.w = q->w; a.bias = q->bias;
    a.c = (int)q->c; a.h = (int)q->h; a.w_in = (int)q->w_in; a.sxc = (int)q->sxc; a.sxs = (int)q->sxs;
    a.m = (int)q->m; a.ohw = (int)(q->oh * q->ow); a.ow = (int)q->ow; a.nb = (int)(q->b * q->oh * q->ow);
    a.k = (int)(9 * q->c); a.ih0 = -(int)q->ph; a.iw0 = -(int)q->pw;
    a.pr = (int)((64 / q->ow - 1) * q->stride + 3); a.pc = (int)((q->ow - 1) * q->stride + 3);
    a.relu = q->relu; a.accum = q->accum;
    if (IG_CB * a.pr * a.pc > IG_PATCH)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "conv_implicit: a patch of %d floats", IG_CB * a.pr * a.pc);
    const int64_t gm = (q->m + bm - 1) / bm, gn = a.nb / 64, nst = (q->c + IG_CB - 1) / IG_CB;
    /* under one block per multiprocessor: the stages split (at least two a split) into partials */
    int64_t splits = 1;
    if (q->part && !q->accum && gm * gn < gr->dev->sms) {
        splits = std::min({2 * (int64_t)gr->dev->sms / (gm * gn), nst / 2, q->part_floats / (q->m * a.nb)});
        if (splits < 2) splits = 1;
    }
    int64_t per;
    splits = cu_split_units(nst, splits, &per);
    a.per = (int)per;
    a.part = splits > 1 ? q->part : NULL;
    ig_fn k = kinds[tm4][q->stride == 2][a.k % 4 == 0 && cu_aligned16(q->w)];
    CU_TRY(mma_launch(gr, stream, k, dim3((unsigned)gn, (unsigned)gm, (unsigned)splits), bytes, a), "conv_implicit");
    int st = CU_LAUNCHED("conv_implicit");
    if (st != MPSCY_OK || splits == 1) return st;
    CU_TRY(cu_launch(gr, conv_fwd_sum, cu_blocks(q->m * a.nb, CU_THREADS, 4096), CU_THREADS, stream, q->y,
                     (const float *)q->part, q->bias, splits, q->m, (int64_t)a.nb, (int64_t)a.ohw, q->m, (int64_t)0,
                     q->relu),
           "conv_implicit_sum");
    return CU_LAUNCHED("conv_implicit_sum");
}
