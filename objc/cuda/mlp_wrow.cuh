/* mlp_wrow.cuh — the one-kernel MLP step's row phase by one warp a row (mlp.cu's warp-row form,
 * fu_args.wrow): the row layers' weights (layers 1.. of the chain) sit in the block's shared
 * memory, copied there while the kernel waits between steps, so a row's forward, loss and
 * d(input) are a warp's loads from shared memory with no block barrier. Included by mlp.cu only.
 *
 * Why: the block form (mlp_rows.cuh) spends ~1.2-1.7 us a layer on a 64 x 128 product with 16
 * warps reading the weights from L2 and meeting at block barriers (the forty-ninth session's
 * cycle counts). Here each lane owns whole outputs: the forward reads w[j, k..k+3] as float4
 * (a row pitch of 4 mod 8 floats: conflict-free), the d(input) reads w[j, i..i+3] for a lane's
 * four inputs; x and dz are broadcast from shared memory. A forward sum runs as four partial sums
 * (k mod 4, each in k order, then added pairwise), a d(input) sum in j order: other bits than the
 * block form's tree of lanes, the same to a float's rounding. The offsets of every row buffer and
 * weight block are planned on the host (wr_plan), so the chain computes none. */
#ifndef MPSCY_CUDA_MLP_WROW_CUH
#define MPSCY_CUDA_MLP_WROW_CUH

#include "mlp.cuh"
#include "mlp_rows.cuh"

/* a row layer's pitch in shared memory: K rounded up to 8, plus 4 (float4 rows conflict-free) */
static inline int wr_pitch(int K) { return ((K + 7) & ~7) + 4; }

/* The form's layout, into a (wr_in, wr_w, wr_p, wr_logit, wr_dz, wr_dzn); returns its shared floats
 * past the split's slice, or 0 where the chain does not fit it: every row layer's input a multiple
 * of 4 (float4 rows), the row's activations, the logits and two dz vectors in the block's row
 * buffers (FU_SMEM_FLOATS). */
static inline int64_t wr_plan(fu_args *a) {
    if (a->n_layers < 2) return 0;
    int64_t n = 0;
    int act = 0, widest = FU_MAX_CLASSES;
    for (int l = 1; l < a->n_layers; l++) {
        const fu_layer &L = a->L[l];
        if (L.in % 4) return 0;
        a->wr_in[l] = act;
        act += L.in;
        a->wr_p[l] = wr_pitch(L.in);
        a->wr_w[l] = (int)n;
        n += (int64_t)L.out * a->wr_p[l] + ((L.out + 3) & ~3);  /* the rows, then the bias (4-aligned) */
        widest = L.in > widest ? L.in : widest;
    }
    a->wr_logit = act;
    a->wr_dz = act + ((FU_MAX_CLASSES + 3) & ~3);
    a->wr_dzn = widest;  /* a multiple of 4 */
    if (a->wr_dz + 2 * (int64_t)widest > FU_SMEM_FLOATS || n > INT32_MAX) return 0;
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

/* Row r by warp 0 (every lane), its input row (layer 1's) in smem already (row_input, by the
 * block): each row layer's forward, the loss, each d(input) down to layer 0's dz; the early
 * decision's largest |input| (of the layers past 1) and |dz| into wmax[0] and wmax[FU_WARPS].
 * smem: the block's row buffers (wr_plan's activations, logits and dz vectors); wsm: wr_load's
 * weights. */
static __device__ __noinline__ void wr_chain(const fu_args &a, float *smem, const float *wsm, int r, int lane,
                                             fu_trace *T, unsigned int *wmax) {
    const int nl = a.n_layers;
    float mx = 0.0f, md = 0.0f;
    float *logit = smem + a.wr_logit;
    /* the forward: a lane's two outputs (j0 + lane, + 32), each as four partial sums over k */
    for (int l = 1; l < nl; l++) {
        const fu_layer &L = a.L[l];
        const int K = L.in, N = L.out, P = a.wr_p[l];
        const float *wl = wsm + a.wr_w[l], *bias = wl + N * P;
        const float4 *x4 = (const float4 *)(smem + a.wr_in[l]);
        float *out = l + 1 < nl ? smem + a.wr_in[l + 1] : logit;
        for (int j0 = 0; j0 < N; j0 += 64) {
            const int ja = j0 + lane, jb = ja + 32;
            const float4 *wa = (const float4 *)(wl + (ja < N ? ja : 0) * P),
                         *wb = (const float4 *)(wl + (jb < N ? jb : 0) * P);
            float4 sa = make_float4(0.0f, 0.0f, 0.0f, 0.0f), sb = sa;
#pragma unroll 4
            for (int k4 = 0; k4 < K / 4; k4++) {
                const float4 x = x4[k4], p = wa[k4], q = wb[k4];
                sa.x = fmaf(x.x, p.x, sa.x);
                sa.y = fmaf(x.y, p.y, sa.y);
                sa.z = fmaf(x.z, p.z, sa.z);
                sa.w = fmaf(x.w, p.w, sa.w);
                sb.x = fmaf(x.x, q.x, sb.x);
                sb.y = fmaf(x.y, q.y, sb.y);
                sb.z = fmaf(x.z, q.z, sb.z);
                sb.w = fmaf(x.w, q.w, sb.w);
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int j = h ? jb : ja;
                const float4 t = h ? sb : sa;
                if (j < N) {
                    float v = ((t.x + t.y) + (t.z + t.w)) + (L.bias ? bias[j] : 0.0f);
                    if (L.relu) v = mpscy_relu(v);
                    if (l + 1 < nl) mx = fu_amax(mx, v);  /* the next layer's input (not the logits) */
                    out[j] = v;
                    L.y[(int64_t)r * N + j] = v;
                }
            }
        }
        __syncwarp();
        fu_mark(a, T);
    }
    float *cur = smem + a.wr_dz, *nxt = cur + a.wr_dzn;
    {
        const fu_layer &L = a.L[nl - 1];
        const int C = L.out, label = a.labels[r];
        int best;
        const double row = row_loss(logit, cur, C, label, a.eps, 1.0 / (double)a.b, lane, &best);
        __syncwarp();
        for (int i = lane; i < C; i += 32) {
            L.dz[(int64_t)r * C + i] = cur[i];
            md = fu_amax(md, cur[i]);
        }
        if (lane == 0) {
            a.S->loss_part[r] = row;
            a.S->correct_part[r] = best == label;
        }
        fu_mark(a, T);
    }
    /* each d(input): a lane's four inputs i0..i0 + 3, sum over the layer's outputs j in order */
    for (int l = nl - 1; l >= 1; l--) {
        const fu_layer &L = a.L[l], &B = a.L[l - 1];
        const int K = L.in, N = L.out, P = a.wr_p[l];
        const float *wl = wsm + a.wr_w[l];
        const float *y = smem + a.wr_in[l];  /* layer l - 1's output: its ReLU's mask */
        for (int i0 = 4 * lane; i0 < K; i0 += 128) {
            float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float *wc = wl + i0;
#pragma unroll 4
            for (int j = 0; j < N; j++) {
                const float d = cur[j];
                const float4 w = *(const float4 *)(wc + j * P);
                s.x = fmaf(d, w.x, s.x);
                s.y = fmaf(d, w.y, s.y);
                s.z = fmaf(d, w.z, s.z);
                s.w = fmaf(d, w.w, s.w);
            }
            const float4 ym = *(const float4 *)(y + i0);
            float v[4] = {s.x, s.y, s.z, s.w};
            const float yv[4] = {ym.x, ym.y, ym.z, ym.w};
#pragma unroll
            for (int u = 0; u < 4; u++) {
                if (B.relu && mpscy_relu_zeroes(yv[u])) v[u] = 0.0f;
                md = fu_amax(md, v[u]);
            }
            *(float4 *)(nxt + i0) = make_float4(v[0], v[1], v[2], v[3]);
            float *dz = B.dz + (int64_t)r * K + i0;
            if (((uintptr_t)dz & 15) == 0) {
                *(float4 *)dz = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int u = 0; u < 4; u++) dz[u] = v[u];
            }
        }
        __syncwarp();
        fu_mark(a, T);
        float *t = cur;
        cur = nxt;
        nxt = t;
    }
    if (a.early) {
        const unsigned int w0 = fu_amax_warp(mx), w1 = fu_amax_warp(md);
        if (lane == 0) {
            wmax[0] = max(wmax[0], w0);
            wmax[FU_WARPS] = max(wmax[FU_WARPS], w1);
        }
    }
}

#endif /* MPSCY_CUDA_MLP_WROW_CUH */
