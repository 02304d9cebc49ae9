/* pool.cu — MaxPool2D, AvgPool2D, GlobalAvgPool2D and Upsample2D on CUDA, NCHW, as cpu/pool.c
 * defines them (floor mode; max pooling sends each gradient to the first maximum, a NaN winning;
 * average pooling divides by KH*KW or, without count_include_pad, by the in-bounds taps; nearest
 * upsampling repeats each pixel over an sh x sw block; bilinear resizing as common/resize_math.h).
 * Backward gathers: each input element sums the outputs whose window holds it, in a fixed order, so
 * no atomics and the same result every run (Upsample2D's in the cpu's order, so the two agree to the
 * bit). MaxPool saves the argmax of every output element. */
#include "cuda.h"
#include "reduce.h"
#include "../common/resize_math.h"

#include <math.h>

#include <algorithm>

struct pool_geom {
    int64_t planes, h, w, oh, ow, kh, kw, sh, sw, ph, pw;
    int include_pad, max;
    int bilinear, align;  /* Upsample2D's mode and align_corners */
};

static pool_geom geom(const cu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    const int32_t *q = n->ints;  /* kh, kw, sh, sw, ph, pw [, count_include_pad] */
    pool_geom p = {b * a->shape[0], a->shape[1], a->shape[2], n->shape[1], n->shape[2], q[0], q[1], q[2], q[3], q[4],
                   q[5], n->kind == MPSCY_LAYER_AVGPOOL2D ? q[6] : 0, n->kind == MPSCY_LAYER_MAXPOOL2D};
    return p;
}

/* The geometry in the index type I of a kernel: int32_t where every index of the layer's tensors
 * fits it (pool_i32), so the per-element divisions are 32-bit ones (a U-Net's 2x2 MaxPool2D
 * backward over (16, 32, 64, 64) took 42 us a call in 64-bit ones on an H100) */
template <typename I>
struct pool_ix {
    I planes, h, w, oh, ow, kh, kw, sh, sw, ph, pw;
    __device__ explicit pool_ix(const pool_geom &p)
        : planes((I)p.planes), h((I)p.h), w((I)p.w), oh((I)p.oh), ow((I)p.ow), kh((I)p.kh), kw((I)p.kw), sh((I)p.sh),
          sw((I)p.sw), ph((I)p.ph), pw((I)p.pw) {}
};

static bool pool_i32(const pool_geom &p) {
    /* the tensors' indices, a window's taps (average pooling's divisor: kh kw) and the window
     * arithmetic along each axis (h + ph + sh, kh, ... in pool_backward's bounds) */
    return cu_fits_i32(std::max({p.planes * std::max(p.h * p.w, p.oh * p.ow) + p.kh * p.w + p.kw, p.kh * p.kw,
                                 p.h + 2 * p.ph + p.sh + p.kh, p.w + 2 * p.pw + p.sw + p.kw}));
}

template <typename I>
static __device__ float avg_window(const pool_ix<I> &p, int include_pad, I oh, I ow, I *h0, I *h1, I *w0, I *w1) {
    I hs = oh * p.sh - p.ph, ws = ow * p.sw - p.pw;
    *h0 = hs < 0 ? 0 : hs;
    *w0 = ws < 0 ? 0 : ws;
    *h1 = hs + p.kh < p.h ? hs + p.kh : p.h;
    *w1 = ws + p.kw < p.w ? ws + p.kw : p.w;
    I count = include_pad ? p.kh * p.kw : (*h1 - *h0) * (*w1 - *w0);
    return 1.0f / (float)count;
}

template <typename I>
__global__ void pool_forward(float *y, int32_t *arg, const float *x, pool_geom g) {
    // y (planes, OH, OW), arg (planes, OH, OW) flat index into the input plane (max), x (planes, H, W)
    cu_pdl_enter();
    const pool_ix<I> p(g);
    const I total = p.planes * p.oh * p.ow;
    for (I e = blockIdx.x * (I)blockDim.x + threadIdx.x; e < total; e += (I)gridDim.x * blockDim.x) {
        I ow = e % p.ow, oh = (e / p.ow) % p.oh, c = e / (p.ow * p.oh);
        const float *xc = x + c * p.h * p.w;
        if (g.max) {
            I h0 = oh * p.sh - p.ph, w0 = ow * p.sw - p.pw, best = -1;
            float m = -INFINITY;
            for (I i = h0 < 0 ? 0 : h0; i < h0 + p.kh && i < p.h; i++)
                for (I j = w0 < 0 ? 0 : w0; j < w0 + p.kw && j < p.w; j++) {
                    float v = xc[i * p.w + j];
                    if (best < 0 || v > m || isnan(v)) {
                        m = v;
                        best = i * p.w + j;
                    }
                }
            y[e] = m;
            arg[e] = (int32_t)best;
        } else {
            I h0, h1, w0, w1;
            float inv = avg_window(p, g.include_pad, oh, ow, &h0, &h1, &w0, &w1), s = 0.0f;
            for (I i = h0; i < h1; i++)
                for (I j = w0; j < w1; j++) s += xc[i * p.w + j];
            y[e] = s * inv;
        }
    }
}

template <typename I>
__global__ void pool_backward(float *dx, const float *dy, const int32_t *arg, pool_geom g, int accum) {
    // dx (planes, H, W), dy (planes, OH, OW), arg (planes, OH, OW) for max pooling
    cu_pdl_enter();
    const pool_ix<I> p(g);
    const I total = p.planes * p.h * p.w;
    for (I e = blockIdx.x * (I)blockDim.x + threadIdx.x; e < total; e += (I)gridDim.x * blockDim.x) {
        I w = e % p.w, h = (e / p.w) % p.h, c = e / (p.w * p.h);
        /* outputs whose window [o*s - pad, o*s - pad + k) holds this row / column */
        I oh0 = h + p.ph - p.kh + 1, ow0 = w + p.pw - p.kw + 1;
        oh0 = oh0 <= 0 ? 0 : (oh0 + p.sh - 1) / p.sh;
        ow0 = ow0 <= 0 ? 0 : (ow0 + p.sw - 1) / p.sw;
        I oh1 = (h + p.ph) / p.sh, ow1 = (w + p.pw) / p.sw;
        if (oh1 > p.oh - 1) oh1 = p.oh - 1;
        if (ow1 > p.ow - 1) ow1 = p.ow - 1;
        float v = 0.0f;
        for (I oh = oh0; oh <= oh1; oh++)
            for (I ow = ow0; ow <= ow1; ow++) {
                I o = (c * p.oh + oh) * p.ow + ow;
                if (g.max) {
                    if (arg[o] == h * p.w + w) v += dy[o];
                } else {
                    I h0, h1, w0, w1;
                    float inv = avg_window(p, g.include_pad, oh, ow, &h0, &h1, &w0, &w1);
                    if (h >= h0 && h < h1 && w >= w0 && w < w1) v += dy[o] * inv;
                }
            }
        dx[e] = accum ? dx[e] + v : v;
    }
}

/* Max pooling whose windows tile the input (pool_tiled: the stride the window, no padding, no rows
 * or columns past the last window): every input element lies in exactly one window, so a thread an
 * output writes its window's kh x kw gradients, dy at the saved argmax and 0 elsewhere, without
 * pool_backward's per-element divisions and window bounds. 0 + dy as pool_backward adds it (so -0
 * becomes +0, as there and on the cpu). */
template <typename I>
__global__ void maxpool_backward_tiled(float *dx, const float *dy, const int32_t *arg, pool_geom g, int accum) {
    cu_pdl_enter();
    const pool_ix<I> p(g);
    const I total = p.planes * p.oh * p.ow;
    for (I o = blockIdx.x * (I)blockDim.x + threadIdx.x; o < total; o += (I)gridDim.x * blockDim.x) {
        const I ow = o % p.ow, t = o / p.ow, oh = t % p.oh, c = t / p.oh;
        const float d = 0.0f + dy[o];
        const I at = arg[o];
        float *dc = dx + c * p.h * p.w;
        for (I i = 0; i < p.kh; i++)
            for (I j = 0; j < p.kw; j++) {
                const I e = (oh * p.kh + i) * p.w + ow * p.kw + j;
                const float v = e == at ? d : 0.0f;
                dc[e] = accum ? dc[e] + v : v;
            }
    }
}

static bool pool_tiled(const pool_geom &p) {
    return p.max && p.kh == p.sh && p.kw == p.sw && p.ph == 0 && p.pw == 0 && p.h == p.oh * p.kh && p.w == p.ow * p.kw;
}

/* one warp per (sample, channel) plane, summed in double (as the cpu's: a float lane sum over
 * a 224 x 224 plane drifts by ~1e-5) */
__global__ void global_avgpool_forward(float *y, const float *x, int64_t planes, int64_t hw) {
    // y (planes), x (planes, HW)
    cu_pdl_enter();
    int64_t c = blockIdx.x * (int64_t)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= planes) return;
    double s = 0.0;
    for (int64_t k = threadIdx.x & 31; k < hw; k += 32) s += x[c * hw + k];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) y[c] = (float)(s / (double)hw);
}

__global__ void global_avgpool_backward(float *dx, const float *dy, int64_t planes, int64_t hw, int accum) {
    // dx (planes, HW), dy (planes)
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < planes * hw; e += (int64_t)gridDim.x * blockDim.x) {
        float d = dy[e / hw] / (float)hw;
        dx[e] = accum ? dx[e] + d : d;
    }
}

/* Upsample2D, nearest: y[c, i, j] = x[c, i / sh, j / sw], a thread per output element */
__global__ void upsample_forward(float *y, const float *x, pool_geom p) {
    // y (planes, H sh, W sw), x (planes, H, W)
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < p.planes * p.oh * p.ow;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = e % p.ow, t = e / p.ow, i = t % p.oh, c = t / p.oh;
        y[e] = x[(c * p.h + i / p.sh) * p.w + j / p.sw];
    }
}

/* a thread per input element: the sum of its block of dy, row by row, left to right in float (cpu/pool.c's order) */
__global__ void upsample_backward(float *dx, const float *dy, pool_geom p, int accum) {
    // dx (planes, H, W), dy (planes, H sh, W sw)
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < p.planes * p.h * p.w;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t w = e % p.w, t = e / p.w, h = t % p.h, c = t / p.h;
        const float *r = dy + (c * p.oh + h * p.sh) * p.ow + w * p.sw;
        float s = 0.0f;
        for (int64_t a = 0; a < p.sh; a++)
            for (int64_t k = 0; k < p.sw; k++) s += r[a * p.ow + k];
        dx[e] = accum ? dx[e] + s : s;
    }
}

/* Upsample2D, bilinear: a thread per output element, its two taps along each axis */
__global__ void bilinear_forward(float *y, const float *x, pool_geom p) {
    // y (planes, OH, OW), x (planes, H, W)
    cu_pdl_enter();
    float rh = mpscy_resize_ratio(p.h, p.oh, p.align), rw = mpscy_resize_ratio(p.w, p.ow, p.align);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < p.planes * p.oh * p.ow;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = e % p.ow, t = e / p.ow, a = t % p.oh, c = t / p.oh;
        y[e] = mpscy_bilinear_at(x + c * p.h * p.w, p.w, mpscy_resize_lerp(a, p.h, rh, p.align),
                                 mpscy_resize_lerp(b, p.w, rw, p.align));
    }
}

/* a thread per input element: the outputs that read it, in cpu/pool.c's order */
__global__ void bilinear_backward(float *dx, const float *dy, pool_geom p, int accum) {
    // dx (planes, H, W), dy (planes, OH, OW)
    cu_pdl_enter();
    float rh = mpscy_resize_ratio(p.h, p.oh, p.align), rw = mpscy_resize_ratio(p.w, p.ow, p.align);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < p.planes * p.h * p.w;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = e % p.w, t = e / p.w, i = t % p.h, c = t / p.h;
        float s = mpscy_bilinear_grad_at(dy + c * p.oh * p.ow, i, j, p.h, p.w, p.oh, p.ow, rh, rw, p.align);
        dx[e] = accum ? __fadd_rn(dx[e], s) : s;
    }
}

static pool_geom upsample_geom(const cu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *a = &g->plan.nodes[n->in[0]];
    pool_geom p = {b * a->shape[0], a->shape[1], a->shape[2], n->shape[1], n->shape[2], 1, 1, n->ints[0], n->ints[1],
                   0, 0, 0, 0, n->ints[2] == 1, n->ints[3]};
    return p;
}

int cu_pool_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    int64_t i = cu_node_index(g, n);
    const float *x = g->y[n->in[0]];
    if (n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) {
        const mpscy_node *src = &g->plan.nodes[n->in[0]];
        int64_t planes = b * src->shape[0], hw = src->shape[1] * src->shape[2];
        CU_TRY(cu_launch(g, global_avgpool_forward, cu_blocks(planes, CU_THREADS / 32, 1 << 30), CU_THREADS, g->stream,
                         g->y[i], x, planes, hw),
               "global_avgpool_forward");
        return CU_LAUNCHED("global_avgpool_forward");
    }
    if (n->kind == MPSCY_LAYER_UPSAMPLE2D) {
        pool_geom p = upsample_geom(g, n, b);
        const char *name = p.bilinear ? "bilinear_forward" : "upsample_forward";
        CU_TRY(cu_launch(g, p.bilinear ? bilinear_forward : upsample_forward, cu_blocks(p.planes * p.oh * p.ow,
                         CU_THREADS, 8192), CU_THREADS, g->stream, g->y[i], x, p),
               name);
        return CU_LAUNCHED(name);
    }
    pool_geom p = geom(g, n, b);
    CU_TRY(cu_launch(g, pool_i32(p) ? pool_forward<int32_t> : pool_forward<int64_t>,
                     cu_blocks(p.planes * p.oh * p.ow, CU_THREADS, 8192), CU_THREADS, g->stream, g->y[i],
                     (int32_t *)(g->save + n->save), x, p),
           "pool_forward");
    return CU_LAUNCHED("pool_forward");
}

int cu_pool_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t i = cu_node_index(g, n);
    float *dx = g->dy[n->in[0]];
    if (!dx) return MPSCY_OK;
    if (n->kind == MPSCY_LAYER_GLOBALAVGPOOL2D) {
        const mpscy_node *src = &g->plan.nodes[n->in[0]];
        int64_t planes = b * src->shape[0], hw = src->shape[1] * src->shape[2];
        CU_TRY(cu_launch(g, global_avgpool_backward, cu_blocks(planes * hw, CU_THREADS, 8192), CU_THREADS, g->stream, dx,
                         (const float *)g->dy[i], planes, hw, (int)n->accum[0]),
               "global_avgpool_backward");
        return CU_LAUNCHED("global_avgpool_backward");
    }
    if (n->kind == MPSCY_LAYER_UPSAMPLE2D) {
        pool_geom p = upsample_geom(g, n, b);
        const char *name = p.bilinear ? "bilinear_backward" : "upsample_backward";
        CU_TRY(cu_launch(g, p.bilinear ? bilinear_backward : upsample_backward, cu_blocks(p.planes * p.h * p.w,
                         CU_THREADS, 8192), CU_THREADS, g->stream, dx, (const float *)g->dy[i], p, (int)n->accum[0]),
               name);
        return CU_LAUNCHED(name);
    }
    pool_geom p = geom(g, n, b);
    if (pool_tiled(p)) {
        CU_TRY(cu_launch(g, pool_i32(p) ? maxpool_backward_tiled<int32_t> : maxpool_backward_tiled<int64_t>,
                         cu_blocks(p.planes * p.oh * p.ow, CU_THREADS, 8192), CU_THREADS, g->stream, dx,
                         (const float *)g->dy[i], (const int32_t *)(g->save + n->save), p, (int)n->accum[0]),
               "maxpool_backward_tiled");
        return CU_LAUNCHED("maxpool_backward_tiled");
    }
    CU_TRY(cu_launch(g, pool_i32(p) ? pool_backward<int32_t> : pool_backward<int64_t>,
                     cu_blocks(p.planes * p.h * p.w, CU_THREADS, 8192), CU_THREADS, g->stream, dx,
                     (const float *)g->dy[i], (const int32_t *)(g->save + n->save), p, (int)n->accum[0]),
           "pool_backward");
    return CU_LAUNCHED("pool_backward");
}
