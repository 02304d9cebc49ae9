/* im2col.cu — a convolution's columns and their gradient: im2col builds col (K, b*OHW), rows
 * ordered (c, ki, kj), from x (b, C, H, W); col2im gathers dx from dcol (each input element sums
 * the taps that read it: no atomics, so sums are deterministic; conv.cu's conv_dgrad_s2 replaces
 * dcol and col2im for 3x3 stride-2 pad-1 convolutions of even H and W). Square 1/3/5/7 kernels
 * run a form compiled for their size (and col2im for stride 1 or 2), which issues every tap's load
 * before the first is used; any other shape runs the generic loops. Index arithmetic is in 32
 * bits (64-bit division costs dozens of instructions): a convolution whose tensors reach 2^31
 * elements runs them over sub-batches (cu_conv_split). */
#include "cuda.h"

typedef mpscy_conv_geom conv_geom;

/* column j of col as (sample s, top-left input row ih0 and column iw0 of its window) */
static __device__ __forceinline__ const float *column_origin(const conv_geom &g, const float *x, unsigned c, unsigned j,
                                                             int *ih0, int *iw0) {
    const unsigned ohw = (unsigned)g.ohw, s = j / ohw, o = j - s * ohw, oh = o / (unsigned)g.ow, ow = o - oh * (unsigned)g.ow;
    *ih0 = (int)oh * (int)g.sh - (int)g.ph;
    *iw0 = (int)ow * (int)g.sw - (int)g.pw;
    return x + ((size_t)s * (unsigned)g.c + c) * (unsigned)(g.h * g.w);
}

/* the output index a tap reads an input element from: t = in + pad - k * dil, divided by the
 * stride S (compiled: 1, 2; 0: s at run time), or -1 when it falls between outputs or outside
 * [0, out) */
template <int S>
static __device__ __forceinline__ int tap_out(int t, int s, int out) {
    if (t < 0) return -1;
    int o;
    if (S == 1) o = t;
    else if (S == 2) o = t & 1 ? -1 : t >> 1;
    else o = t % s == 0 ? t / s : -1;
    return o < out ? o : -1;
}

/* blockIdx.y walks the channels, x the columns; a thread writes its column of all KH*KW rows of
 * the channel (each row's write coalesced across the block) */
__global__ void im2col_kernel(float *col, const float *x, conv_geom g, int64_t b) {
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw), khw = (unsigned)(g.kh * g.kw), H = (unsigned)g.h, W = (unsigned)g.w;
    for (unsigned c = blockIdx.y; c < (unsigned)g.c; c += gridDim.y) {
        float *rows = col + (size_t)c * khw * nb;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < nb; j += gridDim.x * blockDim.x) {
            int ih0, iw0;
            const float *xp = column_origin(g, x, c, j, &ih0, &iw0);
            for (int ki = 0; ki < (int)g.kh; ki++) {
                const int ih = ih0 + ki * (int)g.dh;
                const bool rin = ih >= 0 && ih < (int)H;
                for (int kj = 0; kj < (int)g.kw; kj++) {
                    const int iw = iw0 + kj * (int)g.dw;
                    rows[(size_t)(ki * (int)g.kw + kj) * nb + j] =
                        rin && iw >= 0 && iw < (int)W ? xp[(unsigned)ih * W + (unsigned)iw] : 0.0f;
                }
            }
        }
    }
}

/* the same for a KS x KS kernel: all of a column's taps loaded before any is written */
template <int KS>
__global__ void im2col_fixed(float *__restrict__ col, const float *__restrict__ x, conv_geom g, int64_t b) {
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw);
    const int H = (int)g.h, W = (int)g.w, dh = (int)g.dh, dw = (int)g.dw;
    for (unsigned c = blockIdx.y; c < (unsigned)g.c; c += gridDim.y) {
        float *rows = col + (size_t)c * KS * KS * nb;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < nb; j += gridDim.x * blockDim.x) {
            int ih0, iw0;
            const float *xp = column_origin(g, x, c, j, &ih0, &iw0);
            float v[KS * KS];
#pragma unroll
            for (int ki = 0; ki < KS; ki++) {
                const int ih = ih0 + ki * dh;
                const bool rin = ih >= 0 && ih < H;
#pragma unroll
                for (int kj = 0; kj < KS; kj++) {
                    const int iw = iw0 + kj * dw;
                    v[ki * KS + kj] = rin && iw >= 0 && iw < W ? __ldg(&xp[ih * W + iw]) : 0.0f;
                }
            }
#pragma unroll
            for (int t = 0; t < KS * KS; t++) rows[(size_t)t * nb + j] = v[t];
        }
    }
}

/* blockIdx.y walks the (sample, channel) planes, x the positions of a plane */
__global__ void col2im_kernel(float *dx, const float *dcol, conv_geom g, int64_t b, int accum) {
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw), W = (unsigned)g.w, hw = (unsigned)(g.h * g.w), C = (unsigned)g.c;
    for (unsigned plane = blockIdx.y; plane < (unsigned)b * C; plane += gridDim.y) {
        const unsigned s = plane / C, c = plane - s * C;
        const float *base = dcol + (size_t)c * g.kh * g.kw * nb + s * (unsigned)g.ohw;
        float *dxp = dx + (size_t)plane * hw;
        for (unsigned p = blockIdx.x * blockDim.x + threadIdx.x; p < hw; p += gridDim.x * blockDim.x) {
            const int ih = (int)(p / W), iw = (int)(p - (unsigned)ih * W);
            float v = 0.0f;
            for (int ki = 0; ki < (int)g.kh; ki++) {
                const int oh = tap_out<0>(ih + (int)g.ph - ki * (int)g.dh, (int)g.sh, (int)g.oh);
                if (oh < 0) continue;
                for (int kj = 0; kj < (int)g.kw; kj++) {
                    const int ow = tap_out<0>(iw + (int)g.pw - kj * (int)g.dw, (int)g.sw, (int)g.ow);
                    if (ow >= 0) v += base[(size_t)(ki * (int)g.kw + kj) * nb + (unsigned)(oh * (int)g.ow + ow)];
                }
            }
            dxp[p] = accum ? dxp[p] + v : v;
        }
    }
}

/* col2im for a KS x KS kernel and stride S (tap_out's): blockIdx.y walks groups of VP planes, x
 * the positions of a plane; a thread resolves its position's taps once and loads them from all VP
 * planes before adding any, so it waits for memory once for KS*KS*VP loads (one plane per thread
 * left the kernel bound by the latency of short blocks); a compiled stride makes the tap tests
 * shifts (a runtime division costs ~30 instructions). */
template <int KS, int S>
__global__ void col2im_fixed(float *__restrict__ dx, const float *__restrict__ dcol, conv_geom g, int64_t b,
                             int accum) {
    constexpr int VP = KS <= 3 ? 4 : 1;
    cu_pdl_enter();
    const unsigned nb = (unsigned)(b * g.ohw), W = (unsigned)g.w, hw = (unsigned)(g.h * g.w), C = (unsigned)g.c,
                   OHW = (unsigned)g.ohw, planes = (unsigned)b * C;
    const int OW = (int)g.ow;
    for (unsigned pb = blockIdx.y * VP; pb < planes; pb += gridDim.y * VP) {
        for (unsigned p = blockIdx.x * blockDim.x + threadIdx.x; p < hw; p += gridDim.x * blockDim.x) {
            const int ih = (int)(p / W), iw = (int)(p - (unsigned)ih * W);
            int ohs[KS], ows[KS];  /* the output row (column) tap ki (kj) reads from, or -1 */
#pragma unroll
            for (int k = 0; k < KS; k++) {
                ohs[k] = tap_out<S>(ih + (int)g.ph - k * (int)g.dh, (int)g.sh, (int)g.oh);
                ows[k] = tap_out<S>(iw + (int)g.pw - k * (int)g.dw, (int)g.sw, OW);
            }
            float t[VP][KS * KS];
#pragma unroll
            for (int v = 0; v < VP; v++) {
                const unsigned plane = pb + v, s = plane / C, c = plane - s * C;
                const float *base = dcol + (size_t)c * KS * KS * nb + s * OHW;
#pragma unroll
                for (int ki = 0; ki < KS; ki++)
#pragma unroll
                    for (int kj = 0; kj < KS; kj++)
                        t[v][ki * KS + kj] = plane < planes && ohs[ki] >= 0 && ows[kj] >= 0
                                                 ? __ldg(&base[(size_t)(ki * KS + kj) * nb + (unsigned)(ohs[ki] * OW + ows[kj])])
                                                 : 0.0f;
            }
#pragma unroll
            for (int v = 0; v < VP; v++) {
                if (pb + v >= planes) break;
                float sum = 0.0f;  /* in tap order, as the generic kernel sums */
#pragma unroll
                for (int k = 0; k < KS * KS; k++) sum += t[v][k];
                float *d = dx + (size_t)(pb + v) * hw + p;
                *d = accum ? *d + sum : sum;
            }
        }
    }
}

/* the compiled forms cover square kernels of these sizes */
static bool fixed_size(const conv_geom &g) { return g.kh == g.kw && (g.kh == 1 || g.kh == 3 || g.kh == 5 || g.kh == 7); }

int cu_im2col(cu_graph *gr, cudaStream_t s, const mpscy_conv_geom *g, float *col, const float *x, int64_t b, char *err,
              size_t en) {
    void (*k)(float *, const float *, conv_geom, int64_t) = im2col_kernel;
    if (fixed_size(*g))
        k = g->kh == 1 ? im2col_fixed<1> : g->kh == 3 ? im2col_fixed<3> : g->kh == 5 ? im2col_fixed<5> : im2col_fixed<7>;
    CU_TRY(cu_launch(gr, k, dim3(cu_blocks(b * g->ohw, CU_THREADS, 1024), (unsigned)(g->c < 65535 ? g->c : 65535)),
                     CU_THREADS, s, col, x, *g, b),
           "im2col");
    return CU_LAUNCHED("im2col");
}

int cu_col2im(cu_graph *gr, const mpscy_conv_geom *g, float *dx, const float *dcol, int64_t b, int accum, char *err,
              size_t en) {
    if (fixed_size(*g)) {
        typedef void (*c2i_fn)(float *, const float *, conv_geom, int64_t, int);
        static const c2i_fn kinds[4][3] = {
            {col2im_fixed<1, 0>, col2im_fixed<1, 1>, col2im_fixed<1, 2>},
            {col2im_fixed<3, 0>, col2im_fixed<3, 1>, col2im_fixed<3, 2>},
            {col2im_fixed<5, 0>, col2im_fixed<5, 1>, col2im_fixed<5, 2>},
            {col2im_fixed<7, 0>, col2im_fixed<7, 1>, col2im_fixed<7, 2>}};
        const int s = g->sh == g->sw && (g->sh == 1 || g->sh == 2) ? (int)g->sh : 0;
        const int64_t vp = g->kh <= 3 ? 4 : 1, groups = (b * g->c + vp - 1) / vp;
        CU_TRY(cu_launch(gr, kinds[g->kh / 2][s], dim3(cu_blocks(g->h * g->w, CU_THREADS, 64),
                                                      (unsigned)(groups < 65535 ? groups : 65535)),
                         CU_THREADS, gr->stream, dx, dcol, *g, b, accum),
               "col2im");
        return CU_LAUNCHED("col2im");
    }
    CU_TRY(cu_launch(gr, col2im_kernel, dim3(cu_blocks(g->h * g->w, CU_THREADS, 64),
                                             (unsigned)(b * g->c < 65535 ? b * g->c : 65535)),
                     CU_THREADS, gr->stream, dx, dcol, *g, b, accum),
           "col2im");
    return CU_LAUNCHED("col2im");
}
