/* mlp_linger.cuh — the one-kernel MLP step (mlp.cu) between steps: past its update the kernel
 * waits for the host to hand it the graph's next training step (step.cu's claim) instead of
 * ending. Device code for mlp.cu only. */
#ifndef MPSCY_CUDA_MLP_LINGER_CUH
#define MPSCY_CUDA_MLP_LINGER_CUH

#include "mlp.cuh"

/* Block 0's thread 0 between steps (fu_linger): the verdict once the host asks for step
 * served + 1 (1), or for anything else (0: it stops the kernel, or asked for a step this kernel
 * cannot take), or linger_ns have passed. Then it says it is closing (lg_closing, a store that
 * reaches the host's memory before the load after it is sent: fence.sc at system scope), reads
 * the request once more and publishes what it found (lg_verdict): the host, which writes its
 * request and then reads lg_closing (step.cu's claim), either sees no closing, so this load sees
 * its request, or waits for the verdict. */
static __device__ int fu_linger_verdict(const fu_args &a, unsigned long long t0) {
    cu_result *R = a.R;
    const uint32_t served = a.P->seq;
    const uint32_t r = cu_load_acquire_sys(&R->lg_req);
    if (a.trace && r == served + 1u)
        printf("fused_mlp linger: the next step's request seen %llu ns after block 0's update\n", cu_global_ns() - t0);
    if (r != served) return r == served + 1u;
    if (cu_global_ns() - t0 < a.linger_ns) return -1;
    *(volatile unsigned int *)&R->lg_closing = served;
    __threadfence_system();
    const int go = cu_load_acquire_sys(&R->lg_req) == served + 1u;
    *(volatile unsigned long long *)&R->lg_verdict = 2ull * served + (unsigned long long)go;
    __threadfence_system();
    return go;
}

/* The kernel lingers ($MPSCY_CUDA_FUSED_LINGER): past its update, instead of ending, it waits for
 * the host to hand it the graph's next training step, so that step starts with no launch and the
 * update's tail (the weight gradients, the norm, the update: ~9 us after the early decision)
 * overlaps the host's return and its staging of the next batch, not the next kernel's start. A
 * barrier of the grid whose last word is block 0's: every block counts itself in (its update
 * stored), block 0 polls the host's request meanwhile (one word of pinned memory, one thread)
 * and, once all are in and it has a verdict, releases them with it. True: run the next step
 * (the params block, the labels and the batch as the host stages them, as a launch would). */
static __device__ bool fu_linger(const fu_args &a) {
    __shared__ int go;
    cu_scratch *S = a.S;
    __syncthreads();  /* every thread's update stores issued */
    if (threadIdx.x == 0) {
        const unsigned int gen = *(volatile const unsigned int *)&S->lg_gen;
        __threadfence();
        if (blockIdx.x != 0) {
            atomicAdd(&S->lg_arrive, 1u);
            while (cu_load_acquire_gpu(&S->lg_gen) == gen) {
            }
            go = *(volatile const int *)&S->lg_go;
        } else {
            const unsigned long long t0 = cu_global_ns();
            int v = -1;
            bool all = gridDim.x == 1;
            while (v < 0 || !all) {
                if (!all) all = cu_load_acquire_gpu(&S->lg_arrive) == gridDim.x - 1;
                if (v < 0) v = fu_linger_verdict(a, t0);
            }
            S->lg_arrive = 0u;
            S->lg_go = go = v;
            __threadfence();
            atomicExch(&S->lg_gen, gen + 1u);
        }
        __threadfence();
    }
    __syncthreads();
    return go != 0;
}

#endif /* MPSCY_CUDA_MLP_LINGER_CUH */
