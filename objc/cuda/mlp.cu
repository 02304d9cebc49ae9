/* mlp.cu — the whole training step of a small MLP as one persistent kernel. A chain of Dense
 * layers (each optionally followed by a ReLU) under softmax cross-entropy with integer labels is,
 * at small batch and width, a sequence of tiny dependent products: as separate kernels each one
 * costs a launch and several L2 round trips while doing almost no work. Here one kernel runs
 * four phases (five where layer 0 cannot run in the copy) separated by grid-wide barriers (a
 * cooperative launch; on Hopper optionally one thread-block cluster):
 *   1. the staged params block, labels and batch copied from pinned host memory (no copy node),
 *      each block that copies a slice of a few rows' inputs adding their products with that
 *      slice of layer 0's weights (fu_split: partial sums, added in the row phase);
 *   2. where the slices do not fit, layer 0's forward over the batch as its own phase, split by
 *      output columns across the grid;
 *   3. a block per batch row, with block barriers only: every later layer's forward, the loss and
 *      its gradient, and d(pre-activation) back down the chain (ReLU masks applied); where the
 *      later layers' weights fit in shared memory, 4 of its warps take the row from layer 1's
 *      input on, those weights copied to shared memory while the kernel lingers (mlp_wrow.cuh);
 *   4. every weight and bias gradient from the whole batch's rows, and each block's sum of squares;
 *   5. the global norm, the decision and the optimizer pass of update.h.
 * Every output element is computed by one thread or warp in a fixed order, so results are
 * deterministic. Inner loops issue their loads in batches before using them (indices past the
 * end clamped, their products discarded): every phase is latency-bound. With warm caches (ncu,
 * per line: bench/ncu_lines.py) most warps wait at barriers; the copy phase's others wait on its
 * PCIe reads, the compute phases' on fetching and issuing their instructions more than on memory,
 * so fewer instructions on the critical path pay (the 16-byte dz loads, din_sum's 4 classes).
 *
 * Decided once at build (cu_fused_plan); $MPSCY_CUDA_FUSED picks the form: "0" off, "grid" or
 * "grid:N" (N blocks), "cluster" or "cluster:N" (one cluster of N blocks, Hopper);
 * $MPSCY_CUDA_FUSED_TRACE prints block 0's time per phase and every block's copy-phase stamps.
 * Here: layer 0's own phase, the weight gradients, the kernel and the host side; mlp.cuh: the
 * arguments and shared helpers; mlp_split.cuh: layer 0 in the copy phase; mlp_rows.cuh: the row
 * phase; mlp_decide.cuh: the early decision; mlp_linger.cuh: between steps, the wait for the next
 * one ($MPSCY_CUDA_FUSED_LINGER). */
#include "mlp.cuh"
#include "mlp_decide.cuh"
#include "mlp_linger.cuh"
#include "mlp_rows.cuh"
#include "mlp_split.cuh"
#include "mlp_wrow.cuh"
#include "reduce.h"
#include "update.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Layer 0's forward over the whole batch, split across the grid: y[r, j] = act(x[r, :] . w[j, :]
 * + bias[j]), one warp per (j, R rows), U 32-wide slices of k per batch of loads. */
template <int R, int U>
static __device__ void forward_rows(const fu_layer &l, int b, int gw, int tw, int lane, unsigned int *amax) {
    float mx = 0.0f;  /* the early decision's largest |x| (fu_amax): every x is some warp's */
    const int K = l.in, N = l.out, items = N * ((b + R - 1) / R);
    for (int it = gw; it < items; it += tw) {
        const int j = it % N, r0 = (it / N) * R;
        const float *wr = l.w + (int64_t)j * K;
        const float *xr[R];
#pragma unroll
        for (int r = 0; r < R; r++) xr[r] = l.x + (int64_t)imin(r0 + r, b - 1) * K;
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.0f;
        for (int k0 = 0; k0 < K; k0 += 32 * U) {
            float wv[U], xv[R][U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int k = k0 + u * 32 + lane, kk = imin(k, K - 1);
                wv[u] = wr[kk];
#pragma unroll
                for (int r = 0; r < R; r++) xv[r][u] = xr[r][kk];
                if (k >= K) wv[u] = 0.0f;
            }
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int r = 0; r < R; r++) {
                    acc[r] += xv[r][u] * wv[u];
                    if (amax) mx = fu_amax(mx, xv[r][u]);
                }
        }
        const float bj = l.bias ? l.bias[j] : 0.0f;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float v = warp_allsum(acc[r]) + bj;
            if (l.relu) v = mpscy_relu(v);
            if (lane == r && r0 + r < b) l.y[(int64_t)(r0 + r) * N + j] = v;
        }
    }
    if (amax) fu_amax_publish(amax, mx);
}

/* Rows per warp item: as many as keep every warp of the grid busy, at most 8. */
static __device__ void forward_layer0(const fu_layer &l, int b, int gw, int tw, int lane, unsigned int *amax) {
    int R = 8;
    while (R > 1 && (R > b || l.out * ((b + R - 1) / R) < tw / 2)) R >>= 1;
    switch (R) {
    case 8: forward_rows<8, 4>(l, b, gw, tw, lane, amax); break;
    case 4: forward_rows<4, 8>(l, b, gw, tw, lane, amax); break;
    case 2: forward_rows<2, 16>(l, b, gw, tw, lane, amax); break;
    default: forward_rows<1, 16>(l, b, gw, tw, lane, amax); break;
    }
}

/* One warp item of a layer's weight gradients: dW[j0 + q, i] = sum_r dz[r, j0 + q] x[r, i] for
 * 4 outputs and 32 inputs, GR rows per batch of loads, the rows in order. V4 (fu_layer.dz4): a
 * row's 4 dz values as one 16-byte load, not 4 loads of one float: the same values. Returns this
 * thread's sum of squares of what it wrote. */
template <int GR, bool V4>
static __device__ double dw_item(const fu_layer &L, int b, int it, int ic, int lane) {
    const int K = L.in, N = L.out, c = it % ic, j0 = (it / ic) * 4, i = c * 32 + lane, ii = imin(i, K - 1);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r0 = 0; r0 < b; r0 += GR) {
        float xv[GR], dv[GR][4];
#pragma unroll
        for (int u = 0; u < GR; u++) {
            const int r = imin(r0 + u, b - 1);
            xv[u] = L.x[(int64_t)r * K + ii];
            if (V4) {
                const float4 d = *reinterpret_cast<const float4 *>(L.dz + (int64_t)r * N + j0);
                dv[u][0] = d.x, dv[u][1] = d.y, dv[u][2] = d.z, dv[u][3] = d.w;
            } else {
#pragma unroll
                for (int q = 0; q < 4; q++) dv[u][q] = L.dz[(int64_t)r * N + imin(j0 + q, N - 1)];
            }
            if (r0 + u >= b) xv[u] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < GR; u++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[q] += dv[u][q] * xv[u];
    }
    double s2 = 0;
    if (i < K)
#pragma unroll
        for (int q = 0; q < 4; q++)
            if (j0 + q < N) {
                L.dw[(int64_t)(j0 + q) * K + i] = acc[q];
                s2 += (double)acc[q] * acc[q];
            }
    return s2;
}

/* Every layer's weight and bias gradients from the whole batch's dz and inputs: dw_item's warp
 * items of 4 outputs and 32 inputs, then db[j] = sum_r dz[r, j]. Returns this thread's sum of
 * squares of what it wrote. GR is 8, whose code is half as long as 16 rows' (A/B on the H200:
 * 41.9 us a step against 44.1; with dz's 16-byte loads, 41.8 against 43.2). With
 * $MPSCY_CUDA_FUSED_GRADV=0 (a measuring knob) dz's 4 values a row come as 4 loads: the same sums
 * in the same order. */
template <int GR>
static __device__ double weight_grads(const fu_args &a, int gw, int tw, int lane) {
    const int b = a.b;
    double s2 = 0;
    int base = 0;
    for (int l = 0; l < a.n_layers; l++) {
        const fu_layer &L = a.L[l];
        const int K = L.in, N = L.out, ic = (K + 31) / 32, n_dw = ic * ((N + 3) / 4);
        const int n_db = L.db ? (N + 31) / 32 : 0, n = n_dw + n_db;
        int it = gw - base;
        if (it < 0) it += ((-it + tw - 1) / tw) * tw;  /* this warp's first item in this layer */
        for (; it < n; it += tw) {
            if (it < n_dw) {
                s2 += L.dz4 ? dw_item<GR, true>(L, b, it, ic, lane) : dw_item<GR, false>(L, b, it, ic, lane);
            } else {
                const int j = (it - n_dw) * 32 + lane, jj = imin(j, N - 1);
                float acc = 0.0f;
                for (int r0 = 0; r0 < b; r0 += GR) {
                    float v[GR];
#pragma unroll
                    for (int u = 0; u < GR; u++) v[u] = L.dz[(int64_t)imin(r0 + u, b - 1) * N + jj];
#pragma unroll
                    for (int u = 0; u < GR; u++) acc += r0 + u < b ? v[u] : 0.0f;
                }
                if (j < N) {
                    L.db[j] = acc;
                    s2 += (double)acc * acc;
                }
            }
        }
        base += n;
    }
    return s2;
}

template <bool CLUSTER>
__global__ void __launch_bounds__(FU_THREADS, 1) fused_mlp_kernel(const __grid_constant__ fu_args ga) {
    __shared__ __align__(16) float smem[FU_SMEM_FLOATS];  /* 16: fu_split reads float4 */
    extern __shared__ float dsm[];  /* the split's weight slice */
    /* the arguments, copied to shared memory: the phases index the layers at run time, which
     * from the parameter space is a generic load of a global load's latency per field */
    __shared__ fu_args sa;
    __shared__ unsigned int wmax[2 * FU_WARPS];  /* the early decision's largest values a warp (row_chain) */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    /* warp items go round the blocks first, so every multiprocessor gets a share of a small phase */
    const int gw = warp * gridDim.x + blockIdx.x, tw = gridDim.x * FU_WARPS;
    const int b = ga.b;
    fu_next nx = {false, false, false};  /* what the kernel did for this step while it lingered */
    for (;;) {  /* a step, and the next ones while the kernel lingers (fu_linger) */
        fu_trace T;
        T.n = 0;
        fu_mark(ga, &T);
        if (ga.trace && threadIdx.x == 0)
            for (int k = 1; k < FU_STAMPS; k++) ga.stamps[blockIdx.x * FU_STAMPS + k] = 0ull;
        if (FU_CLOCKS && ga.trace && blockIdx.x == 0)
            for (int k = threadIdx.x; k < FU_CLK_WARPS * FU_CLK_N; k += blockDim.x) ga.stamps[gridDim.x * FU_STAMPS + k] = 0ull;
        fu_stamp(ga, 0);
        for (int i = threadIdx.x; i < (int)(sizeof(fu_args) / sizeof(int)); i += blockDim.x)
            ((int *)&sa)[i] = ((const int *)&ga)[i];
        if (threadIdx.x < 2 * FU_WARPS) wmax[threadIdx.x] = 0u;
        __shared__ unsigned int gen0;  /* the row phase's barrier number (below) */

        /* the staged params block, labels and batch from pinned host memory to the device */
        for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < ga.copy_n;
             i += (int64_t)gridDim.x * blockDim.x)
            ga.copy_dst[i] = __ldcv(ga.copy_src + i);  /* not cached: a lingering kernel reads it again */
        /* the split's weight slice to shared memory while the batch arrives (cp.async) */
        if (!nx.w_loading) fu_split_load(ga, b, dsm);
        if (ga.wrow && !nx.wr_loading && (int)blockIdx.x < b) wr_load(ga, dsm + ga.wr_off);
        cp_async_commit();
        /* the batch as the host stages it (deferred): block 0's first warps relay the host's flags
         * (this step's number read from the host's params block, which the launch follows) into
         * S->fused_piece, and the other blocks copy their parts of each piece once its word there is
         * set (fu_split's slices, or `per` parts of each piece); block 0 clears the words once every
         * block has passed the barrier below */
        if (ga.deferred && blockIdx.x == 0) {
            const int64_t pieces = (ga.in_n + ga.in_piece - 1) / ga.in_piece;
            /* `relays` warps poll the flags, each starting FU_RELAY_NS / relays later than the one
             * before, so that a flag is seen a fraction of a PCIe round trip after the host sets it,
             * not up to a whole one; each publishes what it sees (the same words). Two: A/B on the
             * H200, 40.0-41.1 us against 40.0-41.6 with one, lower in five of six pairs (three
             * calls); 4 and 8 warps were slower than one (42.6 and 47.1 against 41.6 and 42.1):
             * their polls take PCIe requests from the batch's reads */
            if (warp < ga.relays && !nx.relayed) {
                const unsigned long long t0 = cu_global_ns(), wait = (unsigned long long)warp * FU_RELAY_NS / ga.relays;
                while (cu_global_ns() - t0 < wait) {
                }
                cu_relay_pieces(ga.flags, pieces, 0u, &reinterpret_cast<const cu_params *>(ga.copy_src)->seq,
                                ga.S->fused_piece, ga.S, ga.R);
            }
        } else if (ga.split_q) {
            const unsigned long long t_rows = fu_split(ga, smem, dsm, b);
            if (ga.lg_time && threadIdx.x == 0 && t_rows) {  /* the linger's figures (FU_LG_TIMES) */
                atomicMax(&ga.S->lg_t_rows, t_rows);
                atomicMax(&ga.S->lg_t_products, cu_global_ns());
            }
        } else if (ga.deferred) {
            const int64_t n = ga.in_n, piece = ga.in_piece, pieces = (n + piece - 1) / piece, copiers = gridDim.x - 1;
            const int64_t per = copiers / pieces > 1 ? copiers / pieces : 1,
                          part = ((piece + per - 1) / per + 3) & ~(int64_t)3;
            for (int64_t it = blockIdx.x - 1; it < pieces * per; it += copiers) {
                const int64_t p = it / per, lo = min(p * piece + (it % per) * part, n),
                              hi = min(min(lo + part, (p + 1) * piece), n);
                if (threadIdx.x == 0)
                    fu_wait_piece(ga.S, p);
                __syncthreads();
                cu_copy_pinned(ga.in_dst, ga.in_src, lo, hi);
            }
        }
        /* the row phase's barrier number (fu_early): read before the copy's barrier, which every
         * block passes before the last one at that barrier can raise it, and after this block's
         * rows (read at the top, its load had been on their path: A/B on an H100 31.2-31.4 us a
         * step against 31.6, with the verdict in the linger's release word) */
        if (threadIdx.x == 0) gen0 = *(volatile const unsigned int *)&ga.S->fu_gen;
        __syncthreads();
        const fu_args &a = sa;
        FU_MARK();
        fu_stamp(a, 3);
        fu_sync<CLUSTER>();
        fu_stamp(a, 4);
        if (a.lg_time && blockIdx.x == 0 && threadIdx.x == 0) a.S->lg_t_copy = cu_global_ns();
        if (a.deferred && blockIdx.x == 0 && threadIdx.x < CU_STAGE_MAX_PIECES) a.S->fused_piece[threadIdx.x] = 0u;
        FU_MARK();
        /* layer 0's forward over the whole batch, split by output columns across the grid (unless
         * the copy phase did it) */
        if (a.n_layers > 1 && !a.split_q) {
            forward_layer0(a.L[0], b, gw, tw, lane, a.early ? &a.S->fu_amax[0] : NULL);
            FU_MARK();
            fu_sync<CLUSTER>();
            FU_MARK();
        }
        /* each row through the rest of the chain and back: a warp per row, with the row layers'
         * weights in shared memory (wr_load: waited for here), or a block per row */
        if (a.wrow && (int)blockIdx.x < b) {
            float mx = 0.0f;  /* the rows' inputs' largest |value| (fu_amax), each warp's into wmax */
            for (int r = blockIdx.x; r < b; r += gridDim.x) {
                row_input(a, smem, 1, r, &mx);  /* by the block, as the block rows' */
                fu_mark_fine(a, &T);
                cp_async_wait<0>();
                fu_mark_fine(a, &T);
                __syncthreads();
                FU_MARK();
                if (warp < a.wrow) wr_chain(a, smem, dsm + a.wr_off, r, lane, warp, &T, wmax);
                if (r + (int)gridDim.x < b) __syncthreads();  /* the next row's input overwrites this one's */
            }
            if (a.early) fu_wmax_note(&wmax[warp], lane, mx);
        } else {
            for (int r = blockIdx.x; r < b; r += gridDim.x)
                row_chain(a, smem, a.n_layers > 1 ? 1 : 0, r, lane, warp, &T, wmax);
        }
        if (a.early && !CLUSTER) {
            fu_early(a, wmax, true, gen0);  /* the barrier itself, its last block deciding */
            FU_MARK();
        } else {
            if (a.early) fu_early(a, wmax, false, 0u);
            FU_MARK();
            fu_sync<CLUSTER>();
        }
        FU_MARK();
        /* every weight gradient, and each block's sum of squares of what it wrote */
        double v[3] = {weight_grads<8>(a, gw, tw, lane), 0.0, 0.0};
        v[0] = block_sum(v[0]);
        if (threadIdx.x == 0) a.S->norm_part[blockIdx.x] = v[0];
        FU_MARK();
        fu_sync<CLUSTER>();
        FU_MARK();
        /* every block adds the partials in the same order, so all take the same decision */
        v[0] = threadIdx.x < gridDim.x ? a.S->norm_part[threadIdx.x] : 0.0;
        for (int k = threadIdx.x + blockDim.x; k < (int)gridDim.x; k += blockDim.x) v[0] += a.S->norm_part[k];
        v[1] = v[2] = 0.0;
        add_row_parts(a.S, b, v);
        /* whether fu_early decided (block 0's thread 0 decides below), loaded beside the parts */
        const bool late = a.early && blockIdx.x == 0 && threadIdx.x == 0 && __ldcg(&a.S->fu_late) == a.P->rseq;
        block_sum3(v);
        const double loss = v[1] / (double)b;
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            a.S->loss = loss;  /* decide() below copies both into R */
            a.S->correct = a.accuracy == MPSCY_ACCURACY_NONE ? -1 : (long long)v[2];
        }
        decide_and_update<false>(a.u, a.S, a.R, a.P, v[0], loss, a.clip_norm, !input_bad(a.S, a.P), late);
        FU_MARK();
        if (a.trace && blockIdx.x == 0 && threadIdx.x == 0) fu_trace_print(a, T);
        if (CLUSTER || !a.linger_ns || !fu_linger(a, dsm, &nx)) break;
    }
}

/* ------------------------------------------------------------------------------- host side */

/* Whether the kernel can take `bytes` of dynamic shared memory (both forms' opt-in raised to them,
 * and a block of it still fits a multiprocessor) */
static bool fu_smem_fits(size_t bytes) {
    int per_sm = 0;
    if (cu_smem_optin((const void *)fused_mlp_kernel<false>, (int)bytes) != cudaSuccess ||
        cu_smem_optin((const void *)fused_mlp_kernel<true>, (int)bytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_mlp_kernel<false>, FU_THREADS, bytes) !=
            cudaSuccess ||
        per_sm < 1) {
        cudaGetLastError();
        return false;
    }
    return true;
}

/* Whether layer 0 runs in the copy phase (fu_split), decided once the grid is: the room for its
 * weight slice (dynamic shared memory) and for the partial products of every batch size up to
 * the built one. $MPSCY_CUDA_FUSED_SPLIT sets the rows a copying block takes (0: layer 0 as its
 * own phase; a measuring knob). */
static void fu_plan_split(cu_graph *g, cu_fused *f) {
    fu_args *a = &f->a;
    const int64_t batch = g->plan.batch;
    const int rows = cu_knob_int("MPSCY_CUDA_FUSED_SPLIT", FU_SPLIT_ROWS), K = a->L[0].in, N = a->L[0].out;
    cudaFuncAttributes fa;
    int kw = 0;
    a->split_rows = rows;
    f->split_align = cu_knob_int("MPSCY_CUDA_FUSED_SPLITW", 32);
    if (a->n_layers < 2 || rows < 1 || g->dev->prop.major < 8 ||  /* cp.async */
        cudaFuncGetAttributes(&fa, fused_mlp_kernel<false>) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    int64_t cap = ((int64_t)g->dev->prop.sharedMemPerBlockOptin - (int64_t)fa.sharedSizeBytes) / 4;
    if (cap > FU_SPLIT_FLOATS) cap = FU_SPLIT_FLOATS;
    if (!fu_split_q(f->blocks, K, N, batch, rows, cap, f->split_align, &kw)) return;
    const int64_t ws = ((int64_t)N * fu_pitch(kw) + 3) & ~(int64_t)3;
    const size_t bytes = (size_t)ws * sizeof(float);
    int64_t most = 0;
    for (int64_t b = 1; b <= batch; b++) {
        int w;
        const int64_t q = fu_split_q(f->blocks, K, N, b, rows, ws, f->split_align, &w);
        if (q * b * N > most) most = q * b * N;
    }
    if (!fu_smem_fits(bytes)) return;
    if (cu_dev_alloc(&g->dev->base, (void **)&a->ypart, (size_t)most * sizeof(float)) != MPSCY_OK) {
        a->ypart = NULL;
        return;
    }
    f->ypart_floats = most;
    f->ws_floats = ws;
}

/* Whether the row phase runs a few warps a row (mlp_wrow.cuh): the row layers' weights fit in the
 * dynamic shared memory past the split's slice. $MPSCY_CUDA_FUSED_WROW (measuring) sets the warps
 * (default 4, one a scheduler; 0: a block a row always). */
static void fu_plan_wrow(cu_graph *g, cu_fused *f) {
    fu_args plan = f->a;
    plan.wrow = cu_knob_int("MPSCY_CUDA_FUSED_WROW", 4);
    const int64_t n = plan.wrow >= 1 && plan.wrow <= FU_WARPS && g->dev->prop.major >= 8 ? wr_plan(&plan) : 0;
    /* fu_smem_fits refuses more than the opt-in limit less the kernel's static shared memory (the
     * attribute cannot be raised past it) */
    if (!n || !fu_smem_fits((size_t)(f->ws_floats + n) * sizeof(float))) return;
    f->a = plan;
    f->a.wr_off = f->ws_floats;
    f->wr_floats = n;
}

int cu_fused_plan(cu_graph *g) {
    const mpscy_plan *p = &g->plan;
    const char *env = getenv("MPSCY_CUDA_FUSED");
    if (env && !strcmp(env, "0")) return 0;
    int cluster = env && !strncmp(env, "cluster", 7), blocks = 0;
    const char *colon = env ? strchr(env, ':') : NULL;
    if (colon) blocks = atoi(colon + 1);
    if (cluster && (g->dev->prop.major < 9 || blocks > 16)) return 0;
    if (!cluster && !g->dev->coop) return 0;
    if (p->n_inputs != 1 || p->input_grad || p->optim.kind == MPSCY_OPTIM_LBFGS || p->target != MPSCY_TARGET_INDEX ||
        (p->loss.kind != MPSCY_LOSS_SPARSE_CE && p->loss.kind != MPSCY_LOSS_CE) || p->class_weight || p->loss.ignore ||
        p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD || p->batch > FU_MAX_BATCH || p->out_size > FU_MAX_CLASSES ||
        (int64_t)p->batch * p->n_params > FU_MAX_WORK || p->nodes[0].kind != MPSCY_LAYER_INPUT || p->n_frozen > 0)
        return 0;
    fu_args a;
    memset(&a, 0, sizeof a);
    int nl = 0;
    int32_t prev = 0;  /* the node the next Dense must read */
    for (int32_t i = 1; i < p->n_nodes; i++) {
        const mpscy_node *n = &p->nodes[i];
        if (n->kind != MPSCY_LAYER_DENSE || n->in[0] != prev || nl == FU_MAX_LAYERS || !g->dy[i]) return 0;
        const int64_t in = p->nodes[prev].size, out = n->size;
        if (in > FU_VEC || out > FU_VEC) return 0;
        fu_layer *l = &a.L[nl++];
        l->x = g->y[prev];
        l->y = g->y[i];
        l->dz = g->dy[i];
        l->w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0);
        l->bias = cu_tensor(g, n, MPSCY_ROLE_PARAM, 1);
        l->dw = cu_tensor_grad(g, n, 0);
        l->db = cu_tensor_grad(g, n, 1);
        l->in = (int)in;
        l->out = (int)out;
        l->relu = (g->fuse[i] & CU_FUSE_RELU) != 0;
        if (!l->w || !l->dw || (l->bias == NULL) != (l->db == NULL)) return 0;
        if (i == p->output) {
            if (l->relu || i != p->n_nodes - 1) return 0;
            break;
        }
        if (n->consumers != 1) return 0;
        prev = i;
        if (l->relu) {  /* the ReLU right after it, skipped by plan_fusions */
            if (i + 1 >= p->n_nodes || p->nodes[i + 1].kind != MPSCY_LAYER_RELU || p->nodes[i + 1].in[0] != i ||
                p->nodes[i + 1].consumers != 1 || !(g->fuse[i + 1] & CU_SKIP))
                return 0;
            prev = ++i;
            /* a ReLU on the logits: the row phase takes the loss's gradient as the last Dense's
             * dz, with no mask of that ReLU, so such a model runs as separate kernels */
            if (i == p->output) return 0;
        }
    }
    if (nl == 0 || a.L[nl - 1].y != g->y[p->output]) return 0;
    const int dz4 = cu_knob_on("MPSCY_CUDA_FUSED_GRADV");
    for (int l = 0; l < nl; l++)
        a.L[l].dz4 = dz4 && a.L[l].out % 4 == 0 && ((uintptr_t)a.L[l].dz & 15) == 0;
    /* the kernel's grid: every block resident at once (cooperative), or one cluster */
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_mlp_kernel<false>, FU_THREADS, 0) != cudaSuccess ||
        per_sm < 1) {
        cudaGetLastError();
        return 0;
    }
    if (cluster) {
        if (blocks <= 0) blocks = 16;
        if (blocks > 8 &&
            cudaFuncSetAttribute(fused_mlp_kernel<true>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
    } else {
        int most = per_sm * g->dev->sms;
        if (blocks <= 0) blocks = g->dev->sms;  /* measured best on an H100 (bench/cuda_bench.py --forms) */
        if (blocks > most) blocks = most;
        if (blocks > CU_MAX_PARTS) blocks = CU_MAX_PARTS;
    }
    if (blocks < 2 && g->defer) return 0;  /* deferred staging wants a relay block and a copying one */
    a.n_layers = nl;
    a.accuracy = p->loss.accuracy;
    a.labels = (const int32_t *)(g->stage_d + g->off_target);
    a.eps = p->loss.label_smoothing;
    a.eps_u = a.eps / (double)a.L[nl - 1].out;  /* the loss's term (row_loss); 1 / b comes per launch */
    a.S = g->scratch;
    a.R = g->result;
    a.P = g->params_d;
    a.clip_norm = p->optim.clip_grad_norm;
    a.trace = getenv("MPSCY_CUDA_FUSED_TRACE") != NULL;
    a.early = cu_knob_on("MPSCY_CUDA_FUSED_EARLY");
    a.early_warp = cu_knob_on("MPSCY_CUDA_FUSED_EARLYWARP");
    a.early_rel = cu_knob_on("MPSCY_CUDA_FUSED_EARLYREL");
    a.split_dot = cu_knob_int("MPSCY_CUDA_FUSED_SPLITDOT", 1);
    a.prefetch = cu_knob_on("MPSCY_CUDA_FUSED_PREFETCH");
    a.lg_time = g->lg_report;
    a.din_wide = cu_knob_int("MPSCY_CUDA_FUSED_DWIDE", 0);
    a.row_narrow = cu_knob_int("MPSCY_CUDA_FUSED_ROWU", 16) == 8;
    a.split_parts = cu_knob_int("MPSCY_CUDA_FUSED_SPLITK", 0) != 1;
    a.relays = cu_knob_int("MPSCY_CUDA_FUSED_RELAYS", 2);
    if (a.relays < 1) a.relays = 1;
    if (a.relays > FU_WARPS) a.relays = FU_WARPS;
    float *slot[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3 && k < p->n_vec_slots; k++) slot[k] = g->optim + p->vec_offset[k];
    a.u = update_args{g->params, g->grads, slot[0], slot[1], slot[2], p->n_train, p->optim.kind,
                      p->optim.kind == MPSCY_OPTIM_ADAMW || (p->optim.flags & MPSCY_OPTIM_DECOUPLED_WD) != 0,
                      p->optim.clip_grad_norm > 0,
                      p->optim.clip_grad_value > 0 ? (float)p->optim.clip_grad_value : 0.0f};
    /* block 0 with no share of the update reaches the linger, and starts relaying the next
     * step's flags, sooner: A/B on three H100 machines, 32.2 us a step against 32.7, 31.2 against
     * 31.4, 30.2 against 30.9 ($MPSCY_CUDA_FUSED_SKIP0=0, measuring, gives it its share; the grid
     * form only, lingering or not) */
    a.u.skip_block0 = !cluster && cu_knob_on("MPSCY_CUDA_FUSED_SKIP0");
    cu_fused *f = (cu_fused *)cu_host_alloc(&g->dev->base, sizeof(cu_fused));
    if (!f) return 0;
    f->a = a;
    f->cluster = cluster;
    f->blocks = blocks;
    /* the full batch's kernel lingers this long after its update for the next step (fu_linger),
     * where the host hands steps over: deferred staging, early return, the grid form */
    const int linger_us = cu_knob_int("MPSCY_CUDA_FUSED_LINGER", FU_LINGER_US);
    f->linger_ns = g->defer && g->early && !cluster && linger_us > 0 ? 1000ull * (unsigned long long)linger_us : 0ull;
    if (a.trace && cu_dev_alloc(&g->dev->base, (void **)&f->a.stamps, FU_STAMP_BYTES(blocks)) != MPSCY_OK) {
        cu_host_free(&g->dev->base, f, sizeof(cu_fused));
        return 0;
    }
    fu_plan_split(g, f);
    fu_plan_wrow(g, f);
    g->fu = f;
    return 1;
}

void cu_fused_free(cu_graph *g) {
    if (!g->fu) return;
    if (g->fu->a.ypart) cu_dev_free(&g->dev->base, g->fu->a.ypart, (size_t)g->fu->ypart_floats * sizeof(float));
    if (g->fu->a.stamps) cu_dev_free(&g->dev->base, g->fu->a.stamps, FU_STAMP_BYTES(g->fu->blocks));
    cu_host_free(&g->dev->base, g->fu, sizeof(cu_fused));
    g->fu = NULL;
}

int cu_fused_step(cu_graph *g, int64_t b, size_t staged, int deferred, char *err, size_t en) {
    cu_fused *f = g->fu;
    f->a.b = (int)b;
    f->a.inv_b = 1.0 / (double)b;  /* the loss's terms (row_loss) */
    f->a.copy_src = (const uint4 *)g->stage_h;
    f->a.copy_dst = (uint4 *)g->stage_d;
    f->a.copy_n = (int64_t)((staged + 15) / 16);
    f->a.deferred = deferred;
    f->a.linger_ns = deferred ? f->linger_ns : 0ull;  /* a partial batch's direct launch ends */
    f->a.split_q = 0;
    if (f->ws_floats) {
        int kw = 0;
        f->a.split_q = fu_slices(f, b, &kw);
        f->a.split_kw = kw;
        f->a.split_pitch = fu_pitch(kw);
        if (f->a.split_q && !deferred)  /* its slices copy the batch (from the staging, done) */
            f->a.copy_n = (int64_t)((g->off_input[0] + 15) / 16);
    }
    f->a.in_src = (const float *)(g->stage_h + g->off_input[0]);
    f->a.in_dst = (float *)(g->stage_d + g->off_input[0]);
    f->a.in_n = b * g->in0_size;
    if (deferred) {
        f->a.in_piece = cu_stage_piece(f->a.in_n);
        f->a.flags = g->flags_h;
    }
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at;
    cfg.gridDim = dim3(f->blocks);
    cfg.blockDim = dim3(FU_THREADS);
    cfg.dynamicSmemBytes = (size_t)(f->ws_floats + f->wr_floats) * sizeof(float);
    /* the kernel's shared-memory opt-in covers this: fu_plan_split and fu_plan_wrow raised it to
     * these bytes, and cu_smem_optin never lowers it */
    cfg.stream = g->stream;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    if (f->cluster) {
        at.id = cudaLaunchAttributeClusterDimension;
        at.val.clusterDim.x = f->blocks;
        at.val.clusterDim.y = 1;
        at.val.clusterDim.z = 1;
        CU_TRY(cudaLaunchKernelEx(&cfg, fused_mlp_kernel<true>, f->a), "fused_mlp (cluster)");
    } else {
        at.id = cudaLaunchAttributeCooperative;
        at.val.cooperative = 1;
        CU_TRY(cudaLaunchKernelEx(&cfg, fused_mlp_kernel<false>, f->a), "fused_mlp (cooperative)");
    }
    return CU_LAUNCHED("fused_mlp");
}
