/* _staging.h — the copies the Cython bridge makes into a graph's staging buffers, each checking
 * its data in the same pass: float batches for NaN/Inf (the largest exponent seen), labels for
 * their range. One read and one write per element; compiled for AVX-512, AVX2 and baseline
 * x86-64 and chosen at load time. A large batch bound for a device's pinned memory is split in
 * pieces claimed by a few of mpscy's worker threads (measured on the lent H100's host, 3.2 MB:
 * 292 us on one thread, 133 us on four; bench/host_copy.cu). Included by _native.pyx and by the
 * cuda backend's stage.c (its deferred staging); no allocation, no Python.
 * A NULL dst makes each copy a check only, of the same rules in the same order: fit's check of
 * a whole dataset before it trains (no temporaries, however many rows). The choice is made once
 * per call, before the loop, so the copying loop is the one it always was. */
#ifndef MPSCY_STAGING_H
#define MPSCY_STAGING_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "common/pool.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MPSCY_STAGING_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef MPSCY_STAGING_SIMD
#define MPSCY_STAGING_SIMD
#endif

/* Copies n floats; returns the largest exponent field seen (0x7f800000: a NaN or Inf). */
MPSCY_STAGING_SIMD static uint32_t mpscy_copy_exp(float *restrict dst, const float *restrict src, int64_t n) {
    const uint32_t *in = (const uint32_t *)src;   /* (n) */
    uint32_t *out = (uint32_t *)dst;              /* (n) */
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t v = in[i], e = v & 0x7f800000u;
        out[i] = v;
        mx = e > mx ? e : mx;
    }
    return mx;
}

/* mpscy_copy_exp with non-temporal stores (x86-64 with AVX2; elsewhere mpscy_copy_exp itself), for
 * a batch bound for a device: its floats go to memory without first reading dst's lines into the
 * core's cache, and the device's reads over PCIe then find them in memory, not dirty in a core's
 * cache (cuda's deferred staging, A/B on the lent H100's host, 9 rounds: the MLP b32 34.7 us a
 * step against 36.5, the 3.2 MB batch of the wide MLP 600.5 against 626-652, the CNN the same;
 * the plain copy followed by clwb of its lines was slower than either, 38.9 and 737). Ends with a
 * store fence, so that a flag stored after it (release order orders only ordinary stores) is
 * seen after the floats. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx2"))) static uint32_t mpscy_copy_exp_nt_avx2(float *restrict dst, const float *restrict src,
                                                                      int64_t n) {
    const uint32_t *in = (const uint32_t *)src;   /* (n) */
    uint32_t *out = (uint32_t *)dst;              /* (n) */
    uint32_t mx = 0;
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(out + i) & 31u); i++) {   /* to dst's first 32-byte boundary */
        const uint32_t v = in[i], e = v & 0x7f800000u;
        out[i] = v;
        mx = e > mx ? e : mx;
    }
    const __m256i mask = _mm256_set1_epi32(0x7f800000);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
    for (; i + 16 <= n; i += 16) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(in + i)), b = _mm256_loadu_si256((const __m256i *)(in + i + 8));
        acc0 = _mm256_max_epu32(acc0, _mm256_and_si256(a, mask));
        acc1 = _mm256_max_epu32(acc1, _mm256_and_si256(b, mask));
        _mm256_stream_si256((__m256i *)(out + i), a);
        _mm256_stream_si256((__m256i *)(out + i + 8), b);
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_max_epu32(acc0, acc1));
    for (int k = 0; k < 8; k++) mx = lanes[k] > mx ? lanes[k] : mx;
    for (; i < n; i++) {
        const uint32_t v = in[i], e = v & 0x7f800000u;
        out[i] = v;
        mx = e > mx ? e : mx;
    }
    _mm_sfence();
    return mx;
}
#endif

static uint32_t mpscy_copy_exp_nt(float *restrict dst, const float *restrict src, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) return mpscy_copy_exp_nt_avx2(dst, src, n);
#endif
    return mpscy_copy_exp(dst, src, n);
}

/* The largest exponent field of n floats: mpscy_copy_exp without the copy (a NULL dst). */
MPSCY_STAGING_SIMD static uint32_t mpscy_max_exp(const float *src, int64_t n) {
    const uint32_t *in = (const uint32_t *)src;   /* (n) */
    uint32_t mx = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t e = in[i] & 0x7f800000u;
        mx = e > mx ? e : mx;
    }
    return mx;
}

/* The index of the first NaN or Inf of src (n), or -1: the rare second pass. */
static int64_t mpscy_first_nonfinite(const float *src, int64_t n) {
    const uint32_t *in = (const uint32_t *)src;
    for (int64_t i = 0; i < n; i++)
        if ((in[i] & 0x7f800000u) == 0x7f800000u) return i;
    return -1;
}

/* Copies n floats (dst NULL: checks them only); returns the index of the first NaN or Inf, or -1. */
static int64_t mpscy_copy_finite(float *restrict dst, const float *restrict src, int64_t n) {
    uint32_t mx = dst ? mpscy_copy_exp(dst, src, n) : mpscy_max_exp(src, n);
    return mx == 0x7f800000u ? mpscy_first_nonfinite(src, n) : -1;
}

/* The index of the first value of src (n) outside [0, 1] (BinaryCrossEntropy's targets), or -1. */
static int64_t mpscy_first_outside_unit(const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!(src[i] >= 0.0f && src[i] <= 1.0f)) return i;
    return -1;
}

/* int32 or int64 labels into the int32 staging buffer (dst NULL: checked only); returns the first
 * row outside [0, classes), or -1. The call then raises, so what an out-of-range value leaves in
 * the buffer is never read: the int64 copy stages it as 0 (a narrowing cast would be the wrong
 * label), the int32 copy as it is. */
MPSCY_STAGING_SIMD static int64_t mpscy_copy_labels_i64(int32_t *restrict dst, const int64_t *restrict src, int64_t n,
                                                         int64_t classes) {
    int64_t bad = 0;
    if (dst) {
        for (int64_t i = 0; i < n; i++) {
            int64_t v = src[i];
            int ok = v >= 0 && v < classes;
            bad |= !ok;
            dst[i] = ok ? (int32_t)v : 0;
        }
    } else {
        for (int64_t i = 0; i < n; i++) bad |= (src[i] < 0) | (src[i] >= classes);
    }
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= classes) return i;
    return -1;
}

/* The same with torch's ignore_index: a label equal to `ign` is staged as it is (the loss leaves it
 * out) and counted into *ignored; returns the first row outside [0, classes) that is not `ign`, or
 * -1. One pass without branches (a segmentation batch's labels are every pixel's), then, only when
 * a label is bad, the search for the first. */
#define MPSCY_COPY_LABELS_IGN(NAME, T)                                                                       \
    MPSCY_STAGING_SIMD static int64_t NAME(int32_t *restrict dst, const T *restrict src, int64_t n,          \
                                           int64_t classes, int32_t ign, int64_t *ignored) {                 \
        int64_t skip = 0;                                                                                     \
        int bad = 0;                                                                                          \
        for (int64_t i = 0; i < n; i++) {                                                                     \
            const T v = src[i];                                                                               \
            const int is_ign = v == (T)ign;                                                                   \
            skip += is_ign;                                                                                   \
            bad |= (!is_ign) & ((v < 0) | (v >= classes));                                                    \
            if (dst) dst[i] = (int32_t)v;                                                                     \
        }                                                                                                     \
        *ignored = skip;                                                                                      \
        if (!bad) return -1;                                                                                  \
        for (int64_t i = 0; i < n; i++)                                                                       \
            if (src[i] != (T)ign && (src[i] < 0 || src[i] >= classes)) return i;                              \
        return -1;                                                                                            \
    }
MPSCY_COPY_LABELS_IGN(mpscy_copy_labels_ign_i64, int64_t)
MPSCY_COPY_LABELS_IGN(mpscy_copy_labels_ign_i32, int32_t)
#undef MPSCY_COPY_LABELS_IGN

MPSCY_STAGING_SIMD static int64_t mpscy_copy_labels_i32(int32_t *restrict dst, const int32_t *restrict src, int64_t n,
                                                         int64_t classes) {
    int32_t bad = 0;
    if (dst) {
        for (int64_t i = 0; i < n; i++) {
            int32_t v = src[i];
            bad |= (v < 0) | (v >= classes);
            dst[i] = v;
        }
    } else {
        for (int64_t i = 0; i < n; i++) bad |= (src[i] < 0) | (src[i] >= classes);
    }
    if (!bad) return -1;
    for (int64_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= classes) return i;
    return -1;
}

/* ---------------------------------------------------------------- large batches, in parallel */

#define MPSCY_STAGE_MIN_CHUNK 16384   /* floats (64 KB) per claimed piece */
#define MPSCY_STAGE_POOL_BYTES (256 << 10)  /* batches from this size get staging threads */

/* Threads (the caller one of them) that stage a batch whose largest input has `bytes`: for a
 * batch bound for a device's memory (device_bound) of MPSCY_STAGE_POOL_BYTES or more, half the
 * cores, at most 4 (measured best on the lent GPUs' 16-core hosts: bench/host_copy.cu); else 1.
 * $MPSCY_STAGE_THREADS overrides it for any backend (1: none), a testing and tuning knob. */
static int mpscy_stage_threads(int64_t bytes, int device_bound) {
    const char *knob = getenv("MPSCY_STAGE_THREADS");
    if (knob && *knob) return atoi(knob);
    if (!device_bound || bytes < MPSCY_STAGE_POOL_BYTES) return 1;
    long half = sysconf(_SC_NPROCESSORS_ONLN) / 2;
    return half < 1 ? 1 : half > 4 ? 4 : (int)half;
}
#define MPSCY_STAGE_MAX_CHUNKS 64

#define MPSCY_STAGE_BAD 0x80000000u   /* a piece's flag bit: it held a NaN or Inf */

/* n floats src -> dst in `chunks` pieces of `chunk`, claimed by a pool's threads in order. With
 * flags (the cuda backend's deferred staging), flags[c] = seq, or seq | MPSCY_STAGE_BAD, is stored
 * with release order as piece c lands; with hook, the first thread to start runs hook(arg) before
 * any piece (the launch of the graph that waits on the flags) and its result lands in status. */
typedef struct mpscy_stage_job {
    float *dst;
    const float *src;
    int64_t n, chunk, chunks;
    _Atomic int64_t next;         /* the next unclaimed piece; -1: the hook's turn */
    uint32_t mx[MPSCY_STAGE_MAX_CHUNKS];
    uint32_t *flags, seq;
    int stream;                   /* non-temporal stores (mpscy_copy_exp_nt): a device's batch */
    int (*hook)(void *);
    void *arg;
    int status;
    /* NULL, or (the cuda backend's $MPSCY_CUDA_VERBOSE) CLOCK_MONOTONIC ns: each piece's flag
     * stored, at [c], and each of the first MPSCY_STAGE_TASK_STAMPS tasks' start, at
     * [MPSCY_STAGE_MAX_CHUNKS + t] */
    int64_t *stamp;
} mpscy_stage_job;

#define MPSCY_STAGE_TASK_STAMPS 8
#define MPSCY_STAGE_STAMPS (MPSCY_STAGE_MAX_CHUNKS + MPSCY_STAGE_TASK_STAMPS)

static int64_t mpscy_stage_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Each thread claims pieces until none is left, so a worker slow to wake delays nothing. */
static void mpscy_stage_task(void *ctx, int32_t t, int32_t nt) {
    (void)nt;
    mpscy_stage_job *j = (mpscy_stage_job *)ctx;
    if (j->stamp && t < MPSCY_STAGE_TASK_STAMPS) j->stamp[MPSCY_STAGE_MAX_CHUNKS + t] = mpscy_stage_now();
    for (int64_t c; (c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->chunks;) {
        if (c < 0) {
            j->status = j->hook(j->arg);
            continue;
        }
        int64_t lo = c * j->chunk, hi = lo + j->chunk < j->n ? lo + j->chunk : j->n;
        j->mx[c] = j->stream ? mpscy_copy_exp_nt(j->dst + lo, j->src + lo, hi - lo)
                             : mpscy_copy_exp(j->dst + lo, j->src + lo, hi - lo);
        if (j->flags)
            atomic_store_explicit((_Atomic uint32_t *)&j->flags[c], j->seq | (j->mx[c] == 0x7f800000u ? MPSCY_STAGE_BAD : 0u),
                                  memory_order_release);
        if (j->stamp) j->stamp[c] = mpscy_stage_now();
    }
}

/* Runs a job whose dst, src, n, chunk and chunks are set (at most MPSCY_STAGE_MAX_CHUNKS pieces)
 * on the pool (NULL: the caller alone); returns the index of the first NaN or Inf, or -1. */
static int64_t mpscy_stage_run(mpscy_pool *pool, mpscy_stage_job *j, uint32_t *flags, uint32_t seq,
                               int (*hook)(void *), void *arg) {
    j->flags = flags;
    j->seq = seq;
    j->hook = hook;
    j->arg = arg;
    j->status = 0;
    atomic_init(&j->next, hook ? -1 : 0);
    mpscy_parallel(pool, mpscy_stage_task, j);
    uint32_t mx = 0;
    for (int64_t c = 0; c < j->chunks; c++) mx = j->mx[c] > mx ? j->mx[c] : mx;
    return mx == 0x7f800000u ? mpscy_first_nonfinite(j->src, j->n) : -1;
}

/* mpscy_copy_finite over a pool (NULL: on the caller alone; a check only, dst NULL, is too). */
static int64_t mpscy_copy_finite_pool(mpscy_pool *pool, float *dst, const float *src, int64_t n) {
    if (!pool || !dst || n < 2 * MPSCY_STAGE_MIN_CHUNK) return mpscy_copy_finite(dst, src, n);
    mpscy_stage_job j;
    j.dst = dst;
    j.src = src;
    j.n = n;
    j.chunk = (n + MPSCY_STAGE_MAX_CHUNKS - 1) / MPSCY_STAGE_MAX_CHUNKS;
    j.chunk = j.chunk < MPSCY_STAGE_MIN_CHUNK ? MPSCY_STAGE_MIN_CHUNK : (j.chunk + 15) / 16 * 16;
    j.chunks = (n + j.chunk - 1) / j.chunk;
    j.stream = 0;
    j.stamp = NULL;
    return mpscy_stage_run(pool, &j, NULL, 0, NULL, NULL);
}

#endif /* MPSCY_STAGING_H */
