/* mlp_decide.cuh — the one-kernel MLP step's decisions (mlp.cu): the rows' loss and correct
 * count summed (add_row_parts, block_sum3) and the early decision at the row phase's barrier
 * (fu_early). Device code for mlp.cu only. */
#ifndef MPSCY_CUDA_MLP_DECIDE_CUH
#define MPSCY_CUDA_MLP_DECIDE_CUH

#include "mlp.cuh"
#include "reduce.h"
#include "update.h"

/* v[1] += the rows' losses, v[2] += their correct counts, each thread its rows k = tid, tid +
 * blockDim.x, ... (then block_sum3: the same order wherever it runs, so the same bits) */
static __device__ __forceinline__ void add_row_parts(const cu_scratch *S, int b, double *v) {
    for (int k = threadIdx.x; k < b; k += blockDim.x) {
        v[1] += __ldcg(&S->loss_part[k]);
        v[2] += (double)__ldcg(&S->correct_part[k]);
    }
}

/* Three sums over the block at once (one pair of barriers); every thread gets the results. */
static __device__ void block_sum3(double *v) {
    __shared__ double w[3][FU_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < 3; k++) v[k] = warp_allsum(v[k]);
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < 3; k++) w[k][warp] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 3; k++) {
        double t = 0;
        for (int q = 0; q < FU_WARPS; q++) t += w[k][q];
        v[k] = t;
    }
}

/* The early decision (fu_amax in mlp.cuh): each block, past its rows, counts itself in. On a grid
 * (barrier; gen: the barrier's number, read at the kernel's start) this is the grid barrier after
 * the row phase: the last block to arrive releases the others, then decides, which costs them
 * nothing; in a cluster the cluster barrier follows. The last block adds the rows' losses and
 * correct counts as the end does (the same bits), and when the loss is finite, the input was not
 * flagged bad and the bound proves every gradient finite, it writes the step's result and
 * releases it to the host (R->done, as decide() does) while the others go on to the weight
 * gradients: the host's wait ends here, not after them. The end then decides again, the same way
 * (a finite loss and norm), and writes the norm (decide()). Otherwise only the end decides. The
 * words go back to 0 for the next step. With a.early_rel (the default) a block counts itself in by one
 * acquire-release atomic (not a fence, the atomic and a fence), and on a grid the last block's
 * warp 1 releases the others while its warp 0 decides: the result's path is the arrival, the
 * rows' parts loaded and summed, the result written (A/B on an H100: 28.9 us a step against 29.6). */
static __device__ void fu_early(const fu_args &a, const unsigned int *wmax, bool barrier, unsigned int gen) {
    __shared__ int last;
    cu_scratch *S = a.S;
    __syncthreads();  /* every warp of the block has its largest values in wmax */
    if (threadIdx.x == 0) {
        unsigned int m0 = 0u, m1 = 0u;
        for (int k = 0; k < FU_WARPS; k++) {
            m0 = max(m0, wmax[k]);
            m1 = max(m1, wmax[FU_WARPS + k]);
        }
        if (m0) atomicMax(&S->fu_amax[0], m0);
        if (m1) atomicMax(&S->fu_amax[1], m1);
        fu_stamp(a, 5);
        if (!a.early_rel) __threadfence();
        last = (a.early_rel ? cu_atom_add_acq_rel_gpu(&S->fu_arrive, 1u) : atomicAdd(&S->fu_arrive, 1u)) == gridDim.x - 1;
        if (last && !a.early_rel) {
            S->fu_arrive = 0u;
            __threadfence();
            if (barrier) atomicExch(&S->fu_gen, gen + 1u);  /* the others go on */
        } else if (!last && barrier) {
            /* the grid barrier after the row phase, as grid.sync's: the last block to arrive
             * releases the others, then decides while they compute the weight gradients */
            while (cu_load_acquire_gpu(&S->fu_gen) == gen) {
            }
        }
        if (!a.early_rel) __threadfence();
    }
    __syncthreads();
    if (a.early_rel && last && threadIdx.x == 32) {  /* the others go on while warp 0 decides */
        S->fu_arrive = 0u;
        if (barrier) cu_store_release_gpu(&S->fu_gen, gen + 1u);
    }
    /* with every row's parts in warp 0 (b <= 32), that warp alone: block_sum3's other warps add
     * 0.0 to warp 0's sums, so these are its bits, with no block barrier ($MPSCY_CUDA_FUSED_EARLYWARP=0,
     * measuring, takes block_sum3 always) */
    const bool one_warp = a.b <= 32 && a.early_warp;
    if (!last || (one_warp && threadIdx.x >= 32)) return;
    double v[3] = {0.0, 0.0, 0.0};
    unsigned int w0 = 0u, w1 = 0u, rseq = 0u;
    int bad = 0;
    if (threadIdx.x == 0) {  /* loaded beside the rows' parts, not after their sums */
        w0 = __ldcg(&S->fu_amax[0]);
        w1 = __ldcg(&S->fu_amax[1]);
        rseq = a.P->rseq;
        bad = input_bad(S, a.P);
    }
    add_row_parts(S, a.b, v);
    if (one_warp) {
#pragma unroll
        for (int k = 0; k < 3; k++) v[k] = 0.0 + warp_allsum(v[k]);  /* block_sum3's first term (0.0 + w) */
    } else {
        block_sum3(v);
    }
    if (threadIdx.x != 0) return;
    const float mx = __uint_as_float(w0), md = __uint_as_float(w1);
    /* the words back to 0 for the next step (every block has added to them: it counted itself in) */
    S->fu_amax[0] = S->fu_amax[1] = 0u;
    const double loss = v[1] / (double)a.b, bound = (double)a.b * fmax((double)mx, 1.0) * (double)md;
    /* an Inf maximum makes the bound Inf or NaN: no early decision */
    if (!rseq || !isfinite(loss) || !(bound < 0.5 * (double)FLT_MAX) || bad) return;
    cu_result *R = a.R;
    R->loss = loss;
    R->correct = a.accuracy == MPSCY_ACCURACY_NONE ? -1 : (long long)v[2];
    R->finite = 1;
    R->applied = 1;
    R->norm_late = S->fu_late = rseq;  /* the norm comes later: the host, the end's decide() */
    release_result(R, rseq);
    fu_stamp(a, 6);
    if (a.lg_time) S->lg_t_decide = cu_global_ns();
}

#endif /* MPSCY_CUDA_MLP_DECIDE_CUH */
