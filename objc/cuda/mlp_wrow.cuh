/* mlp_wrow.cuh — the one-kernel MLP step's row phase by a few warps a row (mlp.cu's warp-row
 * form, fu_args.wrow warps, 4 by default): the row layers' weights (layers 1.. of the chain) sit in
 * the block's shared memory, copied there while the kernel waits between steps, so a row's forward,
 * loss and d(input) are those warps' loads from shared memory, meeting at a named barrier of theirs
 * only. Included by mlp.cu only.
 *
 * Why: the block form (mlp_rows.cuh) spends ~1.2-1.7 us a layer on a 64 x 128 product with 16
 * warps reading the weights from L2 and meeting at block barriers (the forty-ninth session's
 * cycle counts). Here a group of G lanes owns an output: the forward reads w[j, k..k+3] as float4
 * (every G-th chunk of k a lane), the d(input) reads w[j, i..i+3] for a group's four inputs (every
 * G'-th j a lane); x and dz are broadcast from shared memory, and each row's pitch is chosen so a
 * quarter-warp's float4 loads fall on distinct banks. Each warp takes its share of the outputs (of
 * the inputs, going back): a warp alone pulls ~32 bytes a cycle from shared memory (its
 * scheduler's share), four warps on the four schedulers all 128 (bench/cuda_notes.md, fifty-first
 * session). A lane's sum runs as
 * four partial sums (float4 lanes, each in order) added pairwise, then the group's lanes by a
 * butterfly: other bits than the block form's tree of lanes, the same to a float's rounding. The
 * offsets, groups and pitches are planned on the host (wr_plan), so the chain computes none. */
#ifndef MPSCY_CUDA_MLP_WROW_CUH
#define MPSCY_CUDA_MLP_WROW_CUH

#include "mlp.cuh"
#include "mlp_rows.cuh"

/* the largest power of two <= n (n >= 1), at most cap */
static inline int wr_pow2(int n, int cap) {
    int g = 1;
    while (2 * g <= n && 2 * g <= cap) g *= 2;
    return g;
}

/* The form's layout for a->wrow warps, into a (wr_in, wr_w, wr_p, wr_g, wr_gb, wr_outs, wr_chunks, wr_logit, wr_dzn); returns its shared floats past the split's slice, or 0 where the chain does not fit it:
 * every row layer's input a multiple of 4 (float4 rows), the row's activations, the logits and two
 * dz vectors in the block's row buffers (FU_SMEM_FLOATS). */
static inline int64_t wr_plan(fu_args *a) {
    const int nw = a->wrow;
    if (a->n_layers < 2 || nw < 1) return 0;
    int64_t n = 0;
    int act = 0, widest = FU_MAX_CLASSES;
    for (int l = 1; l < a->n_layers; l++) {
        const fu_layer &L = a->L[l];
        if (L.in % 4) return 0;
        const int K4 = L.in / 4, outs = (L.out + nw - 1) / nw, chunks = (K4 + nw - 1) / nw;
        /* G lanes an output (forward), G' lanes a chunk of 4 inputs (d(input)) */
        const int g = wr_pow2(outs >= 32 ? 1 : 32 / outs, K4), gb = wr_pow2(chunks >= 32 ? 1 : 32 / chunks, L.out);
        /* the pitch in float4s: a quarter-warp (8 lanes) reads 8 distinct 16-byte bank groups in
         * the forward (8/G rows x G chunks: p = G mod 8, odd for G = 1) and, where it can, in the
         * d(input) (8/G' chunks x G' rows: p = 8/G' mod 8, odd for G' >= 8) */
        auto fwd = [&](int p) { return g >= 8 || (g == 1 ? (p & 1) : p % 8 == g); };
        auto bwd = [&](int p) { return gb == 1 || (gb >= 8 ? (p & 1) : (p * gb) % 8 == 0 && (p * gb / 8) % 2 == 1); };
        int p = -1;  /* both where it can, else the forward's (always found within 8) */
        for (int q = K4; q < K4 + 16 && p < 0; q++)
            if (fwd(q) && bwd(q)) p = q;
        for (int q = K4; q < K4 + 16 && p < 0; q++)
            if (fwd(q)) p = q;
        a->wr_in[l] = act;
        act += L.in;
        a->wr_p[l] = 4 * p;
        /* as shifts and counts: the chain computes no division by a run-time value (each was a
         * ~20-instruction dependent sequence on its warps' path: the fifty-second session's SASS) */
        a->wr_g[l] = __builtin_ctz((unsigned)g);
        a->wr_gb[l] = __builtin_ctz((unsigned)gb);
        a->wr_outs[l] = outs;
        a->wr_chunks[l] = chunks;
        a->wr_w[l] = (int)n;
        n += (int64_t)L.out * a->wr_p[l] + ((L.out + 3) & ~3);  /* the rows, then the bias (4-aligned) */
        widest = L.in > widest ? L.in : widest;
    }
    a->wr_logit = act;
    a->wr_dzn = widest;  /* a multiple of 4 */
    if (act + FU_MAX_CLASSES + 2 * (int64_t)widest > FU_SMEM_FLOATS || n > INT32_MAX) return 0;
    return n;
}

/* the row layers' weights and biases to shared memory (cp.async, every thread of a row block; the
 * caller commits, and the row phase waits for the group) */
static __device__ void wr_load(const fu_args &a, float *wsm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int l = 1; l < a.n_layers; l++) {
        const fu_layer &L = a.L[l];
        const int K = L.in, N = L.out, P = a.wr_p[l];
        float *ws = wsm + a.wr_w[l];
        /* a warp a row, 16 bytes a copy where the rows are 16-byte aligned (K is a multiple of 4) */
        const bool v4 = ((uintptr_t)L.w & 15) == 0;
        for (int j = warp; j < N; j += nw) {
            const float *src = L.w + (int64_t)j * K;
            float *dst = ws + j * P;
            if (v4)
                for (int k = 4 * lane; k < K; k += 128) cp_async16(dst + k, src + k, true);
            else
                for (int k = lane; k < K; k += 32) cp_async4(dst + k, src + k, true);
        }
        for (int j = threadIdx.x; j < N; j += blockDim.x)
            cp_async4(ws + N * P + j, L.bias ? L.bias + j : L.w, L.bias != NULL);
    }
}

/* the chain's warps meet (a named barrier of theirs; one warp: its lanes) */
static __device__ __forceinline__ void wr_sync(int nw) {
    if (nw == 1) __syncwarp();
    else asm volatile("bar.sync 1, %0;" ::"r"(32 * nw) : "memory");
}

/* Row r by the block's first a.wrow warps (warp w, every lane), its input row (layer 1's) in smem
 * already (row_input, by the block): each row layer's forward, the loss (warp 0), each d(input)
 * down to layer 0's dz; the early decision's largest |input| (of the layers past 1) and |dz| into
 * wmax[w] and wmax[FU_WARPS + w]. smem: the block's row buffers (wr_plan's activations, logits and
 * dz vectors); wsm: wr_load's weights. */
static __device__ __forceinline__ void wr_chain(const fu_args &a, float *smem, const float *wsm, int r, int lane, int w,
                                             fu_trace *T, unsigned int *wmax) {
    const int nl = a.n_layers, nw = a.wrow;
    const int label = w == 0 ? a.labels[r] : 0;  /* the loss's, loaded ahead (row_loss_step) */
    const bool clk = FU_CLOCKS && a.trace && blockIdx.x == 0 && lane == 0 && w < FU_CLK_WARPS;  /* fu_clk's points */
    float mx = 0.0f, md = 0.0f;
    float *logit = smem + a.wr_logit;
    /* the forward: this warp's outputs [jlo, jhi), G lanes each, a lane every G-th float4 of k */
    for (int l = 1; l < nl; l++) {
        const fu_layer &L = a.L[l];
        const int K4 = L.in / 4, N = L.out, P = a.wr_p[l], gs = a.wr_g[l], G = 1 << gs;
        const int jlo = w * a.wr_outs[l], jhi = imin(N, jlo + a.wr_outs[l]), o = lane >> gs, h = lane & (G - 1);
        const int nk = (K4 - h + G - 1) >> gs;  /* this lane's float4s of k (h < G <= K4: at least one) */
        /* the layer's fields before the sums (after a store through a generic pointer they would be
         * loaded again: it might alias the arguments in shared memory) */
        const bool has_bias = L.bias != NULL, relu = L.relu != 0;
        float *yrow = L.y + (int64_t)r * N;
        const float *wl = wsm + a.wr_w[l], *bias = wl + N * P;
        const float4 *x4 = (const float4 *)(smem + a.wr_in[l]);
        float *out = l + 1 < nl ? smem + a.wr_in[l + 1] : logit;
        const int ck = 4 * (l - 1);
        fu_clk(a, clk, w, ck);
        for (int j0 = jlo; j0 < jhi; j0 += 32 >> gs) {  /* uniform over the warp: the shuffles below */
            const int j = j0 + o;
            const float4 *wr = (const float4 *)(wl + (j < jhi ? j : jlo) * P);
            float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
            for (int t = 0; t < nk; t++) {  /* k4 = h, h + G, ... in order */
                const int k4 = h + (t << gs);
                const float4 x = x4[k4], p = wr[k4];
                s.x = fmaf(x.x, p.x, s.x);
                s.y = fmaf(x.y, p.y, s.y);
                s.z = fmaf(x.z, p.z, s.z);
                s.w = fmaf(x.w, p.w, s.w);
            }
            float v = (s.x + s.y) + (s.z + s.w);
            fu_clk(a, clk && j0 == jlo, w, ck + 1);
#pragma unroll
            for (int m = 1; m < 32; m *= 2)  /* the rounds m < G, unrolled (a predicate a round, no loop) */
                if (m < G) v += __shfl_xor_sync(0xffffffffu, v, m);
            if (j < jhi && h == 0) {
                v += has_bias ? bias[j] : 0.0f;
                if (relu) v = mpscy_relu(v);
                if (l + 1 < nl) mx = fu_amax(mx, v);  /* the next layer's input (not the logits) */
                out[j] = v;
                yrow[j] = v;
            }
        }
        fu_clk(a, clk, w, ck + 2);
        wr_sync(nw);
        fu_clk(a, clk, w, ck + 3);
        fu_mark(a, T);
    }
    float *cur = logit + FU_MAX_CLASSES, *nxt = cur + a.wr_dzn;
    const int cl = 4 * (nl - 1);
    fu_clk(a, clk, w, cl);
    if (w == 0) md = row_loss_step(a, logit, cur, r, label, lane, T);
    fu_clk(a, clk, w, cl + 2);
    wr_sync(nw);
    fu_clk(a, clk, w, cl + 3);
    fu_mark(a, T);
    /* each d(input): this warp's chunks of 4 inputs, G' lanes each, a lane every G'-th output j */
    for (int l = nl - 1; l >= 1; l--) {
        const fu_layer &L = a.L[l], &B = a.L[l - 1];
        const int K = L.in, K4 = K / 4, N = L.out, P = a.wr_p[l], gs = a.wr_gb[l], G = 1 << gs;
        const int clo = w * a.wr_chunks[l], chi = imin(K4, clo + a.wr_chunks[l]), o = lane >> gs, g = lane & (G - 1);
        const int nj = (N - g + G - 1) >> gs;  /* this lane's outputs j (g < G <= N: at least one) */
        const bool mask = B.relu != 0;
        float *dzrow = B.dz + (int64_t)r * K;
        const float *wl = wsm + a.wr_w[l];
        const float *y = smem + a.wr_in[l];  /* layer l - 1's output: its ReLU's mask */
        const int ck = 4 * (2 * nl - 1 - l);
        fu_clk(a, clk, w, ck);
        for (int c0 = clo; c0 < chi; c0 += 32 >> gs) {
            const int c = c0 + o, i0 = 4 * (c < chi ? c : clo);
            const float *wc = wl + i0;
            float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
            for (int t = 0; t < nj; t++) {  /* j = g, g + G, ... in order */
                const int j = g + (t << gs);
                const float d = cur[j];
                const float4 wv = *(const float4 *)(wc + j * P);
                s.x = fmaf(d, wv.x, s.x);
                s.y = fmaf(d, wv.y, s.y);
                s.z = fmaf(d, wv.z, s.z);
                s.w = fmaf(d, wv.w, s.w);
            }
            fu_clk(a, clk && c0 == clo, w, ck + 1);
#pragma unroll
            for (int m = 1; m < 32; m *= 2) {
                if (m < G) {
                    s.x += __shfl_xor_sync(0xffffffffu, s.x, m);
                    s.y += __shfl_xor_sync(0xffffffffu, s.y, m);
                    s.z += __shfl_xor_sync(0xffffffffu, s.z, m);
                    s.w += __shfl_xor_sync(0xffffffffu, s.w, m);
                }
            }
            if (c < chi && g == 0) {
                const float4 ym = *(const float4 *)(y + i0);
                float v[4] = {s.x, s.y, s.z, s.w};
                const float yv[4] = {ym.x, ym.y, ym.z, ym.w};
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    if (mask && mpscy_relu_zeroes(yv[u])) v[u] = 0.0f;
                    md = fu_amax(md, v[u]);
                }
                *(float4 *)(nxt + i0) = make_float4(v[0], v[1], v[2], v[3]);
                float *dz = dzrow + i0;
                if (((uintptr_t)dz & 15) == 0) {
                    *(float4 *)dz = make_float4(v[0], v[1], v[2], v[3]);
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++) dz[u] = v[u];
                }
            }
        }
        fu_clk(a, clk, w, ck + 2);
        wr_sync(nw);
        fu_clk(a, clk, w, ck + 3);
        fu_mark(a, T);
        float *t = cur;
        cur = nxt;
        nxt = t;
    }
    if (a.early) fu_wmax_notes(wmax, w, lane, mx, md);
}

#endif /* MPSCY_CUDA_MLP_WROW_CUH */
