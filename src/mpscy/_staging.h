/* _staging.h — the copies the Cython bridge makes into a graph's staging buffers, each checking
 * its data in the same pass: float batches for NaN/Inf (the largest exponent seen), labels for
 * their range. One read and one write per element; compiled for AVX-512, AVX2 and baseline
 * x86-64 and chosen at load time. A large batch bound for a device's pinned memory is split
 * over a few of mpscy's worker threads and written with streaming stores (the host never reads
 * it back; measured on the lent H100's host: 3.2 MB in 124 us on 4 threads instead of 292 us).
 * Included by _native.pyx only; no allocation, no Python. */
#ifndef MPSCY_STAGING_H
#define MPSCY_STAGING_H

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "common/pool.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MPSCY_STAGING_NT 1
#endif

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

/* ---------------------------------------------------------------- large batches, in parallel */

#define MPSCY_STAGE_MIN_CHUNK 16384   /* floats (64 KB) per claimed piece */
#define MPSCY_STAGE_MAX_CHUNKS 64

/* Copies n floats; returns the largest exponent field seen (0x7f800000: a NaN or Inf). */
static uint32_t mpscy_copy_exp_plain(float *restrict dst, const float *restrict src, int64_t n) {
    const uint32_t *in = (const uint32_t *)src;
    uint32_t *out = (uint32_t *)dst, mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = in[i], e = v & 0x7f800000u;
        out[i] = v;
        mx = e > mx ? e : mx;
    }
    return mx;
}

#ifdef MPSCY_STAGING_NT
/* The same with streaming stores once dst is 64-byte aligned. */
__attribute__((target("avx512f"))) static uint32_t mpscy_copy_exp_avx512(float *dst, const float *src, int64_t n) {
    int64_t head = (int64_t)((64 - ((uintptr_t)dst & 63)) & 63) / 4;
    if (head > n || ((uintptr_t)dst & 3)) head = n;
    uint32_t mx = mpscy_copy_exp_plain(dst, src, head);
    const __m512i emask = _mm512_set1_epi32(0x7f800000);
    __m512i vmx = _mm512_setzero_si512();
    int64_t i = head;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_loadu_si512((const void *)(src + i));
        vmx = _mm512_max_epu32(vmx, _mm512_and_si512(v, emask));
        _mm512_stream_si512((__m512i *)(dst + i), v);
    }
    _mm_sfence();
    uint32_t tail = mpscy_copy_exp_plain(dst + i, src + i, n - i), v = (uint32_t)_mm512_reduce_max_epu32(vmx);
    mx = v > mx ? v : mx;
    return tail > mx ? tail : mx;
}

__attribute__((target("avx2"))) static uint32_t mpscy_copy_exp_avx2(float *dst, const float *src, int64_t n) {
    int64_t head = (int64_t)((32 - ((uintptr_t)dst & 31)) & 31) / 4;
    if (head > n || ((uintptr_t)dst & 3)) head = n;
    uint32_t mx = mpscy_copy_exp_plain(dst, src, head);
    const __m256i emask = _mm256_set1_epi32(0x7f800000);
    __m256i vmx = _mm256_setzero_si256();
    int64_t i = head;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
        vmx = _mm256_max_epu32(vmx, _mm256_and_si256(v, emask));
        _mm256_stream_si256((__m256i *)(dst + i), v);
    }
    _mm_sfence();
    uint32_t lanes[8], tail = mpscy_copy_exp_plain(dst + i, src + i, n - i);
    _mm256_storeu_si256((__m256i *)lanes, vmx);
    for (int k = 0; k < 8; k++) mx = lanes[k] > mx ? lanes[k] : mx;
    return tail > mx ? tail : mx;
}
#endif

typedef uint32_t (*mpscy_copy_exp_fn)(float *, const float *, int64_t);

/* The copy loop for `isa`: "avx512", "avx2", "plain", or NULL/"" for the best this CPU runs;
 * NULL when the named one cannot run here. */
static mpscy_copy_exp_fn mpscy_copy_exp_pick(const char *isa) {
    int any = !isa || !*isa;
#ifdef MPSCY_STAGING_NT
    if ((any || !strcmp(isa, "avx512")) && __builtin_cpu_supports("avx512f")) return mpscy_copy_exp_avx512;
    if ((any || !strcmp(isa, "avx2")) && __builtin_cpu_supports("avx2")) return mpscy_copy_exp_avx2;
#endif
    return any || !strcmp(isa, "plain") ? mpscy_copy_exp_plain : NULL;
}

typedef struct mpscy_stage_job {
    float *dst;
    const float *src;
    int64_t n, chunk, chunks;
    _Atomic int64_t next;
    mpscy_copy_exp_fn copy;
    uint32_t mx[MPSCY_STAGE_MAX_CHUNKS];
} mpscy_stage_job;

/* Each thread claims pieces until none is left, so a worker slow to wake delays nothing. */
static void mpscy_stage_task(void *ctx, int32_t t, int32_t nt) {
    (void)t;
    (void)nt;
    mpscy_stage_job *j = (mpscy_stage_job *)ctx;
    for (int64_t c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->chunks;) {
        int64_t lo = c * j->chunk, hi = lo + j->chunk < j->n ? lo + j->chunk : j->n;
        j->mx[c] = j->copy(j->dst + lo, j->src + lo, hi - lo);
    }
}

/* mpscy_copy_finite over a pool (NULL: on the caller alone, as mpscy_copy_finite) with the
 * copy loop `copy` (from mpscy_copy_exp_pick). */
static int64_t mpscy_copy_finite_pool(mpscy_pool *pool, mpscy_copy_exp_fn copy, float *dst, const float *src,
                                      int64_t n) {
    if (!pool || !copy || n < 2 * MPSCY_STAGE_MIN_CHUNK) return mpscy_copy_finite(dst, src, n);
    mpscy_stage_job j;
    j.dst = dst;
    j.src = src;
    j.n = n;
    j.chunk = (n + MPSCY_STAGE_MAX_CHUNKS - 1) / MPSCY_STAGE_MAX_CHUNKS;
    j.chunk = j.chunk < MPSCY_STAGE_MIN_CHUNK ? MPSCY_STAGE_MIN_CHUNK : (j.chunk + 15) / 16 * 16;
    j.chunks = (n + j.chunk - 1) / j.chunk;
    atomic_init(&j.next, 0);
    j.copy = copy;
    mpscy_parallel(pool, mpscy_stage_task, &j);
    uint32_t mx = 0;
    for (int64_t c = 0; c < j.chunks; c++) mx = j.mx[c] > mx ? j.mx[c] : mx;
    if (mx != 0x7f800000u) return -1;
    const uint32_t *in = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++)
        if ((in[i] & 0x7f800000u) == 0x7f800000u) return i;
    return -1;
}

#endif /* MPSCY_STAGING_H */
