// resident_probe.cu — what a step of the one-kernel MLP (objc/cuda/mlp.cu: 132 blocks of 512
// threads, the batch copied from pinned memory by the kernel, grid barriers, the result to pinned
// memory polled by the host) costs before any arithmetic, launched as a CUDA graph per step (the
// library's way) against a kernel that stays resident across steps and polls a flag in pinned
// memory that the host sets (no launch at all). The host loop per step: copy the batch (100 KB,
// 32 x 784 floats, or none) into pinned staging, launch or set the flag, poll the result word
// until it shows the step's number. Barriers: 2 per step in both (start, after the copy), as
// the kernel's first phases. Each figure: median over 9 runs of 2000 steps, µs per step.
//     nvcc -O3 -std=c++17 -arch=sm_90 bench/resident_probe.cu -o /tmp/resident_probe && /tmp/resident_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../objc/cuda/cuda.h"  // cu_load_acquire_gpu, cu_load_acquire_sys
#include "probe.h"

static __device__ __forceinline__ void st_release_sys(unsigned *p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// sense barrier over the grid: bar[0] arrivals, bar[1] generation (both back to their pattern
// after each use, so it serves launch after launch)
static __device__ __forceinline__ void grid_barrier(unsigned *bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned gen = cu_load_acquire_gpu(&bar[1]);
        __threadfence();
        if (atomicAdd(&bar[0], 1u) == gridDim.x - 1) {
            bar[0] = 0;
            __threadfence();
            atomicAdd(&bar[1], 1u);
        } else {
            while (cu_load_acquire_gpu(&bar[1]) == gen) {
            }
        }
    }
    __syncthreads();
}

// the step's first phases: every block copies its slice of the batch from pinned memory
static __device__ __forceinline__ void copy_slice(float4 *__restrict__ d, const float4 *s, long n4) {
    const long per = (n4 + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(lo + per, n4);
    for (long i = lo + threadIdx.x; i < hi; i += blockDim.x) d[i] = __ldcv(s + i);
}

// launched once per step (in a graph): copy, barrier, result
__global__ void __launch_bounds__(512) launched(const float4 *src, float4 *dst, long n4, unsigned *bar,
                                                const unsigned *seqp, unsigned *result) {
    copy_slice(dst, src, n4);
    grid_barrier(bar);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const unsigned seq = *seqp + 1;
        *const_cast<unsigned *>(seqp) = seq;
        __threadfence_system();
        st_release_sys(result, seq);
    }
}

// resident for `steps` steps: block 0 (or every block, all_poll) polls the host's flag, barrier,
// copy, barrier, result
__global__ void __launch_bounds__(512) resident(const float4 *src, float4 *dst, long n4, unsigned *bar,
                                                const unsigned *flag, unsigned *result, unsigned steps,
                                                int all_poll) {
    for (unsigned seq = 1; seq <= steps; seq++) {
        if (threadIdx.x == 0 && (all_poll || blockIdx.x == 0))
            while (cu_load_acquire_sys(flag) != seq) {
            }
        if (all_poll) __syncthreads();
        else grid_barrier(bar);
        copy_slice(dst, src, n4);
        grid_barrier(bar);
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            __threadfence_system();
            st_release_sys(result, seq);
        }
    }
}

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const int blocks = prop.multiProcessorCount;
    const long n = 32 * 784, n4 = n / 4;
    const unsigned steps = 2000;
    std::vector<float> host(n, 1.0f);
    float4 *stage, *dst;
    unsigned *flag, *result, *bar, *seqd;
    CK(cudaHostAlloc(&stage, n * 4, cudaHostAllocMapped));
    CK(cudaHostAlloc(&flag, 64, cudaHostAllocMapped));
    CK(cudaHostAlloc(&result, 64, cudaHostAllocMapped));
    CK(cudaMalloc(&dst, n * 4));
    CK(cudaMalloc(&bar, 64));
    CK(cudaMalloc(&seqd, 64));
    CK(cudaMemset(bar, 0, 64));
    CK(cudaMemset(seqd, 0, 64));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    volatile unsigned *vres = result, *vflag = flag;
    printf("# %s, %d blocks of 512 threads; batch %ld floats (%ld KB); µs per step, median of 9 runs of %u\n",
           prop.name, blocks, n, n * 4 / 1024, steps);

    for (int with_copy = 1; with_copy >= 0; with_copy--) {
        const long m4 = with_copy ? n4 : 0;
        // (a) a graph of one cooperative kernel per step, the host polling the pinned result
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(blocks);
        cfg.blockDim = dim3(512);
        cfg.stream = s;
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeCooperative;
        at[0].val.cooperative = 1;
        cfg.attrs = at;
        cfg.numAttrs = 1;
        CK(cudaLaunchKernelEx(&cfg, launched, (const float4 *)stage, dst, m4, bar, (const unsigned *)seqd, result));
        CK(cudaStreamEndCapture(s, &graph));
        CK(cudaGraphInstantiate(&exec, graph, 0));
        CK(cudaMemset(seqd, 0, 64));
        *vres = 0;
        CK(cudaDeviceSynchronize());
        std::vector<double> runs;
        unsigned seq = 0;
        for (int r = 0; r < 10; r++) {
            const double t0 = now_us();
            for (unsigned i = 0; i < steps; i++) {
                if (with_copy) memcpy(stage, host.data(), n * 4);
                ++seq;
                CK(cudaGraphLaunch(exec, s));
                while (*vres != seq) {
                }
            }
            if (r) runs.push_back((now_us() - t0) / steps);
        }
        CK(cudaStreamSynchronize(s));
        std::sort(runs.begin(), runs.end());
        printf("graph launch per step%s: %.2f us (min %.2f)\n", with_copy ? ", batch copied" : "", runs[4], runs[0]);
        CK(cudaGraphExecDestroy(exec));
        CK(cudaGraphDestroy(graph));

        // (b) resident: one launch, the host setting the flag per step
        for (int all_poll = 0; all_poll < 2; all_poll++) {
            runs.clear();
            for (int r = 0; r < 10; r++) {
                *vflag = 0;
                *vres = 0;
                void *args[] = {(void *)&stage, (void *)&dst, (void *)&m4, (void *)&bar, (void *)&flag,
                                (void *)&result, (void *)&steps, (void *)&all_poll};
                CK(cudaLaunchCooperativeKernel((const void *)resident, dim3(blocks), dim3(512), args, 0, s));
                const double t0 = now_us();
                for (unsigned i = 1; i <= steps; i++) {
                    if (with_copy) memcpy(stage, host.data(), n * 4);
                    std::atomic_thread_fence(std::memory_order_seq_cst);
                    *vflag = i;
                    while (*vres != i) {
                    }
                }
                if (r) runs.push_back((now_us() - t0) / steps);
                CK(cudaStreamSynchronize(s));
            }
            std::sort(runs.begin(), runs.end());
            printf("resident, %s%s: %.2f us (min %.2f)\n", all_poll ? "every block polls" : "block 0 polls + barrier",
                   with_copy ? ", batch copied" : "", runs[4], runs[0]);
        }
    }
    return 0;
}
