/* mlp.cuh — the one-kernel MLP step's shared definitions (mlp.cu): its limits, the arguments
 * the kernel takes, the host's plan, the grid barrier and the phase trace. Device code for
 * mlp.cu and the phase headers it includes (mlp_split.cuh, mlp_rows.cuh) only. */
#ifndef MPSCY_CUDA_MLP_CUH
#define MPSCY_CUDA_MLP_CUH

#include "cuda.h"
#include "update.h"

#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#define FU_MAX_LAYERS 8
#define FU_MAX_CLASSES 64
#define FU_THREADS 512
#define FU_WARPS (FU_THREADS / 32)
#define FU_VEC 4096                    /* widest row held in shared memory */
#define FU_SMEM_FLOATS (2 * FU_VEC + 1024) /* two row vectors and the d(input) partial sums (36 KB) */
#define FU_MAX_BATCH 256
#define FU_RELAY_NS 1500               /* about one PCIe round trip of a flag poll (bench/cuda_notes.md) */
#define FU_MAX_WORK ((int64_t)1 << 24) /* batch x parameters: beyond it the library GEMMs win */
#define FU_LINGER_US 50                /* how long the kernel waits for the next step (fu_linger; $MPSCY_CUDA_FUSED_LINGER) */

struct fu_layer {
    const float *x;    /* (b, in): the graph input or the layer below's output */
    float *y;          /* (b, out): output, after the ReLU when relu */
    float *dz;         /* (b, out): d(pre-activation) */
    const float *w;    /* (out, in) */
    const float *bias; /* (out) or NULL */
    float *dw, *db;    /* gradients (db NULL without bias) */
    int in, out, relu;
    int dz4;           /* dz's rows as 16-byte loads in the weight gradients (out a multiple of 4, dz
                        * aligned; decided at plan, never with $MPSCY_CUDA_FUSED_GRADV=0, a measuring knob) */
};

struct fu_args {
    fu_layer L[FU_MAX_LAYERS];
    int n_layers, b, accuracy;
    double eps;        /* label smoothing */
    double eps_u, inv_b; /* eps / classes and 1 / b (the loss's terms, made on the host: the same bits) */
    update_args u;
    cu_scratch *S;
    cu_result *R;
    const cu_params *P;
    double clip_norm;
    const uint4 *copy_src;       /* the staging (params block, labels, batch) in pinned, mapped host */
    uint4 *copy_dst;             /* memory, copied by the kernel to its device mirror (copy_n units) */
    int64_t copy_n;
    const int32_t *labels;
    /* deferred staging (step.cu): input 0's rows (in_n floats) are pulled from pinned in_src to
     * in_dst piece by piece (in_piece floats) as the host flags them (flags, this step's number in
     * the host's params block, which heads copy_src); the copy above then covers the params block
     * and labels only */
    int deferred;
    const float *in_src;
    float *in_dst;
    int64_t in_n, in_piece;
    const uint32_t *flags;
    /* layer 0 in the copy phase (fu_split; split_q 0: its own phase after the copy): copying
     * block c >= 1 owns K-slice q = (c - 1) % split_q (split_kw wide) of layer 0's input for
     * split_rows rows, holds w[:, slice] in dynamic shared memory (split_pitch floats a row)
     * loaded before its rows land, and for each of them writes the slice's partial products to
     * ypart[q][r][:]; the row phase adds the split_q partials, the bias and the ReLU */
    int split_q, split_kw, split_pitch, split_rows;
    float *ypart;
    int relays;        /* warps that relay the host's flags ($MPSCY_CUDA_FUSED_RELAYS, default 2; 1 is one warp, the form before) */
    int split_parts;   /* fu_split's dot form in parts of the slice (0: $MPSCY_CUDA_FUSED_SPLITK=1, measuring) */
    int row_narrow;    /* $MPSCY_CUDA_FUSED_ROWU=8 (measuring): the row load's partial products 8 loads a round, not 16 */
    int din_wide;      /* $MPSCY_CUDA_FUSED_DWIDE=1 (measuring): the row phase's d(input) loads 16 classes a batch always */
    int split_dot;     /* $MPSCY_CUDA_FUSED_SPLITDOT=0 (measuring): the split's products a (row, output) a thread */
    int early;         /* the early decision (fu_early; $MPSCY_CUDA_FUSED_EARLY=0, measuring: the end decides always) */
    int early_rel;     /* fu_early's arrival one acq_rel atomic, the others released by warp 1 while warp 0 decides ($MPSCY_CUDA_FUSED_EARLYREL=0, measuring: fences, then the release, then the decision) */
    int early_warp;    /* fu_early's sums by warp 0 alone where b <= 32 ($MPSCY_CUDA_FUSED_EARLYWARP=0, measuring: block_sum3) */
    int trace;         /* $MPSCY_CUDA_FUSED_TRACE: block 0 prints each phase's time (a profiling knob) */
    unsigned long long linger_ns; /* after its update the kernel waits this long for the next step (fu_linger); 0: it ends */
    int lg_time;       /* $MPSCY_CUDA_VERBOSE: the linger's intervals timed (fu_linger, S->lg_sum) */
    int prefetch;      /* while it lingers, the next step's front begun (fu_linger; $MPSCY_CUDA_FUSED_PREFETCH=0, measuring: not) */
    unsigned long long *stamps; /* with trace: FU_STAMPS times a block (fu_stamp) */
    int wrow;          /* the row phase by this many warps a row (0: a block a row), its weights in shared memory at wr_off (mlp_wrow.cuh) */
    int64_t wr_off;    /* where in the dynamic shared memory (floats, past the split's slice) */
    int wr_in[FU_MAX_LAYERS], wr_w[FU_MAX_LAYERS], wr_p[FU_MAX_LAYERS]; /* wr_plan: row layer l's input row in
                        * the row buffers, its weights past wr_off, their pitch (floats) */
    int wr_g[FU_MAX_LAYERS], wr_gb[FU_MAX_LAYERS]; /* wr_plan: log2 of the lanes an output (forward), a chunk of 4 inputs (d(input)) */
    int wr_outs[FU_MAX_LAYERS], wr_chunks[FU_MAX_LAYERS]; /* wr_plan: a warp's outputs (forward), chunks of 4 inputs (d(input)) */
    int wr_logit, wr_dzn; /* the logits in the row buffers, then (FU_MAX_CLASSES floats on) two dz vectors of wr_dzn floats */
};

/* $MPSCY_CUDA_VERBOSE (fu_args.lg_time; the linger: mlp_linger.cuh): S->lg_sum's intervals, in ns, over the steps taken while
 * lingering whose step before was too: from a step's early decision, block 0's arrival here, the
 * next request seen, the next step's pieces all relayed, the release; then over the step that
 * release started, from it, its early decision, the last copying block's rows read,
 * their products done, block 0 past the copy's barrier; then from the early decision again, block
 * 0's first look that found every block in (every update done: a look that may wait behind a
 * look at the request, a PCIe round trip, until that is seen); their count last */
#define FU_LG_TIMES 10
static_assert(sizeof(((cu_scratch *)0)->lg_sum) == FU_LG_TIMES * sizeof(long long), "cu_scratch.lg_sum holds FU_LG_TIMES");

/* What the lingering kernel did for the step it then runs (fu_linger) */
struct fu_next {
    bool relayed;    /* block 0: every piece of the step relayed already */
    bool w_loading;  /* this block's slice of layer 0's weights on its way already (fu_split_load) */
    bool wr_loading; /* this row block's row-layer weights on their way already (wr_load) */
};

#define FU_STAMPS 7    /* per block: start, its pieces seen, its rows loaded (split), copy done, barrier passed,
                        * its arrival at the early decision, the early decision released (its last block) */
#define FU_MARKS 32    /* block 0's marks (fu_mark) at most */
/* 1: a measuring build whose trace also has the row phase's fine points (fu_clk, fu_mark_fine);
 * 0: they are not compiled, so the step's hot path carries no test for them */
#define FU_CLOCKS 0
#define FU_CLK_WARPS 4 /* with trace: block 0's first warps' SM clock at FU_CLK_N points of the warp rows (fu_clk) */
#define FU_CLK_N 20
#define FU_STAMP_BYTES(blocks) (((size_t)(blocks) * FU_STAMPS + (FU_CLOCKS ? FU_CLK_WARPS * FU_CLK_N : 0)) * sizeof(unsigned long long))

struct cu_fused {
    fu_args a;
    int cluster, blocks;
    int64_t ws_floats;     /* dynamic shared memory for the split's weight slice, in floats (0: no split) */
    int64_t ypart_floats;  /* g's room for the partial products */
    int64_t wr_floats;     /* dynamic shared memory past ws_floats for the warp-row form's weights (0: block rows) */
    int split_align;       /* fu_split_q's align: 32 ($MPSCY_CUDA_FUSED_SPLITW, a measuring knob; 0 or 1: none) */
    unsigned long long linger_ns; /* $MPSCY_CUDA_FUSED_LINGER (us) as ns: the full batch's kernel lingers (deferred grid form) */
};

/* Data written earlier in this launch is read with plain loads after a barrier (grid.sync and
 * cluster.sync order memory at their scope). */
template <bool CLUSTER>
static __device__ __forceinline__ void fu_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (CLUSTER) {
        cg::this_cluster().sync();
        return;
    }
#endif
    cg::this_grid().sync();
}

static __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

/* The early decision (mlp.cu's fu_early): whether every weight gradient is finite is known before
 * any is computed. In float, dW[j, i] = sum_r dz[r, j] x[r, i] over b rows is at most
 * b max|x| max|dz| (1 + 2^-24)^(b + 1) in magnitude, and db[j] at most that with max|x| taken
 * as 1: with both maxima finite and b max(max|x|, 1) max|dz| < FLT_MAX / 2, every gradient, and
 * so their norm, is finite. Each thread keeps the largest |value| it reads or writes of the
 * layers' inputs (the batch and every hidden layer's output) and of their dz, a NaN or an Inf as
 * Inf; each warp then publishes its largest into S->fu_amax as float bits (for values >= 0 they
 * order as unsigned ints). */
static __device__ __forceinline__ float fu_amax(float m, float v) {
    const float x = fabsf(v);
    return x <= FLT_MAX ? fmaxf(m, x) : INFINITY;
}

/* the warp's largest as float bits (every lane calls it) */
static __device__ __forceinline__ unsigned int fu_amax_warp(float m) {
    unsigned int w = __float_as_uint(m);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    w = __reduce_max_sync(0xffffffffu, w);
#else
    for (int o = 16; o > 0; o >>= 1) w = max(w, __shfl_xor_sync(0xffffffffu, w, o));
#endif
    return w;
}

/* the warp's largest into its slot of the block's wmax (wmax[warp]: the layers' inputs,
 * wmax[FU_WARPS + warp]: their dz; fu_early reads them after a block barrier; every lane calls it) */
static __device__ __forceinline__ void fu_wmax_note(unsigned int *slot, int lane, float m) {
    const unsigned int w = fu_amax_warp(m);
    if (lane == 0) *slot = max(*slot, w);
}

/* both of a row's largest values (|input|, |dz|) into the warp's slots (fu_wmax_note) */
static __device__ __forceinline__ void fu_wmax_notes(unsigned int *wmax, int warp, int lane, float mx, float md) {
    fu_wmax_note(&wmax[warp], lane, mx);
    fu_wmax_note(&wmax[FU_WARPS + warp], lane, md);
}

/* the warp's largest into the grid's word (every lane calls it) */
static __device__ __forceinline__ void fu_amax_publish(unsigned int *word, float m) {
    const unsigned int w = fu_amax_warp(m);
    if ((threadIdx.x & 31) == 0 && w) atomicMax(word, w);
}

/* $MPSCY_CUDA_FUSED_TRACE: thread 0 of block 0 stamps the time at each mark (a profiling knob) */
struct fu_trace {
    unsigned long long t[FU_MARKS];
    long long c[FU_MARKS];
    int n;
};

static __device__ __forceinline__ void fu_mark(const fu_args &a, fu_trace *T) {
    if (a.trace && blockIdx.x == 0 && threadIdx.x == 0 && T->n < FU_MARKS) {
        T->t[T->n] = cu_global_ns();
        T->c[T->n++] = clock64();
    }
}
#define FU_MARK() fu_mark(a, &T)

/* a mark inside a phase (the loss's steps, the row input's waits): with FU_CLOCKS only */
static __device__ __forceinline__ void fu_mark_fine(const fu_args &a, fu_trace *T) {
    if (FU_CLOCKS) fu_mark(a, T);
}

/* with trace: thread 0 of every block stamps the time of event k (FU_STAMPS) */
static __device__ __forceinline__ void fu_stamp(const fu_args &a, int k) {
    if (a.trace && threadIdx.x == 0) a.stamps[blockIdx.x * FU_STAMPS + k] = cu_global_ns();
}

/* with FU_CLOCKS and the trace: lane 0 of block 0's chain warp w (on: that, and the trace) stamps
 * the SM's clock at point k of the warp rows (wr_chain: 4 a phase, the phase's start, its first
 * sums, its end, past its barrier) */
static __device__ __forceinline__ void fu_clk(const fu_args &a, bool on, int w, int k) {
    if (FU_CLOCKS && on && k < FU_CLK_N) a.stamps[gridDim.x * FU_STAMPS + w * FU_CLK_N + k] = clock64();
}

/* $MPSCY_CUDA_FUSED_TRACE: block 0's thread 0 prints its marks and every block's stamps */
static __device__ __forceinline__ void fu_trace_print(const fu_args &a, const fu_trace &T) {
    /* per mark, ns: copy, barrier, layer 0, barrier, row loaded, each later layer's forward,
     * loss, each d(input), barrier, gradients, barrier, decision and update */
    const int nt = T.n;
    printf("fused_mlp trace: %d blocks, SM clock %.0f MHz; ns per mark:", (int)gridDim.x,
           1e3 * (double)(T.c[nt - 1] - T.c[0]) / (double)(T.t[nt - 1] - T.t[0]));
    for (int k = 1; k < nt; k++) printf(" %llu", T.t[k] - T.t[k - 1]);
    printf(" total %llu\n", T.t[nt - 1] - T.t[0]);
    /* every block's stamps from block 0's start: min, max (its block) of each event */
    printf("fused_mlp stamps (ns from block 0's start; min max@block):");
    for (int k = 0; k < FU_STAMPS; k++) {
        long long lo = 1LL << 62, hi = -(1LL << 62);
        int at = -1;
        for (int blk = 0; blk < (int)gridDim.x; blk++) {
            const unsigned long long at_k = a.stamps[blk * FU_STAMPS + k];
            if (!at_k) continue;  /* not this block's event (a block that copies no slice) */
            const long long d = (long long)(at_k - a.stamps[0]);
            if (d < lo) lo = d;
            if (d > hi) {
                hi = d;
                at = blk;
            }
        }
        if (at >= 0) printf(" [%d] %lld %lld@%d", k, lo, hi, at);
    }
    printf("\n");
    /* the warp rows' clocks (fu_clk), cycles from warp 0's first; 0: not taken */
    const unsigned long long *ck = a.stamps + gridDim.x * FU_STAMPS;
    if (FU_CLOCKS && ck[0]) {
        for (int w = 0; w < FU_CLK_WARPS; w++) {
            printf("fused_mlp clocks warp %d:", w);
            for (int k = 0; k < FU_CLK_N; k++)
                printf(" %lld", ck[w * FU_CLK_N + k] ? (long long)(ck[w * FU_CLK_N + k] - ck[0]) : -1LL);
            printf("\n");
        }
    }
}

/* Deferred staging: waits until the relay (block 0's first warps, cu_relay_pieces) has seen the
 * host's flag of piece p; block 0 clears the words after the copy's barrier. */
static __device__ __forceinline__ void fu_wait_piece(const cu_scratch *S, int64_t p) {
    while (cu_load_acquire_gpu(&S->fused_piece[p]) == 0u) __nanosleep(64);
}

#endif /* MPSCY_CUDA_MLP_CUH */
