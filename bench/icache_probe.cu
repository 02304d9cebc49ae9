// icache_probe.cu — how fast an SM runs straight-line code it ran before, by the code's size.
//
// The one-kernel MLP step runs each phase's code once a step; profiles of it show warps stalled on
// instruction fetch (no_instruction). This probe times a warp over N independent FFMAs (16 bytes
// each, 8 chains, so a warm pass issues about one a cycle) for N from 1024 to 16384 instructions
// (16 KB to 256 KB of code): the first pass, then later passes over the same addresses, with a
// pause between passes as between steps. A later pass as slow as the first means the code does not
// stay in the SM's instruction caches from one pass to the next. Rows for 1 warp in 1 block, 4
// warps in 1 block (one per scheduler), and 1 warp in each of 132 blocks (every SM fetching the
// same code at once, as the step's phases do).
//
//   nvcc -std=c++17 -arch=sm_90 -O3 -o /tmp/icache_probe bench/icache_probe.cu && /tmp/icache_probe
#include "probe.h"

#define CHAIN 8
#define PASSES 6

/* FFMAs [B * 1024, (B + 1) * 1024) of a pass, then the next 1024 (as separate code: each has its
 * own constants), so that no unroll limit folds a large pass into a loop */
template <int B, int NB>
struct chunk {
    static __device__ __forceinline__ void run(float *v, float k) {
#pragma unroll
        for (int i = 0; i < 1024 / CHAIN; i++)
#pragma unroll
            for (int c = 0; c < CHAIN; c++) v[c] = fmaf(v[c], k, (float)(B * 1024 + i * CHAIN + c) * 0.25f + 0.5f);
        chunk<B + 1, NB>::run(v, k);
    }
};
template <int NB>
struct chunk<NB, NB> {
    static __device__ __forceinline__ void run(float *, float) {}
};

template <int N>
__global__ void probe(float k, float *out, long long *cyc, int pause_ns) {
    float v[CHAIN];
#pragma unroll
    for (int c = 0; c < CHAIN; c++) v[c] = (float)(threadIdx.x + c);
    for (int p = 0; p < PASSES; p++) {
        __syncthreads();
        const long long t0 = clock64();
        chunk<0, N / 1024>::run(v, k);
        /* the pass ends when its last chain's result is in */
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < CHAIN; c++) s += v[c];
        asm volatile("" ::"f"(s));
        const long long t1 = clock64();
        if ((threadIdx.x & 31) == 0) cyc[(blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * PASSES + p] = t1 - t0;
        if (pause_ns) {
            const long long tp = clock64();
            while (clock64() - tp < 2 * (long long)pause_ns) {
            }
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < CHAIN; c++) s += v[c];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <int N>
static void row(int blocks, int threads, float *out, long long *cyc, long long *h) {
    const int warps = blocks * threads / 32;
    double sum[PASSES] = {0};
    for (int rep = 0; rep < 5; rep++) {
        probe<N><<<blocks, threads>>>(1.0000001f, out, cyc, 10000);
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(h, cyc, sizeof(long long) * warps * PASSES, cudaMemcpyDeviceToHost));
        for (int p = 0; p < PASSES; p++) {
            long long mx = 0;
            for (int w = 0; w < warps; w++) mx = h[w * PASSES + p] > mx ? h[w * PASSES + p] : mx;
            if (rep > 0) sum[p] += (double)mx / 4.0;  /* the first launch loads the module's code */
        }
    }
    printf("%6d instr %4d KB  %3d block(s) x %2d warp(s): cycles a pass (slowest warp):", N, N * 16 / 1024, blocks,
           threads / 32);
    for (int p = 0; p < PASSES; p++) printf(" %8.0f", sum[p]);
    printf("   per instr: first %.2f, later %.2f\n", sum[0] / N, sum[PASSES - 1] / N);
}

template <int N>
static void sizes(float *out, long long *cyc, long long *h) {
    row<N>(1, 32, out, cyc, h);
    row<N>(1, 128, out, cyc, h);
    row<N>(132, 32, out, cyc, h);
}

int main() {
    float *out;
    long long *cyc, *h;
    CK(cudaMalloc(&out, 132 * 128 * sizeof(float)));
    CK(cudaMalloc(&cyc, 132 * 4 * PASSES * sizeof(long long)));
    h = (long long *)malloc(132 * 4 * PASSES * sizeof(long long));
    int clk;
    CK(cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, 0));
    printf("icache_probe: %d kHz max SM clock; a pass's cycles over N FFMAs (8 chains), %d passes, 10 us between\n",
           clk, PASSES);
    sizes<1024>(out, cyc, h);
    sizes<2048>(out, cyc, h);
    sizes<3072>(out, cyc, h);
    sizes<4096>(out, cyc, h);
    sizes<6144>(out, cyc, h);
    sizes<8192>(out, cyc, h);
    sizes<12288>(out, cyc, h);
    sizes<16384>(out, cyc, h);
    return 0;
}
