/* activation_math.h — the element-wise activations, their derivatives and Softmax over one
 * strided row, written once and included by the CPU (C) and CUDA (.cu) backends (as
 * optim_math.h is), with PyTorch's formulas: the softmax sums in double, GELU in double here (the
 * cuda backend's; the CPU computes its own in float, vmath.h). */
#ifndef MPSCY_ACTIVATION_MATH_H
#define MPSCY_ACTIVATION_MATH_H

#include <math.h>
#include <stdint.h>
#include "plan.h"

#if defined(__CUDACC__)
#define MPSCY_AHD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MPSCY_AHD static inline __attribute__((always_inline))  /* inlined into each kind's loop, so it vectorizes */
#else
#define MPSCY_AHD static inline
#endif

/* The float functions the activations call: libm's, unless the includer brings its own of the same
 * accuracy (the CPU backend: objc/cpu/vmath.h, loops the compiler can vectorize). MPSCY_LOG1PF is
 * only ever called on values >= 0 (exp of something). */
#ifndef MPSCY_EXPF
#define MPSCY_EXPF expf
#define MPSCY_EXPM1F expm1f
#define MPSCY_TANHF tanhf
#define MPSCY_LOG1PF log1pf
#endif

#define MPSCY_SQRT_2_OVER_PI 0.7978845608028654
#define MPSCY_GELU_C 0.044715

/* ReLU's rule, for its value and its gradient mask: 0 where y <= 0 (mpscy_relu_zeroes), else v. A NaN passes (torch's
 * relu, clamp_min, and its threshold_backward keep it), so a NaN made inside a network reaches the
 * loss and its step is refused. Every ReLU of the backends, fused or not, goes through these. */
MPSCY_AHD int mpscy_relu_zeroes(float y) { return y <= 0.0f; }
MPSCY_AHD float mpscy_relu_pass(float y, float v) { return mpscy_relu_zeroes(y) ? 0.0f : v; }
MPSCY_AHD float mpscy_relu(float x) { return mpscy_relu_pass(x, x); }

/* min(max(v, 0), 6) as std::min/std::max take it (torch's clamp and hardtanh): a NaN passes */
MPSCY_AHD float mpscy_clamp6(float v) { return v < 0.0f ? 0.0f : (v > 6.0f ? 6.0f : v); }

/* y of one element for ReLU, LeakyReLU (r = slope), ELU (r = alpha), Sigmoid, Tanh, Swish,
 * ReLU6, Hardsigmoid, Hardswish, Softplus (r = beta, r1 = threshold) and Mish, in float as
 * torch's CPU kernels write them; x otherwise */
MPSCY_AHD float mpscy_act(int kind, float x, float r, float r1) {
    switch (kind) {
    case MPSCY_LAYER_RELU: return mpscy_relu(x);
    case MPSCY_LAYER_LEAKYRELU: return x > 0.0f ? x : x * r;
    case MPSCY_LAYER_ELU: return x > 0.0f ? x : r * MPSCY_EXPM1F(x);
    case MPSCY_LAYER_SIGMOID: return 1.0f / (1.0f + MPSCY_EXPF(-x));
    case MPSCY_LAYER_TANH: return MPSCY_TANHF(x);
    case MPSCY_LAYER_SWISH: return x / (1.0f + MPSCY_EXPF(-x));
    case MPSCY_LAYER_RELU6: return mpscy_clamp6(x);
    case MPSCY_LAYER_HARDSIGMOID: return mpscy_clamp6(x + 3.0f) / 6.0f;
    case MPSCY_LAYER_HARDSWISH: return x * mpscy_clamp6(x + 3.0f) / 6.0f;
    case MPSCY_LAYER_SOFTPLUS: return x * r > r1 ? x : MPSCY_LOG1PF(MPSCY_EXPF(x * r)) / r;
    case MPSCY_LAYER_MISH: return x * MPSCY_TANHF(MPSCY_LOG1PF(MPSCY_EXPF(x)));
    default: return x;
    }
}

/* d(input) of one element from d(output) g, the input x and the output y (every operand read,
 * so a loop over a fixed kind vectorizes); r, r1 as mpscy_act's */
MPSCY_AHD float mpscy_act_grad(int kind, float g, float x, float y, float r, float r1) {
    switch (kind) {
    case MPSCY_LAYER_RELU: return mpscy_relu_pass(y, g);
    case MPSCY_LAYER_LEAKYRELU: return g * (x > 0.0f ? 1.0f : r);
    /* torch's elu_backward from the input: alpha * exp(x), not y + alpha (which cancels for x < -10) */
    case MPSCY_LAYER_ELU: return x > 0.0f ? g : g * r * MPSCY_EXPF(x);
    case MPSCY_LAYER_SIGMOID: return g * y * (1.0f - y);
    case MPSCY_LAYER_TANH: return g * (1.0f - y * y);
    case MPSCY_LAYER_SWISH: {
        float s = 1.0f / (1.0f + MPSCY_EXPF(-x));
        return g * s * (1.0f + x * (1.0f - s));
    }
    /* torch's hardtanh_backward, hardsigmoid_backward (times 1/6), hardswish_backward (x/3 + 1/2
     * strictly between -3 and 3, 0 at -3, g at 3, as torch 2.13 takes it), softplus_backward and
     * mish_backward, from the input */
    case MPSCY_LAYER_RELU6: return x <= 0.0f || x >= 6.0f ? 0.0f : g;
    case MPSCY_LAYER_HARDSIGMOID: return x > -3.0f && x < 3.0f ? g * (1.0f / 6.0f) : 0.0f;
    case MPSCY_LAYER_HARDSWISH: return x <= -3.0f ? 0.0f : (x < 3.0f ? g * (x / 3.0f + 0.5f) : g);
    case MPSCY_LAYER_SOFTPLUS: {
        float z = MPSCY_EXPF(x * r);
        return x * r > r1 ? g : g * z / (z + 1.0f);
    }
    case MPSCY_LAYER_MISH: {
        float s = 1.0f / (1.0f + MPSCY_EXPF(-x)), t = MPSCY_TANHF(MPSCY_LOG1PF(MPSCY_EXPF(x)));
        return g * (t + x * s * (1.0f - t * t));
    }
    default: return g;
    }
}

/* GELU, exact or the tanh approximation, and its derivative, in double (the cuda backend's; the
 * CPU's are vmath.h's float loops). PyTorch's formulas, written so that nothing cancels for
 * negative x: 0.5 (1 + erf(x / sqrt 2)) as 0.5 erfc(-x / sqrt 2), and 0.5 (1 + tanh(u)) as
 * sigmoid(2u) (1 + erf and 1 + tanh lose every digit in double near x = -8 and -7). */
MPSCY_AHD double mpscy_gelu_tanh_sigmoid(double v, double *ss) {  /* sigmoid(2u); *ss = sigmoid(2u) (1 - sigmoid(2u)) */
    double w = 2.0 * MPSCY_SQRT_2_OVER_PI * (v + MPSCY_GELU_C * v * v * v);
    double e = exp(-fabs(w)), d = 1.0 / (1.0 + e);
    *ss = e * d * d;
    return w < 0.0 ? e * d : d;
}

MPSCY_AHD float mpscy_gelu(float x, int approx_tanh) {
    double v = x, ss;
    return approx_tanh ? (float)(v * mpscy_gelu_tanh_sigmoid(v, &ss)) : (float)(0.5 * v * erfc(-v * 0.7071067811865476));
}

MPSCY_AHD double mpscy_gelu_grad(float x, int approx_tanh) {
    double v = x;
    if (approx_tanh) {
        double ss, s = mpscy_gelu_tanh_sigmoid(v, &ss);
        return s + v * ss * 2.0 * MPSCY_SQRT_2_OVER_PI * (1.0 + 3.0 * MPSCY_GELU_C * v * v);
    }
    return 0.5 * erfc(-v * 0.7071067811865476) + v * exp(-0.5 * v * v) * 0.3989422804014327;
}

/* Softmax of one row of len elements, `inner` apart: y (len), x (len) */
MPSCY_AHD void mpscy_softmax_row(float *y, const float *x, int64_t len, int64_t inner) {
    float m = x[0];
    for (int64_t i = 1; i < len; i++) m = x[i * inner] > m ? x[i * inner] : m;
    double s = 0;
    for (int64_t i = 0; i < len; i++) s += (y[i * inner] = expf(x[i * inner] - m));
    float inv = (float)(1.0 / s);
    for (int64_t i = 0; i < len; i++) y[i * inner] *= inv;
}

/* Its backward: dx = y (dy - dy . y), written or accumulated */
MPSCY_AHD void mpscy_softmax_row_grad(float *dx, const float *dy, const float *y, int64_t len, int64_t inner,
                                      int accum) {
    double dot = 0;
    for (int64_t i = 0; i < len; i++) dot += (double)dy[i * inner] * y[i * inner];
    for (int64_t i = 0; i < len; i++) {
        int64_t j = i * inner;
        float r = y[j] * (float)(dy[j] - dot);
        dx[j] = accum ? dx[j] + r : r;
    }
}

/* A Softmax node's axis as (outer, len, inner) blocks of a batch of b samples. */
MPSCY_AHD void mpscy_axis_split(const mpscy_node *n, int64_t b, int64_t *outer, int64_t *len, int64_t *inner) {
    int32_t ax = n->ints[0];
    *outer = b;
    *len = n->shape[ax];
    *inner = 1;
    for (int32_t d = 0; d < ax; d++) *outer *= n->shape[d];
    for (int32_t d = ax + 1; d < n->rank; d++) *inner *= n->shape[d];
}

#endif /* MPSCY_ACTIVATION_MATH_H */
