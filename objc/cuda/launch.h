/* launch.h — kernel launches as the graph takes them (programmatic dependent launch, the shared
 * memory carveout) and the small arithmetic of grids and splits. Included by cuda.h after cu_graph;
 * include cuda.h, not this file. */
#ifndef MPSCY_CUDA_LAUNCH_H
#define MPSCY_CUDA_LAUNCH_H

/* a launch as its stream's programmatic dependent when pdl (the attribute), else a plain one;
 * carveout: the share of a multiprocessor's L1/shared memory the launch asks to be shared memory,
 * in percent (-1: the kernel's own preference) */
template <typename... K, typename... A>
static inline cudaError_t cu_launch_pdl(bool pdl, int carveout, void (*kernel)(K...), dim3 grid, dim3 block,
                                        size_t shm, cudaStream_t s, A... args) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at[2];
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = shm;
    cfg.stream = s;
    cfg.attrs = at;
    if (pdl) {
        at[cfg.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[cfg.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (carveout >= 0) {
#if CUDART_VERSION >= 12080
        at[cfg.numAttrs].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
        at[cfg.numAttrs++].val.sharedMemCarveout = (unsigned)carveout;
#else  /* no such launch attribute before CUDA 12.8: the kernel's own attribute */
        cudaError_t e = cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                             carveout);
        if (e != cudaSuccess) return e;
#endif
    }
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename... K, typename... A>
static inline cudaError_t cu_launch_shm(const cu_graph *g, void (*kernel)(K...), dim3 grid, dim3 block, size_t shm,
                                        cudaStream_t s, A... args) {
    return cu_launch_pdl(g->pdl, g->carveout, kernel, grid, block, shm, s, args...);
}

template <typename... K, typename... A>
static inline cudaError_t cu_launch(const cu_graph *g, void (*kernel)(K...), dim3 grid, dim3 block, cudaStream_t s,
                                    A... args) {
    return cu_launch_shm(g, kernel, grid, block, 0, s, args...);
}

static inline bool cu_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }
static inline int64_t cu_round4(int64_t f) { return (f + 3) & ~(int64_t)3; }  /* floats: 16-byte aligned offsets */

/* whether a grid-stride loop's int32 indices hold every index up to `most` and a stride past it
 * (a grid of at most 8192 blocks of CU_THREADS: merge.cu's and pool.cu's element-wise kernels) */
static inline bool cu_fits_i32(int64_t most) { return most + (int64_t)8192 * CU_THREADS < INT32_MAX; }

static inline unsigned cu_blocks(int64_t n, int64_t per, int64_t cap) {
    int64_t b = (n + per - 1) / per;
    if (b < 1) b = 1;
    return (unsigned)(b > cap ? cap : b);
}

/* A split product's K (units: MMA steps or stages) in at most `want` (>= 1) even chunks: each
 * chunk's units in *per; returns how many chunks that makes (no more than want, and the same at
 * the caller's rounding: ceil(units / per)). */
static inline int64_t cu_split_units(int64_t units, int64_t want, int64_t *per) {
    *per = (units + want - 1) / want;
    return (units + *per - 1) / *per;
}

#endif /* MPSCY_CUDA_LAUNCH_H */
