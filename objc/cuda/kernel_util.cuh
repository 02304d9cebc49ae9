/* kernel_util.cuh — device code shared by the cuda backend's kernels (included by cuda.h in CUDA
 * sources): ReLU on four elements, memory-ordering loads and stores, the deferred staging's relay
 * of the host's piece flags and its copies from pinned memory, cp.async, programmatic dependent
 * launch and the pull's consumer wait. */
#ifndef MPSCY_CUDA_KERNEL_UTIL_CUH
#define MPSCY_CUDA_KERNEL_UTIL_CUH

#if defined(__CUDACC__)
/* ReLU's mask on four elements at once (activation_math.h's rule): each of v where m's is > 0
 * (or NaN), else 0; relu4(v) is v through the ReLU */
static __device__ __forceinline__ float4 relu_pass4(float4 m, float4 v) {
    return make_float4(mpscy_relu_pass(m.x, v.x), mpscy_relu_pass(m.y, v.y), mpscy_relu_pass(m.z, v.z),
                       mpscy_relu_pass(m.w, v.w));
}
static __device__ __forceinline__ float4 relu4(float4 v) { return relu_pass4(v, v); }

static __device__ __forceinline__ uint32_t cu_load_acquire_gpu(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* the same at system scope: a word the host writes in pinned memory (step.cu's piece flags) */
static __device__ __forceinline__ uint32_t cu_load_acquire_sys(const uint32_t *p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ void cu_store_release_gpu(uint32_t *p, uint32_t v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

/* *p += v, returning the old value, as one acquire-release atomic at gpu scope: this thread's
 * writes (and those it saw, a block's before its barrier) are visible to whoever acquires the new
 * value, and it sees theirs before (mlp.cu's early decision: one operation, not a fence, the
 * atomic and a fence) */
static __device__ __forceinline__ uint32_t cu_atom_add_acq_rel_gpu(uint32_t *p, uint32_t v) {
    uint32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

/* the same at system scope: a word the host reads in pinned memory (update.h's result marks) */
static __device__ __forceinline__ void cu_store_release_sys(uint32_t *p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

#define CU_PULL_PATIENCE_NS 5000000000ull  /* a piece the host has not flagged by then: stalled */

static __device__ __forceinline__ unsigned long long cu_global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* Deferred staging's one reader of the host's piece flags (step.cu's pull kernel, mlp.cu's
 * one-kernel step), run by one whole warp: its lanes read the flags of up to 64 pieces at once
 * (consecutive words, one PCIe round trip a poll), each lane relaying its pieces to device
 * memory (to[p]: the flag's value) as their flags carry this step's number seq. A piece flagged
 * bad (NaN or Inf) marks the step in S->bad_seq; a piece unflagged for CU_PULL_PATIENCE_NS sets
 * R->stalled and is relayed as bad, so no consumer waits forever. Reads of host memory by many
 * threads queue behind one another (~1 us each on the H200: 2112 warps reading one word took
 * 2 ms), so the consumers wait on device memory only. With stop (mlp_linger.cuh: the pieces of a
 * step not yet asked for), nothing stalls while *stop is 0; 1 ends the relay, 2 lets it go on
 * as without stop, its patience counted from then. Returns whether every piece was relayed. */
static __device__ bool cu_relay_pieces(const uint32_t *flags, int64_t pieces, uint32_t seq, const uint32_t *seq_src,
                                       uint32_t *to, cu_scratch *S, cu_result *R, const volatile int *stop = NULL) {
    unsigned long long t0 = cu_global_ns();
    const int64_t p0 = threadIdx.x & 31, p1 = p0 + 32;
    bool wait0 = p0 < pieces, wait1 = p1 < pieces, stalled = false, patient = !stop;
    while (__any_sync(0xffffffffu, wait0 || wait1)) {
        if (!patient) {
            const int s = __shfl_sync(0xffffffffu, *stop, 0);
            if (s == 1) return false;
            if (s == 2) {
                patient = true;
                t0 = cu_global_ns();
            }
        }
        /* seq_src: the step's number is read there (host memory the launch follows), with the
         * first poll's flags in one round trip (a plain load before the acquiring ones) */
        const uint32_t sv = seq_src ? *(volatile const uint32_t *)seq_src : seq;
        uint32_t v0 = wait0 ? cu_load_acquire_sys(&flags[p0]) : 0, v1 = wait1 ? cu_load_acquire_sys(&flags[p1]) : 0;
        seq = sv;
        seq_src = NULL;
        if (patient && !stalled && cu_global_ns() - t0 > CU_PULL_PATIENCE_NS) {
            stalled = true;
            if (wait0 || wait1) R->stalled = 1;
        }
        if (stalled) v0 = v1 = seq | CU_STAGE_BAD;
        if (wait0 && (v0 & ~CU_STAGE_BAD) == seq) {
            if (v0 & CU_STAGE_BAD) atomicExch(&S->bad_seq, seq);
            cu_store_release_gpu(&to[p0], v0);
            wait0 = false;
        }
        if (wait1 && (v1 & ~CU_STAGE_BAD) == seq) {
            if (v1 & CU_STAGE_BAD) atomicExch(&S->bad_seq, seq);
            cu_store_release_gpu(&to[p1], v1);
            wait1 = false;
        }
    }
    return true;
}

/* floats [lo, hi) of pinned src to dst by the whole block. Both are 16-byte aligned at multiples
 * of 4 floats (pieces and parts are): float4 up to the tail, four loads in flight per thread (a
 * load from host memory takes microseconds); .cv loads fetch from host memory anew (never a line
 * cached from an earlier step). */
static __device__ __forceinline__ void cu_copy_pinned(float *__restrict__ dst, const float *src, int64_t lo, int64_t hi) {
    const int64_t lo4 = lo / 4, hi4 = hi / 4, st = blockDim.x;
    const float4 *s4 = reinterpret_cast<const float4 *>(src);
    float4 *d4 = reinterpret_cast<float4 *>(dst);
    int64_t i = lo4 + threadIdx.x;
    for (; i + 3 * st < hi4; i += 4 * st) {
        const float4 a = __ldcv(s4 + i), b = __ldcv(s4 + i + st), c = __ldcv(s4 + i + 2 * st), d = __ldcv(s4 + i + 3 * st);
        d4[i] = a;
        d4[i + st] = b;
        d4[i + 2 * st] = c;
        d4[i + 3 * st] = d;
    }
    for (; i < hi4; i += st) d4[i] = __ldcv(s4 + i);
    for (int64_t e = hi4 * 4 + threadIdx.x; e < hi; e += st) dst[e] = __ldcv(src + e);
}

/* cp.async: global to shared memory without passing through registers, 4 or 16 bytes, zero-filled
 * where !ok (sm_80 and newer; nothing is copied before: callers run only there), in commit
 * groups waited for by cp_async_wait<N> (at most N groups still in flight) */
static __device__ __forceinline__ void cp_async4(float *s, const float *g, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned sa = (unsigned)__cvta_generic_to_shared(s);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sa), "l"(g), "r"(ok ? 4 : 0));
#endif
}

static __device__ __forceinline__ void cp_async16(float *s, const float *g, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned sa = (unsigned)__cvta_generic_to_shared(s);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(ok ? 16 : 0));
#endif
}

static __device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
static __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

/* Programmatic dependent launch (Hopper; which graphs use it: graph.cu): a kernel launched with
 * cu_launch may start while the previous one finishes; it lets its own dependents start early, then waits
 * until everything before it is complete and visible. Both are no-ops without the launch
 * attribute (the default) and before Hopper. Every kernel begins with it. */
/* the two halves of cu_pdl_enter, for a kernel with work to do between them */
static __device__ __forceinline__ void cu_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static __device__ __forceinline__ void cu_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

static __device__ __forceinline__ void cu_pdl_enter() {
    cu_pdl_trigger();
    cu_pdl_wait();
}

/* A consumer started beside the pull (cu_pull_parts): waits until every part holding floats
 * [lo, hi] of input 0 is copied, one thread a part, then the block's barrier. The parts' layout
 * is the pull kernel's (step.cu): part k % CU_PULL_SPLIT of piece k / CU_PULL_SPLIT. */
static __device__ __forceinline__ void cu_pull_wait(const cu_pull_parts &pull, int64_t lo, int64_t hi) {
    const int64_t part = cu_pull_part(pull.piece);
    const int64_t k0 = lo / pull.piece * CU_PULL_SPLIT + lo % pull.piece / part,
                  k1 = hi / pull.piece * CU_PULL_SPLIT + hi % pull.piece / part;
    const uint32_t seq = pull.P->seq;
    for (int64_t k = k0 + threadIdx.x; k <= k1; k += blockDim.x)
        while (cu_load_acquire_gpu(&pull.seq[k]) != seq) __nanosleep(32);
    __syncthreads();
}
#endif

#endif /* MPSCY_CUDA_KERNEL_UTIL_CUH */
