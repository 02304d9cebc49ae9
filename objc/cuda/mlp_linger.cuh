/* mlp_linger.cuh — the one-kernel MLP step (mlp.cu) between steps: past its update the kernel
 * waits for the host to hand it the graph's next training step (step.cu's claim) instead of
 * ending. Device code for mlp.cu only. */
#ifndef MPSCY_CUDA_MLP_LINGER_CUH
#define MPSCY_CUDA_MLP_LINGER_CUH

#include "mlp.cuh"
#include "mlp_split.cuh"
#include "mlp_wrow.cuh"

/* Block 0's thread 0 between steps (fu_linger): the verdict once the host asks for step
 * served + 1 (1), or for anything else (0: it stops the kernel, or asked for a step this kernel
 * cannot take), or linger_ns have passed. Then it says it is closing (lg_closing, a store that
 * reaches the host's memory before the load after it is sent: fence.sc at system scope), reads
 * the request once more and publishes what it found (lg_verdict): the host, which writes its
 * request and then reads lg_closing (step.cu's claim), either sees no closing, so this load sees
 * its request, or waits for the verdict. */
static __device__ int fu_linger_verdict(const fu_args &a, unsigned long long t0) {
    cu_result *R = a.R;
    const uint32_t served = a.P->seq;
    const uint32_t r = cu_load_acquire_sys(&R->lg_req);
    if (a.trace && r == served + 1u)
        printf("fused_mlp linger: the next step's request seen %llu ns after block 0's update\n", cu_global_ns() - t0);
    if (r != served) return r == served + 1u;
    if (cu_global_ns() - t0 < a.linger_ns) return -1;
    *(volatile unsigned int *)&R->lg_closing = served;
    __threadfence_system();
    const int go = cu_load_acquire_sys(&R->lg_req) == served + 1u;
    *(volatile unsigned long long *)&R->lg_verdict = 2ull * served + (unsigned long long)go;
    __threadfence_system();
    return go;
}

/* The kernel lingers ($MPSCY_CUDA_FUSED_LINGER): past its update, instead of ending, it waits for
 * the host to hand it the graph's next training step, so that step starts with no launch and the
 * update's tail (the weight gradients, the norm, the update: ~9 us after the early decision)
 * overlaps the host's return and its staging of the next batch, not the next kernel's start. A
 * barrier of the grid whose last word is block 0's: every block counts itself in (its update
 * stored), block 0 polls the host's request meanwhile (one word of pinned memory, one thread)
 * and, once all are in and it has a verdict, releases them with it. True: run the next step
 * (the params block and the labels read again, uncached, as after a launch).
 *
 * The next step's front meanwhile (fu_args.prefetch, deferred staging; nx says what was done):
 * - block 0's relay warps relay the host's flags of step served + 1 from their block's arrival
 *   on, not from the next step's start, and go on past the release when it runs the step
 *   (nx->relayed: all were, so the step's own relay is skipped). The host stages a step's pieces
 *   only once it is the next one, and a kernel that ends without it has relayed only what that
 *   step's own kernel would have;
 * - with layer 0 in the copy phase, each copying block loads its slice of the new weights
 *   (fu_split_load, nx->w_loading) once every block is in, so every update is done (block 0
 *   counts itself in too), rather than at the release (with lg_time S->lg_w_early counts those
 *   blocks in the steps run); one that misses that moment loads it once the step runs. A row
 *   block of the warp rows (fu_args.wrow) loads the row layers' weights then too (wr_load,
 *   nx->wr_loading); block 0, busy watching the host, loads them once the step runs.
 * A kernel that ends clears the words its relay set (block 0, once its relay warps are done).
 * Measured on an H100: 31.4 us a step against 33.0 with $MPSCY_CUDA_FUSED_PREFETCH=0. Reading
 * a block's rows here too when their pieces came before the release gained nothing (32.2 us):
 * on the benchmark they came after it for 99.9% of the blocks (bench/cuda_notes.md), and so
 * did they with block 0 free of the update (update_args.skip_block0, so that it reaches this
 * linger ~1.5 us sooner): 0-456 blocks in ~345,000 read them here (forty-ninth session). */
static __device__ bool fu_linger(const fu_args &a, float *ws, fu_next *nx) {
    __shared__ int go, act;
    __shared__ volatile int all_relayed;
    __shared__ unsigned long long t_relayed;
    __shared__ volatile int stop;  /* block 0: its relay warps' word (cu_relay_pieces): 2 go on, 1 end */
    cu_scratch *S = a.S;
    const int warp = threadIdx.x >> 5;
    fu_slice t;
    const bool relay = a.prefetch && a.deferred, slice = relay && a.split_q && fu_split_slice(a, a.b, &t),
               rows = relay && a.wrow && (int)blockIdx.x < a.b;
    nx->relayed = nx->w_loading = nx->wr_loading = false;
    /* the step to relay, read before any release: a released block's params copy overwrites it */
    const uint32_t next = a.P->seq + 1u;
    if (threadIdx.x == 0) stop = all_relayed = 0;
    __syncthreads();  /* every thread's update stores issued */
    unsigned int gen = 0u;
    unsigned long long td = 0ull;  /* block 0's thread 0, with lg_time: this step's early decision, when timed */
    if (threadIdx.x == 0) {
        gen = *(volatile const unsigned int *)&S->lg_gen;
        __threadfence();
    }
    if (blockIdx.x == 0) {
        if (threadIdx.x == 0) {
            const unsigned long long t0 = cu_global_ns();
            int v = -1;
            unsigned long long t_req = 0ull, t_all = 0ull;
            bool all = false;
            atomicAdd(&S->lg_arrive, 1u);  /* block 0 counts too: all in, every update is done (the slices) */
            while (v < 0 || !all) {
                if (!all && (all = cu_load_acquire_gpu(&S->lg_arrive) == gridDim.x) && a.lg_time) t_all = cu_global_ns();
                if (v < 0 && (v = fu_linger_verdict(a, t0)) >= 0) t_req = cu_global_ns();
            }
            stop = v ? 2 : 1;
            /* FU_LG_TIMES' figures (block 0's thread 0's alone): this step's stamps taken and
             * cleared before the release, after which the next step's blocks stamp anew */
            unsigned long long at[9] = {t0, t_req, 0ull, 0ull, 0ull, 0ull, 0ull, 0ull, t_all}, tr = 0ull;
            if (a.lg_time) {
                tr = S->lg_t_release;
                td = S->lg_t_decide;
                at[4] = td, at[5] = S->lg_t_rows, at[6] = S->lg_t_products, at[7] = S->lg_t_copy;
                S->lg_t_decide = S->lg_t_rows = S->lg_t_products = S->lg_t_copy = 0ull;
                at[3] = cu_global_ns();
                S->lg_t_release = v ? at[3] : 0ull;
            }
            S->lg_arrive = 0u;
            go = v;
            __threadfence();
            /* the release: the barrier's next number, its top bit set when the kernel ends, so
             * that the waiters have the verdict in the word they poll (a second load of a word
             * beside it and a fence after it cost ~0.2-0.4 us a step on an H100) */
            atomicExch(&S->lg_gen, ((gen + 1u) & 0x7fffffffu) | (v ? 0u : 0x80000000u));
            __threadfence();
            if (a.lg_time && v && td && tr) {
                for (int k = 0; k < 9; k++)
                    if (k != 2) S->lg_sum[k] += (long long)(at[k] - (k < 4 || k == 8 ? td : tr));
                S->lg_sum[FU_LG_TIMES - 1]++;
            } else {
                td = 0ull;
            }
        } else if (relay && warp >= 1 && warp <= a.relays) {
            /* staggered as the step's own relay warps are (mlp.cu) */
            const unsigned long long t0 = cu_global_ns(), wait = (unsigned long long)(warp - 1) * FU_RELAY_NS / a.relays;
            while (cu_global_ns() - t0 < wait && !stop) {
            }
            if (cu_relay_pieces(a.flags, (a.in_n + a.in_piece - 1) / a.in_piece, next, NULL, S->fused_piece, S, a.R,
                                &stop) &&
                (threadIdx.x & 31) == 0) {
                if (!all_relayed) t_relayed = cu_global_ns();
                all_relayed = 1;
            }
        }
        __syncthreads();  /* the relay warps are done */
        if (td && all_relayed) S->lg_sum[2] += (long long)(t_relayed - td);
        /* a kernel that ends leaves no relayed word behind (the words are 0 between steps: the
         * copying blocks wait for them to be nonzero), whatever launches next */
        if (!go && relay && threadIdx.x < CU_STAGE_MAX_PIECES) S->fused_piece[threadIdx.x] = 0u;
        nx->relayed = all_relayed != 0;
        return go != 0;
    }
    /* the other blocks: counted in, then (a copying block) its slice of the new weights once every
     * block's update is done, if that comes before the release; then the release */
    if (threadIdx.x == 0) {
        atomicAdd(&S->lg_arrive, 1u);
        act = 0;
        while ((slice || rows) && cu_load_acquire_gpu(&S->lg_gen) == gen)
            if (cu_load_acquire_gpu(&S->lg_arrive) == gridDim.x) {
                act = 1;
                break;
            }
    }
    __syncthreads();
    if (act) {
        if (slice) fu_split_load(a, a.b, ws);
        if (rows) wr_load(a, ws + a.wr_off);
        cp_async_commit();
        nx->w_loading = slice;
        nx->wr_loading = rows;
    }
    if (threadIdx.x == 0) {
        uint32_t g2;
        while ((g2 = cu_load_acquire_gpu(&S->lg_gen)) == gen) {
        }
        go = !(g2 & 0x80000000u);
        if (go && act && slice && a.lg_time) atomicAdd(&S->lg_w_early, 1ull);
    }
    __syncthreads();
    if (!go && act) cp_async_wait<0>();  /* nothing left in flight as the kernel ends */
    return go != 0;
}

#endif /* MPSCY_CUDA_MLP_LINGER_CUH */
