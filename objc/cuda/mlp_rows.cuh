/* mlp_rows.cuh — the one-kernel MLP step's row phase (mlp.cu): a block per batch row takes it
 * through every layer after the first, the softmax cross-entropy and back down the chain, with
 * block barriers only. Included by mlp.cu only. */
#ifndef MPSCY_CUDA_MLP_ROWS_CUH
#define MPSCY_CUDA_MLP_ROWS_CUH

#include "mlp.cuh"
#include "reduce.h"

/* softmax cross-entropy of one row (label smoothing eps) by one warp, in double as loss.cu
 * computes it: dz = its gradient over the batch mean (p - q) / b, where the smoothed one-hot q
 * sums to 1; returns the row's loss and its predicted class in *best (all lanes). u = eps / C and
 * inv_b = 1 / b come made (fu_args: the host's division, the same bits as the device's); marks
 * between its steps with the trace in a FU_CLOCKS build (T). */
static __device__ __forceinline__ double row_loss(const fu_args &a, const float *logit, float *dz, int C, int label,
                                                  int lane, int *best, fu_trace *T) {
    const double eps = a.eps, u = a.eps_u, inv_b = a.inv_b;
    const int hn = C > 32 ? 2 : 1;  /* the halves holding classes (uniform: the benchmark's 10 need one) */
    /* C <= 64: at most two classes a lane, loaded once (-inf past C: no maximum, no NaN) */
    const float l0 = lane < C ? logit[lane] : -INFINITY, l1 = lane + 32 < C ? logit[lane + 32] : -INFINITY;
    float m = -INFINITY;
    m = l0 > m ? l0 : m;  /* a NaN is never the largest here (the argmax below sees it) */
    m = l1 > m ? l1 : m;
    m = warp_allmax(m);
    /* the first maximum, as the cpu's argmax: the first NaN when there is one (a NaN counts as
     * larger than any number, as numpy's and torch's argmax), else the first class equal to the
     * largest value (0 when every logit is -inf) */
    {
        const unsigned nlo = __ballot_sync(0xffffffffu, isnan(l0)), nhi = __ballot_sync(0xffffffffu, isnan(l1)),
                       lo = __ballot_sync(0xffffffffu, lane < C && l0 == m),
                       hi = __ballot_sync(0xffffffffu, lane + 32 < C && l1 == m);
        *best = nlo ? __ffs(nlo) - 1 : nhi ? 32 + __ffs(nhi) - 1 : lo ? __ffs(lo) - 1 : hi ? 32 + __ffs(hi) - 1 : 0;
    }
    fu_mark_fine(a, T);
    double e[2] = {0.0, 0.0}, s = 0;
    /* one exp's code run twice (a rolled loop: the row phase's time goes to fetching its
     * instructions, each once a step) */
#pragma unroll 1
    for (int h = 0; h < hn; h++) {
        const int i = lane + 32 * h;
        const double t = i < C ? exp((double)((h ? l1 : l0) - m)) : 0.0;
        if (h) e[1] = t;
        else e[0] = t;
        s += t;
    }
    /* the row's loss -sum_i q_i (logit_i - lse) as lse sum_i q_i - sum_i q_i logit_i: both sums
     * need no lse, so they share the exps' all-sum (one butterfly, not two in a row); a weight-0
     * class adds nothing (ce.h). With no smoothing the same bits as the sum of its terms. */
    double qs = 0, ql = 0, q[2];  /* each class's q, for its sums here and its dz below */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int i = lane + 32 * h;
        q[h] = (1.0 - eps) * (i == label ? 1.0 : 0.0) + u;
        if (i < C && q[h] != 0.0) {
            qs += q[h];
            ql += q[h] * (double)(h ? l1 : l0);
        }
    }
    fu_mark_fine(a, T);
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        qs += __shfl_xor_sync(0xffffffffu, qs, o);
        ql += __shfl_xor_sync(0xffffffffu, ql, o);
    }
    fu_mark_fine(a, T);
    const double lse = (double)m + log(s), inv_s = 1.0 / s;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int i = lane + 32 * h;
        if (i < C) dz[i] = (float)((e[h] * inv_s - q[h]) * inv_b);
    }
    return lse * qs - ql;
}

/* The loss step of row r (its label, loaded by the caller ahead of the forward: an L2 round trip
 * off the loss's path) by one warp (every lane): row_loss over the logits, dz written to dz
 * (shared) and to the last layer's dz, the row's loss and whether it was right to the scratch;
 * returns the largest |dz| (fu_amax) */
static __device__ float row_loss_step(const fu_args &a, const float *logit, float *dz, int r, int label, int lane,
                                      fu_trace *T) {
    const fu_layer &L = a.L[a.n_layers - 1];
    const int C = L.out;
    int best;
    float md = 0.0f;
    const double row = row_loss(a, logit, dz, C, label, lane, &best, T);
    fu_mark_fine(a, T);
    __syncwarp();
    for (int i = lane; i < C; i += 32) {
        L.dz[(int64_t)r * C + i] = dz[i];
        md = fu_amax(md, dz[i]);
    }
    if (lane == 0) {
        a.S->loss_part[r] = row;
        a.S->correct_part[r] = best == label;
    }
    return md;
}

/* d(input) element i's share from classes [jlo, jhi): sum_j dz[j] W[j, i] with dz = cur, U
 * classes a batch of loads (those past jhi clamped to jhi - 1, their products 0, which leave
 * the sum as it is): the same sum, in the same order, for any U. row_chain takes 4 where a group
 * has at most 4 classes (the 10-class layer's groups have 2: of 16 loads a thread 14 were
 * wasted); $MPSCY_CUDA_FUSED_DWIDE=1 (a measuring knob) takes 16 always. */
template <int U>
static __device__ __forceinline__ float din_sum(const float *W, const float *cur, int K, int i, int jlo, int jhi) {
    float acc = 0.0f;
    for (int j0 = jlo; j0 < jhi; j0 += U) {
        float wv[U], dv[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int j = imin(j0 + u, jhi - 1);
            wv[u] = W[(int64_t)j * K + i];
            dv[u] = j0 + u < jhi ? cur[j] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < U; u++) acc += dv[u] * wv[u];
    }
    return acc;
}

/* layer 0's output element j of row r: its Q slices' partial products (qs floats apart) added in
 * slice order, U loads in flight (the same sum for any U) */
template <int U>
static __device__ __forceinline__ float split_sum(const float *yp, int Q, int64_t qs) {
    float v = 0.0f;
    for (int q0 = 0; q0 < Q; q0 += U) {
        float pv[U];
#pragma unroll
        for (int u = 0; u < U; u++) pv[u] = q0 + u < Q ? yp[(q0 + u) * qs] : 0.0f;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (q0 + u < Q) v += pv[u];
    }
    return v;
}

/* The row phase's input row r, every thread of the block: layer 0's output from the split's
 * partial products (in slice order, then the bias and the ReLU; also stored to layer 0's y), or
 * layer `first`'s input row; the largest |value| into *mx (fu_amax). The caller's barrier follows. */
static __device__ __forceinline__ void row_input(const fu_args &a, float *cur, int first, int r, float *mx) {
    const int tid = threadIdx.x, nthr = blockDim.x;
    if (a.split_q && first == 1) {
        /* layer 0's output row: its slices' partial products in order, the bias, the ReLU */
        const fu_layer &L = a.L[0];
        const int N = L.out, Q = a.split_q;
        const int64_t qs = (int64_t)a.b * N;
        for (int j = tid; j < N; j += nthr) {
            const float *yp = a.ypart + (int64_t)r * N + j;
            const float bj = L.bias ? L.bias[j] : 0.0f;
            /* 16 loads in flight: the benchmark MLP's 16 slices in one round trip */
            float v = a.row_narrow ? split_sum<8>(yp, Q, qs) : split_sum<16>(yp, Q, qs);
            v += bj;
            if (L.relu) v = mpscy_relu(v);
            cur[j] = v;
            L.y[(int64_t)r * N + j] = v;
            *mx = fu_amax(*mx, v);
        }
    } else {
        const fu_layer &L = a.L[first];
        const float *src = L.x + (int64_t)r * L.in;
        for (int i = tid; i < L.in; i += nthr) {
            cur[i] = src[i];
            *mx = fu_amax(*mx, cur[i]);
        }
    }
}

/* wmax: the block's largest |input| and |dz| a warp (fu_amax; 2 x FU_WARPS words of shared
 * memory, fu_early's) */
static __device__ __noinline__ void row_chain(const fu_args &a, float *smem, int first, int r, int lane, int warp,
                                              fu_trace *T, unsigned int *wmax) {
    const int nl = a.n_layers, tid = threadIdx.x, nthr = blockDim.x;
    float *cur = smem, *nxt = smem + FU_VEC, *part = smem + 2 * FU_VEC;
    float mx = 0.0f, md = 0.0f;  /* the early decision's largest |input| and |dz| (fu_amax) */
    const int label = warp == 0 ? a.labels[r] : 0;  /* the loss's, loaded ahead (row_loss_step) */
    row_input(a, cur, first, r, &mx);
    __syncthreads();
    fu_mark(a, T);
    for (int l = first; l < nl; l++) {
        /* out[j0 + q] = x . w[j0 + q, :] for 4 outputs per warp item, 8 32-wide slices of k per
         * batch of loads (32 loads in flight per lane) */
        const fu_layer &L = a.L[l];
        const int K = L.in, N = L.out;
        const float *W = L.w, *bias = L.bias;
        const int relu = L.relu;
        float *yr = L.y + (int64_t)r * N;
        for (int j0 = warp * 4; j0 < N; j0 += FU_WARPS * 4) {
            const float *wq[4];
            float bq[4];  /* loaded with the weights, not after the sums */
#pragma unroll
            for (int q = 0; q < 4; q++) {
                wq[q] = W + (int64_t)imin(j0 + q, N - 1) * K;
                bq[q] = bias && j0 + q < N ? bias[j0 + q] : 0.0f;
            }
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int k0 = 0; k0 < K; k0 += 32 * 8) {
                float wv[4][8], xv[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {  /* slices past K load nothing (predicated off) */
                    const int k = k0 + u * 32 + lane;
                    xv[u] = k < K ? cur[k] : 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; q++) wv[q][u] = k < K ? wq[q][k] : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++)
#pragma unroll
                    for (int q = 0; q < 4; q++) acc[q] += wv[q][u] * xv[u];
            }
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float v = warp_allsum(acc[q]);
                if (j0 + q < N) {
                    v += bq[q];
                    if (relu) v = mpscy_relu(v);
                    if (l + 1 < nl) mx = fu_amax(mx, v);  /* the next layer's input (not the logits) */
                    if (lane == q) {
                        nxt[j0 + q] = v;
                        yr[j0 + q] = v;
                    }
                }
            }
        }
        __syncthreads();
        fu_mark(a, T);
        float *t = cur;
        cur = nxt;
        nxt = t;
    }
    {
        if (warp == 0) md = row_loss_step(a, cur, nxt, r, label, lane, T);  /* the first dz: md was 0 */
        __syncthreads();
        fu_mark(a, T);
        float *t = cur;
        cur = nxt;
        nxt = t;
    }
    for (int l = nl - 1; l >= 1; l--) {
        const fu_layer &L = a.L[l], &B = a.L[l - 1];
        const int K = L.in, N = L.out;
        const float *W = L.w;
        /* this thread's first mask value, loaded before the sums so its latency overlaps them */
        const float y0 = tid < K && B.relu ? B.y[(int64_t)r * K + tid] : 1.0f;
        int G = nthr / K;
        G = G < 1 ? 1 : G > 16 ? 16 : G;
        const int per = (N + G - 1) / G;
        for (int e = tid; e < G * K; e += nthr) {  /* G > 1: one element per thread; else a loop */
            const int g = e / K, i = e % K, jlo = g * per, jhi = imin(jlo + per, N);
            const float acc = per <= 4 && !a.din_wide ? din_sum<4>(W, cur, K, i, jlo, jhi)
                                                       : din_sum<16>(W, cur, K, i, jlo, jhi);
            if (G > 1) part[e] = acc;
            else nxt[i] = acc;
        }
        /* the groups' parts summed in group order, then the mask: where G is 1 each thread reads
         * back only the elements it wrote, so the barrier is for the parts alone (a second one
         * before the mask, as the step had, guarded nothing: A/B 41.8 us with it, 41.9 without) */
        if (G > 1) __syncthreads();
        for (int i = tid; i < K; i += nthr) {
            float v;
            if (G > 1) {
                v = part[i];
                for (int g = 1; g < G; g++) v += part[g * K + i];
            } else {
                v = nxt[i];
            }
            if (B.relu && mpscy_relu_zeroes(i == tid ? y0 : B.y[(int64_t)r * K + i])) v = 0.0f;
            nxt[i] = v;
            B.dz[(int64_t)r * K + i] = v;
            md = fu_amax(md, v);
        }
        __syncthreads();
        fu_mark(a, T);
        float *t = cur;
        cur = nxt;
        nxt = t;
    }
    if (a.early) fu_wmax_notes(wmax, warp, lane, mx, md);
}

#endif /* MPSCY_CUDA_MLP_ROWS_CUH */
