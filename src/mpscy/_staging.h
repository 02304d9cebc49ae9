/* _staging.h — the copies the Cython bridge makes into a graph's staging buffers, each checking
 * its data in the same pass: float batches for NaN/Inf (the largest exponent seen), labels for
 * their range. One read and one write per element; compiled for AVX-512, AVX2 and baseline
 * x86-64 and chosen at load time. Included by _native.pyx only; no allocation, no Python. */
#ifndef MPSCY_STAGING_H
#define MPSCY_STAGING_H

#include <stdint.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MPSCY_STAGING_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef MPSCY_STAGING_SIMD
#define MPSCY_STAGING_SIMD
#endif

/* Copies n floats; returns the index of the first NaN or Inf, or -1. */
MPSCY_STAGING_SIMD static int64_t mpscy_copy_finite(float *restrict dst, const float *restrict src, int64_t n) {
    const uint32_t *in = (const uint32_t *)src;   /* (n) */
    uint32_t *out = (uint32_t *)dst;              /* (n) */
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = in[i], e = v & 0x7f800000u;
        out[i] = v;
        mx = e > mx ? e : mx;
    }
    if (mx != 0x7f800000u) return -1;
    for (int64_t i = 0; i < n; i++)
        if ((in[i] & 0x7f800000u) == 0x7f800000u) return i;
    return -1;
}

/* int32 or int64 labels into the int32 staging buffer; returns the first row outside
 * [0, classes), or -1. Out-of-range values are staged as 0 (the call then raises). */
MPSCY_STAGING_SIMD static int64_t mpscy_copy_labels_i64(int32_t *restrict dst, const int64_t *restrict src, int64_t n,
                                                         int64_t classes) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t v = src[i];
        int ok = v >= 0 && v < classes;
        bad |= !ok;
        dst[i] = ok ? (int32_t)v : 0;
    }
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= classes) return i;
    return -1;
}

MPSCY_STAGING_SIMD static int64_t mpscy_copy_labels_i32(int32_t *restrict dst, const int32_t *restrict src, int64_t n,
                                                         int64_t classes) {
    int32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t v = src[i];
        bad |= (v < 0) | (v >= classes);
        dst[i] = v;
    }
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= classes) return i;
    return -1;
}

#endif /* MPSCY_STAGING_H */
