// ce_probe.cu — a batch already staged in pinned host memory reaching a kernel that is running
// (as the one-kernel MLP step lingers, mlp_linger.cuh): the kernel's own loads over PCIe, spread
// as the step's copying blocks spread them (a warp a row of a block's slice, a load a lane at a
// time: mlp_split.cuh's fu_split, its rows' reads), against the copy engine (cudaMemcpyAsync on a second
// stream, then cuStreamWriteValue32 of a device word the kernel waits on), whole or in pieces.
// Also the kernel's loads in other shapes: the slices' widths and row pitch (a slice whose start
// is 128-byte aligned is read in fewer, whole PCIe requests), each block's slice contiguous
// (slice-major staging) read as float4 or floats, and no loads (the harness's own cost); and the
// host's staging of the batch (non-temporal stores; straight, slice-major, on 1-4 threads).
// What bench/cuda_notes.md's next steps for the MLP b32 would gain. Per way, median of the timed
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

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
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
    int pitch;             /* mode 0: floats from a row to the next in src and dst */
    int ce, pieces;        /* ce: the copy engine moves the batch, each piece's word in flag[p] */
    int mode;              /* !ce: 0 rows' slices as fu_split reads them, 1 each block's slice contiguous
                              (slice-major staging) read as float4, 2 the same as floats, 3 none */
    long chunk;            /* modes 1-2: floats a block's contiguous slice takes (a multiple of 4) */
    const uint32_t *go;    /* pinned: the round the host started */
    volatile uint32_t *done;
    uint32_t *go_d, *flag, *count; /* device */
    unsigned long long *dev_ns;
    int rounds;
};

// G blocks, all resident: block 0 relays `go` to the others and reports; with !ce blocks 1.. read
// their slices of the batch as fu_split reads them, with ce block 0 waits for every piece's word
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
            if (a.mode == 0) {
                const int q = c % a.Q, r0 = (c / a.Q) * ROWS_PER_BLOCK, k0 = q * a.kw, kq = min(a.kw, a.K - k0);
                for (int rr = warp; rr < ROWS_PER_BLOCK && r0 + rr < a.rows; rr += THREADS / 32) {
                    const long o = (long)(r0 + rr) * a.pitch + k0;
                    for (int i = lane; i < kq; i += 32) a.dst[o + i] = __ldcv(a.src + o + i);
                }
            } else if (a.mode == 1) {
                const long lo = c * a.chunk, n4 = a.chunk / 4;
                const float4 *s4 = reinterpret_cast<const float4 *>(a.src + lo);
                float4 *d4 = reinterpret_cast<float4 *>(a.dst + lo);
                for (long i = threadIdx.x; i < n4; i += THREADS) d4[i] = __ldcv(s4 + i);
            } else if (a.mode == 2) {
                const long lo = c * a.chunk;
                for (long i = threadIdx.x; i < a.chunk; i += THREADS) a.dst[lo + i] = __ldcv(a.src + lo + i);
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

/* the host's staging of the batch from a cache-hot row-major source into pinned memory, with
 * non-temporal stores: straight, or permuted slice-major (block c's Q-slice of ROWS_PER_BLOCK rows
 * contiguous, chunk floats apart, as modes 1-2 read it); median over 200 copies, µs */
static double stage_us(float *dst, const float *src, int rows, int K, int Q, int kw, long chunk) {
    std::vector<double> t;
    for (int it = 0; it < 220; it++) {
        const double t0 = now_us();
        if (!chunk) {
            const long n = (long)rows * K;
            long i = 0;
            for (; i + 3 < n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
            for (; i < n; i++) dst[i] = src[i];
        } else {
            const int groups = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
            for (int g = 0; g < groups; g++)
                for (int q = 0; q < Q; q++) {
                    float *d = dst + (long)(g * Q + q) * chunk;
                    const int k0 = q * kw, kq = std::min(kw, K - k0);
                    alignas(16) float buf[4096];
                    long o = 0;
                    for (int rr = 0; rr < ROWS_PER_BLOCK && g * ROWS_PER_BLOCK + rr < rows; rr++) {
                        const float *s = src + (long)(g * ROWS_PER_BLOCK + rr) * K + k0;
                        memcpy(buf + o, s, kq * sizeof(float));
                        o += kq;
                    }
                    for (long i = 0; i < o; i += 4) _mm_stream_ps(d + i, _mm_load_ps(buf + i));
                }
        }
        _mm_sfence();
        if (it >= 20) t.push_back(now_us() - t0);
    }
    return median(t);
}

/* the straight staging on T threads, T - 1 of them spinning workers started once (as mpscy's pool
 * keeps them): n floats in pieces of `piece` claimed in order; median over 200 rounds of the
 * caller's time from the round's start to every piece done, µs */
static double stage_threads_us(float *dst, const float *src, long n, long piece, int T) {
    std::atomic<int> gen{0}, done{0}, stop{0};
    std::atomic<long> next{0};
    auto work = [&]() {
        for (long p; (p = next.fetch_add(1)) * piece < n;) {
            const long lo = p * piece, hi = std::min(n, lo + piece);
            long i = lo;
            for (; i + 3 < hi; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
            for (; i < hi; i++) dst[i] = src[i];
            _mm_sfence();
        }
        done.fetch_add(1);
    };
    std::vector<std::thread> th;
    for (int t = 1; t < T; t++)
        th.emplace_back([&]() {
            for (int seen = 0;;) {
                int g;
                while ((g = gen.load(std::memory_order_acquire)) == seen && !stop.load()) _mm_pause();
                if (stop.load()) return;
                seen = g;
                work();
            }
        });
    std::vector<double> t;
    for (int it = 1; it <= 220; it++) {
        next.store(0);
        done.store(0);
        const double t0 = now_us();
        gen.store(it, std::memory_order_release);
        work();
        while (done.load(std::memory_order_acquire) != T) _mm_pause();
        if (it > 20) t.push_back(now_us() - t0);
        const double tw = now_us();
        while (now_us() - tw < 20.0) {
        }
    }
    stop.store(1);
    for (auto &x : th) x.join();
    return median(t);
}

int main(int argc, char **argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 32, K = argc > 2 ? atoi(argv[2]) : 784, rounds = 200, warm = 20;
    const long n = (long)rows * K, n_alloc = n + 64L * 1024;
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
    CK(cudaHostAlloc(&src, n_alloc * sizeof(float), cudaHostAllocMapped));
    CK(cudaHostAlloc(&go, 64, cudaHostAllocMapped));
    CK(cudaHostAlloc(&done, 64, cudaHostAllocMapped));
    CK(cudaMalloc(&dst, n_alloc * sizeof(float)));
    CK(cudaMalloc(&go_d, 64));
    CK(cudaMalloc(&flag, 64 * sizeof(uint32_t)));
    CK(cudaMalloc(&count, 64));
    CK(cudaMalloc(&dev_ns, (rounds + 1) * sizeof(unsigned long long)));
    cudaStream_t sk, sc;
    CK(cudaStreamCreateWithFlags(&sk, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&sc, cudaStreamNonBlocking));
    std::vector<float> back((long)rows * ((K + 31) / 32 * 32) > n ? (long)rows * ((K + 31) / 32 * 32) : n);
    printf("%s, %d SMs; batch %d x %d floats (%.1f KB), %d slices of %d inputs, %d copying blocks of %d\n", prop.name,
           G, rows, K, n * 4 / 1024.0, Q, kw, Q * groups, G);
    {
        std::vector<float> hot(n);
        for (long i = 0; i < n; i++) hot[i] = (float)i;
        const long tight = ((n + Q * groups - 1) / (Q * groups) + 3) / 4 * 4;
        printf("host staging, one thread, non-temporal: straight %.2f us, slice-major %.2f us\n",
               stage_us(src, hot.data(), rows, K, 0, kw, 0), stage_us(src, hot.data(), rows, K, Q, kw, tight));
    }
    {
        std::vector<float> hot(n);
        for (long i = 0; i < n; i++) hot[i] = (float)i;
        for (long piece : {8192L, 4096L, 2048L})
            printf("host staging, %ld-float pieces, spinning workers: 1 thread %.2f us, 2 %.2f, 3 %.2f, 4 %.2f\n", piece,
                   stage_threads_us(src, hot.data(), n, piece, 1), stage_threads_us(src, hot.data(), n, piece, 2),
                   stage_threads_us(src, hot.data(), n, piece, 3), stage_threads_us(src, hot.data(), n, piece, 4));
    }
    printf("%-28s %8s %8s %8s %8s\n", "way", "host us", "api us", "dev us", "bad");
    /* modes 1-2: the copiers' slices contiguous, chunk floats apart (chunk 32-float aligned: 128 B) */
    const int copiers = Q * groups;
    const long tight = ((n + copiers - 1) / copiers + 3) / 4 * 4, aligned = (tight + 31) / 32 * 32;
    const int pitch128 = (K + 31) / 32 * 32;
    const long ways[][6] = {{0, 1, 0, 0, kw, K},  {0, 1, 0, 0, 56, K}, {0, 1, 0, 0, 64, K}, {0, 1, 0, 0, 64, pitch128},
                            {0, 1, 0, 0, 96, pitch128}, {0, 1, 0, 0, 128, pitch128},
                            {0, 1, 1, tight, kw, K}, {0, 1, 1, aligned, kw, K}, {0, 1, 3, 0, kw, K}, {1, 1, 0, 0, kw, K}};
    for (const auto &w : ways) {
        const int ce = (int)w[0], pieces = (int)w[1], mode = (int)w[2], wkw = (int)w[4], wpitch = (int)w[5];
        const int wQ = (K + wkw - 1) / wkw;
        const long chunk = w[3];
        if (chunk * copiers > n_alloc || wQ * groups > G - 1 || (long)rows * wpitch > n_alloc) continue;
        *go = *done = 0;
        CK(cudaMemset(go_d, 0, 64));
        CK(cudaMemset(flag, 0, 64 * sizeof(uint32_t)));
        CK(cudaMemset(count, 0, 64));
        CK(cudaDeviceSynchronize());
        probe_args a = {src, dst, rows, K, mode == 0 ? wQ : Q, mode == 0 ? wkw : kw, wpitch, ce, pieces, mode, chunk, go, done, go_d, flag, count, dev_ns, rounds};
        watch<<<G, THREADS, 0, sk>>>(a);
        CK(cudaGetLastError());
        std::vector<double> host, api;
        long bad = 0;
        const long piece = (n + pieces - 1) / pieces;
        for (int k = 1; k <= rounds; k++) {
            const long m = (long)rows * pitch128 > n ? (long)rows * pitch128 : n;
            for (long i = 0; i + 3 < m; i += 4)  /* non-temporal, as the step's staging (stage.c) */
                _mm_stream_ps(src + i, _mm_setr_ps((float)(k * 131 + i % 977), (float)(k * 131 + (i + 1) % 977),
                                                   (float)(k * 131 + (i + 2) % 977), (float)(k * 131 + (i + 3) % 977)));
            for (long i = m & ~3L; i < m; i++) src[i] = (float)(k * 131 + i % 977);
            _mm_sfence();
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
            if (k % 20 == 0 && !(!ce && mode == 3)) {  /* a round's batch, checked (the kernel waits at the next go meanwhile) */
                CK(cudaMemcpyAsync(back.data(), dst, back.size() * sizeof(float), cudaMemcpyDeviceToHost, sc));
                CK(cudaStreamSynchronize(sc));
                for (long r = 0; r < rows; r++)
                    for (long i = 0; i < K; i++) {
                        const long e = ce || mode ? r * K + i : r * wpitch + i;
                        bad += back[e] != src[e];
                    }
            }
        }
        CK(cudaStreamSynchronize(sk));
        std::vector<unsigned long long> d(rounds + 1);
        CK(cudaMemcpy(d.data(), dev_ns, d.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
        std::vector<double> dev;
        for (int k = warm + 1; k <= rounds; k++) dev.push_back(d[k] * 1e-3);
        char name[64];
        static const char *modes[] = {"kernel loads (fu_split)", "kernel float4, slice-major", "kernel float4, 128B slices",
                                      "kernel floats, slice-major", "no loads (the harness)"};
        if (ce)
            snprintf(name, sizeof name, "copy engine, %d piece%s", pieces, pieces > 1 ? "s" : "");
        else if (mode == 0)
            snprintf(name, sizeof name, "rows: %d x %d, pitch %d", wQ, wkw, wpitch);
        else
            snprintf(name, sizeof name, "%s", modes[mode == 0 ? 0 : mode == 1 ? (chunk == tight ? 1 : 2) : mode + 1]);
        printf("%-28s %8.2f %8.2f %8.2f %8ld\n", name, median(host), median(api), median(dev), bad);
    }
    return 0;
}
