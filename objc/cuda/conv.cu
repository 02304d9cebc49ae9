/* conv.cu — Conv2D on CUDA (NCHW, weight (OC, C / groups, KH, KW) as in PyTorch) as im2col +
 * GEMM: the columns (K, b*OHW), K = C*KH*KW rows ordered (c, ki, kj), are built once per step
 * and kept for backward (one buffer per convolution). In fp32 on sm_80 and newer (MPSCY_CUDA_GEMM
 * unset) the products are mpscy's own 3xTF32 tensor-core kernels (mma.cuh): the forward product
 * writes NCHW with the bias and, when a ReLU is the only consumer, the ReLU; backward gathers dz
 * (masked by that ReLU) to (OC, b*OHW) with chunk sums for the bias gradient, then dW = dz col^T
 * (the long K = b*OHW split over the GPU, partials added in a fixed order) and dcol = W^T dz, and
 * col2im gathers dx (no atomics: sums are deterministic; both in im2col.cu), except for a 3x3,
 * stride-2, pad-1 convolution of even H and W, whose dx is one product per parity class of its
 * positions written straight to NCHW (conv_s2.cu, no dcol; W re-laid for it by the training
 * forward on the side stream, dz's shifted copies written by the gather when it moves float4s
 * of whole rows). tf32, older GPUs and the forced GEMM modes run every product as the
 * small-GEMM kernel or cuBLASLt by size, as Dense's, with the (OC, b*OHW) result scattered to
 * NCHW by conv_out_kernel. With groups 1 and K <= 32 (a network's first convolutions) the forward
 * is instead conv_direct.cu's fp32 kernel in every precision and mode, and the columns are built
 * only by a training step, on the side stream; where the weight gradient is the own long product
 * it reads x itself instead (conv_dw.cu), as does that of a convolution whose forward is the
 * implicit product (conv_implicit.cu), and no columns are built or held at all. The weight
 * gradient's own split product and the ordered sums of split partials are conv_dw.cu's. A
 * convolution too large for 32-bit indices runs over sub-batches instead (conv_split.cu). */
#include <algorithm>

#include "cuda.h"
#include "blas.h"
#include "reduce.h"
#include "mma.cuh"

typedef mpscy_conv_geom conv_geom;

static conv_geom geom(const mpscy_plan *p, const mpscy_node *n) { return mpscy_conv_geometry(p, n); }

/* The own products (sm_80 and newer, fp32): 3xTF32 on tensor cores in mma.cuh's pipeline:
 * mma.cuh's conv_mma_kernel for the weight gradient dW = dz col^T (both operands K-contiguous over
 * the long K = b*OHW, split over the GPU with the partials added afterwards in a fixed order) and
 * dcol = W^T dz (K = OC / groups, both operands row-contiguous); conv_fwd_kernel below for the
 * forward. */
/* The forward product with the output scattered straight to NCHW: y[s, o0 + m, pix] =
 * relu(sum_t W[m, t] col[t, n] + bias[o0 + m]) for n = s*OHW + pix, W (M, K) row-major (ld K),
 * col (K, nb) row-major; a (16 TM) x 64 tile per block over the whole K (a convolution's K is at
 * most a few thousand). The epilogue replaces the separate scatter (conv_out_kernel) that
 * cuBLASLt's (OC, nb) result needs. VA: W rows 16-byte aligned (K % 4 == 0); VB: col rows too
 * (nb % 4 == 0); VY: OHW even and y aligned, so a thread's column pairs are one float2.
 * With part (a grid too small for the GPU), block z takes K chunk z and writes part[z] (M, nb)
 * instead, for conv_fwd_sum. */
template <int TM, bool VA, bool VB, bool VY>
__global__ void __launch_bounds__(256, 2) conv_fwd_kernel(float *__restrict__ y, float *__restrict__ part,
                                                          const float *__restrict__ w, const float *__restrict__ col,
                                                          const float *__restrict__ bias, int M, int K, int nb, int ohw,
                                                          int oc, int o0, int relu, int chunk) {
    extern __shared__ __align__(16) float mma_smem[];
    cu_pdl_enter();
    const int m0 = blockIdx.y * 16 * TM, n0 = blockIdx.x * 64, k0 = blockIdx.z * chunk;
    float acc[TM * 4];
    mma_product<TM, 4, true, false, VA, VB>(acc, mma_smem, w, K, m0, M, col, nb, n0, nb, k0, min(K, k0 + chunk));
#pragma unroll
    for (int e = 0; e < TM * 4; e += 2) { /* (e, e + 1): columns n, n + 1 of row m, n even */
        int r, c;
        mma_pos<TM, 4>(e, r, c);
        const int m = m0 + r, n = n0 + c;
        if (m >= M || n >= nb) continue;
        if (part) {
            float *p = &part[((size_t)blockIdx.z * M + m) * nb + n];
            p[0] = acc[e];
            if (n + 1 < nb) p[1] = acc[e + 1];
            continue;
        }
        const float bo = bias ? bias[o0 + m] : 0.0f;
        float v0 = acc[e] + bo, v1 = acc[e + 1] + bo;
        if (relu) {
            v0 = mpscy_relu(v0);
            v1 = mpscy_relu(v1);
        }
        const int s = n / ohw, pix = n - s * ohw;
        float *yo = &y[((size_t)s * oc + o0 + m) * ohw + pix];
        if (VY) { /* OHW even: n + 1 is in range and in the same plane */
            *reinterpret_cast<float2 *>(yo) = make_float2(v0, v1);
        } else {
            *yo = v0;
            if (n + 1 < nb) {
                const int s1 = (n + 1) / ohw, pix1 = n + 1 - s1 * ohw;
                y[((size_t)s1 * oc + o0 + m) * ohw + pix1] = v1;
            }
        }
    }
}

typedef void (*fwd_fn)(float *, float *, const float *, const float *, const float *, int, int, int, int, int, int, int,
                       int);

/* y (b, OC, OHW) from conv_fwd_kernel's split partials part (splits, M, nb): their sum in order,
 * plus the bias, through the fused ReLU (channels o0 .. o0 + M) */
__global__ void conv_fwd_sum(float *y, const float *part, const float *bias, int64_t splits, int64_t M, int64_t nb,
                             int64_t ohw, int64_t oc, int64_t o0, int relu) {
    cu_pdl_enter();
    const int64_t total = M * nb;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        float v = part[e];
        for (int64_t z = 1; z < splits; z++) v += part[z * total + e];
        const int64_t m = e / nb, n = e - m * nb, s = n / ohw, pix = n - s * ohw;
        v += bias ? bias[o0 + m] : 0.0f;
        y[(s * oc + o0 + m) * ohw + pix] = relu && mpscy_relu_zeroes(v) ? 0.0f : v;
    }
}

/* dcol's instance: M = K*KH*KW rows of tile 32 or 64, 64 columns */
static mma_fn dcol_kind(bool tm4, bool va, bool vb, int *bytes) {
    static const mma_fn kinds[2][2][2] = {
        {{conv_mma_kernel<2, 4, false, false, false, false>, conv_mma_kernel<2, 4, false, false, false, true>},
         {conv_mma_kernel<2, 4, false, false, true, false>, conv_mma_kernel<2, 4, false, false, true, true>}},
        {{conv_mma_kernel<4, 4, false, false, false, false>, conv_mma_kernel<4, 4, false, false, false, true>},
         {conv_mma_kernel<4, 4, false, false, true, false>, conv_mma_kernel<4, 4, false, false, true, true>}}};
    *bytes = tm4 ? mma_smem_bytes<4, 4, false, false>() : mma_smem_bytes<2, 4, false, false>();
    return kinds[tm4][va][vb];
}

static fwd_fn fwd_kind(bool tm4, bool va, bool vb, bool vy, int *bytes) {
    static const fwd_fn kinds[2][2][2][2] = {
        {{{conv_fwd_kernel<2, false, false, false>, conv_fwd_kernel<2, false, false, true>},
          {conv_fwd_kernel<2, false, true, false>, conv_fwd_kernel<2, false, true, true>}},
         {{conv_fwd_kernel<2, true, false, false>, conv_fwd_kernel<2, true, false, true>},
          {conv_fwd_kernel<2, true, true, false>, conv_fwd_kernel<2, true, true, true>}}},
        {{{conv_fwd_kernel<4, false, false, false>, conv_fwd_kernel<4, false, false, true>},
          {conv_fwd_kernel<4, false, true, false>, conv_fwd_kernel<4, false, true, true>}},
         {{conv_fwd_kernel<4, true, false, false>, conv_fwd_kernel<4, true, false, true>},
          {conv_fwd_kernel<4, true, true, false>, conv_fwd_kernel<4, true, true, true>}}}};
    *bytes = tm4 ? mma_smem_bytes<4, 4, true, false>() : mma_smem_bytes<2, 4, true, false>();
    return kinds[tm4][va][vb][vy];
}

/* y (b, OC, OHW) = yt (OC, b*OHW) + bias, through the fused ReLU when relu. When OHW % 4 == 0 a
 * thread moves four elements of one plane as float4 (one index division for the four): vec, given
 * when both buffers are 16-byte aligned. */
__global__ void conv_out_kernel(float *y, const float *yt, const float *bias, int64_t b, int64_t oc, int64_t ohw, int relu,
                                int vec) {
    cu_pdl_enter();
    const unsigned OHW = (unsigned)ohw, OC = (unsigned)oc, nb = (unsigned)(b * ohw), total = (unsigned)(b * oc * ohw);
    if (vec) {
        for (unsigned e = (blockIdx.x * blockDim.x + threadIdx.x) * 4; e < total; e += gridDim.x * blockDim.x * 4) {
            const unsigned plane = e / OHW, i = e - plane * OHW, s = plane / OC, o = plane - s * OC;
            float4 v = *reinterpret_cast<const float4 *>(&yt[o * nb + s * OHW + i]);
            const float bo = bias ? bias[o] : 0.0f;
            v.x += bo; v.y += bo; v.z += bo; v.w += bo;
            if (relu) v = relu4(v);
            *reinterpret_cast<float4 *>(&y[e]) = v;
        }
        return;
    }
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
        unsigned i = e % OHW, o = (e / OHW) % OC, s = e / (OHW * OC);
        float v = yt[o * nb + s * OHW + i] + (bias ? bias[o] : 0.0f);
        y[e] = relu && mpscy_relu_zeroes(v) ? 0.0f : v;
    }
}

/* dy's four elements at src, zeroed where the fused ReLU's output ry <= 0 (ry NULL: none) */
static __device__ __forceinline__ float4 dz_load4(const float *dy, const float *ry, unsigned src) {
    float4 v = *reinterpret_cast<const float4 *>(&dy[src]);
    if (ry) v = relu_pass4(*reinterpret_cast<const float4 *>(&ry[src]), v);
    return v;
}

/* dzt (OC, b*OHW) from dy (b, OC, OHW), zeroed where the fused ReLU's output ry <= 0; block
 * (x, o) takes chunk x of channel o and leaves its sum in dbp (chunks, OC) for the bias gradient.
 * vec (OHW % 4 == 0, buffers 16-byte aligned): four elements of a plane per thread as float4.
 * S2 (vec, and OW % 4 == 0 so a float4 lies in one row): dzt is copy 1 of conv_dgrad_s2's dzs
 * (4, OC, nb), and the thread also writes its float4 of copies 0, 2 and 3 from dy's masked
 * neighbours right and below (as conv_dz_shift, which it replaces; the sums count copy 1 only). */
template <bool S2>
__global__ void conv_dz_kernel(float *dzt, float *dbp, const float *dy, const float *ry, int64_t b, int64_t oc,
                               int64_t ohw, int64_t ow, int64_t chunk, int vec) {
    cu_pdl_enter();
    const unsigned OHW = (unsigned)ohw, OC = (unsigned)oc, nb = (unsigned)(b * ohw);
    const unsigned j0 = blockIdx.x * (unsigned)chunk, j1 = min(nb, j0 + (unsigned)chunk);
    /* a channel a block row; grid y is at most 65535, so more channels loop */
    for (unsigned o = blockIdx.y; o < OC; o += gridDim.y) {
        float sum = 0.0f;
        if (S2 || vec) {
            for (unsigned j = j0 + 4 * threadIdx.x; j < j1; j += 4 * blockDim.x) {
                unsigned s = j / OHW, i = j - s * OHW, src = (s * OC + o) * OHW + i;
                const float4 v = dz_load4(dy, ry, src);
                float *d = &dzt[o * nb + j];
                *reinterpret_cast<float4 *>(d) = v;
                sum += (v.x + v.y) + (v.z + v.w);
                if (S2) {  /* (q .. q + 3) of row m: right is q + 4, 0 past the row; down is row m + 1 */
                    const unsigned OW = (unsigned)ow, q = i % OW;
                    const size_t T = (size_t)OC * nb;  /* copy to copy */
                    const bool right = q + 4 < OW, down = i + OW < OHW;
                    const float rv = right ? (ry && mpscy_relu_zeroes(ry[src + 4]) ? 0.0f : dy[src + 4]) : 0.0f;
                    const float4 dv = down ? dz_load4(dy, ry, src + OW) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                    const float dr =
                        right && down ? (ry && mpscy_relu_zeroes(ry[src + OW + 4]) ? 0.0f : dy[src + OW + 4]) : 0.0f;
                    *reinterpret_cast<float4 *>(d - T) = make_float4(v.y, v.z, v.w, rv);   /* (0, 1) */
                    *reinterpret_cast<float4 *>(d + T) = dv;                               /* (1, 0) */
                    *reinterpret_cast<float4 *>(d + 2 * T) = make_float4(dv.y, dv.z, dv.w, dr);  /* (1, 1) */
                }
            }
        } else {
            for (unsigned j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
                unsigned s = j / OHW, i = j - s * OHW, src = (s * OC + o) * OHW + i;
                float v = dy[src];
                v = ry && mpscy_relu_zeroes(ry[src]) ? 0.0f : v;
                dzt[o * nb + j] = v;
                sum += v;
            }
        }
        sum = block_sum(sum);
        if (threadIdx.x == 0) dbp[blockIdx.x * OC + o] = sum;
    }
}

/* y (b, OC, OHW) from yt (OC, b*OHW), + bias, through the fused ReLU: conv_out_kernel on s,
 * moving float4s where OHW % 4 == 0 and both buffers are 16-byte aligned */
int cu_conv_out(cu_graph *gr, cudaStream_t s, const conv_geom *g, float *y, const float *yt, const float *bias,
                int64_t b, int relu, char *err, size_t en) {
    const int vec = g->ohw % 4 == 0 && cu_aligned16(y) && cu_aligned16(yt);
    CU_TRY(cu_launch(gr, conv_out_kernel, cu_blocks(b * g->oc * g->ohw / (vec ? 4 : 1), CU_THREADS, 16384), CU_THREADS,
                     s, y, yt, bias, b, g->oc, g->ohw, relu, vec),
           "conv_out");
    return CU_LAUNCHED("conv_out");
}

int cu_conv_dz_vec(const conv_geom *g, const float *dzt, const float *dy, const float *ry) {
    return g->ohw % 4 == 0 && cu_aligned16(dy) && (!ry || cu_aligned16(ry)) && cu_aligned16(dzt);
}

int cu_conv_dz(cu_graph *gr, cudaStream_t s, const conv_geom *g, float *dzt, float *dbp, const float *dy,
               const float *ry, int64_t b, int vec, int shifted, char *err, size_t en) {
    const unsigned rows = (unsigned)std::min<int64_t>(g->oc, 65535);  /* a channel a row; more loop */
    CU_TRY(cu_launch(gr, shifted ? conv_dz_kernel<true> : conv_dz_kernel<false>,
                     dim3((unsigned)cu_dz_chunks(b * g->ohw), rows), CU_THREADS, s, dzt, dbp, dy, ry, b, g->oc,
                     g->ohw, g->ow, (int64_t)CU_DZ_CHUNK, vec),
           "conv_dz");
    return CU_LAUNCHED("conv_dz");
}

#define DW_CHUNK 1024  /* K per product of the split weight gradient (cuBLASLt's, tf32) */

/* whether dx may come from conv_dgrad_s2: 3x3, stride 2, pad 1, dilation 1, groups 1, H and W
 * even, and dx wanted (the input has a gradient) */
static bool conv_s2(const mpscy_plan *p, const mpscy_node *n, const conv_geom &g) {
    return cu_conv_s2_fits(&g) && p->nodes[n->in[0]].grad;
}

/* whether dx may come from an implicit product (conv_implicit.cu): a 3x3 stride-1 convolution
 * whose input's shape fits it, and dx wanted */
static bool conv_s1(const mpscy_plan *p, const mpscy_node *n, const conv_geom &g) {
    return cu_conv_implicit_dgrad_fits(&g) && p->nodes[n->in[0]].grad;
}

/* the shared workspace (main stream only): the forward's (OC, nb) result or split partials, then
 * backward's dcol (K, nb) */
int64_t cu_conv_workspace(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    return (g.oc + g.k) * p->batch * g.ohw;
}

static bool conv_long_dw(const cu_graph *gr, int64_t nb_built) { return gr->gemm_mode == 2 && nb_built >= 4 * DW_CHUNK; }

/* the three products of a group, as the own kernel or cuBLASLt (decided by the built batch) */
enum { CONV_FWD, CONV_DW, CONV_DCOL };

/* whether product `which` runs as an own kernel of this file (not the small-GEMM kernel) */
static bool conv_mma(const cu_graph *gr, int which, int64_t nb_built) {
    return cu_mma_own(gr) && (which != CONV_DW || conv_long_dw(gr, nb_built));
}

/* A convolution's own slab (colbuf at col_off, floats at the built batch, each part a multiple
 * of 4): the columns (K, nb), kept from forward to backward (only for the form CU_DW_COLUMNS:
 * conv_dw_form); then its backward's dz (OC, nb), the weight gradient's split-K partials
 * (dw_part_floats) and the bias gradient's chunk sums. These are private so
 * that the weight and bias gradients run on the side stream while the main stream goes on with
 * dcol, col2im and the layers below, which reuse the shared workspace. A convolution that may
 * take conv_dgrad_s2 (s2: conv_s2's geometry) has room for dz's four copies dzs (4, OC, nb) at
 * dzt instead (dzt itself is copy 1, at dzs + OC*nb with the step's nb) and, last, for wc (9, OC,
 * C), written by the forward and kept for backward; one whose dx may be an implicit product (s1:
 * conv_s1's geometry) has room there for W flipped (C, OC*9). Sized by the geometry alone, so
 * tf32, the forced GEMM modes and MPSCY_CUDA_IMPLICIT=0 leave them unused. One whose gradients are
 * conv_dw_small's (CU_DW_SMALL) needs no dz and no chunk sums: only the partials. */
struct conv_slab { int64_t dzt, part, dbp, wc, total; };

/* floats of the weight gradient's split partials at the built batch, as many as its product may
 * write there and so at any smaller one: conv_dw_small's blocks where the geometry lets it take
 * them (cu_conv_dw_parts' bound, whether or not $MPSCY_CUDA_DW_SMALL does), else conv_dw_own's
 * splits (fp32) or cuBLASLt's DW_CHUNK chunks (a long K in tf32 or before sm_80); none for a
 * product that is not split */
static int64_t dw_part_floats(const cu_graph *gr, const mpscy_node *n, const conv_geom &g, int64_t nb_built) {
    const int64_t kgo = g.kg * g.ocg, most = cu_conv_dw_parts(nb_built) * kgo;
    if (!gr->dy[n->in[0]] && cu_conv_dw_small_fits(&g, mpscy_node_tensor(&gr->plan, n, MPSCY_ROLE_PARAM, 1) >= 0))
        return most;
    int64_t splits = 1;
    if (conv_mma(gr, CONV_DW, nb_built)) splits = cu_conv_dw_own_most(gr, &g, nb_built);
    else if (conv_long_dw(gr, nb_built)) splits = (nb_built + DW_CHUNK - 1) / DW_CHUNK;
    return splits > 1 ? std::min(splits * kgo, most) : 0;
}

static conv_slab slab_of(const cu_graph *gr, const mpscy_node *n, const conv_geom &g, int64_t nb_built, bool s2, bool s1,
                         int form) {
    const bool cols = form == CU_DW_COLUMNS, small = form == CU_DW_SMALL;
    conv_slab s;
    s.dzt = cols ? cu_round4(g.k * nb_built) : 0;
    s.part = s.dzt + (small ? 0 : cu_round4((s2 ? 4 : 1) * g.oc * nb_built));
    s.dbp = s.part + cu_round4(dw_part_floats(gr, n, g, nb_built));
    s.wc = s.dbp + (small ? 0 : cu_round4(cu_dz_chunks(nb_built) * g.oc));
    s.total = s.wc + (s2 || s1 ? cu_round4(9 * g.oc * g.c) : 0);
    return s;
}

/* whether a training step's dx comes from conv_dgrad_s2 (the own fp32 path), else dcol and
 * col2im: one test for the forward, which re-lays W for it, and the backward */
static bool conv_s2_dx(const cu_graph *gr, const mpscy_node *n, const conv_geom &g) {
    return gr->dy[n->in[0]] && conv_s2(&gr->plan, n, g) && conv_mma(gr, CONV_DCOL, gr->plan.batch * g.ohw);
}

/* the same for dx as an implicit product (a stride-1 convolution; W flipped by the forward) */
static bool conv_s1_dx(const cu_graph *gr, const mpscy_node *n, const conv_geom &g) {
    return gr->implicit && gr->dy[n->in[0]] && conv_s1(&gr->plan, n, g) && cu_mma_own(gr) &&
           (uintptr_t)gr->dy[n->in[0]] % 8 == 0;
}

/* whether the forward reads x itself (conv_direct, or the implicit product) rather than columns
 * it builds: one test for the forward and the backward */
static bool conv_reads_x(const cu_graph *gr, int64_t i, const conv_geom &g) {
    return cu_conv_direct_fits(&g) ||
           (gr->implicit && cu_mma_own(gr) && cu_conv_implicit_fits(&g) && (uintptr_t)gr->y[i] % 8 == 0);
}

/* how a training step's weight gradient reads its operands (cuda.h's CU_DW_*), one decision for
 * the forward, the backward and the slab: CU_DW_SMALL, conv_dw_small straight from dy and x (no dx
 * wanted: a layer on the model's input; few taps and outputs; $MPSCY_CUDA_DW_SMALL=0: never);
 * CU_DW_GATHER, the own long product reading x (a forward that reads x; $MPSCY_CUDA_DW_GATHER=0:
 * never); else CU_DW_COLUMNS, the columns the forward built and kept */
static int conv_dw_form(const cu_graph *gr, int64_t i, const conv_geom &g) {
    const mpscy_node *n = &gr->plan.nodes[i];
    if (cu_conv_split(gr, n)) return CU_DW_COLUMNS;  /* split: columns of a sub-batch at a time */
    if (gr->dw_small > 0 && !gr->dy[n->in[0]] &&
        cu_conv_dw_small_fits(&g, mpscy_node_tensor(&gr->plan, n, MPSCY_ROLE_PARAM, 1) >= 0))
        return CU_DW_SMALL;
    if (gr->dw_gather && g.groups == 1 && conv_reads_x(gr, i, g) && conv_mma(gr, CONV_DW, gr->plan.batch * g.ohw))
        return CU_DW_GATHER;
    return CU_DW_COLUMNS;
}

/* one product of a group (which); a weight gradient with x reads x itself (conv_dw.cu), not col */
static int conv_gemm(cu_graph *gr, int which, cudaStream_t stream, const conv_geom &g, int64_t nb, int64_t nb_built,
                     float *c, const float *w, const float *col, const float *dzt, float *part, char *err, size_t en,
                     const float *x = NULL) {
    /* cuBLASLt products run on the main stream or gr->side (cu_gemm_run: each has its workspace);
     * the second side stream takes only weight gradients of own kernels reading x */
    const int side = stream != gr->stream;
    int64_t M, N, K;
    if (which == CONV_FWD) { M = g.ocg; N = nb; K = g.kg; }
    else if (which == CONV_DW) { M = g.ocg; N = g.kg; K = nb; }
    else { M = g.kg; N = nb; K = g.ocg; }
    if (which == CONV_DCOL && conv_mma(gr, which, nb_built)) {
        /* dcol (kg, nb) = W^T dz: A (kg, ocg) is W read down its rows, B (nb, ocg) is dz's */
        int bytes;
        const bool tm4 = g.kg > 32, va = g.kg % 4 == 0 && cu_aligned16(w), vb = nb % 4 == 0 && cu_aligned16(dzt);
        mma_fn k = dcol_kind(tm4, va, vb, &bytes);
        dim3 grid((unsigned)((nb + 63) / 64), (unsigned)((g.kg + (tm4 ? 63 : 31)) / (tm4 ? 64 : 32)));
        CU_TRY(mma_launch(gr, stream, k, grid, bytes, c, nb, (int64_t)0, w, g.kg, dzt, nb, (int)g.kg, (int)nb, g.ocg,
                          g.ocg),
               "conv_dcol");
        return CU_LAUNCHED("conv_dcol");
    }
    /* decided at the built batch, as graph.cu planned the partials */
    int64_t Nb = which == CONV_DW ? N : nb_built, Kb = which == CONV_DW ? nb_built : K;
    if (cu_gemm_small_wanted(gr, M, Nb, Kb) && !(which == CONV_DW && conv_long_dw(gr, nb_built))) {
        cu_small_gemm q = {};
        q.c = c; q.m = M; q.n = N; q.k = K;
        if (which == CONV_FWD) {  /* yt (ocg, nb) = W (ocg, kg) col (kg, nb) */
            q.a = w; q.am = g.kg; q.ak = 1; q.b = col; q.bk = nb; q.bn = 1; q.ldc = nb;
        } else if (which == CONV_DW) {  /* dW (ocg, kg) = dzt (ocg, nb) col^T (nb, kg) */
            q.a = dzt; q.am = nb; q.ak = 1; q.b = col; q.bk = 1; q.bn = nb; q.ldc = g.kg;
        } else {  /* dcol (kg, nb) = W^T (kg, ocg) dzt (ocg, nb) */
            q.a = w; q.am = 1; q.ak = g.kg; q.b = dzt; q.bk = nb; q.bn = 1; q.ldc = nb;
        }
        return cu_gemm_small(gr, stream, &q, err, en);
    }
    /* column-major views: a row-major (r, cols) matrix is (cols x r) with ld = cols */
    cu_gemm q = {};
    q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    if (which == CONV_DW && conv_mma(gr, which, nb_built))  /* fp32: conv_dw.cu's split products */
        return cu_conv_dw_own(gr, stream, &g, nb, c, dzt, col, x, part, err, en);
    if (side && stream != gr->side)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "conv_gemm: a cuBLASLt product on the second side stream");
    if (which == CONV_DW && conv_long_dw(gr, nb_built) && nb >= 4 * DW_CHUNK) {
        /* K = b*OHW is long (tf32): equal chunks as one strided batch of products into partials (after
         * dcol in the workspace), the tail chunk as one more, then one ordered sum */
        int64_t full = nb / DW_CHUNK, tail = nb - full * DW_CHUNK, kgo = g.kg * g.ocg;
        q.transa = 1; q.m = g.kg; q.n = g.ocg; q.k = DW_CHUNK; q.a = col; q.lda = nb; q.b = dzt; q.ldb = nb;
        q.d = part; q.ldd = g.kg; q.batch = (int32_t)full; q.sa = DW_CHUNK; q.sb = DW_CHUNK; q.sd = kgo;
        int st = cu_gemm_run(gr, &q, side, err, en);
        if (st == MPSCY_OK && tail) {
            cu_gemm t = q;
            t.batch = 0; t.k = tail; t.a = col + full * DW_CHUNK; t.b = dzt + full * DW_CHUNK; t.d = part + full * kgo;
            st = cu_gemm_run(gr, &t, side, err, en);
        }
        if (st == MPSCY_OK) {
            int64_t splits = full + (tail ? 1 : 0);
            CU_TRY(cu_sum_parts(gr, stream, c, part, kgo, splits, NULL, 1, 0), "conv_dw_reduce");
            return CU_LAUNCHED("conv_dw_reduce");
        }
        if (st != MPSCY_UNSUPPORTED) return st;
        q = cu_gemm{};  /* no batched algorithm: one long product below */
        q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    }
    if (which == CONV_FWD) {  /* D (nb x ocg) = col (nb x kg) . W (kg x ocg) */
        q.m = nb; q.n = g.ocg; q.k = g.kg; q.a = col; q.lda = nb; q.b = w; q.ldb = g.kg; q.ldd = nb;
    } else if (which == CONV_DW) {  /* D (kg x ocg) = col^T (kg x nb) . dzt (nb x ocg) */
        q.transa = 1; q.m = g.kg; q.n = g.ocg; q.k = nb; q.a = col; q.lda = nb; q.b = dzt; q.ldb = nb; q.ldd = g.kg;
    } else {  /* D (nb x kg) = dzt (nb x ocg) . W^T (ocg x kg) */
        q.transb = 1; q.m = nb; q.n = g.kg; q.k = g.ocg; q.a = dzt; q.lda = nb; q.b = w; q.ldb = g.kg; q.ldd = nb;
    }
    q.d = c;
    return cu_gemm_run(gr, &q, side, err, en);
}

int cu_conv_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    const mpscy_plan *p = &gr->plan;
    int64_t i = cu_node_index(gr, n);
    conv_geom g = geom(p, n);
    const int64_t split = cu_conv_split(gr, n);
    if (split > 0) return cu_conv_split_forward(gr, n, b, split, err, en);
    int64_t nb = b * g.ohw;
    float *col = gr->colbuf + gr->col_off[i];                 // (K, nb)
    float *yt = gr->ws;                                        // (OC, nb)
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);    // (OC, kg)
    const float *bias = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1); // (OC) or NULL
    const float *x = gr->y[n->in[0]];                          // (b, C, H, W)
    int relu = (gr->fuse[i] & CU_FUSE_RELU) != 0;
    const bool s2 = train && conv_s2_dx(gr, n, g), s1 = train && conv_s1_dx(gr, n, g);
    const int form = conv_dw_form(gr, i, g);
    if (s2 || s1) {
        /* W re-laid for the backward's dx on the side stream, off the critical path, then
         * gr->wready recorded; the backward waits on it. In a capture (and eagerly, for a partial
         * batch) a wait refers to the event's latest record at the time of the wait: the
         * forward's records all precede any backward work on the in-order side stream, and the
         * latest follows every earlier re-layout, so the wait covers them all without waiting
         * for the backward's side work. W is not written until the optimizer, after the join. */
        float *wc = col + slab_of(gr, n, g, p->batch * g.ohw, conv_s2(p, n, g), conv_s1(p, n, g), form).wc;
        int st = cu_fork(gr, gr->side, err, en);
        if (st == MPSCY_OK)
            st = s2 ? cu_conv_s2_weights(gr, gr->side, &g, wc, w, err, en)
                    : cu_conv_flip_weights(gr, gr->side, &g, wc, w, err, en);
        if (st != MPSCY_OK) return st;
        CU_TRY(cudaEventRecord(gr->wready, gr->side), "wc event");
    }
    /* a forward that reads x itself (direct, or implicit) builds the columns only for a training
     * step's weight gradient, on the side stream (joined after backward in step.cu), reading x,
     * which nothing writes again in the step; and none when that product reads x too
     * (conv_dw_form), or when no backward runs for this layer (a frozen one below every
     * trainable layer) */
    auto side_columns = [&]() -> int {
        if (!train || form != CU_DW_COLUMNS || !n->grad) return MPSCY_OK;
        int st = cu_fork(gr, gr->side, err, en);
        if (st == MPSCY_OK) st = cu_im2col(gr, gr->side, &g, col, x, b, err, en);
        if (st != MPSCY_OK || gr->dy[n->in[0]] || !gr->input_dw_main) return st;
        /* a layer without dx takes its weight gradient on the main stream (cu_conv_backward), which
         * waits for this record; as for wready, the latest record covers every earlier one */
        CU_TRY(cudaEventRecord(gr->colready, gr->side), "columns event");
        gr->cols_recorded = 1;
        return MPSCY_OK;
    };
    if (cu_conv_direct_fits(&g)) {
        /* any precision (fp32 FMA is at least as exact as the products) */
        int st = side_columns();
        return st != MPSCY_OK ? st : cu_conv_direct(gr, &g, gr->y[i], x, w, bias, b, relu, err, en);
    }
    if (conv_reads_x(gr, i, g)) {
        /* fp32, 3x3: the product reads x itself */
        int st = side_columns();
        if (st != MPSCY_OK) return st;
        cu_implicit q = {};
        q.y = gr->y[i]; q.x = x; q.w = w; q.bias = bias; q.part = gr->ws; q.part_floats = cu_conv_workspace(p, n);
        q.b = b; q.c = g.c; q.h = g.h; q.w_in = g.w; q.sxc = g.h * g.w; q.sxs = g.c * g.h * g.w;
        q.m = g.oc; q.oh = g.oh; q.ow = g.ow; q.ph = g.ph; q.pw = g.pw; q.stride = g.sh; q.relu = relu;
        return cu_conv_implicit(gr, gr->stream, &q, err, en);
    }
    int st = cu_im2col(gr, gr->stream, &g, col, x, b, err, en);
    if (st == MPSCY_OK && cu_mma_own(gr)) {
        /* fp32: mpscy's product writes NCHW with the bias and ReLU, no (OC, nb) buffer or scatter */
        const int tm = g.ocg > 32 ? 4 : 2;
        int bytes;
        fwd_fn k = fwd_kind(tm == 4, g.kg % 4 == 0 && cu_aligned16(w), nb % 4 == 0 && cu_aligned16(col),
                            g.ohw % 2 == 0 && (uintptr_t)gr->y[i] % 8 == 0, &bytes);
        const int64_t gn = (nb + 63) / 64, gm = (g.ocg + 16 * tm - 1) / (16 * tm), nk = (g.kg + MMA_BK - 1) / MMA_BK;
        /* a grid under two blocks per multiprocessor splits K (at least 4 steps a chunk) into
         * partials in the workspace's (OC + K, nb), summed by conv_fwd_sum */
        int64_t splits = g.groups == 1 ? std::min({2 * (int64_t)gr->dev->sms / (gm * gn), nk / 4, 1 + g.k / g.oc}) : 1;
        int64_t steps;
        splits = cu_split_units(nk, splits < 2 ? 1 : splits, &steps);
        const int64_t chunk = steps * MMA_BK;
        float *part = splits > 1 ? gr->ws : NULL;
        dim3 grid((unsigned)gn, (unsigned)gm, (unsigned)splits);
        for (int64_t gi = 0; gi < g.groups; gi++) {
            CU_TRY(mma_launch(gr, gr->stream, k, grid, bytes, gr->y[i], part, w + gi * g.ocg * g.kg,
                              (const float *)col + gi * g.kg * nb, bias, (int)g.ocg, (int)g.kg, (int)nb, (int)g.ohw,
                              (int)g.oc, (int)(gi * g.ocg), relu, (int)chunk),
                   "conv_fwd");
            st = CU_LAUNCHED("conv_fwd");
            if (st != MPSCY_OK) return st;
        }
        if (part) {
            CU_TRY(cu_launch(gr, conv_fwd_sum, cu_blocks(g.ocg * nb, CU_THREADS, 4096), CU_THREADS, gr->stream, gr->y[i],
                             (const float *)part, bias, splits, g.ocg, nb, g.ohw, g.oc, (int64_t)0, relu),
                   "conv_fwd_sum");
            return CU_LAUNCHED("conv_fwd_sum");
        }
        return MPSCY_OK;
    }
    for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++)
        st = conv_gemm(gr, CONV_FWD, gr->stream, g, nb, p->batch * g.ohw, yt + gi * g.ocg * nb, w + gi * g.ocg * g.kg,
                       col + gi * g.kg * nb, NULL, NULL, err, en);
    return st != MPSCY_OK ? st : cu_conv_out(gr, gr->stream, &g, gr->y[i], yt, bias, b, relu, err, en);
}

int cu_conv_backward(cu_graph *gr, const mpscy_node *n, int64_t b, char *err, size_t en) {
    const mpscy_plan *p = &gr->plan;
    int64_t i = cu_node_index(gr, n);
    conv_geom g = geom(p, n);
    int64_t nb = b * g.ohw, nb_built = p->batch * g.ohw;
    float *dx = gr->dy[n->in[0]];
    const bool s2 = conv_s2_dx(gr, n, g);  /* dx by conv_dgrad_s2, */
    const bool s1 = !s2 && conv_s1_dx(gr, n, g);  /* or an implicit product, else dcol and col2im */
    const int form = conv_dw_form(gr, i, g);
    const bool gather = form == CU_DW_GATHER;  /* no columns */
    /* this convolution's side stream: every other one whose weight gradient is own kernels
     * reading x (no cuBLAS, whose workspace is gr->side's; no columns, which a forward builds on
     * gr->side) takes the second side stream, so that its chain starts once its dz is there
     * instead of after the last layer's chain (the README CNN: conv2's and conv4's, beside
     * conv3's); everything below that goes beside the main stream goes there */
    cudaStream_t side = gr->side;
    if (gr->alt && gather && dx && (gr->side_turn++ & 1) == 0) side = gr->alt;
    const conv_slab sl = slab_of(gr, n, g, nb_built, conv_s2(p, n, g), conv_s1(p, n, g), form);
    float *slab = gr->colbuf + gr->col_off[i];
    const float *col = slab;                                   // (K, nb)
    float *dzs = slab + sl.dzt;                                // s2: (4, OC, nb), dz's shifted copies
    float *dzt = dzs + (s2 ? g.oc * nb : 0);                   // (OC, nb): copy 1 of dzs when s2
    float *part = slab + sl.part;                              // the weight gradient's partials
    float *dbp = slab + sl.dbp;                                // (chunks, OC)
    float *dcol = gr->ws;                                      // (K, nb), shared
    const float *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    float *dw = cu_tensor_grad(gr, n, 0), *db = cu_tensor_grad(gr, n, 1);
    /* a fused ReLU: the gradient arrives at the ReLU node, masked by its output (aliased to ours) */
    int32_t r = -1;
    if ((gr->fuse[i] & CU_FUSE_RELU) && !gr->dz_ready[i])  /* else a Dense above wrote our dz, masked */
        for (int32_t k = (int32_t)i + 1; k < p->n_nodes && r < 0; k++)
            if (p->nodes[k].kind == MPSCY_LAYER_RELU && p->nodes[k].in[0] == i) r = k;
    const float *dy = gr->dy[r >= 0 ? r : i], *ry = r >= 0 ? gr->y[r] : NULL;
    const int64_t split = cu_conv_split(gr, n);
    if (split > 0) return cu_conv_split_backward(gr, n, b, split, dy, ry, err, en);
    if (form == CU_DW_SMALL) {  /* no dx: dW and db in one pass over dy as it lies, and x */
        cudaStream_t s = gr->stream;
        if (!gr->input_dw_main) {  /* at the side stream's chain's end */
            int st = cu_fork(gr, side, err, en);
            if (st != MPSCY_OK) return st;
            s = side;
        }
        return cu_conv_dw_small(gr, s, &g, nb, dw_part_floats(gr, n, g, nb_built), dw, db, dy, ry, gr->y[n->in[0]],
                                slab + sl.part, err, en);
    }
    /* conv_dgrad_s2 writes the dz of the product below, masked by its ReLU (cu_relu_product) */
    const float *dx_mask = NULL;
    if (dx && s2 && gr->dz_direct && !n->accum[0]) {
        const int32_t k = cu_relu_product(gr, n->in[0]);
        if (k >= 0) {
            dx_mask = gr->y[n->in[0]];  /* the ReLU's output (the product's own, aliased) */
            dx = gr->dy[k];
            gr->dz_ready[k] = 1;
        }
    }
    /* with nothing to mask, the implicit dx reads dz as it lies, (b, OC, OHW), and its transpose
     * for the weight gradient runs on the side stream instead of before dx on the main one */
    const bool direct = dx && s1 && !ry && gr->dz_direct && side != gr->stream;
    const int64_t chunks = cu_dz_chunks(nb);
    const int vec = cu_conv_dz_vec(&g, dzt, dy, ry);
    const int shifted = s2 && vec && g.ow % 4 == 0;  /* dz's four copies in this one pass */
    auto dz_pass = [&](cudaStream_t s) -> int {  /* dzt (OC, nb) and the bias gradient's chunk sums */
        return cu_conv_dz(gr, s, &g, dzt, dbp, dy, ry, b, vec, shifted, err, en);
    };
    int st = direct ? MPSCY_OK : dz_pass(gr->stream);
    /* dx as one product on the main stream (s2: conv_dgrad_s2, s1: the implicit one) */
    auto dx_product = [&]() -> int {
        CU_TRY(cudaStreamWaitEvent(gr->stream, gr->wready, 0), "wc wait");  /* W re-laid (forward) */
        if (s2) return cu_conv_s2_dgrad(gr, &g, dx, dx_mask, dzs, slab + sl.wc, nb, shifted, (int)n->accum[0], err, en);
        /* dx = the stride-1 convolution of dz (OC, b*OHW, or as it lies when direct) with W
         * flipped and padding 2 - p */
        cu_implicit q = {};
        q.y = dx; q.w = slab + sl.wc;
        q.x = direct ? dy : dzt; q.sxc = direct ? g.ohw : nb; q.sxs = direct ? g.oc * g.ohw : g.ohw;
        q.b = b; q.c = g.oc; q.h = g.oh; q.w_in = g.ow;
        q.m = g.c; q.oh = g.h; q.ow = g.w; q.ph = 2 - g.ph; q.pw = 2 - g.pw; q.stride = 1;
        q.accum = (int)n->accum[0];
        return cu_conv_implicit(gr, gr->stream, &q, err, en);
    };
    /* the weight and bias gradients on the side stream (they read only this convolution's slab),
     * dx's products on the main one; a dx of one product is enqueued first (the fork's mark
     * before it, the side stream's wait after: dependencies unchanged), so that its blocks are
     * not queued behind the weight gradient's ($MPSCY_CUDA_DX_FIRST=2) */
    const bool dx_first = dx && (s2 || s1) && ((gr->dx_first >= 2 && side != gr->stream) || direct);
    if (st == MPSCY_OK && dx_first) {
        if ((st = cu_fork_mark(gr, err, en)) == MPSCY_OK && (st = dx_product()) == MPSCY_OK)
            st = cu_fork_follow(gr, side, err, en);
    } else if (st == MPSCY_OK) {
        st = cu_fork(gr, side, err, en);
    }
    if (st == MPSCY_OK && direct) st = dz_pass(side);
    if (st == MPSCY_OK && db) {
        /* with no dx (a layer on the model's input) the main stream has nothing of this layer
         * left to run, and in a chain nothing at all until the join: the bias sums run there,
         * beside the weight gradient, not before it on the side stream */
        CU_TRY(cu_sum_parts(gr, dx ? side : gr->stream, db, dbp, g.oc, chunks, NULL, 1, 0), "conv_db");
        st = CU_LAUNCHED("conv_db");
    }
    /* without dx (a layer on the model's input) the main stream has nothing left to run until the
     * join: the weight gradient runs there, beside the side stream's chain of the others, after
     * the columns the side stream built in the forward (if it built them) */
    const int dw_side = dx || !gr->input_dw_main;
    if (st == MPSCY_OK && !dw_side && gr->cols_recorded)
        CU_TRY(cudaStreamWaitEvent(gr->stream, gr->colready, 0), "columns wait");
    for (int64_t gi = 0; gi < g.groups && st == MPSCY_OK; gi++) {
        st = conv_gemm(gr, CONV_DW, dw_side ? side : gr->stream, g, nb, nb_built, dw + gi * g.ocg * g.kg, NULL,
                       col + gi * g.kg * nb, dzt + gi * g.ocg * nb, part, err, en, gather ? gr->y[n->in[0]] : NULL);
        if (st == MPSCY_OK && dx && !s2 && !s1)
            st = conv_gemm(gr, CONV_DCOL, gr->stream, g, nb, nb_built, dcol + gi * g.kg * nb, w + gi * g.ocg * g.kg,
                           NULL, dzt + gi * g.ocg * nb, NULL, err, en);
    }
    if (st != MPSCY_OK || !dx || dx_first) return st;
    if (s2 || s1) return dx_product();
    return cu_col2im(gr, &g, dx, dcol, b, (int)n->accum[0], err, en);
}

/* floats of split-K partials (and counters) the own-kernel products of a convolution may take */
void cu_conv_gemm_need(const cu_graph *gr, const mpscy_node *n, int64_t *floats, int64_t *counters) {
    conv_geom g = geom(&gr->plan, n);
    int64_t nb = gr->plan.batch * g.ohw, f, c;
    int64_t shapes[3][3] = {{g.ocg, nb, g.kg}, {g.ocg, g.kg, nb}, {g.kg, nb, g.ocg}};
    *floats = *counters = 0;
    if (cu_conv_split(gr, n)) return;  /* split: cuBLASLt only */
    for (int k = 0; k < 3; k++)
        if (cu_gemm_small_wanted(gr, shapes[k][0], shapes[k][1], shapes[k][2]) &&
            !(k == 1 && conv_long_dw(gr, nb)) && !conv_mma(gr, k, nb)) {
            cu_gemm_small_need(gr->dev->sms, shapes[k][0], shapes[k][1], shapes[k][2], 0, &f, &c);
            *floats += f * g.groups;
            *counters += c * g.groups;
        }
}

int cu_conv_dw_form(const cu_graph *gr, const mpscy_node *n) {
    return conv_dw_form(gr, cu_node_index(gr, n), geom(&gr->plan, n));
}

int64_t cu_conv_columns(const cu_graph *gr, const mpscy_node *n) {
    const mpscy_plan *p = &gr->plan;
    conv_geom g = geom(p, n);
    const int64_t split = cu_conv_split(gr, n);
    if (split > 0) return cu_conv_split_columns(gr, n, split);
    return slab_of(gr, n, g, p->batch * g.ohw, conv_s2(p, n, g), conv_s1(p, n, g), cu_conv_dw_form(gr, n)).total;
}
