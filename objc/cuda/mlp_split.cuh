/* mlp_split.cuh — the one-kernel MLP step's layer 0 in its copy phase (mlp.cu): each copying
 * block multiplies the slice of a few rows it copies by that slice of layer 0's weights, and the
 * row phase adds the partial products. The geometry (fu_split_q) is shared by the plan and the
 * launch on the host. Included by mlp.cu only. */
#ifndef MPSCY_CUDA_MLP_SPLIT_CUH
#define MPSCY_CUDA_MLP_SPLIT_CUH

#include "mlp.cuh"

#define FU_SPLIT_FLOATS 40960  /* the most shared memory for layer 0's weight slice (160 KB) */
#define FU_SPLIT_ROWS 4        /* rows a copying block takes in fu_split ($MPSCY_CUDA_FUSED_SPLIT) */

static int fu_pitch(int kw) { return kw + !(kw & 1); }

/* fu_split's slices of layer 0's input (K inputs, N outputs) for b rows in groups of rows over
 * blocks - 1 copying blocks: as many as the groups leave blocks for, each slice's width rounded
 * up to a multiple of `align` inputs once it is that wide (fewer slices, whose starts fall on
 * 128-byte lines with align 32: their reads over PCIe are whole requests; the MLP b32's 784
 * inputs as 13 slices of 64 rather than 16 of 49: A/B on an H100 30.1 us a step against 31.5,
 * 30.6 with align 8; bench/ce_probe.cu's reads alone 5.3 us against 6.1; other shapes unmeasured:
 * $MPSCY_CUDA_FUSED_SPLITW=0 compares); 0 when their weights
 * would pass cap floats or their rows the shared room (then layer 0 runs as its own phase). */
static int fu_split_q(int blocks, int K, int N, int64_t b, int rows, int64_t cap, int align, int *kw) {
    const int64_t groups = (b + rows - 1) / rows;
    int q = (int)((blocks - 1) / groups);
    if (q < 1 || rows < 1) return 0;
    if (q > K) q = K;
    int w = (K + q - 1) / q;
    if (align > 1 && w >= align && (w + align - 1) / align * align < K) w = (w + align - 1) / align * align;
    if ((int64_t)N * fu_pitch(w) > cap || (int64_t)rows * w > FU_SMEM_FLOATS) return 0;
    *kw = w;
    return (K + w - 1) / w;
}

/* fu_split_q for b rows with the geometry the plan fixed (f->ws_floats: the split's room) */
static inline int fu_slices(const cu_fused *f, int64_t b, int *kw) {
    return fu_split_q(f->blocks, f->a.L[0].in, f->a.L[0].out, b, f->a.split_rows, f->ws_floats, f->split_align, kw);
}

/* Layer 0 in the copy phase (split_q > 0; fu_split_q): copying block c >= 1 owns K-slice q =
 * (c - 1) % Q of layer 0's input (split_kw wide) for the split_rows rows of row group
 * (c - 1) / Q. It loads w[:, slice] into ws (fu_split_load: pitch floats a row, odd, for
 * conflict-free column reads) while its rows are still on their way, then waits for the pieces
 * that hold its rows' slices (deferred staging), copies them from pinned memory to x's device
 * rows and to shared memory, and writes their partial products ypart[q][r][j] = x[r, slice] .
 * w[j, slice]: with fewer outputs than threads, each in up to 4 parts of the slice, a thread a
 * part, the parts then added in order (the benchmark MLP's 128 outputs on all 16 warps, not 4:
 * A/B on the H200 39.7 and 40.1 us a step against 40.9 and 41.2); otherwise each by one thread
 * in order ($MPSCY_CUDA_FUSED_SPLITK=1, a measuring knob, takes that form always). */

/* this block's slice of layer 0's input and its rows for fu_split, or 0 */
struct fu_slice {
    int q, k0, kq, r0, nr;
};
static __device__ __forceinline__ int fu_split_slice(const fu_args &a, int b, fu_slice *t) {
    const int Q = a.split_q, c = (int)blockIdx.x - 1;
    if (!Q || c < 0) return 0;
    t->q = c % Q;
    t->k0 = t->q * a.split_kw;
    t->kq = imin(a.split_kw, a.L[0].in - t->k0);
    t->r0 = (c / Q) * a.split_rows;
    t->nr = imin(a.split_rows, b - t->r0);
    return t->kq > 0 && t->nr > 0;
}

/* w[:, slice] into ws, pitch floats a row, a warp a row (cp.async, sm_80 and newer:
 * fu_plan_split; not waited for) */
static __device__ void fu_split_load(const fu_args &a, int b, float *ws) {
    fu_slice t;
    if (!fu_split_slice(a, b, &t)) return;
    const fu_layer &L = a.L[0];
    const int K = L.in, N = L.out, pitch = a.split_pitch, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int j = threadIdx.x >> 5; j < N; j += nw) {
        const float *src = L.w + (int64_t)j * K + t.k0;
        float *dst = ws + j * pitch;
        for (int k = lane; k < t.kq; k += 32) cp_async4(dst + k, src + k, true);
    }
}

/* acc[r] += w * x's row r, for the four rows of a transposed slice */
static __device__ __forceinline__ void fu_fma4(float *acc, float w, float4 x) {
    acc[0] += w * x.x;
    acc[1] += w * x.y;
    acc[2] += w * x.z;
    acc[3] += w * x.w;
}

/* Returns when thread 0 had its rows (with lg_time; else, or without a slice, 0). */
static __device__ unsigned long long fu_split(const fu_args &a, float *smem, const float *ws, int b) {
    fu_slice t;
    if (!fu_split_slice(a, b, &t)) return 0ull;
    const fu_layer &L = a.L[0];
    const int K = L.in, N = L.out, pitch = a.split_pitch, kq = t.kq;
    const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nthr >> 5;
    /* x's slice of the rows, (nr, kq); with split_dot (nr <= 4) transposed, (kq, 4): a row's
     * four values one 16-byte broadcast */
    float *xs = smem;
    const int dot = a.split_dot && t.nr <= 4 && kq * 4 <= FU_SMEM_FLOATS;
    if (a.deferred && tid == 0) {
        const int64_t lo = (int64_t)t.r0 * K + t.k0, hi = (int64_t)(t.r0 + t.nr - 1) * K + t.k0 + kq;
        for (int64_t p = lo / a.in_piece; p <= (hi - 1) / a.in_piece; p++)
            fu_wait_piece(a.S, p);
    }
    __syncthreads();  /* the rows' pieces are there */
    fu_stamp(a, 1);
    /* a warp a row, a load a lane at a time: reading the slices with the whole block at once, the
     * group's rows in contiguous float4 parts, or a lane's loads of a row (up to 4) issued
     * together, was slower (more requests over PCIe at once: bench/cuda_notes.md; the last 38.8
     * us a step against 32.8 on an H100, its rows read 13 us after the release against 7.7), and
     * so were fewer warps (2 a block: 34.5 us against 32.2; 1: 39.3) */
    float mx = 0.0f;  /* the early decision's largest |x| (fu_amax) */
    for (int rr = warp; rr < t.nr; rr += nw) {
        const int64_t o = (int64_t)(t.r0 + rr) * K + t.k0;
        for (int k = lane; k < kq; k += 32) {
            const float v = __ldcv(a.in_src + o + k);
            xs[dot ? k * 4 + rr : rr * kq + k] = v;
            a.in_dst[o + k] = v;
            mx = fu_amax(mx, v);
        }
    }
    const unsigned long long t_rows = a.lg_time ? cu_global_ns() : 0ull;
    if (a.early) fu_amax_publish(&a.S->fu_amax[0], mx);
    cp_async_wait<0>();  /* the slice */
    __syncthreads();
    fu_stamp(a, 2);
    /* with fewer outputs than threads, P parts of the slice an output (a thread each, up to 4;
     * each part's two chains as below), their sums added in part order through shared memory
     * after the slice's x */
    const int P = dot && a.split_parts && N < nthr ? imin(imin(nthr / N, 4), kq) : 1;
    if (P > 1 && kq * 4 + P * 4 * N <= FU_SMEM_FLOATS) {
        const float4 *x4 = reinterpret_cast<const float4 *>(xs);
        float *part = xs + ((kq * 4 + 3) & ~3);
        const int per = (kq + P - 1) / P;
        for (int e = tid; e < P * N; e += nthr) {
            const int j = e % N, p = e / N, lo = p * per, hi = imin(lo + per, kq);
            const float *w = ws + j * pitch;
            float a0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int k = lo;
            for (; k + 1 < hi; k += 2) {
                fu_fma4(a0, w[k], x4[k]);
                fu_fma4(a1, w[k + 1], x4[k + 1]);
            }
            if (k < hi) fu_fma4(a0, w[k], x4[k]);
#pragma unroll
            for (int rr = 0; rr < 4; rr++) part[(p * 4 + rr) * N + j] = a0[rr] + a1[rr];
        }
        __syncthreads();
        for (int e = tid; e < t.nr * N; e += nthr) {
            const int j = e % N, rr = e / N;
            float v = part[rr * N + j];
            for (int p = 1; p < P; p++) v += part[(p * 4 + rr) * N + j];
            a.ypart[((int64_t)t.q * b + t.r0 + rr) * N + j] = v;
        }
        return t_rows;
    }
    if (dot) {
        /* an output a thread, all its rows at once: per k one weight and one broadcast of the
         * rows' x (a quarter of the shared-memory reads of the form below), the same two
         * chains per row in the same order (the same bits); rows past nr hold stale values,
         * their sums never stored */
        const float4 *x4 = reinterpret_cast<const float4 *>(xs);
        for (int j = tid; j < N; j += nthr) {
            const float *w = ws + j * pitch;
            float a0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int k = 0;
            for (; k + 1 < kq; k += 2) {
                fu_fma4(a0, w[k], x4[k]);
                fu_fma4(a1, w[k + 1], x4[k + 1]);
            }
            if (k < kq) fu_fma4(a0, w[k], x4[k]);
#pragma unroll
            for (int rr = 0; rr < 4; rr++)
                if (rr < t.nr) a.ypart[((int64_t)t.q * b + t.r0 + rr) * N + j] = a0[rr] + a1[rr];
        }
        return t_rows;
    }
    const int S = N >= nthr ? 1 : nthr / N;
    for (int e = tid; e < S * N; e += nthr) {
        const int j = e % N;
        const float *w = ws + j * pitch;
        for (int rr = e / N; rr < t.nr; rr += S) {
            const float *x = xs + rr * kq;
            float acc0 = 0.0f, acc1 = 0.0f;  /* two chains, added at the end */
            int k = 0;
            for (; k + 1 < kq; k += 2) {
                acc0 += w[k] * x[k];
                acc1 += w[k + 1] * x[k + 1];
            }
            if (k < kq) acc0 += w[k] * x[k];
            a.ypart[((int64_t)t.q * b + t.r0 + rr) * N + j] = acc0 + acc1;
        }
    }
    return t_rows;
}

#endif /* MPSCY_CUDA_MLP_SPLIT_CUH */
