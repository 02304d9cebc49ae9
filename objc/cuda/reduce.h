/* reduce.h — device-side reductions shared by loss.cu and optim.cu (and later norm layers):
 * warp and block sums, and the "last block finishes" pattern that turns per-block partials into
 * one total inside the same kernel, in a fixed order, so results are deterministic run to run.
 * Header-only device code; include from .cu files only. */
#ifndef MPSCY_CUDA_REDUCE_H
#define MPSCY_CUDA_REDUCE_H

template <typename T>
static __device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;  /* lane 0 holds the sum */
}

template <typename T>
static __device__ __forceinline__ T warp_allsum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float warp_allmax(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

/* (v, i) comes before (best, k) in a row's argmax order, both indices >= 0: a NaN counts as
 * larger than any number (numpy's and torch's argmax), and among equal values (or NaNs) the lower
 * index wins. A total order, so the warp's reduction below gives the same index in any grouping. */
static __device__ __forceinline__ bool argmax_before(float v, int64_t i, float best, int64_t k) {
    const bool nv = isnan(v), nb = isnan(best);
    if (nv || nb) return nv && (!nb || i < k);
    return v > best || (v == best && i < k);
}

/* The first maximum across the warp of each lane's (value, index) pair, index < 0 meaning none,
 * in argmax_before's order: the cpu's argmax (objc/cpu/loss.c) over the row. */
template <typename I>
static __device__ __forceinline__ I warp_first_max(float best, I k) {
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(0xffffffffu, best, o);
        I ok = __shfl_xor_sync(0xffffffffu, k, o);
        if (ok >= 0 && (k < 0 || argmax_before(ob, ok, best, k))) {
            best = ob;
            k = ok;
        }
    }
    return k;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); thread 0 gets the result. */
template <typename T>
static __device__ __forceinline__ T block_sum(T v) {
    __shared__ T warps[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  /* warps[] may still be read from a previous call */
    if (lane == 0) warps[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < nw ? warps[lane] : (T)0;
        v = warp_sum(v);
    }
    return v;
}

/* Called by every thread after thread 0 stored this block's partial: true in the one block
 * that arrives last, which may then read every partial (through volatile loads). */
static __device__ __forceinline__ bool last_block(unsigned int *count) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count, 1u) == gridDim.x - 1;
    __syncthreads();
    return last;
}

#endif /* MPSCY_CUDA_REDUCE_H */
