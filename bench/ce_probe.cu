// ce_probe.cu — a batch already staged in pinned host memory reaching a kernel that is running
// (as the one-kernel MLP step lingers, mlp_linger.cuh): the kernel's own loads over PCIe, spread
// as the step's copying blocks spread them (a warp a row of a block's slice, a load a lane at a
// time: mlp_split.cuh's fu_split_rows), against the copy engine (cudaMemcpyAsync on a second
// stream, then cuStreamWriteValue32 of a device word the kernel waits on), whole or in pieces.
// What bench/cuda_notes.md's next step for the MLP b32 would gain. Per way, median of the timed
// rounds (µs):
//   host  — from the host raising `go` (pinned) to it seeing the kernel's `done` (pinned), which
//           the kernel writes once every float is in device memory: the whole trip, both ways'
//           PCIe latencies included alike;
//   api   — of that, the host's time in the copy calls (0 for the kernel's own loads);
//   dev   — the kernel's view, from block 0 seeing `go` to its having the batch (globaltimer).
// Each round checks the batch in device memory against the host's (a fresh value a round).
//     nvcc -O3 -std=c++17 -arch=sm_90 bench/ce_probe.cu -o /tmp/ce_probe && /tmp/ce_probe [rows [K]]
// (default 32 x 784: the benchmark MLP's 100 KB batch; no libcuda link: the driver's entry point
// comes from cudaGetDriverEntryPointByVersion)
#include <cuda.h>  /* the driver's types, for cuStreamWriteValue32 */

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../objc/cuda/cuda.h"  /* cu_global_ns, cu_load_acquire_gpu / _sys (kernel_util.cuh) */
#include "probe.h"

#define THREADS 512
#define ROWS_PER_BLOCK 4 /* fu_split's rows a copying block takes (FU_SPLIT_ROWS) */

typedef CUresult (*write_value_fn)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

struct probe_args {
    const float *src;      /* pinned */
    float *dst;            /* device */
    int rows, K, Q, kw;    /* the slices: Q of kw inputs, ROWS_PER_BLOCK rows a block */
    int ce, pieces;        /* ce: the copy engine moves the batch, each piece's word in flag[p] */
    const uint32_t *go;    /* pinned: the round the host started */
    volatile uint32_t *done;
    uint32_t *go_d, *flag, *count; /* device */
    unsigned long long *dev_ns;
    int rounds;
};

// G blocks, all resident: block 0 relays `go` to the others and reports; with !ce blocks 1.. read
// their slices of the batch as fu_split_rows does, with ce block 0 waits for every piece's word
__global__ void __launch_bounds__(THREADS, 1) watch(probe_args a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, copiers = a.Q * ((a.rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
    for (uint32_t k = 1; k <= (uint32_t)a.rounds; k++) {
        __shared__ unsigned long long t0;
        if (threadIdx.x == 0) {
            if (blockIdx.x == 0) {
                while (cu_load_acquire_sys(a.go) != k) {
                }
                t0 = cu_global_ns();
                atomicExch(a.go_d, k);
            } else {
                while (cu_load_acquire_gpu(a.go_d) != k) {
                }
            }
        }
        __syncthreads();
        const int c = (int)blockIdx.x - 1;
        if (!a.ce && c >= 0 && c < copiers) {
            const int q = c % a.Q, r0 = (c / a.Q) * ROWS_PER_BLOCK, k0 = q * a.kw, kq = min(a.kw, a.K - k0);
            for (int rr = warp; rr < ROWS_PER_BLOCK && r0 + rr < a.rows; rr += THREADS / 32) {
                const long o = (long)(r0 + rr) * a.K + k0;
                for (int i = lane; i < kq; i += 32) a.dst[o + i] = __ldcv(a.src + o + i);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                __threadfence();
                atomicAdd(a.count, 1u);
            }
        }
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            if (a.ce) {
                for (int p = 0; p < a.pieces; p++)
                    while (cu_load_acquire_gpu(&a.flag[p]) != k) {
                    }
            } else {
                while (cu_load_acquire_gpu(a.count) != k * (uint32_t)copiers) {
                }
            }
            a.dev_ns[k] = cu_global_ns() - t0;
            __threadfence();
            *a.done = k;
            __threadfence_system();
        }
    }
}

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char **argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 32, K = argc > 2 ? atoi(argv[2]) : 784, rounds = 200, warm = 20;
    const long n = (long)rows * K;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const int G = prop.multiProcessorCount, groups = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
    const int Q = std::max(1, std::min(K, (G - 1) / groups)), kw = (K + Q - 1) / Q;
    write_value_fn write_value = nullptr;
    cudaDriverEntryPointQueryResult qr;
    CK(cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", (void **)&write_value, 12000, cudaEnableDefault, &qr));
    if (qr != cudaDriverEntryPointSuccess || !write_value) {
        fprintf(stderr, "cuStreamWriteValue32 not found\n");
        return 1;
    }
    float *src, *dst;
    uint32_t *go, *done, *go_d, *flag, *count;
    unsigned long long *dev_ns;
    CK(cudaHostAlloc(&src, n * sizeof(float), cudaHostAllocMapped));
    CK(cudaHostAlloc(&go, 64, cudaHostAllocMapped));
    CK(cudaHostAlloc(&done, 64, cudaHostAllocMapped));
    CK(cudaMalloc(&dst, n * sizeof(float)));
    CK(cudaMalloc(&go_d, 64));
    CK(cudaMalloc(&flag, 64 * sizeof(uint32_t)));
    CK(cudaMalloc(&count, 64));
    CK(cudaMalloc(&dev_ns, (rounds + 1) * sizeof(unsigned long long)));
    cudaStream_t sk, sc;
    CK(cudaStreamCreateWithFlags(&sk, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&sc, cudaStreamNonBlocking));
    std::vector<float> back(n);
    printf("%s, %d SMs; batch %d x %d floats (%.1f KB), %d slices of %d inputs, %d copying blocks of %d\n", prop.name,
           G, rows, K, n * 4 / 1024.0, Q, kw, Q * groups, G);
    printf("%-28s %8s %8s %8s %8s\n", "way", "host us", "api us", "dev us", "bad");
    const int ways[][2] = {{0, 1}, {1, 1}, {1, 2}, {1, 4}, {1, 8}};
    for (const auto &w : ways) {
        const int ce = w[0], pieces = w[1];
        *go = *done = 0;
        CK(cudaMemset(go_d, 0, 64));
        CK(cudaMemset(flag, 0, 64 * sizeof(uint32_t)));
        CK(cudaMemset(count, 0, 64));
        CK(cudaDeviceSynchronize());
        probe_args a = {src, dst, rows, K, Q, kw, ce, pieces, go, done, go_d, flag, count, dev_ns, rounds};
        watch<<<G, THREADS, 0, sk>>>(a);
        CK(cudaGetLastError());
        std::vector<double> host, api;
        long bad = 0;
        const long piece = (n + pieces - 1) / pieces;
        for (int k = 1; k <= rounds; k++) {
            for (long i = 0; i < n; i++) src[i] = (float)(k * 131 + i % 977);
            const double t_wait = now_us();
            while (now_us() - t_wait < 30.0) {  /* every block back at its wait */
            }
            const double t0 = now_us();
            __atomic_store_n(go, (uint32_t)k, __ATOMIC_SEQ_CST);
            if (ce)
                for (int p = 0; p < pieces; p++) {
                    const long lo = p * piece, m = std::min(piece, n - lo);
                    if (m > 0) CK(cudaMemcpyAsync(dst + lo, src + lo, m * sizeof(float), cudaMemcpyHostToDevice, sc));
                    if (write_value((CUstream)sc, (CUdeviceptr)(flag + p), (cuuint32_t)k, CU_STREAM_WRITE_VALUE_DEFAULT) !=
                        CUDA_SUCCESS) {
                        fprintf(stderr, "cuStreamWriteValue32 failed\n");
                        return 1;
                    }
                }
            const double t1 = now_us();
            while (__atomic_load_n(done, __ATOMIC_ACQUIRE) != (uint32_t)k) {
            }
            const double t2 = now_us();
            if (k > warm) {
                host.push_back(t2 - t0);
                api.push_back(t1 - t0);
            }
            if (k % 20 == 0) {  /* a round's batch, checked (the kernel waits at the next go meanwhile) */
                CK(cudaMemcpyAsync(back.data(), dst, n * sizeof(float), cudaMemcpyDeviceToHost, sc));
                CK(cudaStreamSynchronize(sc));
                for (long i = 0; i < n; i++) bad += back[i] != src[i];
            }
        }
        CK(cudaStreamSynchronize(sk));
        std::vector<unsigned long long> d(rounds + 1);
        CK(cudaMemcpy(d.data(), dev_ns, d.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
        std::vector<double> dev;
        for (int k = warm + 1; k <= rounds; k++) dev.push_back(d[k] * 1e-3);
        char name[64];
        snprintf(name, sizeof name, ce ? "copy engine, %d piece%s" : "kernel loads (fu_split_rows)", pieces,
                 pieces > 1 ? "s" : "");
        printf("%-28s %8.2f %8.2f %8.2f %8ld\n", name, median(host), median(api), median(dev), bad);
    }
    return 0;
}
