/* mma.cuh — fp32 matrix products on tensor cores (sm_80 and newer) for the convolutions:
 * 3xTF32 arithmetic in a cp.async pipeline.
 *
 * Arithmetic: x = big + small with big = tf32(x), small = x - big (read as tf32), and
 * a b ~ a_s b_b + a_b b_s + a_b b_b (the small products first), accumulated in fp32. The dropped
 * a_s b_s and the truncation of the small parts are ~2^-21 of the product, fp32's own order of
 * error, at tensor-core speed (one mma.sync m16n8k8 is 1,024 multiply-adds).
 *
 * Pipeline: a block of 256 threads computes a (16 TM) x (16 TN) tile of D = A B^T over
 * [k0, k1) in steps of MMA_BK, with MMA_STAGES steps in flight: each step's tiles go straight
 * from global to shared memory with cp.async (zero-filled outside the matrices), so the loads of
 * the next steps overlap the multiplies of this one without passing through registers.
 *
 * Operands are given as A (M, K) and B (N, K) views of global memory. KC (K-contiguous): element
 * (r, k) is p[r ld + k], kept in shared memory as [r][BK + 4]; otherwise (row-contiguous) it is
 * p[k ld + r], kept as [BK][R + 8]. Either padding puts a warp's fragment reads (8 rows g by 4
 * columns t) in 32 distinct banks. VEC: 16-byte copies (ld, the base and the K range multiples of
 * 4 floats, and for row-contiguous operands the row count too); else 4-byte copies. */
#ifndef MPSCY_CUDA_MMA_CUH
#define MMA_BK 32
#define MMA_STAGES 3
#define MPSCY_CUDA_MMA_CUH

#include "cuda.h"

template <bool KC, int R>
struct mma_tile {
    static constexpr int LD = KC ? MMA_BK + 4 : R + 8;
    static constexpr int FLOATS = KC ? R * LD : MMA_BK * LD;
    static __device__ __forceinline__ int at(int r, int k) { return KC ? r * LD + k : k * LD + r; }
};

/* shared memory of one block of a (16 TM) x (16 TN) product, in bytes */
template <int TM, int TN, bool AK, bool BK>
constexpr int mma_smem_bytes() {
    return MMA_STAGES * (mma_tile<AK, 16 * TM>::FLOATS + mma_tile<BK, 16 * TN>::FLOATS) * (int)sizeof(float);
}

/* big = x rounded to tf32 (to nearest, ties away: add half of the dropped 13 bits' unit, clear
 * them), small = x - big (exact in fp32; the tensor core reads its top 19 bits). Integer and
 * fp32 ALU work only (no cvt.rna.tf32). */
static __device__ __forceinline__ void tf32_split(float x, uint32_t &big, uint32_t &small) {
    big = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    small = __float_as_uint(x - __uint_as_float(big));
}

static __device__ __forceinline__ void mma_tf32(float *c, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap(); /* the host runs these kernels on sm_80 and newer only */
#endif
}

/* one operand's MMA_BK step kb into shared tile s: rows [r0, r0 + R) of `rows`, K in [kb, k1) */
template <bool KC, int R, bool VEC>
static __device__ __forceinline__ void mma_load(float *s, const float *__restrict__ g, int64_t ld, int r0, int rows,
                                                int64_t kb, int64_t k1) {
    typedef mma_tile<KC, R> T;
    const int tid = threadIdx.x;
    if constexpr (KC && VEC) { /* 8 chunks of 4 K per row */
#pragma unroll
        for (int q = 0; q < R * 8 / 256; q++) {
            const int e = tid + 256 * q, r = e / 8, k = (e % 8) * 4;
            const bool ok = r0 + r < rows && kb + k < k1;
            cp_async16(s + T::at(r, k), ok ? g + (int64_t)(r0 + r) * ld + kb + k : g, ok);
        }
    } else if constexpr (KC) { /* a warp copies 32 consecutive K of one row */
#pragma unroll
        for (int q = 0; q < R / 8; q++) {
            const int e = tid + 256 * q, r = e / 32, k = e % 32;
            const bool ok = r0 + r < rows && kb + k < k1;
            cp_async4(s + T::at(r, k), ok ? g + (int64_t)(r0 + r) * ld + kb + k : g, ok);
        }
    } else if constexpr (VEC) { /* R / 4 chunks of 4 rows per K */
#pragma unroll
        for (int q = 0; q < R / 32; q++) {
            const int e = tid + 256 * q, k = e / (R / 4), r = (e % (R / 4)) * 4;
            const bool ok = r0 + r < rows && kb + k < k1;
            cp_async16(s + T::at(r, k), ok ? g + (kb + k) * ld + r0 + r : g, ok);
        }
    } else {
#pragma unroll
        for (int q = 0; q < R / 8; q++) {
            const int e = tid + 256 * q, k = e / R, r = e % R;
            const bool ok = r0 + r < rows && kb + k < k1;
            cp_async4(s + T::at(r, k), ok ? g + (kb + k) * ld + r0 + r : g, ok);
        }
    }
}

/* Where accumulator e of this thread sits in the (16 TM) x (16 TN) tile: 8 warps as 2 (m) x 4 (n),
 * each a (8 TM) x (4 TN) warp tile of (TM / 2) x (TN / 2) m16n8 fragments, whose four values sit
 * at rows g, g + 8 and columns 2t, 2t + 1 (g = lane / 4, t = lane % 4). e and e + 1 (e even) are
 * adjacent columns of one row. */
template <int TM, int TN>
static __device__ __forceinline__ void mma_pos(int e, int &r, int &c) {
    constexpr int NI = TN / 2;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int mi = e / (4 * NI), ni = (e / 4) % NI, q = e % 4;
    r = (w & 1) * 8 * TM + mi * 16 + g + (q >= 2 ? 8 : 0);
    c = (w >> 1) * 4 * TN + ni * 8 + 2 * t + (q & 1);
}

/* acc (mma_pos's layout) = A[m0 .., k0:k1) B[n0 .., k0:k1)^T with each operand's tiles stored by
 * its loader, load_a(tile, kb) and load_b(tile, kb): K in [kb, kb + MMA_BK) of the block's rows,
 * laid out as mma_tile<AK, 16 TM> and mma_tile<BK, 16 TN>, zero outside the operand, cp.async
 * copies only; each called once for each step, kb = k0, k0 + MMA_BK, ... in order. smem:
 * mma_smem_bytes of dynamic shared memory. Returns once this thread's copies have landed; a
 * second product into the same smem must follow a block barrier (the other warps may still read
 * the last step's tiles).
 * RESUM: the tensor cores' accumulator is added into an fp32 sum (IEEE, round to nearest) after
 * every step and started again from 0, so that it accumulates MMA_BK products at most. The
 * tensor cores round their accumulation toward zero, and over a long K (thousands of positions
 * of a weight gradient) that bias grows with K; ConvTranspose2D's products take this form. */
template <int TM, int TN, bool AK, bool BK, bool RESUM = false, class LoadA, class LoadB>
static __device__ __forceinline__ void mma_product_ab(float (&acc)[TM * TN], float *smem, const LoadA &load_a,
                                                      const LoadB &load_b, int64_t k0, int64_t k1) {
    constexpr int BM = 16 * TM, BN = 16 * TN, MI = TM / 2, NI = TN / 2;
    typedef mma_tile<AK, BM> TA;
    typedef mma_tile<BK, BN> TB;
    constexpr int STAGE = TA::FLOATS + TB::FLOATS;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm = (w & 1) * 8 * TM, wn = (w >> 1) * 4 * TN;
    float sum[RESUM ? TM * TN : 1];
#pragma unroll
    for (int e = 0; e < TM * TN; e++) acc[e] = 0.0f;
    if constexpr (RESUM)
#pragma unroll
        for (int e = 0; e < TM * TN; e++) sum[e] = 0.0f;
    const int nk = (int)((k1 - k0 + MMA_BK - 1) / MMA_BK);
#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; s++) {
        if (s < nk) {
            load_a(smem + s * STAGE, k0 + s * MMA_BK);
            load_b(smem + s * STAGE + TA::FLOATS, k0 + s * MMA_BK);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<MMA_STAGES - 2>(); /* step kt has landed (for this thread's copies) */
        __syncthreads();                  /* ... for everyone's; and step kt - 1's slot is free */
        const int nx = kt + MMA_STAGES - 1;
        if (nx < nk) {
            float *s = smem + (nx % MMA_STAGES) * STAGE;
            load_a(s, k0 + (int64_t)nx * MMA_BK);
            load_b(s + TA::FLOATS, k0 + (int64_t)nx * MMA_BK);
        }
        cp_async_commit();
        const float *sa = smem + (kt % MMA_STAGES) * STAGE, *sb = sa + TA::FLOATS;
#pragma unroll
        for (int k = 0; k < MMA_BK; k += 8) {
            uint32_t ab[MI][4], as[MI][4], bb[NI][2], bs[NI][2];
#pragma unroll
            for (int i = 0; i < MI; i++) {
                const int m = wm + i * 16 + g;
                tf32_split(sa[TA::at(m, k + t)], ab[i][0], as[i][0]);
                tf32_split(sa[TA::at(m + 8, k + t)], ab[i][1], as[i][1]);
                tf32_split(sa[TA::at(m, k + t + 4)], ab[i][2], as[i][2]);
                tf32_split(sa[TA::at(m + 8, k + t + 4)], ab[i][3], as[i][3]);
            }
#pragma unroll
            for (int j = 0; j < NI; j++) {
                const int n = wn + j * 8 + g;
                tf32_split(sb[TB::at(n, k + t)], bb[j][0], bs[j][0]);
                tf32_split(sb[TB::at(n, k + t + 4)], bb[j][1], bs[j][1]);
            }
#pragma unroll
            for (int i = 0; i < MI; i++)
#pragma unroll
                for (int j = 0; j < NI; j++) {
                    float *c = &acc[(i * NI + j) * 4];
                    mma_tf32(c, as[i], bb[j]);
                    mma_tf32(c, ab[i], bs[j]);
                    mma_tf32(c, ab[i], bb[j]);
                }
        }
        if constexpr (RESUM)
#pragma unroll
            for (int e = 0; e < TM * TN; e++) {
                sum[e] = __fadd_rn(sum[e], acc[e]);
                acc[e] = 0.0f;
            }
    }
    if constexpr (RESUM)
#pragma unroll
        for (int e = 0; e < TM * TN; e++) acc[e] = sum[e];
    cp_async_wait<0>();
}

/* mma_product_ab with A the (M, K) view of a (ld lda) */
template <int TM, int TN, bool AK, bool BK, bool VA, bool RESUM = false, class LoadB>
static __device__ __forceinline__ void mma_product_by(float (&acc)[TM * TN], float *smem, const float *__restrict__ a,
                                                      int64_t lda, int m0, int M, const LoadB &load_b, int64_t k0,
                                                      int64_t k1) {
    auto load_a = [&](float *s, int64_t kb) { mma_load<AK, 16 * TM, VA>(s, a, lda, m0, M, kb, k1); };
    mma_product_ab<TM, TN, AK, BK, RESUM>(acc, smem, load_a, load_b, k0, k1);
}

/* mma_product_by with B the (N, K) view of b (ld ldb) */
template <int TM, int TN, bool AK, bool BK, bool VA, bool VB, bool RESUM = false>
static __device__ __forceinline__ void mma_product(float (&acc)[TM * TN], float *smem, const float *__restrict__ a,
                                                   int64_t lda, int m0, int M, const float *__restrict__ b,
                                                   int64_t ldb, int n0, int N, int64_t k0, int64_t k1) {
    auto load_b = [&](float *s, int64_t kb) { mma_load<BK, 16 * TN, VB>(s, b, ldb, n0, N, kb, k1); };
    mma_product_by<TM, TN, AK, BK, VA, RESUM>(acc, smem, a, lda, m0, M, load_b, k0, k1);
}

/* o (M, N) rows ldo apart, tile (m0, n0) = acc (mma_pos's layout): float2 stores where aligned */
template <int TM, int TN>
static __device__ __forceinline__ void mma_store(const float (&acc)[TM * TN], float *o, int64_t ldo, int m0, int M,
                                                 int n0, int N) {
    const bool v2 = (ldo & 1) == 0 && ((uintptr_t)o & 7) == 0;
#pragma unroll
    for (int e = 0; e < TM * TN; e += 2) { /* (e, e + 1): columns n, n + 1 of row m, n even */
        int r, c;
        mma_pos<TM, TN>(e, r, c);
        const int m = m0 + r, n = n0 + c;
        if (m >= M || n >= N) continue;
        if (v2 && n + 1 < N) {
            *reinterpret_cast<float2 *>(&o[m * ldo + n]) = make_float2(acc[e], acc[e + 1]);
        } else {
            o[m * ldo + n] = acc[e];
            if (n + 1 < N) o[m * ldo + n + 1] = acc[e + 1];
        }
    }
}

/* conv_mma_kernel (named for its first users, conv.cu's products): out[z] (M, N) = A[:, Kz]
 * B[:, Kz]^T for the z-th chunk of K (out + z zstride, row stride ldo), as the views above. A
 * product split over K leaves its partials for an ordered sum (conv.cu's cu_sum_parts). */
template <int TM, int TN, bool AK, bool BK, bool VA, bool VB>
__global__ void __launch_bounds__(256, 2) conv_mma_kernel(float *__restrict__ out, int64_t ldo, int64_t zstride,
                                                          const float *__restrict__ a, int64_t lda,
                                                          const float *__restrict__ b, int64_t ldb, int M, int N,
                                                          int64_t K, int64_t chunk) {
    extern __shared__ __align__(16) float mma_smem[];
    cu_pdl_enter();
    const int m0 = blockIdx.y * 16 * TM, n0 = blockIdx.x * 16 * TN;
    const int64_t k0 = (int64_t)blockIdx.z * chunk, k1 = min(K, k0 + chunk);
    float acc[TM * TN];
    mma_product<TM, TN, AK, BK, VA, VB>(acc, mma_smem, a, lda, m0, M, b, ldb, n0, N, k0, k1);
    mma_store<TM, TN>(acc, out + blockIdx.z * zstride, ldo, m0, M, n0, N);
}

typedef void (*mma_fn)(float *, int64_t, int64_t, const float *, int64_t, const float *, int64_t, int, int, int64_t,
                       int64_t);

/* conv_mma_kernel with both operands K-contiguous (a convolution's weight gradient, a Dense's
 * forward): tiles of 64 (tm4, tn4) or 32 rows and columns, 16-byte copies when vec; *bytes its
 * shared memory (mma_kk_bytes, that of any product of such tiles) */
static inline int mma_kk_bytes(bool tm4, bool tn4) {
    static const int sizes[2][2] = {{mma_smem_bytes<2, 2, true, true>(), mma_smem_bytes<2, 4, true, true>()},
                                    {mma_smem_bytes<4, 2, true, true>(), mma_smem_bytes<4, 4, true, true>()}};
    return sizes[tm4][tn4];
}

static inline mma_fn mma_kk_kind(bool tm4, bool tn4, bool vec, int *bytes) {
    static const mma_fn kinds[2][2][2] = {
        {{conv_mma_kernel<2, 2, true, true, false, false>, conv_mma_kernel<2, 2, true, true, true, true>},
         {conv_mma_kernel<2, 4, true, true, false, false>, conv_mma_kernel<2, 4, true, true, true, true>}},
        {{conv_mma_kernel<4, 2, true, true, false, false>, conv_mma_kernel<4, 2, true, true, true, true>},
         {conv_mma_kernel<4, 4, true, true, false, false>, conv_mma_kernel<4, 4, true, true, true, true>}}};
    *bytes = mma_kk_bytes(tm4, tn4);
    return kinds[tm4][tn4][vec];
}

/* whether a graph's products may be these kernels: fp32 with MPSCY_CUDA_GEMM unset on sm_80 and
 * newer (conv.cu's forward, dcol and long weight gradients; dense.cu's long-K products) */
static inline bool cu_mma_own(const cu_graph *gr) {
    return gr->gemm_mode == 2 && gr->plan.precision != MPSCY_PRECISION_TF32 && gr->dev->prop.major >= 8;
}

/* a kernel of mma.cuh's with its dynamic shared memory (over the 48 KB default: opted in) */
template <typename... K, typename... A>
static cudaError_t mma_launch(const cu_graph *gr, cudaStream_t s, void (*k)(K...), dim3 grid, int bytes, A... args) {
    cudaError_t e = cu_smem_optin((const void *)k, bytes);
    return e != cudaSuccess ? e : cu_launch_shm(gr, k, grid, 256, (size_t)bytes, s, args...);
}

#endif /* MPSCY_CUDA_MMA_CUH */
