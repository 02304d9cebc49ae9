/* rng.h — the counter-based generator (Philox4x32-10, Salmon et al. 2011) behind dropout masks.
 * A mask element is a pure function of (seed, step counter, node index, element index), so the
 * CPU, CUDA and Metal backends draw identical masks, a step needs no generator state, and a
 * checkpoint only has to store the seed and the counter. */
#ifndef MPSCY_RNG_H
#define MPSCY_RNG_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MPSCY_RNG_FN __host__ __device__ __forceinline__
#else
#define MPSCY_RNG_FN static inline
#endif

MPSCY_RNG_FN void mpscy_philox4x32(uint32_t out[4], const uint32_t ctr_in[4], uint64_t seed) {
    uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Uniform in [0, 1) with 24 random bits (exact in float32) for element `e` of node `node`
 * at step `counter`. Four consecutive elements share one Philox block. */
MPSCY_RNG_FN float mpscy_uniform(uint64_t seed, uint64_t counter, uint32_t node, uint64_t e) {
    uint32_t ctr[4] = {(uint32_t)(e >> 2), node ^ ((uint32_t)(e >> 34) << 16), (uint32_t)counter,
                       (uint32_t)(counter >> 32)};
    uint32_t out[4];
    mpscy_philox4x32(out, ctr, seed);
    return (float)(out[e & 3] >> 8) * (1.0f / 16777216.0f);
}

/* Inverted dropout: an element is kept when its uniform is below 1 - rate (as torch's
 * bernoulli(1 - p)); kept values are scaled by 1 / (1 - rate). */
MPSCY_RNG_FN int mpscy_dropout_keep(uint64_t seed, uint64_t counter, uint32_t node, uint64_t e, float keep_prob) {
    return mpscy_uniform(seed, counter, node, e) < keep_prob;
}

/* Element e's multiplier at dropout rate `rate`: 1 / (1 - rate) when kept, else 0, in float as
 * every backend computes it (the same elements kept with the same scale everywhere). */
MPSCY_RNG_FN float mpscy_dropout_multiplier(uint64_t seed, uint64_t counter, uint32_t node, uint64_t e, float rate) {
    const float keep = 1.0f - rate;
    return mpscy_dropout_keep(seed, counter, node, e, keep) ? 1.0f / keep : 0.0f;
}

#endif /* MPSCY_RNG_H */
