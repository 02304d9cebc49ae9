// l2_probe.cu — what one load costs an SM when another SM has just written its line.
//
// The one-kernel MLP step is a chain of phases where blocks write (activations, gradients, the
// updated weights), meet at a grid barrier, and other blocks read what was written: each phase's
// first loads are of lines another SM wrote a moment before. This probe times single dependent
// loads (clock64 around an L2 load whose value a branch waits on) by thread 0 of each of 132
// blocks (one an SM), after a grid barrier, of:
//   - a line written before the kernel (clean in L2),
//   - the line this block itself wrote before the barrier,
//   - the line another block wrote before the barrier, for every other block in turn.
// It prints the medians, and for the others' lines the spread over writers, so that lines written
// by SMs near the reader and far from it show apart (H100's L2 is two partitions).
//
//   nvcc -std=c++17 -arch=sm_90 -O3 -o /tmp/l2_probe bench/l2_probe.cu && /tmp/l2_probe
#include <algorithm>
#include <vector>

#include "probe.h"

#define LINE 32 /* unsigned ints a 128-byte line */

static __device__ __forceinline__ unsigned ld_cg(const unsigned *p) {
    unsigned v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* a grid barrier of gen-numbered rounds (every block resident: one a multiprocessor) */
static __device__ void grid_bar(unsigned *bar, unsigned &gen) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned g = gen + 1;
        if (atomicAdd(&bar[0], 1u) == gridDim.x - 1) {
            bar[0] = 0;
            __threadfence();
            atomicExch(&bar[1], g);
        } else {
            while (ld_cg(&bar[1]) != g) {
            }
        }
        __threadfence();
    }
    gen++;
    __syncthreads();
}

/* one timed load: the clock after a branch on the value, so it waits for it */
static __device__ __forceinline__ long long timed(const unsigned *p, unsigned *sink) {
    const long long t0 = clock64();
    const unsigned v = ld_cg(p);
    if (v == 0xdeadbeefu) *sink = v;
    return clock64() - t0;
}

__global__ void probe(unsigned *buf, const unsigned *clean, unsigned *bar, long long *lat, int *smid, unsigned *sink) {
    const int n = gridDim.x, b = blockIdx.x;
    unsigned gen = 0;
    if (threadIdx.x == 0) {
        unsigned s;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
        smid[b] = (int)s;
    }
    for (int round = 0; round < n; round++) {
        /* each block writes its line (a fresh value each round) */
        if (threadIdx.x < LINE) buf[b * LINE + threadIdx.x] = round * 1000u + b;
        grid_bar(bar, gen);
        if (threadIdx.x == 0) {
            const int w = (b + round) % n; /* round 0: its own line */
            long long tc = timed(&clean[(size_t)(b * n + round) * LINE], sink);
            long long tw = timed(&buf[w * LINE], sink);
            lat[((size_t)b * n + w) * 2 + 0] = tw;
            lat[((size_t)b * n + w) * 2 + 1] = tc;
        }
        grid_bar(bar, gen);
    }
}

int main() {
    int dev = 0, sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const int n = sms;
    unsigned *buf, *clean, *bar, *sink;
    long long *lat;
    int *smid;
    CK(cudaMalloc(&buf, (size_t)n * LINE * 4));
    CK(cudaMalloc(&clean, (size_t)n * n * LINE * 4));
    CK(cudaMalloc(&bar, 64));
    CK(cudaMalloc(&sink, 64));
    CK(cudaMalloc(&lat, (size_t)n * n * 2 * 8));
    CK(cudaMalloc(&smid, n * 4));
    std::vector<long long> h((size_t)n * n * 2);
    std::vector<int> hs(n);
    for (int rep = 0; rep < 3; rep++) {
        CK(cudaMemset(clean, 1, (size_t)n * n * LINE * 4)); /* every clean line in L2 */
        CK(cudaMemset(bar, 0, 64));
        probe<<<n, 128>>>(buf, clean, bar, lat, smid, sink);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
    }
    CK(cudaMemcpy(h.data(), lat, h.size() * 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hs.data(), smid, n * 4, cudaMemcpyDeviceToHost));
    auto med = [](std::vector<long long> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
    std::vector<long long> cl, own, oth;
    for (int r = 0; r < n; r++)
        for (int w = 0; w < n; w++) {
            cl.push_back(h[((size_t)r * n + w) * 2 + 1]);
            (w == r ? own : oth).push_back(h[((size_t)r * n + w) * 2]);
        }
    std::vector<long long> s = oth;
    std::sort(s.begin(), s.end());
    printf("l2_probe: %d blocks, cycles a dependent ld.global.cg (clock64 around it)\n", n);
    printf("  a clean line (written before the kernel): median %lld\n", med(cl));
    printf("  the line this SM wrote before the barrier: median %lld\n", med(own));
    printf("  a line another SM wrote before the barrier: p10 %lld, median %lld, p90 %lld, max %lld\n",
           s[s.size() / 10], s[s.size() / 2], s[s.size() * 9 / 10], s.back());
    /* per reader, its writers' latencies by SM id: two groups would show the partitions */
    for (int r : {0, 1, n / 2, n - 1}) {
        const int top = *std::max_element(hs.begin(), hs.end());
        printf("  reader block %d (SM %d), by writer's SM id (0..%d; -1: none):", r, hs[r], top);
        std::vector<long long> bysm(top + 1, -1);
        for (int w = 0; w < n; w++) bysm[hs[w]] = h[((size_t)r * n + w) * 2];
        for (int k = 0; k <= top; k++) printf("%s%lld", k % 24 ? " " : "\n    ", bysm[k]);
        printf("\n");
    }
    return 0;
}
