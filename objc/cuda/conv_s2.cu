/* conv_s2.cu — the data gradient of a 3x3, stride-2, pad-1 convolution (groups 1, dilation 1,
 * H and W even) without dcol and col2im, for conv.cu's backward in the own fp32 path: one 3xTF32
 * product per parity class of the input positions (mma.cuh), written straight to NCHW. W is
 * re-laid for the products by the training forward on the side stream; dz's shifted copies come
 * from conv.cu's dz gather when it moves float4s of whole rows, else from conv_dz_shift here. */
#include "cuda.h"
#include "mma.cuh"

typedef mpscy_conv_geom conv_geom;

int cu_conv_s2_fits(const mpscy_conv_geom *g) {
    return g->groups == 1 && g->kh == 3 && g->kw == 3 && g->sh == 2 && g->sw == 2 && g->ph == 1 && g->pw == 1 &&
           g->dh == 1 && g->dw == 1 && g->h % 2 == 0 && g->w % 2 == 0;
}

/* The data gradient of a 3x3, stride-2, pad-1 convolution (groups 1, H and W even: OH = H / 2)
 * without dcol and col2im. dx[s, c, 2m + py, 2n + px] = sum over co and the taps of parity class
 * z = 2 py + px of W[co, c, ky, kx] dz[s, co, m + ey, n + ex]: for py = 0 only ky = 1 (ey = 0),
 * for py = 1 ky = 0 (ey = 1) and ky = 2 (ey = 0); the same in x. So the classes have 1, 2, 2 and
 * 4 taps, each class a product (C, b*OH*OW) over K = taps * OC. dz comes as four copies dzs
 * (4, OC, nb) shifted by (ey, ex) = (0, 1), (0, 0), (1, 0), (1, 1) (copy 1 is dzt; 0 past the
 * edge), an order in which every class's taps are consecutive copies: class 0 copy 1, class 1
 * copies 0-1, class 2 copies 1-2, class 3 copies 0-3; its B is one (K, nb) view of dzs. */
static __host__ __device__ __forceinline__ int s2_first(int z) { return z & 1 ? 0 : 1; }  /* its first copy */
static __host__ __device__ __forceinline__ int s2_taps(int z) { return (1 + (z >> 1)) * (1 + (z & 1)); }
static __host__ __device__ __forceinline__ int s2_woff(int z) { return z ? 2 * z - 1 : 0; }  /* taps before it */

/* copies 0, 2 and 3 of dzs (4, OC, nb) from copy 1, where conv_dz_kernel<true> does not apply
 * (not vec, or OW % 4 != 0): copy (ey, ex) at e = o*nb + j is copy 1 at e + ey*OW + ex, or 0 past
 * its plane's edge (nb is a multiple of OHW: e % OHW is j's pixel) */
__global__ void conv_dz_shift(float *dzs, int64_t total, int64_t ohw, int64_t oh, int64_t ow) {
    cu_pdl_enter();
    const unsigned T = (unsigned)total, OHW = (unsigned)ohw, OH = (unsigned)oh, OW = (unsigned)ow;
    const float *d = dzs + total;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < T; e += gridDim.x * blockDim.x) {
        const unsigned pix = e % OHW, m = pix / OW, q = pix - m * OW;
        const bool right = q + 1 < OW, down = m + 1 < OH;
        dzs[e] = right ? d[e + 1] : 0.0f;
        dzs[2 * (size_t)T + e] = down ? d[e + OW] : 0.0f;
        dzs[3 * (size_t)T + e] = right && down ? d[e + OW + 1] : 0.0f;
    }
}

/* wc (9, OC, C): W (OC, C, 3, 3) re-laid as the products' A, class z's taps at s2_woff(z) in the
 * order of its copies, each W[:, :, ky, kx] as (OC, C) (the product's rows C contiguous); run by
 * the training forward on the side stream (cu_conv_s2_weights) */
__global__ void conv_w_s2(float *wc, const float *w, int64_t oc, int64_t c) {
    cu_pdl_enter();
    const unsigned occ = (unsigned)(oc * c);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < 9 * occ; e += gridDim.x * blockDim.x) {
        const unsigned t = e / occ, r = e - t * occ;  /* r = co*C + ci */
        const int z = t == 0 ? 0 : t < 3 ? 1 : t < 5 ? 2 : 3, cp = s2_first(z) + (int)t - s2_woff(z);
        const bool ey = cp >= 2, ex = cp == 0 || cp == 3;
        const int ky = z >> 1 ? (ey ? 0 : 2) : 1, kx = z & 1 ? (ex ? 0 : 2) : 1;
        wc[e] = w[(size_t)r * 9 + ky * 3 + kx];
    }
}

/* dx (b, C, H, W) (added to when accum): block z takes class 3 - z (the long K first), a
 * (16 TM) x 64 tile of its product wc_z^T (C, K) dzs_z (K, nb), and scatters it to the class's
 * positions (2m + py, 2n + px); each element of dx is written once, zeroed where mask (the
 * ReLU's output below, or NULL) is not positive. VA: C % 4 == 0 and wc 16-byte aligned; VB: nb %
 * 4 == 0 and dzs aligned. */
template <int TM, bool VA, bool VB>
__global__ void __launch_bounds__(256, 2) conv_dgrad_s2(float *__restrict__ dx, const float *__restrict__ wc,
                                                        const float *__restrict__ dzs,
                                                        const float *__restrict__ mask, int C, int OC, int nb, int ohw,
                                                        int ow, int hw, int w, int accum) {
    extern __shared__ __align__(16) float mma_smem[];
    cu_pdl_enter();
    const int z = 3 - (int)blockIdx.z, py = z >> 1, px = z & 1;
    const int m0 = blockIdx.y * 16 * TM, n0 = blockIdx.x * 64;
    float acc[TM * 4];
    mma_product<TM, 4, false, false, VA, VB>(acc, mma_smem, wc + (size_t)s2_woff(z) * OC * C, C, m0, C,
                                             dzs + (size_t)s2_first(z) * OC * nb, nb, n0, nb, 0,
                                             (int64_t)s2_taps(z) * OC);
    /* this thread's four columns (i = 2 ni + (q & 1) in mma_pos's terms) as offsets in dx */
    int col[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r, c;
        mma_pos<TM, 4>((i >> 1) * 4 + (i & 1), r, c);
        const unsigned n = (unsigned)(n0 + c), s = n / (unsigned)ohw, pix = n - s * (unsigned)ohw,
                       m = pix / (unsigned)ow, q = pix - m * (unsigned)ow;
        const unsigned at = s * (unsigned)(C * hw) + (2 * m + py) * (unsigned)w + 2 * q + px;
        col[i] = n < (unsigned)nb ? (int)at : -1;
    }
#pragma unroll
    for (int e = 0; e < TM * 4; e++) {
        int r, c;
        mma_pos<TM, 4>(e, r, c);
        const int ci = m0 + r, o = col[((e >> 2) & 1) * 2 + (e & 1)];
        if (ci >= C || o < 0) continue;
        float *d = &dx[o + ci * hw];
        const float v = accum ? *d + acc[e] : acc[e];
        *d = mask && mpscy_relu_zeroes(mask[o + ci * hw]) ? 0.0f : v;
    }
}

typedef void (*dgrad_fn)(float *, const float *, const float *, const float *, int, int, int, int, int, int, int, int);

static dgrad_fn dgrad_kind(bool tm4, bool va, bool vb, int *bytes) {
    static const dgrad_fn kinds[2][2][2] = {
        {{conv_dgrad_s2<2, false, false>, conv_dgrad_s2<2, false, true>},
         {conv_dgrad_s2<2, true, false>, conv_dgrad_s2<2, true, true>}},
        {{conv_dgrad_s2<4, false, false>, conv_dgrad_s2<4, false, true>},
         {conv_dgrad_s2<4, true, false>, conv_dgrad_s2<4, true, true>}}};
    *bytes = tm4 ? mma_smem_bytes<4, 4, false, false>() : mma_smem_bytes<2, 4, false, false>();
    return kinds[tm4][va][vb];
}

/* W re-laid into wc for conv_dgrad_s2, on stream s (a training forward's side stream: conv.cu) */
int cu_conv_s2_weights(cu_graph *gr, cudaStream_t s, const mpscy_conv_geom *cg, float *wc, const float *w, char *err,
                       size_t en) {
    const conv_geom &g = *cg;
    CU_TRY(cu_launch(gr, conv_w_s2, cu_blocks(9 * g.oc * g.c, CU_THREADS, 1024), CU_THREADS, s, wc, w, g.oc, g.c),
           "conv_w_s2");
    return CU_LAUNCHED("conv_w_s2");
}

/* dx (b, C, H, W) of a cu_conv_s2_fits convolution from dzs (4, OC, nb) whose copy 1 (dzt) is written
 * (all four when shifted: conv_dz_kernel<true>) and wc (9, OC, C), W re-laid by the forward, masked
 * by mask (or NULL)
 * (cu_conv_s2_weights; the caller has waited for it): dz's three other copies unless shifted,
 * then the four classes in one launch */
int cu_conv_s2_dgrad(cu_graph *gr, const mpscy_conv_geom *cg, float *dx, const float *mask, float *dzs, const float *wc,
                     int64_t nb, int shifted, int accum, char *err, size_t en) {
    const conv_geom &g = *cg;
    if (!shifted) {
        CU_TRY(cu_launch(gr, conv_dz_shift, cu_blocks(g.oc * nb, CU_THREADS, 4096), CU_THREADS, gr->stream, dzs,
                         g.oc * nb, g.ohw, g.oh, g.ow),
               "conv_dz_shift");
        int st = CU_LAUNCHED("conv_dz_shift");
        if (st != MPSCY_OK) return st;
    }
    int bytes;
    const bool tm4 = g.c > 32;
    dgrad_fn k = dgrad_kind(tm4, g.c % 4 == 0 && cu_aligned16(wc), nb % 4 == 0 && cu_aligned16(dzs), &bytes);
    dim3 grid((unsigned)((nb + 63) / 64), (unsigned)((g.c + (tm4 ? 63 : 31)) / (tm4 ? 64 : 32)), 4);
    CU_TRY(mma_launch(gr, gr->stream, k, grid, bytes, dx, (const float *)wc, (const float *)dzs, mask, (int)g.c, (int)g.oc,
                      (int)nb, (int)g.ohw, (int)g.ow, (int)(g.h * g.w), (int)g.w, accum),
           "conv_dgrad_s2");
    return CU_LAUNCHED("conv_dgrad_s2");
}
