/* resize_math.h — bilinear resizing as torch's upsample_bilinear2d from the sizes (UpSample.h:
 * area_pixel_compute_scale, area_pixel_compute_source_index, guard_index_and_lambda), shared by the
 * CPU (C) and CUDA backends, every product and sum rounded on its own so both give the same bits.
 *
 * Along an axis, output o reads s = r o (align_corners, r = (in - 1) / (out - 1), 0 when out == 1)
 * or s = max(r (o + 0.5) - 0.5, 0) (r = in / out); i0 = min(floor(s), in - 1), l1 = clamp(s - i0, 0,
 * 1), l0 = 1 - l1, i1 = i0 + (i0 < in - 1). The backward gathers: i0 is nondecreasing in o, so the
 * outputs reading input i are the run whose i0 is i - 1 or i, each input summing its run in order. */
#ifndef MPSCY_RESIZE_MATH_H
#define MPSCY_RESIZE_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MPSCY_RHD __device__ __forceinline__  /* the _rn intrinsics are device functions */
#define MPSCY_RMUL(a, b) __fmul_rn((a), (b))
#define MPSCY_RADD(a, b) __fadd_rn((a), (b))
#else
#define MPSCY_RHD static inline
#define MPSCY_RMUL(a, b) ((a) * (b))
#define MPSCY_RADD(a, b) ((a) + (b))
#endif

/* one output index's two taps along an axis */
typedef struct mpscy_lerp {
    int64_t i0, i1;
    float l0, l1;
} mpscy_lerp;

MPSCY_RHD float mpscy_resize_ratio(int64_t in, int64_t out, int align) {
    if (align) return out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f;
    return (float)in / (float)out;
}

MPSCY_RHD mpscy_lerp mpscy_resize_lerp(int64_t o, int64_t in, float r, int align) {
    float s = align ? MPSCY_RMUL(r, (float)o) : MPSCY_RADD(MPSCY_RMUL(r, MPSCY_RADD((float)o, 0.5f)), -0.5f);
    if (!(s > 0.0f)) s = 0.0f;
    mpscy_lerp t;
    t.i0 = (int64_t)s;                          /* s >= 0: the cast is floor */
    if (t.i0 > in - 1) t.i0 = in - 1;
    t.l1 = MPSCY_RADD(s, -(float)t.i0);
    if (t.l1 > 1.0f) t.l1 = 1.0f;
    t.l0 = MPSCY_RADD(1.0f, -t.l1);
    t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
    return t;
}

/* the first output index (0..out) whose i0 is >= i */
MPSCY_RHD int64_t mpscy_resize_first(int64_t i, int64_t in, int64_t out, float r, int align) {
    int64_t lo = 0, hi = out;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (mpscy_resize_lerp(mid, in, r, align).i0 >= i) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* the weight output o's taps give input i: l0 where i0 == i, plus l1 where i1 == i */
MPSCY_RHD float mpscy_resize_weight(mpscy_lerp t, int64_t i) {
    float w = t.i0 == i ? t.l0 : 0.0f;
    return t.i1 == i ? MPSCY_RADD(w, t.l1) : w;
}

/* y[oh, ow] of one plane x (h, w) */
MPSCY_RHD float mpscy_bilinear_at(const float *x, int64_t w, mpscy_lerp th, mpscy_lerp tw) {
    const float *r0 = x + th.i0 * w, *r1 = x + th.i1 * w;
    float a = MPSCY_RADD(MPSCY_RMUL(tw.l0, r0[tw.i0]), MPSCY_RMUL(tw.l1, r0[tw.i1]));
    float b = MPSCY_RADD(MPSCY_RMUL(tw.l0, r1[tw.i0]), MPSCY_RMUL(tw.l1, r1[tw.i1]));
    return MPSCY_RADD(MPSCY_RMUL(th.l0, a), MPSCY_RMUL(th.l1, b));
}

/* dx[i, j] of one plane from dy (oh, ow): over the outputs whose rows read row i, the row weight
 * times that row's sum over the columns reading column j, each rounded in turn */
MPSCY_RHD float mpscy_bilinear_grad_at(const float *dy, int64_t i, int64_t j, int64_t h, int64_t w, int64_t oh,
                                       int64_t ow, float rh, float rw, int align) {
    int64_t a0 = mpscy_resize_first(i - 1, h, oh, rh, align), a1 = mpscy_resize_first(i + 1, h, oh, rh, align);
    int64_t b0 = mpscy_resize_first(j - 1, w, ow, rw, align), b1 = mpscy_resize_first(j + 1, w, ow, rw, align);
    float s = 0.0f;
    for (int64_t a = a0; a < a1; a++) {
        float wa = mpscy_resize_weight(mpscy_resize_lerp(a, h, rh, align), i);  /* a 0 still passes a NaN */
        const float *row = dy + a * ow;
        float t = 0.0f;
        for (int64_t b = b0; b < b1; b++)
            t = MPSCY_RADD(t, MPSCY_RMUL(mpscy_resize_weight(mpscy_resize_lerp(b, w, rw, align), j), row[b]));
        s = MPSCY_RADD(s, MPSCY_RMUL(wa, t));
    }
    return s;
}

#endif
