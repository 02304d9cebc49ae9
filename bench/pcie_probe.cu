// pcie_probe.cu — how fast a batch already in pinned host memory reaches the device: the copy
// engine (cudaMemcpyAsync, one copy and in pieces) against the SMs' own loads over PCIe (a pull
// kernel like step.cu's, by grid size and loads in flight per thread). What the deferred batch's
// pull (step.cu) could gain from the copy engine. Sizes: the README CNN's batch (64 x 3x32x32,
// 786 KB) and the wide MLP's (1024 x 784, 3.2 MB). Each figure: median of 21 timed runs (CUDA
// events around one operation, enqueued behind a 50 µs wait so that the host's submission is not timed), µs and GB/s.
//     nvcc -O3 -std=c++17 -arch=sm_90 bench/pcie_probe.cu -o /tmp/pcie_probe && /tmp/pcie_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "probe.h"

// blocks split n4 float4 evenly; each thread keeps U loads of host memory in flight
template <int U>
__global__ void pull(float4 *__restrict__ d, const float4 *s, long n4) {
    const long per = (n4 + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(lo + per, n4);
    long i = lo + threadIdx.x;
    const long st = blockDim.x;
    for (; i + (U - 1) * st < hi; i += U * st) {
        float4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = __ldcv(s + i + u * st);
#pragma unroll
        for (int u = 0; u < U; u++) d[i + u * st] = v[u];
    }
    for (; i < hi; i += st) d[i] = __ldcv(s + i);
}

// keeps the GPU busy while the host enqueues what follows, so the events time the GPU's work,
// not the host's submission
__global__ void hold(long ns) {
    long long t0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    for (long long t = t0; t - t0 < ns;) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
}

template <class F>
static float timed(cudaStream_t s, F f) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    std::vector<float> t;
    for (int r = 0; r < 26; r++) {
        hold<<<1, 1, 0, s>>>(50000);
        cudaEventRecord(a, s);
        f();
        cudaEventRecord(b, s);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        if (r >= 5) t.push_back(ms * 1e3f);
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs, PCIe gen/width not exposed by the runtime\n", prop.name, prop.multiProcessorCount);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    for (long bytes : {786432L, 3211264L}) {
        float *h, *d;
        CK(cudaHostAlloc((void **)&h, bytes, cudaHostAllocMapped));
        CK(cudaMalloc((void **)&d, bytes));
        for (long i = 0; i < bytes / 4; i++) h[i] = (float)i;
        printf("\n%ld bytes\n", bytes);
        auto report = [&](const char *what, float us) {
            printf("  %-44s %8.2f us  %6.1f GB/s\n", what, us, bytes / (us * 1e3));
        };
        report("copy engine, one copy", timed(s, [&] { cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s); }));
        for (int pieces : {4, 8, 24}) {
            char name[64];
            snprintf(name, sizeof name, "copy engine, %d copies in a row", pieces);
            const long pb = bytes / pieces;
            report(name, timed(s, [&] {
                       for (int p = 0; p < pieces; p++)
                           cudaMemcpyAsync((char *)d + p * pb, (const char *)h + p * pb, p == pieces - 1 ? bytes - p * pb : pb,
                                           cudaMemcpyHostToDevice, s);
                   }));
        }
        const long n4 = bytes / 16;
        const float4 *hs;
        CK(cudaHostGetDevicePointer((void **)&hs, h, 0));
        for (int grid : {96, 132, 264, 528})
            for (int u : {1, 2, 4, 8}) {
                char name[64];
                snprintf(name, sizeof name, "SM loads, %d blocks x 256, %d float4 in flight", grid, u);
                auto f = [&] {
                    if (u == 1) pull<1><<<grid, 256, 0, s>>>((float4 *)d, hs, n4);
                    if (u == 2) pull<2><<<grid, 256, 0, s>>>((float4 *)d, hs, n4);
                    if (u == 4) pull<4><<<grid, 256, 0, s>>>((float4 *)d, hs, n4);
                    if (u == 8) pull<8><<<grid, 256, 0, s>>>((float4 *)d, hs, n4);
                };
                report(name, timed(s, f));
            }
        CK(cudaGetLastError());
        // the copy is right: one check of the last pull's result
        std::vector<float> back(bytes / 4);
        CK(cudaMemcpy(back.data(), d, bytes, cudaMemcpyDeviceToHost));
        long bad = 0;
        for (long i = 0; i < bytes / 4; i++) bad += back[i] != (float)i;
        printf("  device copy mismatches: %ld\n", bad);
        cudaFreeHost(h);
        cudaFree(d);
    }
    return 0;
}
