/* vmath.h — float exp, expm1, tanh and log1p (of values >= 0), and GELU's two forms, for the CPU
 * backend's activation loops, written without calls or branches so that the compiler vectorizes
 * the loops that use them (libm's are calls, one element at a time: Mish ran at 31 ns an element,
 * GELU in double at 10). Cephes's polynomials (exp, logf, tanhf near 0), a Taylor series (expm1
 * near 0) and least-squares fits of our own (the normal distribution's tail); against double
 * precision over 40 million points (tests/test_layers.py checks a grid): exp within 8.2e-8
 * relative, expm1 1.3e-7, tanh 1.4e-7, log1p(exp) 1.7e-7 (libm's are within about 1.2e-7); GELU
 * within 3.7e-7 and its tanh form 3.2e-7, relative to values down to 1e-30, below which an
 * intermediate goes subnormal (within 1.2e-38 |x| there); torch's float32 GELU keeps no digit
 * below x = -5.5, where 1 + erf(x / sqrt 2) and 1 + tanh(u) cancel.
 * NaN and -0 pass, exp overflows to inf past 88.72 and goes through the subnormals to 0 below
 * -103.97, as libm's. Included by activation.c only. */
#ifndef MPSCY_CPU_VMATH_H
#define MPSCY_CPU_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define VM_INLINE static inline __attribute__((always_inline))  /* into each activation's loop */
#else
#define VM_INLINE static inline
#endif

VM_INLINE float vm_as_f(int32_t b) { float f; memcpy(&f, &b, sizeof f); return f; }
VM_INLINE int32_t vm_as_i(float f) { int32_t b; memcpy(&b, &f, sizeof b); return b; }

/* 2^n p(r), x = n ln 2 + r (ln 2 in two parts), 2^n as two halves, each a normal float, so that
 * n = 128 stays finite and n down to -150 rounds once into the subnormals, as libm's */
VM_INLINE float vm_expf(float x) {
    const float hi = 88.72283935546875f, lo = -103.97208404541015625f;
    float xc = x > hi ? hi : (x < lo ? lo : x);
    float n = xc * 1.44269504088896341f + 12582912.0f;  /* round to the nearest integer */
    n = n - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r2 + r + 1.0f;
    int32_t ni = (int32_t)n, h = ni >> 1;
    float y = p * vm_as_f((h + 127) << 23) * vm_as_f((ni - h + 127) << 23);
    y = x > hi ? INFINITY : y;
    y = x < lo ? 0.0f : y;
    return x != x ? x : y;
}

/* exp(x) - 1: its Taylor series to x^8 / 8! within |x| < 0.5 (the rest below 6e-9 of the value), exp - 1 beyond */
VM_INLINE float vm_expm1f(float x) {
    float p = 1.0f / 40320.0f;
    p = p * x + 1.0f / 5040.0f;
    p = p * x + 1.0f / 720.0f;
    p = p * x + 1.0f / 120.0f;
    p = p * x + 1.0f / 24.0f;
    p = p * x + 1.0f / 6.0f;
    p = p * x + 0.5f;
    float small = p * x * x + x, big = vm_expf(x) - 1.0f;
    small = x == 0.0f ? x : small;  /* -0 stays -0, as libm's */
    return x > -0.5f && x < 0.5f ? small : big;
}

/* tanh: Cephes's odd polynomial within |x| < 0.625, 1 - 2 / (exp(2|x|) + 1) with x's sign beyond */
VM_INLINE float vm_tanhf(float x) {
    float a = x < 0.0f ? -x : x, z = x * x;
    float p = -5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    float small = p * z * x + x;
    small = x == 0.0f ? x : small;  /* -0 stays -0, as libm's */
    float big = 1.0f - 2.0f / (vm_expf(a + a) + 1.0f);
    big = x < 0.0f ? -big : big;
    return a < 0.625f ? small : big;
}

/* log(u) for finite u >= 1: Cephes's logf (u = m 2^e, m in [sqrt(1/2), sqrt(2))) */
VM_INLINE float vm_logf_ge1(float u) {
    int32_t b = vm_as_i(u);
    int32_t e = ((b >> 23) & 0xff) - 126;
    float m = vm_as_f((b & 0x807fffff) | 0x3f000000);  /* [0.5, 1) */
    int low = m < 0.707106781186547524f;
    float ef = (float)(low ? e - 1 : e);
    float x = low ? m + m - 1.0f : m - 1.0f;
    float z = x * x;
    float y = 7.0376836292E-2f;
    y = y * x - 1.1514610310E-1f;
    y = y * x + 1.1676998740E-1f;
    y = y * x - 1.2420140846E-1f;
    y = y * x + 1.4249322787E-1f;
    y = y * x - 1.6668057665E-1f;
    y = y * x + 2.0000714765E-1f;
    y = y * x - 2.4999993993E-1f;
    y = y * x + 3.3333331174E-1f;
    y = y * x * z;
    y = y + ef * -2.12194440e-4f;
    y = y - 0.5f * z;
    x = x + y;
    return x + ef * 0.693359375f;
}

/* log(1 + z) for z >= 0: log(u) z / (u - 1) with u = 1 + z (which undoes u's rounding), z where
 * u rounds to 1, inf at inf */
VM_INLINE float vm_log1pf_pos(float z) {
    float u = 1.0f + z, d = u - 1.0f;
    float l = vm_logf_ge1(u < INFINITY ? u : 1.0f);
    float r = d == 0.0f ? z : l * (z / d);
    return z == INFINITY ? z : r;
}

/* exp(-x^2 / 2) with the rounding of x^2 / 2 (relative 6e-8, times x^2 / 2 in the result: 6e-6
 * at x = 10) kept out: |x| = h + l with h its top 12 bits, so that h^2 / 2 is exact, and exp(-l (|x|
 * + h) / 2), whose argument is below 1/16, as its Taylor series. |x| past 16 (NaN too) counts as
 * 16, where the result is 0 already. */
VM_INLINE float vm_exp_neg_half_sq(float x) {
    float z = x < 0.0f ? -x : x;
    z = z < 16.0f ? z : 16.0f;
    float h = vm_as_f(vm_as_i(z) & (int32_t)0xfffff000), l = z - h;
    float a = 0.5f * (h * h), b = 0.5f * (l * (z + h));
    float p = 1.0f / 24.0f;
    p = p * b - 1.0f / 6.0f;
    p = p * b + 0.5f;
    p = p * b - 1.0f;
    p = p * b + 1.0f;
    return vm_expf(-a) * p;
}

/* Phi(x), the standard normal distribution function, given e = exp(-x^2 / 2): 0.5 + x P(x^2)
 * within |x| <= 0.75; beyond, 1 - Phi(|x|) = e t Q(t - 0.3) with t = 1 / (1 + |x|), so the
 * negative tail keeps its relative accuracy. P and Q are least-squares fits in relative error of
 * 0.5 erf(x / sqrt 2) / x and 0.5 erfcx(|x| / sqrt 2) / t (within 3e-8 with float coefficients);
 * t is the variable whose own rounding the tail amplifies least (t = 1 / (1 + |x| / 4) measured
 * 4.5e-7 in GELU). */
VM_INLINE float vm_normal_cdf(float x, float e) {
    float z = x < 0.0f ? -x : x, s = x * x;
    float p = -8.387869e-06f;
    p = p * s + 0.000114777606f;
    p = p * s - 0.0011871376f;
    p = p * s + 0.009973532f;
    p = p * s - 0.06649038f;
    p = p * s + 0.3989423f;
    float small = 0.5f + x * p;
    float t = 1.0f / (1.0f + z), u = t - 0.3f;
    float q = 9.128631f;
    q = q * u + 1.3929625f;
    q = q * u - 6.6926336f;
    q = q * u + 2.8956175f;
    q = q * u + 0.4673655f;
    q = q * u - 1.2892764f;
    q = q * u + 0.7197488f;
    q = q * u + 0.08924388f;
    q = q * u - 0.4591047f;
    q = q * u + 0.21122596f;
    q = q * u + 0.4977711f;
    q = q * t * e;
    float big = x < 0.0f ? q : 1.0f - q;
    return z <= 0.75f ? small : big;
}

/* GELU, exact: x Phi(x), and its derivative Phi(x) + x phi(x) */
VM_INLINE float vm_gelu(float x) { return x * vm_normal_cdf(x, vm_exp_neg_half_sq(x)); }

VM_INLINE float vm_gelu_grad(float x) {
    float e = vm_exp_neg_half_sq(x);
    return vm_normal_cdf(x, e) + x * (e * 0.398942280f);
}

/* GELU's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), as x sigmoid(2u),
 * which does not cancel for negative x. 2u is formed in double and split into two floats, so that
 * its rounding (2u reaches 90) stays out of exp(-|2u|) (one float exp, the low part to first
 * order); |2u| past 110 (NaN too) counts as 110, where that exp is 0 already (below -103.97), so
 * that sigmoid(2u) is 0 or 1 and its slope 0 there. Returns sigmoid(2u) and sets *ss to sigmoid(2u)
 * (1 - sigmoid(2u)). */
VM_INLINE float vm_gelu_tanh_sigmoid(float x, float *ss) {
    double xd = x;
    double w = xd * (2.0 * 0.7978845608028654 + 2.0 * 0.7978845608028654 * 0.044715 * xd * xd);
    double a = w < 0.0 ? -w : w;
    a = a < 110.0 ? a : 110.0;
    float ah = (float)a, al = (float)(a - (double)ah);
    float e = vm_expf(-ah) * (1.0f - al), d = 1.0f / (1.0f + e);
    *ss = e * d * d;
    return w < 0.0 ? e * d : d;
}

VM_INLINE float vm_gelu_tanh(float x) {
    float ss;
    return x * vm_gelu_tanh_sigmoid(x, &ss);
}

/* d/dx x sigmoid(2u) = sigmoid(2u) + x sigmoid(2u) (1 - sigmoid(2u)) 2u', 2u' = 2 sqrt(2 / pi) (1 + 3 0.044715 x^2);
 * the second term x 0 where the slope is 0 (x^2 overflows past 1.8e19; a NaN stays NaN) */
VM_INLINE float vm_gelu_tanh_grad(float x) {
    float ss, sg = vm_gelu_tanh_sigmoid(x, &ss);
    float wp = 1.59576912f + 0.214064449f * (x * x);
    float t = x * (ss * wp);
    return sg + (ss == 0.0f ? x * 0.0f : t);
}

#endif /* MPSCY_CPU_VMATH_H */
