/* conv_dw.cu — a convolution's weight gradient dW = dz col^T in the own fp32 path (sm_80 and
 * newer, mma.cuh's 3xTF32 products), and the ordered sums of split partials that it, the bias
 * gradient and dense.cu's long-K forward share. The long K = b*OHW is split over the GPU into
 * partials added afterwards in a fixed order; B (the columns, K-contiguous) is read either from
 * im2col's columns or, for a convolution whose forward reads x itself (conv.cu decides:
 * conv_dw_form), from x, so that no columns exist. */
#include <algorithm>

#include "cuda.h"
#include "mma.cuh"

typedef mpscy_conv_geom conv_geom;

/* out (count) = the sum of `splits` partials part (splits, count): the weight gradient's split-K
 * partials, and the bias gradient's chunk sums; with a Dense forward's epilogue (dense.cu's product)
 * + bias[e % n] when bias, then the ReLU when relu. Outputs from `split` on go to out2 (a weight
 * gradient and its bias gradient, summed together: conv_dw_small). A block of W warps (W = blockDim.x / 32, at
 * most 32) takes 32 outputs: warp w adds splits w, w + W, ... (coalesced across the warp), then
 * one warp adds the W sums in order, so the result is the same bits on every run (at one W). */
static __global__ void conv_sum_parts(float *out, const float *part, int64_t count, int64_t splits,
                                      const float *bias, int64_t n, int relu, float *out2, int64_t split) {
    __shared__ float sums[32][33];
    cu_pdl_enter();
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, W = blockDim.x >> 5;
    for (int64_t e0 = (int64_t)blockIdx.x * 32; e0 < count; e0 += (int64_t)gridDim.x * 32) {
        const int64_t e = e0 + lane;
        float v = 0.0f;
        if (e < count)
#pragma unroll 4
            for (int64_t s = w; s < splits; s += W) v += __ldg(&part[s * count + e]);
        sums[w][lane] = v;
        __syncthreads();
        if (w == 0 && e < count) {
            float t = sums[0][lane];
            for (int k = 1; k < W; k++) t += sums[k][lane];
            if (bias) t += bias[e % n];
            (e < split ? out + e : out2 + (e - split))[0] = relu && mpscy_relu_zeroes(t) ? 0.0f : t;
        }
        __syncthreads();
    }
}

/* conv_sum_parts over count outputs on stream s, blocks of 32 warps where 8 would each add more
 * than 8 partials: more than gr->sum_wide splits (default 64; the README CNN's first convolution's
 * weight gradient, 256 partials of 864: 11.0 us in the timeline as 8 warps, 4.2 as 32, and its step
 * with the 100% carveout 263.7 us against 272.7, A/B on the H200) */
cudaError_t cu_sum_parts(const cu_graph *gr, cudaStream_t s, float *out, const float *part, int64_t count,
                         int64_t splits, const float *bias, int64_t n, int relu, float *out2, int64_t split) {
    const unsigned threads = gr->sum_wide > 0 && splits > gr->sum_wide ? 1024 : CU_THREADS;
    return cu_launch(gr, conv_sum_parts, cu_blocks(count, 32, 4096), threads, s, out, part, count, splits, bias, n,
                     relu, out2, out2 ? split : count);
}

#define DW_MIN_CHUNK 128  /* K per block of the split product, at least */

/* chunks of K for the split product: one wave of two blocks per multiprocessor, each chunk at least
 * DW_MIN_CHUNK (one block a multiprocessor: the README CNN's step 308.9 us against 281.0 on the
 * H200, A/B) */
static int64_t dw_most(int64_t tiles, int64_t nb, int sms) {
    int64_t s = 2 * (int64_t)sms / tiles, most = (nb + DW_MIN_CHUNK - 1) / DW_MIN_CHUNK;
    if (s > most) s = most;
    return s < 1 ? 1 : s;
}

/* dw_most's count, as chunks of MMA_BK steps (no more than dw_most at any nb: the partials' room) */
static int64_t dw_splits(int64_t tiles, int64_t nb, int sms, int64_t *chunk) {
    int64_t steps;
    const int64_t s = cu_split_units((nb + MMA_BK - 1) / MMA_BK, dw_most(tiles, nb, sms), &steps);
    *chunk = steps * MMA_BK;  /* ceil(nb / (s MMA_BK)) steps: nb / s rounded up to whole steps */
    return s;
}

/* conv_dw_own's tiles of a group's (OCg, Kg): 64 or 32 rows and columns */
static int64_t dw_tiles(const conv_geom &g) {
    const int tm = g.ocg > 32 ? 4 : 2, tn = g.kg > 32 ? 4 : 2;
    return ((g.ocg + 16 * tm - 1) / (16 * tm)) * ((g.kg + 16 * tn - 1) / (16 * tn));
}

int64_t cu_conv_dw_own_most(const cu_graph *gr, const mpscy_conv_geom *cg, int64_t nb) {
    return dw_most(dw_tiles(*cg), nb, gr->dev->sms);
}

/* The weight gradient's B operand read from x itself instead of im2col's columns (the forward
 * of a convolution whose forward reads x, conv_direct or the implicit product, then builds no
 * columns): element (n, j) is col[n, j] of im2col.cu, n = (c, ki, kj) over the group's
 * channels, j = (s, oh, ow), zero in the padding. Each 32-K step of a 16 TN-row tile is copied
 * by a warp a row, a lane a j (as mma_load's 4-byte K-contiguous form), so a warp reads one row
 * of x's window: consecutive (or strided) floats, the taps of a channel hitting L1 in turn. The
 * tiles hold the same floats as the columns' would, in the same order: the same bits. Index
 * arithmetic in 32 bits (larger convolutions run over sub-batches: cu_conv_split). */
struct dw_src {
    const float *x;                    /* (b, C, H, W) at the group's first channel */
    unsigned hw, h, w, ohw, ow, sxs, khw, kw;  /* sxs: floats a sample (C H W) */
    int sh, sw, ph, pw, dh, dw;
};

/* column n = (c, ki, kj) of the columns, one of N: its tap's offsets from a window's origin (dih,
 * diw) and its element's from the origin's (off); past N a row offset no window reaches (its
 * elements are zero-filled) */
static __device__ __forceinline__ void dw_tap(const dw_src &xs, unsigned n, int N, int &dih, int &diw, int &off) {
    const unsigned c = n / xs.khw, t = n - c * xs.khw, ki = t / xs.kw;
    const bool in = (int)n < N;
    dih = in ? (int)ki * xs.dh - xs.ph : -(1 << 30);
    diw = (int)(t - ki * xs.kw) * xs.dw - xs.pw;
    off = in ? (int)(c * xs.hw) + dih * (int)xs.w + diw : 0;
}

template <int TM, int TN, bool VA>
__global__ void __launch_bounds__(256, 2) conv_dw_gather(float *__restrict__ out, int64_t ldo, int64_t zstride,
                                                         const float *__restrict__ a, int64_t lda, dw_src xs, int M,
                                                         int N, int64_t K, int64_t chunk) {
    extern __shared__ __align__(16) float mma_smem[];
    constexpr int BN = 16 * TN, Q = BN / 8;
    cu_pdl_enter();
    const int m0 = blockIdx.y * 16 * TM, n0 = blockIdx.x * BN, lane = threadIdx.x & 31, r0 = threadIdx.x >> 5;
    const int64_t k0 = (int64_t)blockIdx.z * chunk, k1 = min(K, k0 + chunk);
    /* this thread's rows r0 + 8q: the tap's offsets from the window's origin, and its element's
     * offset from the origin's (rows past N get an offset no window reaches: zero-filled) */
    int dih[Q], diw[Q], off[Q];
#pragma unroll
    for (int q = 0; q < Q; q++) dw_tap(xs, (unsigned)(n0 + r0 + 8 * q), N, dih[q], diw[q], off[q]);
    /* this lane's column j = kb + lane as (s, oh, ow), moved on by MMA_BK a step (load_b's steps
     * come in order) without a division */
    unsigned j = (unsigned)(k0 + lane), s = j / xs.ohw, oh = (j - s * xs.ohw) / xs.ow;
    unsigned ow = j - s * xs.ohw - oh * xs.ow, oh_n = xs.ohw / xs.ow;
    const float *__restrict__ x = xs.x;
    auto load_b = [&](float *tile, int64_t kb) {
        const bool kin = kb + lane < k1;
        const int ih0 = (int)(oh * xs.sh), iw0 = (int)(ow * xs.sw);
        /* the window origin's index (unsigned: past the batch, in a step's last lanes, it may wrap;
         * such a lane copies nothing, and an element that is copied lies in x) */
        const unsigned pix = s * xs.sxs + (unsigned)ih0 * xs.w + (unsigned)iw0;
#pragma unroll
        for (int q = 0; q < Q; q++) {
            const bool ok = kin && (unsigned)(ih0 + dih[q]) < xs.h && (unsigned)(iw0 + diw[q]) < xs.w;
            cp_async4(tile + mma_tile<true, BN>::at(r0 + 8 * q, lane), ok ? x + (pix + (unsigned)off[q]) : x, ok);
        }
        for (ow += MMA_BK; ow >= xs.ow;) {
            ow -= xs.ow;
            if (++oh == oh_n) {
                oh = 0;
                s++;
            }
        }
    };
    float acc[TM * TN];
    mma_product_by<TM, TN, true, true, VA>(acc, mma_smem, a, lda, m0, M, load_b, k0, k1);
    mma_store<TM, TN>(acc, out + blockIdx.z * zstride, ldo, m0, M, n0, N);
}

typedef void (*dw_gather_fn)(float *, int64_t, int64_t, const float *, int64_t, dw_src, int, int, int64_t,
                             int64_t);

static dw_gather_fn dw_gather_kind(bool tm4, bool tn4, bool va, int *bytes) {
    static const dw_gather_fn kinds[2][2][2] = {
        {{conv_dw_gather<2, 2, false>, conv_dw_gather<2, 2, true>},
         {conv_dw_gather<2, 4, false>, conv_dw_gather<2, 4, true>}},
        {{conv_dw_gather<4, 2, false>, conv_dw_gather<4, 2, true>},
         {conv_dw_gather<4, 4, false>, conv_dw_gather<4, 4, true>}}};
    *bytes = mma_kk_bytes(tm4, tn4);
    return kinds[tm4][tn4][va];
}

/* x's view for conv_dw_gather */
static dw_src dw_src_of(const conv_geom &g, const float *x) {
    dw_src v;
    v.x = x;
    v.hw = (unsigned)(g.h * g.w); v.h = (unsigned)g.h; v.w = (unsigned)g.w;
    v.ohw = (unsigned)g.ohw; v.ow = (unsigned)g.ow; v.sxs = (unsigned)(g.c * g.h * g.w);
    v.khw = (unsigned)(g.kh * g.kw); v.kw = (unsigned)g.kw;
    v.sh = (int)g.sh; v.sw = (int)g.sw; v.ph = (int)g.ph; v.pw = (int)g.pw; v.dh = (int)g.dh; v.dw = (int)g.dw;
    return v;
}

int64_t cu_conv_dw_parts(int64_t nb) { return (nb + DW_MIN_CHUNK - 1) / DW_MIN_CHUNK; }

int cu_conv_dw_own(cu_graph *gr, cudaStream_t stream, const mpscy_conv_geom *cg, int64_t nb, float *c, const float *dzt,
                   const float *col, const float *x, float *part, char *err, size_t en) {
    /* K = b*OHW is long (fp32): chunks of it (any batch) into partials, then one ordered sum */
    const conv_geom &g = *cg;
    const int tm = g.ocg > 32 ? 4 : 2, tn = g.kg > 32 ? 4 : 2;
    const int64_t gm = (g.ocg + 16 * tm - 1) / (16 * tm), gn = (g.kg + 16 * tn - 1) / (16 * tn);
    int64_t chunk, s = dw_splits(dw_tiles(g), nb, gr->dev->sms, &chunk), kgo = g.kg * g.ocg;
    float *out = s > 1 ? part : c;
    int bytes;
    dim3 grid((unsigned)gn, (unsigned)gm, (unsigned)s);
    if (x) {
        dw_gather_fn k = dw_gather_kind(tm == 4, tn == 4, nb % 4 == 0 && cu_aligned16(dzt), &bytes);
        CU_TRY(mma_launch(gr, stream, k, grid, bytes, out, g.kg, kgo, dzt, nb, dw_src_of(g, x), (int)g.ocg, (int)g.kg,
                          nb, chunk),
               "conv_dw_gather");
    } else {
        mma_fn k = mma_kk_kind(tm == 4, tn == 4, nb % 4 == 0 && cu_aligned16(col) && cu_aligned16(dzt), &bytes);
        CU_TRY(mma_launch(gr, stream, k, grid, bytes, out, g.kg, kgo, dzt, nb, col, nb, (int)g.ocg, (int)g.kg, nb,
                          chunk),
               "conv_dw");
    }
    int st = CU_LAUNCHED("conv_dw");
    if (st != MPSCY_OK || s == 1) return st;
    CU_TRY(cu_sum_parts(gr, stream, c, part, kgo, s, NULL, 1, 0), "conv_dw_reduce");
    return CU_LAUNCHED("conv_dw_reduce");
}

/* The weight and bias gradients of a convolution whose dx nobody wants (on the model's input)
 * with few taps: kg = C KH KW, plus one for the bias, at most 32, and at most 64 outputs (groups 1):
 * the split product above would first need dz as (OC, b*OHW) (conv_dz: a masked transpose of 8 MB
 * for the README CNN's first layer, and the bias's chunk sums with their own sum), then run 256
 * blocks of a 32 x 32 tile over 256 of K each (18 us, ~1% of the tensor cores' time). Here one
 * pass in fp32 FMA (at least as exact as 3xTF32) reads dy (b, OC, OHW) as it lies, masked by the
 * fused ReLU's output ry, and x: a block takes `per` positions j = (s, oh, ow) in tiles of
 * DWS_T, stages each tile's dz (DWS_T, OC) and columns (DWS_T, kg + bias) in shared memory (the
 * next tile's loads in registers meanwhile), and each thread adds a 4 x 4 tile of
 * (output, column) over a quarter (say) of the tile's positions; the bias is the column of ones.
 * Its partial (kg*OC weights, then OC biases) goes to part's row blockIdx.x, or straight to dw
 * and db for a single block, and cu_sum_parts adds the rows in order: the same bits every run.
 * Index arithmetic in 32 bits (larger convolutions run over sub-batches: cu_conv_split). */
#define DWS_T 64          /* positions a tile */
#define DWS_THREADS 256   /* a block: 4 staging threads a position */
#define DWS_LO 68         /* the most floats a staged row of dz (16 groups of 4, + 4) */
#define DWS_LN 36         /* and of the columns (8 groups of 4, + 4) */

struct dws_args {
    float *dw, *db, *part;     /* dw (OC, kg), db (OC) or NULL; part (gridDim.x, OC kg + OC) */
    const float *dy, *ry;      /* (b, OC, OHW); ry NULL: no mask */
    dw_src xs;
    int oc, kg, og, ng, lo, ln;  /* og, ng: groups of 4 outputs, of 4 columns; lo, ln: their rows' strides */
    unsigned nb, per;          /* positions b*OHW; positions a block, a multiple of DWS_T */
};

/* at most 80 registers, so that three blocks fit a multiprocessor beside the other streams'
 * kernels (128 without the bound; ncu on the H200: issue-bound either way, see cuda_notes.md). */
__global__ void __launch_bounds__(DWS_THREADS, 3) conv_dw_small(dws_args a) {
    __shared__ __align__(16) float sm[DWS_T * (DWS_LO + DWS_LN)];
    __shared__ int tap[32][3];  /* column n's offsets from the window's origin (dih, diw, elements) */
    cu_pdl_enter();
    float *dzs = sm, *cols = sm + DWS_T * a.lo;
    const int tid = threadIdx.x, tpg = a.og * a.ng, P = DWS_THREADS / tpg;
    /* the product's roles: position group pg, the (output, column) tile (og, ng) */
    const int pg = tid / tpg, r = tid - pg * tpg, og = r / a.ng, ng = r - og * a.ng;
    /* the staging roles: position t of the tile, groups h0 + 4k of outputs and of columns */
    const int t = tid % DWS_T, h0 = tid / DWS_T;
    const dw_src &xs = a.xs;
    const unsigned j_end = min(a.nb, (blockIdx.x + 1) * a.per);
    /* the staged columns n < 32 (a thread's are 4 (h0 + 4k) + q, h0 < 4, k < 2): a tap, none past
     * kg, and the bias's ones at n == kg */
    if (tid < 32) dw_tap(xs, (unsigned)tid, a.kg, tap[tid][0], tap[tid][1], tap[tid][2]);
    const int one = a.db ? a.kg : -1;
    __syncthreads();
    float4 zr[4], cr[2];
    auto load = [&](unsigned j0) {
        const unsigned j = j0 + (unsigned)t;
        const bool in = j < j_end;
        const unsigned s = in ? j / xs.ohw : 0, i = in ? j - s * xs.ohw : 0, oh = i / xs.ow, ow = i - oh * xs.ow;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float v[4];
            const int o4 = h0 + 4 * k;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int o = 4 * o4 + q;
                const unsigned src = ((s * (unsigned)a.oc + (unsigned)o) * xs.ohw + i);
                const bool ok = in && o4 < a.og && o < a.oc;
                v[q] = ok ? __ldg(&a.dy[src]) : 0.0f;
                if (ok && a.ry && mpscy_relu_zeroes(__ldg(&a.ry[src]))) v[q] = 0.0f;
            }
            zr[k] = make_float4(v[0], v[1], v[2], v[3]);
        }
        const int ih0 = (int)(oh * xs.sh), iw0 = (int)(ow * xs.sw);
        const unsigned pix = s * xs.sxs + (unsigned)ih0 * xs.w + (unsigned)iw0;
#pragma unroll
        for (int k = 0; k < 2; k++) {
            float v[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int n = 4 * (h0 + 4 * k) + q;
                const bool ok = in && (unsigned)(ih0 + tap[n][0]) < xs.h && (unsigned)(iw0 + tap[n][1]) < xs.w;
                v[q] = ok ? __ldg(&xs.x[pix + (unsigned)tap[n][2]]) : 0.0f;
                if (in && n == one) v[q] = 1.0f;
            }
            cr[k] = make_float4(v[0], v[1], v[2], v[3]);
        }
    };
    float acc[16];
#pragma unroll
    for (int q = 0; q < 16; q++) acc[q] = 0.0f;
    unsigned j0 = blockIdx.x * a.per;
    if (j0 < j_end) load(j0);
    for (; j0 < j_end; j0 += DWS_T) {
        __syncthreads();  /* the last tile's products are done with the staging */
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (h0 + 4 * k < a.og) *reinterpret_cast<float4 *>(&dzs[t * a.lo + 4 * (h0 + 4 * k)]) = zr[k];
#pragma unroll
        for (int k = 0; k < 2; k++)
            if (h0 + 4 * k < a.ng) *reinterpret_cast<float4 *>(&cols[t * a.ln + 4 * (h0 + 4 * k)]) = cr[k];
        __syncthreads();
        if (j0 + DWS_T < j_end) load(j0 + DWS_T);  /* in flight during the products */
        if (pg < P)
            for (int u = pg; u < DWS_T; u += P) {
                const float4 z = *reinterpret_cast<const float4 *>(&dzs[u * a.lo + 4 * og]);
                const float4 c = *reinterpret_cast<const float4 *>(&cols[u * a.ln + 4 * ng]);
                const float zv[4] = {z.x, z.y, z.z, z.w}, cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int jj = 0; jj < 4; jj++) acc[4 * i + jj] = fmaf(zv[i], cv[jj], acc[4 * i + jj]);
            }
    }
    /* the position groups' tiles added in order, then this block's partial out */
    __syncthreads();
    if (pg < P)
#pragma unroll
        for (int q = 0; q < 16; q += 4)
            *reinterpret_cast<float4 *>(&sm[(pg * tpg + r) * 16 + q]) =
                make_float4(acc[q], acc[q + 1], acc[q + 2], acc[q + 3]);
    __syncthreads();
    const int kgo = a.oc * a.kg, count = kgo + (a.db ? a.oc : 0);
    for (int e = tid; e < count; e += DWS_THREADS) {
        const int o = e < kgo ? e / a.kg : e - kgo, n = e < kgo ? e - o * a.kg : a.kg;
        const int rr = (o >> 2) * a.ng + (n >> 2), q = (o & 3) * 4 + (n & 3);
        float v = 0.0f;
        for (int p = 0; p < P; p++) v += sm[(p * tpg + rr) * 16 + q];
        if (gridDim.x > 1) a.part[(size_t)blockIdx.x * count + e] = v;
        else if (e < kgo) a.dw[e] = v;
        else a.db[o] = v;
    }
}

/* ROWS ($MPSCY_CUDA_DW_ROWS, on by default): the same gradients by whole output rows, a warp a row
 * (s, oh) at a time, with nothing staged per column element. The warp copies the row's dz
 * (OC x OW, float4 loads as dy lies, masked by ry) into shared memory as (OW, OC) and x's patch
 * under the row (C x KH input rows of PW = (OW - 1) sw + (KW - 1) dw + 1 floats, zero outside
 * x), then lane (og, ng) adds, for every position u of the row, the 4 x CPL tile of outputs
 * 4 og.. and columns ng CPL..: dz from one float4, and column n's value at u is the patch's
 * float at tap n's offset + u sw (the bias's ones and the padding's zeros are rows of the
 * block's shared memory), so a position costs a float4 and CPL loads for 4 CPL FMAs. The
 * block's 8 warps' tiles are then added in warp order into its partial, and cu_sum_parts adds
 * the blocks' in order: the same bits every run, another order of the sums than the tiles'
 * (tested against MPSCY_CUDA_DW_ROWS=0 and the cpu; bench/dw_rows_emulate.py checks the index
 * arithmetic in NumPy). The README CNN's first layer on the H200: ncu 12.6 us alone with the
 * staging's loads in rounds of DWR_ROUND (14.6-15.2 with a load then its store: long-scoreboard
 * stalls 1.75 cycles an instruction, now 0.38) against the tiles' 18.7; A/B, the whole step
 * 248.2 against 254.7 us, 247.0 against 252.3 and 250.7 against 258.2 with MPSCY_CUDA_DW_ROWS=0
 * (the step's tail: this kernel follows the stride-2 dx on the main stream). */
#define DWR_WARPS 8
#define DWR_PATCH 512            /* the most floats of x's patch under one output row */
#define DWR_SHARED (96 * 1024)   /* the most bytes of shared memory a block (two fit a multiprocessor) */
#define DWR_ROUND 8              /* loads a lane has in flight at once while staging a row */

struct dwr_args {
    float *dw, *db, *part;       /* as dws_args */
    const float *dy, *ry, *x;    /* dy, ry (b, OC, OH, OW), ry NULL: no mask; x (b, C, H, W) */
    int oc, kg, ng;              /* ng = 32 / (OC / 4): lanes a group of 4 outputs (OC / 4 divides 32) */
    int c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dwid;
    int pwid, npatch;            /* the patch's row width, its floats (C KH pwid) */
    int lo, wfl, sone;           /* dz's row stride (4 og + 4), a warp's floats, the ones' and zeros' rows */
    int rows, per;               /* b OH output rows; rows a warp */
};

struct dwr_plan {
    int cpl, pwid, npatch, lo, wfl, sone, floats;
};

/* the rows form's layout for g (cpl 0: it does not fit) */
static dwr_plan dwr_plan_of(const conv_geom &g, int bias) {
    dwr_plan q = {};
    if (g.groups != 1 || g.kg > 32 || g.oc % 4 || g.ow % 4 || 32 % (g.ow / 4) || 32 % (g.oc / 4)) return q;
    const int og = (int)g.oc / 4, ng = 32 / og, nc = (int)g.kg + bias, cpl = (nc + ng - 1) / ng;
    q.pwid = (int)((g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1);
    q.npatch = (int)g.c * (int)g.kh * q.pwid;
    q.lo = 4 * og + 4;
    q.wfl = (int)g.ow * q.lo + ((q.npatch + 3) & ~3);
    q.sone = (int)((g.ow - 1) * g.sw + 1);
    /* the patch's offsets table (an int2 a float of the patch), the ones, the zeros, the warps' rooms */
    const int room = 2 * DWR_PATCH + ((2 * q.sone + 3) & ~3) + DWR_WARPS * q.wfl,
              red = 2 * DWR_PATCH + DWR_WARPS * 32 * 4 * cpl;
    q.floats = room > red ? room : red;
    if (cpl <= 8 && q.npatch <= DWR_PATCH && q.floats * 4 <= DWR_SHARED) q.cpl = cpl;
    return q;
}

template <int CPL>
__global__ void __launch_bounds__(DWR_WARPS * 32, 2) conv_dw_rows(dwr_args a) {
    extern __shared__ float4 dwr_sm4[];
    int2 *ptab = reinterpret_cast<int2 *>(dwr_sm4);  /* (DWR_PATCH): the patch's floats' offsets in x */
    float *sm = reinterpret_cast<float *>(ptab + DWR_PATCH);
    cu_pdl_enter();
    const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
    float *dzs = sm + ((2 * a.sone + 3) & ~3) + wp * a.wfl, *pat = dzs + a.ow * a.lo;
    for (int e = threadIdx.x; e < a.sone; e += blockDim.x) {
        sm[e] = 1.0f;           /* the bias's column */
        sm[a.sone + e] = 0.0f;  /* columns past the last */
    }
    /* patch float (c, ki, pc) = row rr = c KH + ki, column pc: its offset in the sample from the
     * row's first input row (or -1 outside x's width) and that row's distance ki dh, once for every
     * row; warp wp takes the rows wp, wp + 8, ... (a division a row, none a float) */
    __shared__ int taps[32];  /* column n < kg's offset in the patch at the row's position 0 */
    for (int rr = wp; rr < a.c * a.kh; rr += DWR_WARPS) {
        const int c = rr / a.kh, ki = rr - c * a.kh;
        for (int pc = lane; pc < a.pwid; pc += 32) {
            const int iw = pc - a.pw;
            ptab[rr * a.pwid + pc] = make_int2((unsigned)iw < (unsigned)a.w ? (c * a.h + ki * a.dh) * a.w + iw : -1,
                                               ki * a.dh);
        }
    }
    if (threadIdx.x < a.kg) {
        const int khw = a.kh * a.kw, n = threadIdx.x, c = n / khw, r = n - c * khw, ki = r / a.kw, kj = r - ki * a.kw;
        taps[n] = (c * a.kh + ki) * a.pwid + kj * a.dwid;
    }
    __syncthreads();  /* the ones, the zeros, the offsets */
    const int og = lane / a.ng, ng = lane - og * a.ng;
    int off[CPL];  /* column ng CPL + k's offset from pat: a tap, the bias's ones, or a zero */
#pragma unroll
    for (int k = 0; k < CPL; k++) {
        const int n = ng * CPL + k;
        off[k] = n < a.kg ? taps[n] : (int)((n == a.kg && a.db ? sm : sm + a.sone) - pat);
    }
    float acc[4][CPL];
#pragma unroll
    for (int q = 0; q < 4; q++)
#pragma unroll
        for (int k = 0; k < CPL; k++) acc[q][k] = 0.0f;
    /* dz's copy: lane takes float4 w4 of rows o0, o0 + ostep, ... */
    const int q4 = a.ow >> 2, ostep = 32 / q4, o0 = lane / q4, w4 = lane - o0 * q4;
    const int r0 = (blockIdx.x * DWR_WARPS + wp) * a.per, r1 = min(r0 + a.per, a.rows);
    for (int row = r0; row < r1; row++) {
        const int s = row / a.oh, oh = row - s * a.oh;
        __syncwarp();  /* the last row's products are done with the staging */
        /* every load of a round in flight before the first store: DWR_ROUND float4 of dz (and of
         * the mask), DWR_ROUND floats of the patch a lane (a load then its store, an iteration
         * each, waited on one memory round trip a float4: ncu's first stall, long scoreboard) */
        const float *dy0 = a.dy + ((size_t)s * a.oc * a.oh + oh) * a.ow + 4 * w4;
        const size_t ostride = (size_t)ostep * a.oh * a.ow;
        for (int o1 = o0; o1 < a.oc; o1 += DWR_ROUND * ostep) {
            float4 v[DWR_ROUND];
#pragma unroll
            for (int j = 0; j < DWR_ROUND; j++)
                if (o1 + j * ostep < a.oc) {
                    const size_t src = (size_t)o1 * a.oh * a.ow + j * ostride;
                    v[j] = __ldg(reinterpret_cast<const float4 *>(dy0 + src));
                    if (a.ry) v[j] = relu_pass4(__ldg(reinterpret_cast<const float4 *>(a.ry + (dy0 - a.dy) + src)), v[j]);
                }
#pragma unroll
            for (int j = 0; j < DWR_ROUND; j++)
                if (o1 + j * ostep < a.oc) {
                    float *d = dzs + 4 * w4 * a.lo + o1 + j * ostep;
                    d[0] = v[j].x;
                    d[a.lo] = v[j].y;
                    d[2 * a.lo] = v[j].z;
                    d[3 * a.lo] = v[j].w;
                }
        }
        const int ih0 = oh * a.sh - a.ph;
        const float *xs = a.x + (size_t)s * a.c * a.h * a.w + ih0 * a.w;
        for (int e1 = lane; e1 < a.npatch; e1 += 32 * DWR_ROUND) {
            float v[DWR_ROUND];
#pragma unroll
            for (int j = 0; j < DWR_ROUND; j++) {
                const int e = e1 + 32 * j;
                v[j] = 0.0f;
                if (e < a.npatch) {
                    const int2 t = ptab[e];
                    if (t.x >= 0 && (unsigned)(ih0 + t.y) < (unsigned)a.h) v[j] = __ldg(&xs[t.x]);
                }
            }
#pragma unroll
            for (int j = 0; j < DWR_ROUND; j++)
                if (e1 + 32 * j < a.npatch) pat[e1 + 32 * j] = v[j];
        }
        __syncwarp();
#pragma unroll 4
        for (int u = 0; u < a.ow; u++) {
            const float4 z = *reinterpret_cast<const float4 *>(&dzs[u * a.lo + 4 * og]);
            const int us = u * a.sw;
            float cv[CPL];
#pragma unroll
            for (int k = 0; k < CPL; k++) cv[k] = pat[off[k] + us];
#pragma unroll
            for (int k = 0; k < CPL; k++) {
                acc[0][k] = fmaf(z.x, cv[k], acc[0][k]);
                acc[1][k] = fmaf(z.y, cv[k], acc[1][k]);
                acc[2][k] = fmaf(z.z, cv[k], acc[2][k]);
                acc[3][k] = fmaf(z.w, cv[k], acc[3][k]);
            }
        }
    }
    __syncthreads();  /* every warp is done with its staging: the room takes the warps' tiles */
#pragma unroll
    for (int q = 0; q < 4; q++)
#pragma unroll
        for (int k = 0; k < CPL; k++) sm[(wp * 32 + lane) * (4 * CPL) + q * CPL + k] = acc[q][k];
    __syncthreads();
    /* output o's column n (n == kg: its bias): warp wp takes the outputs wp, wp + 8, ... */
    const int kgo = a.oc * a.kg, count = kgo + (a.db ? a.oc : 0), nc = a.kg + (a.db ? 1 : 0);
    for (int o = wp; o < a.oc; o += DWR_WARPS)
        for (int n = lane; n < nc; n += 32) {
            const int ln = (o >> 2) * a.ng + n / CPL, slot = (o & 3) * CPL + n % CPL;
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < DWR_WARPS; w++) v += sm[(w * 32 + ln) * (4 * CPL) + slot];
            const int e = n < a.kg ? o * a.kg + n : kgo + o;
            if (gridDim.x > 1) a.part[(size_t)blockIdx.x * count + e] = v;
            else if (n < a.kg) a.dw[e] = v;
            else a.db[o] = v;
        }
}

typedef void (*dwr_fn)(dwr_args);

int cu_conv_dw_rows_fits(const cu_graph *gr, const mpscy_conv_geom *g, int bias) {
    return gr->dw_rows && dwr_plan_of(*g, bias).cpl > 0;
}

int cu_conv_dw_small_fits(const mpscy_conv_geom *g, int bias) {
    return g->groups == 1 && g->oc <= 64 && g->kg + (bias ? 1 : 0) <= 32;
}

/* conv_dw_small's blocks for `units` of work (tiles of positions, or output rows) in shares of
 * `granule` (a block's warps for the rows): gr->dw_small blocks a multiprocessor, no more than fit
 * the partials' room (the split product's, sized at the built batch) nor than the work needs;
 * *per: units a block's granule takes */
static int64_t dw_small_blocks(const cu_graph *gr, int64_t units, int64_t granule, int64_t room, int64_t *per) {
    const int64_t s = std::min({(int64_t)gr->dw_small * gr->dev->sms, (units + granule - 1) / granule,
                                room > 1 ? room : (int64_t)1});
    *per = (units + s * granule - 1) / (s * granule);
    return (units + *per * granule - 1) / (*per * granule);
}

int cu_conv_dw_small(cu_graph *gr, cudaStream_t stream, const mpscy_conv_geom *cg, int64_t nb, int64_t part_floats,
                     float *dw, float *db, const float *dy, const float *ry, const float *x, float *part, char *err,
                     size_t en) {
    const conv_geom &g = *cg;
    const int64_t count = g.oc * g.kg + (db ? g.oc : 0), room = part_floats / count;
    const dwr_plan q = gr->dw_rows ? dwr_plan_of(g, db != NULL) : dwr_plan{};
    int64_t s, per;
    int st;
    if (q.cpl > 0 && cu_aligned16(dy) && (!ry || cu_aligned16(ry))) {
        dwr_args r;
        r.dw = dw; r.db = db; r.part = part; r.dy = dy; r.ry = ry; r.x = x;
        r.oc = (int)g.oc; r.kg = (int)g.kg; r.ng = 32 / (r.oc / 4);
        r.c = (int)g.c; r.h = (int)g.h; r.w = (int)g.w; r.oh = (int)g.oh; r.ow = (int)g.ow;
        r.kh = (int)g.kh; r.kw = (int)g.kw; r.sh = (int)g.sh; r.sw = (int)g.sw; r.ph = (int)g.ph; r.pw = (int)g.pw;
        r.dh = (int)g.dh; r.dwid = (int)g.dw;
        r.pwid = q.pwid; r.npatch = q.npatch; r.lo = q.lo; r.wfl = q.wfl; r.sone = q.sone;
        r.rows = (int)(nb / g.ohw * g.oh);
        s = dw_small_blocks(gr, r.rows, DWR_WARPS, room, &per);
        r.per = (int)per;
        static const dwr_fn kinds[8] = {conv_dw_rows<1>, conv_dw_rows<2>, conv_dw_rows<3>, conv_dw_rows<4>,
                                        conv_dw_rows<5>, conv_dw_rows<6>, conv_dw_rows<7>, conv_dw_rows<8>};
        static_assert(DWR_WARPS * 32 == 256, "mma_launch's blocks");  /* it opts in past 48 KB of shared memory */
        CU_TRY(mma_launch(gr, stream, kinds[q.cpl - 1], dim3((unsigned)s), q.floats * (int)sizeof(float), r),
               "conv_dw_rows");
        st = CU_LAUNCHED("conv_dw_rows");
    } else {
        dws_args a;
        a.dw = dw; a.db = db; a.part = part; a.dy = dy; a.ry = ry; a.xs = dw_src_of(g, x);
        a.oc = (int)g.oc; a.kg = (int)g.kg;
        a.og = (a.oc + 3) / 4; a.ng = (a.kg + (db ? 1 : 0) + 3) / 4;
        a.lo = 4 * a.og + (a.og % 2 ? 0 : 4); a.ln = 4 * a.ng + (a.ng % 2 ? 0 : 4);  /* 4 mod 8: no bank conflicts */
        a.nb = (unsigned)nb;
        s = dw_small_blocks(gr, (nb + DWS_T - 1) / DWS_T, 1, room, &per);
        a.per = (unsigned)(per * DWS_T);
        CU_TRY(cu_launch(gr, conv_dw_small, (unsigned)s, DWS_THREADS, stream, a), "conv_dw_small");
        st = CU_LAUNCHED("conv_dw_small");
    }
    if (st != MPSCY_OK || s == 1) return st;
    CU_TRY(cu_sum_parts(gr, stream, dw, part, count, s, NULL, 1, 0, db, g.oc * g.kg), "conv_dw_small_reduce");
    return CU_LAUNCHED("conv_dw_small_reduce");
}
