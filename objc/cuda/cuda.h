/* cuda.h — internals of the CUDA backend: the graph object with its device slabs, pinned staging
 * and captured CUDA graphs (one per kind of step), the per-kind layer table, and the enqueue functions each
 * family file provides. Enqueue functions put kernels on a stream (they run inside a stream
 * capture) and return a status; none allocates. Only mpscy_cuda_backend (device.cu) is exported. */
#ifndef MPSCY_CUDA_H
#define MPSCY_CUDA_H

#include "../backend.h"
#include "../common/plan.h"
#include "../common/activation_math.h"
#include "../common/optim_math.h"
#include "stage.h"

#include <cuda_runtime.h>

#define CU "cuda"
#define CU_MAX_PARTS 2048      /* partial sums of the loss and norm reductions */
#define CU_DEFER_MIN (64 << 10) /* bytes of input 0 from which a step stages it while it runs */
#define CU_ALIGN 256
#define CU_THREADS 256
#define CU_PULL_SPLIT 4         /* step.cu's pull: copying blocks per piece of a deferred batch */

struct cu_lt;  /* blas.h */

typedef struct cu_device {
    struct mpscy_device_ base;
    int ordinal;
    int sms;                   /* multiprocessors */
    struct cu_lt *lt;          /* cuBLASLt handle */
    int coop;                  /* cooperative kernels can be captured in graphs here */
    int pdl;                   /* programmatic dependent launch works in captured graphs here */
    cudaDeviceProp prop;
    struct cu_graph *pending;  /* a graph whose last training step returned before its update
                                  finished (step.cu); cu_settle waits for it */
} cu_device;

/* Per-step values, written on the host into pinned staging before each launch and copied to
 * the device by the graph's first node, so no schedule ever forces a re-capture. */
typedef struct cu_params {
    mpscy_optim_coef coef;     /* optimizer coefficients of this step (host-computed, as cpu) */
    uint64_t seed, counter;    /* dropout generator key and counter */
    double extra[4];           /* optimizer-specific per-step scalars */
    uint32_t seq;              /* a deferred step's number (its pieces' flags carry it), else 0 */
    uint32_t rseq;             /* a training step's number, or 0: update.h's decide() stores it in
                                  cu_result.done once the result is final */
    uint32_t nslot;            /* the cu_result.norm_ring slot a norm that comes after its result takes:
                                  never the one a norm still owed is in (step.cu) */
} cu_params;

/* Device-side scratch of the reductions and the step's decision. */
typedef struct cu_scratch {
    double loss_part[CU_MAX_PARTS];
    long long correct_part[CU_MAX_PARTS];
    double norm_part[CU_MAX_PARTS];
    unsigned int loss_count, norm_count;
    int applied;               /* 1: this step's update is applied (finite, TRAIN) */
    /* bad_seq .. part_seq: the marks numbered by deferred steps, kept together: step.cu's launch
     * clears them as one range (up to clip_scale) when the numbers start again */
    unsigned int bad_seq;      /* the last deferred step whose input held a NaN or Inf */
    unsigned int piece_seq[CU_STAGE_MAX_PIECES]; /* step.cu's pull: the host's flags, relayed */
    unsigned int fused_piece[CU_STAGE_MAX_PIECES]; /* mlp.cu's deferred copy: the flags relayed, 0 between steps */
    unsigned int part_seq[CU_STAGE_MAX_PIECES * CU_PULL_SPLIT]; /* the pull: each block's part copied */
    float clip_scale;          /* clip_grad_norm coefficient when < 1, else 1 */
    double loss;               /* the step's mean loss */
    long long correct;         /* its correct count, or -1 (no accuracy) */
    unsigned int red_count;    /* L-BFGS reductions (lbfgs.cu) */
    double red_part[CU_MAX_PARTS];
    double coef[2];            /* L-BFGS two-loop coefficient being computed */
    double label_w;            /* loss.cu: the labels' summed class weights, for many rows (loss_label_weight) */
    /* mlp.cu's early decision: the largest |value| of the weight gradients' factors (the layers'
     * inputs, then their dz) as float bits, and the blocks past the row phase; 0 between steps */
    unsigned int fu_amax[2];
    unsigned int fu_arrive;
    unsigned int fu_gen;       /* the row phase's barrier (fu_early): one more each step, never cleared */
    unsigned int fu_late;      /* rseq of the last step fu_early decided: its end writes the norm's slot */
    /* mlp.cu's linger: the blocks past a step's update, and the barrier's number (one more each
     * time in its low 31 bits, never cleared; the top bit block 0's verdict: set, the kernel ends) */
    unsigned int lg_arrive, lg_gen;
    unsigned long long lg_w_early; /* with $MPSCY_CUDA_VERBOSE: copying blocks that loaded their weight slice while the kernel lingered, in steps it ran (never cleared) */
    /* with $MPSCY_CUDA_VERBOSE (fu_args.lg_time), globaltimer ns (0: none): when the last early
     * decision was released, the last step taken while lingering was released, and in the step
     * since, the last copying block had its rows and its products and block 0 passed the copy's
     * barrier; the sums of mlp_linger.cuh's FU_LG_TIMES intervals over the steps timed */
    unsigned long long lg_t_decide, lg_t_release, lg_t_rows, lg_t_products, lg_t_copy;
    long long lg_sum[10];
} cu_scratch;

/* What a step reports; kernels write it into pinned, device-mapped host memory. */
typedef struct cu_result {
    double loss;
    double grad_norm;
    long long correct;
    int finite;
    int applied;
    int stalled;               /* the pull kernel gave up waiting for a piece of the batch */
    unsigned int done;         /* cu_params.rseq of the last step whose result is final */
    double red[8];             /* L-BFGS: reductions read by the host */
    /* a training step decided before its norm was known (mlp.cu's fu_early) has its rseq in
     * norm_late; its norm lands in slot P->nslot, marked by norm_seq[slot] = rseq (a release store) */
    unsigned int norm_late;
    double norm_ring[2];
    unsigned int norm_seq[2];
    /* mlp.cu's linger (step.cu's claim): the host asks the one-kernel step that ran deferred
     * step s for step s + 1 in lg_req (the step's number; 0: stop), and a kernel that gives up
     * waiting says so in lg_closing (s), then gives its verdict in lg_verdict (2 s + 1: it runs
     * the step asked for after all, 2 s: it ends) */
    unsigned int lg_req, lg_closing;
    unsigned long long lg_verdict;
} cu_result;

enum { CU_KIND_TRAIN = 0, CU_KIND_EVAL = 1, CU_KIND_GRAD = 2, CU_KIND_PREDICT = 3, CU_KINDS = 4 };

/* io buffer heads: shared ones point into pinned staging, private ones at device memory */
typedef struct cu_buffer {
    struct mpscy_buffer_ base;
    void *dmem;                /* device bytes of a private buffer (or a graph's device tensor) */
} cu_buffer;

/* per-node decisions taken at build */
enum { CU_FUSE_RELU = 1,       /* Dense: its ReLU consumer is applied in the GEMM epilogue */
       CU_SKIP = 2 };          /* ReLU fused into its Dense, Flatten aliased: no kernel */

/* runs of the gradient slab (offset, floats) whose squares the early norm's final kernel adds
 * itself (optim.cu) */
#define CU_NORM_LATE_RUNS 4
typedef struct cu_norm_late {
    int64_t off[CU_NORM_LATE_RUNS], n[CU_NORM_LATE_RUNS];
    int runs;
} cu_norm_late;

typedef struct cu_graph {
    struct mpscy_graph_ base;
    mpscy_plan plan;
    cu_device *dev;
    int pdl;                   /* its kernels launch with programmatic dependent launch (graph.cu) */
    /* device slabs, one allocation per role */
    float *params;             /* (n_params + n_buffers): trainable, frozen, running stats */
    float *grads;              /* (n_params): the first n_train read by the norm and the update */
    float *optim;              /* (optim_floats): the optimizer's slots (and L-BFGS scratch) */
    float *class_w;            /* (plan.classes) the loss's class weights (plan.class_weight), or NULL */
    float *pos_w;              /* (out_size) bce_with_logits's pos_weight (plan.pos_weight), or NULL */
    double scalars[MPSCY_MAX_SCALARS]; /* optimizer scalars on the host; scalars[0] = step count */
    double mu_next;            /* the running scalar after the step in flight (mpscy_optim_coef_make) */
    float *act, *dact, *save;
    float *ws;                 /* layer workspace (the largest any layer needs; main stream only) */
    float *colbuf;             /* each convolution's im2col columns, kept from forward to backward */
    int64_t col_floats, *col_off;
    int64_t ws_floats;
    int64_t conv_split;        /* $MPSCY_CUDA_CONV_SPLIT at build, or 0: every convolution runs over sub-batches of
                                * at most this many samples (conv_split.cu; testing) */
    int conv_split_only;       /* $MPSCY_CUDA_CONV_SPLIT_ONLY at build, or -1: only the convolution of this index (0:
                                * the first in node order) takes conv_split's sub-batches (testing a mix) */
    void *lt_ws[2];            /* cuBLASLt workspaces of the main and side streams */
    size_t lt_ws_bytes;
    cu_scratch *scratch;       /* device */
    cu_result *result;         /* pinned, mapped: kernels write it, the host reads it */
    /* staging: [params block | target | input 0 | input 1 ...] in pinned host memory and its
     * device mirror, so one copy moves this step's scalars, targets and the first input */
    char *stage_h, *stage_d;
    size_t stage_bytes, off_target, off_input[MPSCY_MAX_INPUTS];
    float *out_h;              /* pinned output of predict (B, out) */
    size_t out_bytes;
    cu_params *params_h, *params_d;
    float **y, **dy;           /* per node: output and d(output) device pointers */
    uint8_t *fuse;             /* per node: CU_FUSE_* */
    cu_buffer *io_bufs;        /* n_inputs + 2 + n_inputs borrowed heads */
    size_t tables_bytes;
    cudaStream_t stream, side; /* side: weight gradients, off the critical path */
    cudaStream_t alt;          /* a second side stream ($MPSCY_CUDA_SIDES=2, the default; else NULL): every other
                                * convolution whose weight gradient is own kernels without columns (conv.cu) */
    int side_turn;             /* capture state: such convolutions met so far in the backward */
    cudaEvent_t fork, join;
    cudaEvent_t wready;        /* on side: a training forward re-laid W for its backward's dx (conv.cu) */
    cudaEvent_t colready;      /* on side: a training forward built a no-dx convolution's columns (conv.cu) */
    int cols_recorded;         /* per capture: colready recorded */
    int input_dw_main;         /* $MPSCY_CUDA_INPUT_DW not "side": a no-dx convolution's dW on the main stream */
    int early;                 /* $MPSCY_CUDA_EARLY not 0: a training step returns once its result is final */
    uint32_t rseq;             /* the last training step's number (cu_params.rseq) */
    uint32_t norm_owed;        /* the last training step's number when it returned before its gradient
                                * norm was known, until the caller has it; else 0 */
    uint32_t owed_slot;        /* the cu_result.norm_ring slot that norm lands in */
    /* the one-kernel step's linger (mlp.cu, step.cu): the kernel that ran deferred step lg_live
     * (0: none) may still be waiting for the next one after its update */
    uint32_t lg_live;
    int64_t lg_steps, lg_taken;  /* training steps of a lingering kernel's graph, and those one took */
    int lg_report;               /* $MPSCY_CUDA_VERBOSE at build: the host's turns timed, the counts printed when freed */
    int64_t lg_result_ns;        /* with lg_report: when the host saw the last such step's result (CLOCK_MONOTONIC) */
    int64_t lg_turn_ns, lg_turns; /* the host's time from a result to the next step's request, summed */
    int64_t lg_enter_ns;         /* of that, to the next step's launch() (the caller's part: Python, the labels) */
    int64_t lg_stage_ns, lg_stages; /* and to the next step's batch staged, where a lingering kernel took it */
    /* with lg_report: one staging's times (_staging.h's mpscy_stage_job.stamp; the slots a
     * staging uses, its pieces and tasks, are the same in each, the others stay 0), and their
     * sums from the result over the lg_stages a lingering kernel took */
    int64_t lg_stamp[CU_STAGE_STAMPS], lg_stamp_ns[CU_STAGE_STAMPS];
    int forked;                /* capture state: the side streams with work to join (1: side, 2: alt, 4: nrm) */
    /* the early norm (optim.cu): each layer's squares summed on their own stream once its gradients
     * are done, the final kernel adding the partials and the last layer's squares, then updating */
    cudaStream_t nrm;          /* that stream (NULL with MPSCY_CUDA_STREAMS=1: the main one) */
    int norm_on;               /* at build (cu_norm_plan): $MPSCY_CUDA_NORM_EARLY not 0 and the partials fit */
    int32_t norm_last;         /* at build: the node whose backward is enqueued last (its squares summed late) */
    int norm_parts;            /* capture state: the early norm's partials enqueued so far */
    cu_norm_late norm_late;    /* at build: the runs of the slab the final kernel squares itself (the tensors no
                                * early node takes), or none and norm_late_parts: those go as partials first */
    int norm_late_parts;
    int upd_batched;           /* $MPSCY_CUDA_UPD_BATCHED at build (update.h's update_args.batched) */
    int upd_prefetch;          /* $MPSCY_CUDA_NORM_PREFETCH at build not 0: the early norm's final kernel loads the
                                * update's first batch before it adds the partials (update_args.prefetch) */
    cudaGraphExec_t exec[CU_KINDS];  /* the captured step of each kind at the built batch */
    /* own small GEMMs (gemm.cu): split-K partials and tile counters, handed out in capture order */
    float *gws;
    unsigned int *gcount;
    int64_t gws_floats, gws_used, gcount_n, gcount_used;
    int gemm_mode;             /* $MPSCY_CUDA_GEMM at build: 1 own kernels, 0 cuBLASLt, 2 by size */
    int implicit;              /* $MPSCY_CUDA_IMPLICIT at build not 0: conv_implicit.cu where it fits */
    int io_settle;             /* $MPSCY_CUDA_IO_SETTLE=1 at build: cu_graph_io waits for a pending step for the
                                  staging too (measuring) */
    int head;                  /* training steps run head.cu ($MPSCY_CUDA_HEAD not 0 and cu_head_fits, at build) */
    int32_t head_drop;         /* the Dropout below the output Dense whose training forward head_forward runs
                                  (cu_head_dropout, at build), or -1 */
    int dense_mma;             /* $MPSCY_CUDA_DENSE_MMA at build not 0: dense.cu's long-K products where they fit */
    uint8_t *dz_ready;         /* per node, per capture: its dz was written (ReLU mask applied) by a consumer
                                  (cu_relu_product's reader);
                                  for a Dropout between them: its backward was, so it runs none */
    struct cu_fused *fu;       /* the train step as one kernel (mlp.cu), or NULL */
    /* deferred staging (step.cu, stage.h): input 0 is copied into pinned staging by these
     * threads while the graph already runs, its pieces' flags in pinned memory */
    int defer;                 /* one input of at least CU_DEFER_MIN bytes at the built batch */
    struct mpscy_pool *stage_pool;
    int stage_stream;          /* input 0 staged with non-temporal stores (cu_stage_stream) */
    uint32_t *flags_h;         /* (CU_STAGE_MAX_PIECES), pinned */
    uint32_t seq;              /* the last deferred step's number, 1 .. seq_period */
    uint32_t seq_period;       /* 2^31 - 1 ($MPSCY_CUDA_SEQ_PERIOD: a smaller one, for testing the wrap) */
    int64_t in0_size;          /* floats per row of input 0 */
    /* the pull's consumer (conv_direct.cu): a direct convolution of input 0 that is the first
     * kernel after the pull starts while the pull still runs, each block once its samples' parts
     * are copied (cu_pull_parts); $MPSCY_CUDA_PULL_CONV=0 waits for the whole pull */
    int pull_conv;             /* the knob, at build */
    int carveout;              /* the shared-memory carveout of every launch (percent), or -1: each kernel's own */
    int dx_first;              /* $MPSCY_CUDA_DX_FIRST: 1 a Dense's dx product enqueued before its side-stream dW,
                                * 2 a convolution's too, 0 neither */
    int sum_wide;              /* cu_sum_parts of more splits than this by 32-warp blocks (0: never) */
    int dz_direct;             /* $MPSCY_CUDA_DZ_DIRECT at build not 0: a stride-2 dx product writes the dz of the
                                * convolution below, masked by its ReLU, and an implicit dx reads its dz as it
                                * lies (conv.cu) */
    int dw_gather;             /* $MPSCY_CUDA_DW_GATHER at build not 0: a convolution whose forward reads x itself
                                * takes its weight gradient's B operand from x too, building no columns (conv.cu) */
    int dw_small;              /* $MPSCY_CUDA_DW_SMALL at build (default 2; 0: off): blocks a multiprocessor of
                                * conv_dw_small, a no-dx convolution's weight and bias gradients in one pass */
    int dw_rows;               /* $MPSCY_CUDA_DW_ROWS at build not 0: conv_dw_small's work by output rows where
                                * it fits (conv_dw.cu's conv_dw_rows) */
    int pull_next;             /* per capture: the pull, the last kernel enqueued, flags its parts for it */
} cu_graph;

/* A build-time knob ($name, graph.cu): on unless set to 0; an integer, def when unset or empty. */
int cu_knob_on(const char *name);
int cu_knob_int(const char *name, int def);

/* cudaMemcpy from pageable memory to the device, and cudaMemset of device memory, run on the
 * legacy default stream and may return before the device holds the bytes, and the graph's
 * streams (non-blocking) are not ordered after that stream: whoever writes so waits here before
 * a kernel may read them */
static inline cudaError_t cu_legacy_done(void) { return cudaStreamSynchronize(cudaStreamLegacy); }

/* A kernel's opt-in to `bytes` of dynamic shared memory (cudaFuncAttributeMaxDynamicSharedMemorySize),
 * never lowered (device.cu): the attribute is the kernel's, shared by every graph and thread of the
 * process, so an engine on another thread setting its smaller need between this thread's set and
 * launch would fail that launch. Raising it past a launch's need changes nothing for the launch. */
cudaError_t cu_smem_optin(const void *kernel, int bytes);

/* Counted allocations: every byte the backend holds goes through here. */
void *cu_host_alloc(mpscy_device dev, size_t bytes);              /* calloc */
void cu_host_free(mpscy_device dev, void *p, size_t bytes);
int cu_dev_alloc(mpscy_device dev, void **p, size_t bytes);       /* cudaMalloc, zeroed */
void cu_dev_free(mpscy_device dev, void *p, size_t bytes);
int cu_pinned_alloc(mpscy_device dev, void **p, size_t bytes);    /* cudaHostAlloc (mapped) */
void cu_pinned_free(mpscy_device dev, void *p, size_t bytes);

/* table entries implemented by buffer.cu, graph.cu and step.cu */
MPSCY_BACKEND_ENTRIES(cu_)
/* waits for a training step still finishing on the device (cu_device.pending), reporting its failure */
int cu_settle(mpscy_device dev, char *err, size_t n);
/* a kernel lingering after g's last step (mlp.cu) told to end now, before g's stream is waited for */
void cu_linger_stop(cu_graph *g);
/* any other graph's kernel lingering on GPU `ordinal` told to end, before work goes there (g: the
 * graph about to put it there, or NULL) */
void cu_linger_yield(int ordinal, const cu_graph *g);
int cu_graph_grad_norm(mpscy_graph g, double *out, char *err, size_t n); /* step.cu: mpscy_graph_grad_norm */
void cu_cache_clear(cu_graph *g);
int cu_capture(cu_graph *g, int kind, char *err, size_t en);

/* Device pointers to node n's tensor `slot` (0 weight / running_mean, 1 bias / running_var). */
float *cu_tensor(cu_graph *g, const mpscy_node *n, int32_t role, int32_t slot);
float *cu_tensor_grad(cu_graph *g, const mpscy_node *n, int32_t slot);
static inline int64_t cu_node_index(const cu_graph *g, const mpscy_node *n) { return n - g->plan.nodes; }

/* One entry per layer kind, enqueueing on g->stream during capture. forward runs in train mode
 * when `train`; backward writes parameter gradients and d(input j) as n->accum[j] says.
 * workspace returns floats needed; commit runs after the update, on the applied flag. */
typedef struct cu_layer_ops {
    int (*forward)(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
    int (*backward)(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
    int64_t (*workspace)(const mpscy_plan *p, const mpscy_node *n);
    /* always = 0: only when the device decided the step is applied; 1: unconditionally (L-BFGS) */
    int (*commit)(cu_graph *g, const mpscy_node *n, int64_t b, int always, char *err, size_t en);
} cu_layer_ops;

extern const cu_layer_ops cu_layers[MPSCY_LAYER_KIND_COUNT];

/* family entry points, listed in layers.cu */
int cu_dense_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_dense_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int64_t cu_dense_workspace(const mpscy_plan *p, const mpscy_node *n);
int cu_activation_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_activation_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int cu_flatten_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_flatten_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int cu_conv_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_conv_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int64_t cu_conv_workspace(const mpscy_plan *p, const mpscy_node *n);
int64_t cu_conv_columns(const cu_graph *gr, const mpscy_node *n);  /* floats of its slab (the kept im2col, ...):
                                                                     * once y, dy and the knobs are set */
/* conv.cu's launches that conv_split.cu shares: y (b, OC, OHW) from the product's (OC, b*OHW) with
 * the bias and the fused ReLU (conv_out_kernel); dz (OC, b*OHW) from dy masked by the fused ReLU's
 * output ry (or NULL) with each CU_DZ_CHUNK of a channel's sum in dbp (conv_dz_kernel; shifted:
 * conv_dgrad_s2's copies too), float4s where cu_conv_dz_vec */
#define CU_DZ_CHUNK 1024
static inline int64_t cu_dz_chunks(int64_t nb) { return (nb + CU_DZ_CHUNK - 1) / CU_DZ_CHUNK; }
int cu_conv_out(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, float *y, const float *yt, const float *bias,
                int64_t b, int relu, char *err, size_t en);
int cu_conv_dz_vec(const mpscy_conv_geom *cg, const float *dzt, const float *dy, const float *ry);
int cu_conv_dz(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, float *dzt, float *dbp, const float *dy,
               const float *ry, int64_t b, int vec, int shifted, char *err, size_t en);
/* conv_split.cu: samples per sub-batch of a convolution with a tensor of 2^31 - 1 or more
 * elements at the built batch (it then runs over sub-batches), 0 for one that fits, -1 for one
 * whose single sample's input, output or columns are that large (refused at build); the shared
 * workspace and the slab (cu_conv_columns) a split one needs; its forward and backward (dy
 * masked by the fused ReLU's output ry, or NULL) */
int64_t cu_conv_split(const cu_graph *gr, const mpscy_node *n);
int64_t cu_conv_split_workspace(const cu_graph *gr, const mpscy_node *n);
int64_t cu_conv_split_columns(const cu_graph *gr, const mpscy_node *n, int64_t s);
int cu_conv_split_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int64_t s, char *err, size_t en);
int cu_conv_split_backward(cu_graph *gr, const mpscy_node *n, int64_t b, int64_t s, const float *dy, const float *ry,
                           char *err, size_t en);
/* how its training weight gradient reads its operands: the kept im2col columns, x itself in the own
 * long product (conv_dw.cu's gather), or conv_dw_small's pass over dy and x */
enum { CU_DW_COLUMNS, CU_DW_GATHER, CU_DW_SMALL };
int cu_conv_dw_form(const cu_graph *gr, const mpscy_node *n);
void cu_conv_gemm_need(const cu_graph *g, const mpscy_node *n, int64_t *floats, int64_t *counters);
/* im2col.cu: a convolution's columns (K, b*OHW) from x (on stream s), and dx (accumulated when
 * accum) from dcol */
int cu_im2col(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, float *col, const float *x, int64_t b, char *err,
              size_t en);
int cu_col2im(cu_graph *g, const mpscy_conv_geom *cg, float *dx, const float *dcol, int64_t b, int accum, char *err,
              size_t en);
/* conv_direct.cu: y (b, OC, OHW) = the convolution of x, + bias, through the ReLU when relu, in one
 * kernel without columns; for groups 1 and C*KH*KW <= 32 (cu_conv_direct_fits) */
int cu_conv_direct_fits(const mpscy_conv_geom *cg);
int cu_conv_direct(cu_graph *g, const mpscy_conv_geom *cg, float *y, const float *x, const float *w, const float *bias,
                   int64_t b, int relu, char *err, size_t en);
int cu_conv_direct_beside(const cu_graph *g);  /* the first layer starts beside the pull (conv_direct.cu) */
/* conv_dw.cu: out (count) = the ordered sum of `splits` partials (splits, count), + bias[e % n]
 * when bias, through the ReLU when relu (a Dense's long-K forward), launched on s; the same bits
 * every run at one configuration */
cudaError_t cu_sum_parts(const cu_graph *g, cudaStream_t s, float *out, const float *part, int64_t count,
                         int64_t splits, const float *bias, int64_t n, int relu, float *out2 = NULL,
                         int64_t split = 0);
/* conv_dw.cu: the weight gradient dw (OCg, Kg) = dzt (OCg, nb) col^T as the own fp32 product split
 * over K on stream s into part (cu_conv_dw_parts(nb) products of (OCg, Kg) at most), then their
 * ordered sum; with x (groups 1) its B is read from x (b, C, H, W) itself, not from col */
int64_t cu_conv_dw_parts(int64_t nb);
int64_t cu_conv_dw_own_most(const cu_graph *g, const mpscy_conv_geom *cg, int64_t nb);  /* its splits at nb or fewer */
int cu_conv_dw_own(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, int64_t nb, float *dw, const float *dzt,
                   const float *col, const float *x, float *part, char *err, size_t en);
/* conv_dw.cu: dw (OC, kg) and db (OC, or NULL) of a convolution without dx, groups 1, kg + 1 (with a
 * bias) <= 32 and OC <= 64 (cu_conv_dw_small_fits), in one fp32 pass over dy (b, OC, OHW) masked
 * by ry > 0 (ry NULL: no mask) and x, in gr->dw_small blocks a multiprocessor at most, then the
 * ordered sum of their partials (room in part: part_floats, as many blocks as fit) */
int cu_conv_dw_small_fits(const mpscy_conv_geom *cg, int bias);
/* whether conv_dw_small's work goes by output rows (conv_dw_rows: gr->dw_rows and the geometry fits),
 * when dy is 16-byte aligned */
int cu_conv_dw_rows_fits(const cu_graph *gr, const mpscy_conv_geom *cg, int bias);
int cu_conv_dw_small(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, int64_t nb, int64_t part_floats, float *dw,
                     float *db, const float *dy, const float *ry, const float *x, float *part, char *err, size_t en);

/* The pull's parts (step.cu): block k of the pull copies part k % CU_PULL_SPLIT (cu_pull_part
 * floats) of piece k / CU_PULL_SPLIT of input 0, then, when the first layer starts beside it
 * (cu_conv_direct_beside), stores the step's number in cu_scratch.part_seq[k] (a release at GPU
 * scope after a fence). That consumer waits for the parts that hold the floats it reads with
 * cu_pull_wait (below; used by conv_direct.cu). */
typedef struct cu_pull_parts {
    const unsigned int *seq;   /* cu_scratch.part_seq, or NULL: nothing to wait for */
    const cu_params *P;        /* P->seq: this step's number */
    int64_t piece;             /* floats in a piece (cu_stage_piece of the pulled floats) */
} cu_pull_parts;
static inline __host__ __device__ int64_t cu_pull_part(int64_t piece) { return (piece / CU_PULL_SPLIT + 3) & ~(int64_t)3; }
/* conv_s2.cu: dx of a 3x3, stride-2, pad-1 convolution (groups 1, H and W even: cu_conv_s2_fits)
 * by parity class. cu_conv_s2_weights: W re-laid into wc (9, OC, C) on stream s (conv.cu's
 * training forward, on the side stream). cu_conv_s2_dgrad (backward, main stream): from dzs (4,
 * OC, nb) whose copy 1 is dz (all four when shifted) and wc, into dx (added to when accum; then
 * zeroed where mask, the ReLU's output below or NULL, is not positive). */
int cu_conv_s2_fits(const mpscy_conv_geom *cg);
int cu_conv_s2_weights(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, float *wc, const float *w, char *err,
                       size_t en);
int cu_conv_s2_dgrad(cu_graph *g, const mpscy_conv_geom *cg, float *dx, const float *mask, float *dzs, const float *wc,
                     int64_t nb, int shifted, int accum, char *err, size_t en);
/* conv_implicit.cu: a 3x3 convolution (stride 1 or 2, groups 1, dilation 1, OW dividing 64 and
 * OHW a multiple of 64: cu_conv_implicit_fits) as an implicit 3xTF32 product in the own fp32 path,
 * with no columns: y (b, M, OH, OW) (added to when accum) from the input at x, sample s channel c
 * at x + s sxs + c sxc. Also a stride-1 convolution's dx (cu_conv_implicit_dgrad_fits), from dz
 * (OC, b*OHW) and W flipped and transposed by cu_conv_flip_weights on stream s (conv.cu's
 * training forward, on the side stream). */
typedef struct cu_implicit {
    float *y;
    const float *x, *w, *bias;   /* w (M, 9 C); bias (M) or NULL */
    float *part;                 /* room for split-K partials (splits, M, b*OH*OW), or NULL */
    int64_t part_floats;
    int64_t b, c, h, w_in, sxc, sxs;
    int64_t m, oh, ow, ph, pw, stride;
    int relu, accum;
} cu_implicit;
int cu_conv_implicit_fits(const mpscy_conv_geom *cg);
int cu_conv_implicit_dgrad_fits(const mpscy_conv_geom *cg);
int cu_conv_implicit(cu_graph *g, cudaStream_t s, const cu_implicit *q, char *err, size_t en);
int cu_conv_flip_weights(cu_graph *g, cudaStream_t s, const mpscy_conv_geom *cg, float *wt, const float *w, char *err,
                         size_t en);
#if defined(__CUDACC__)
/* conv.cu: y (b, OC, OHW) channels o0 .. o0 + M = the ordered sum of split partials (splits, M, nb) + bias,
 * through the ReLU when relu */
__global__ void conv_fwd_sum(float *y, const float *part, const float *bias, int64_t splits, int64_t M, int64_t nb,
                             int64_t ohw, int64_t oc, int64_t o0, int relu);
#endif
int cu_convt_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_convt_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int64_t cu_convt_workspace(const mpscy_plan *p, const mpscy_node *n);
int cu_pool_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_pool_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int64_t cu_batchnorm_workspace(const mpscy_plan *p, const mpscy_node *n);
/* out[ch] = the sum of x (b, c, inner) over samples and positions, in double, over parts of each
 * channel in g->ws (main stream's workspace: s must be ordered with its other uses), as large as
 * cu_channel_sums_workspace says (norm.cu) */
int64_t cu_channel_sums_workspace(int64_t c, int64_t inner, int64_t batch);
int cu_channel_sums(cu_graph *g, cudaStream_t s, float *out, const float *x, int64_t b, int64_t c, int64_t inner,
                    char *err, size_t en);
int cu_batchnorm_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_batchnorm_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int cu_batchnorm_commit(cu_graph *g, const mpscy_node *n, int64_t b, int always, char *err, size_t en);
int cu_layernorm_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_layernorm_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int cu_dropout_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_dropout_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);
int cu_merge_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en);
int cu_merge_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en);

/* gemm.cu: C (M, N, ldc) = A B with A(m, k) = a[m am + k ak] and B(k, n) = b[k bk + n bn], plus
 * the Dense epilogues; one kernel. */
typedef struct cu_small_gemm {
    float *c;
    const float *a, *b;
    int64_t m, n, k, am, ak, bk, bn, ldc;
    const float *bias;         /* forward: + bias[n] */
    int relu;                  /* forward: max(0, .) */
    const float *mask;         /* dX: zero where mask (M, N, ldc) <= 0 (the ReLU below) */
    int accum;                 /* dX: add to c */
    float *rowsum;             /* dW: bias gradient, sum over k of A(m, k) */
    const float *scale;        /* dX: times scale (M, N, ldc), before the mask (a Dropout's multipliers) */
} cu_small_gemm;
int cu_gemm_small_wanted(const cu_graph *g, int64_t m, int64_t n, int64_t k);
void cu_gemm_small_need(int sms, int64_t m, int64_t n, int64_t k, int rows, int64_t *floats, int64_t *counters);
int cu_gemm_small(cu_graph *g, cudaStream_t s, const cu_small_gemm *q, char *err, size_t en);

/* activation.cu helpers shared with dense.cu */
int cu_bias_act_forward(cu_graph *g, cudaStream_t s, float *y, const float *bias, int64_t rows, int64_t cols,
                        int relu, char *err, size_t en);
int cu_bias_act_backward(cu_graph *g, cudaStream_t s, float *dz, float *db, const float *dy, const float *ymask,
                         int64_t rows, int64_t cols, char *err, size_t en);
void cu_colsum_need(int sms, int64_t rows, int64_t cols, int64_t *floats, int64_t *counters);

/* loss.cu: loss, its gradient (dy != NULL) and the correct count in one kernel; eval graphs
 * also finalize the result there. */
int cu_loss(cu_graph *g, float *dy, int64_t b, int finalize, char *err, size_t en);
/* head.cu: a training step's output Dense, loss and the Dense's backward in two kernels, where
 * cu_head_fits (graph.cu decides it once, at build: cu_graph.head) */
int cu_head_fits(const cu_graph *g);
/* graph.cu: the product whose fused ReLU is node j, read by one layer that adds nothing to it (whose
 * dx product may write that product's dz masked, setting dz_ready), else -1 */
int32_t cu_relu_product(const cu_graph *g, int32_t j);
/* the Dropout node whose training forward head_forward applies as it reads x, or -1: the output
 * Dense's input when that Dropout feeds nothing else */
int32_t cu_head_dropout(const cu_graph *g);
int cu_head(cu_graph *g, int64_t b, char *err, size_t en);
/* dense.cu: where the Dense n's dx goes with the epilogue of the layer below (the lower Dense's
 * dz, masked by its ReLU, times one Dropout's multipliers; marking their backward done), else
 * d(input) plain: for dense.cu's own dx product and head.cu */
typedef struct cu_dx_target {
    float *dx;
    const float *mask, *scale;  /* zero where mask <= 0, after times scale; or NULL */
} cu_dx_target;
void cu_dense_dx_target(cu_graph *g, const mpscy_node *n, cu_dx_target *t);
/* optim.cu: global norm + finiteness + clip coefficient, then the update over the flat slab:
 * after the early norm's partials (cu_norm_part), one kernel adding them and the last layer's
 * squares; with $MPSCY_CUDA_NORM_EARLY=0, one cooperative kernel where the device captures them,
 * else two. update = 0: norm only. */
int cu_norm_and_update(cu_graph *g, int update, char *err, size_t en);
/* the early norm: cu_norm_plan once at build (after g->head is decided); in a step, norm_parts
 * reset to 0 before the backward and cu_norm_part after each node's backward is enqueued */
void cu_norm_plan(cu_graph *g);
int cu_norm_part(cu_graph *g, int32_t node, char *err, size_t en);
int cu_coop_probe(cu_device *d);
int cu_pdl_probe(cu_device *d);
int cu_optim_supported(int32_t kind);
/* the host-side coefficients of the next step (step number t) */
void cu_optim_params(cu_graph *g, const mpscy_step_args *a, int64_t t, cu_params *out);
void cu_optim_applied(cu_graph *g, int64_t t);  /* after a step the device applied */
/* lbfgs.cu: one MPSCY_MODE_LBFGS call (see mpscy.h) */
int cu_lbfgs_step(cu_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);
/* step.cu: forward, loss and backward of the staged batch (the GRAD step), synchronized */
int cu_forward_backward(cu_graph *g, int64_t b, mpscy_step_result *r, char *err, size_t n);

/* mlp.cu: a chain of Dense (+ReLU) layers under cross-entropy with integer labels, small enough,
 * trains in one persistent kernel per step, which copies the first `staged` bytes of the
 * staging itself. cu_fused_plan decides at build (sets g->fu); cu_fused_step enqueues it. */
int cu_fused_plan(cu_graph *g);
void cu_fused_free(cu_graph *g);
int cu_fused_step(cu_graph *g, int64_t b, size_t staged, int deferred, char *err, size_t en);
/* whether the full batch's training kernel lingers after its update for the next step (step.cu
 * hands it over: mlp.cu's fu_linger) */
int cu_fused_lingers(const cu_graph *g);
/* with $MPSCY_CUDA_VERBOSE at build, once the stream is idle: the steps a lingering kernel took
 * and the host's turn, the weight slices it loaded while it waited and its timed intervals */
void cu_fused_report(const cu_graph *g);
const char *cu_fused_form(const cu_graph *g, char *buf, size_t n);

/* Side streams: fork one (side: g->side, or g->alt, the second) from the main stream before
 * enqueueing off-critical-path work on it; cu_join joins every one forked. */
int cu_fork(cu_graph *g, cudaStream_t side, char *err, size_t en);
/* the same in two parts: the mark (where the side stream's next work may start) on the main
 * stream, then, after more main-stream work is enqueued, the side stream's wait for it: the
 * main stream's kernels between them come first in the graph's order */
int cu_fork_mark(cu_graph *g, char *err, size_t en);
int cu_fork_follow(cu_graph *g, cudaStream_t side, char *err, size_t en);
int cu_join(cu_graph *g, char *err, size_t en);
/* Stream `to` waits for everything enqueued so far on from[k], for each bit k set in mask. */
int cu_wait_streams(cu_graph *g, cudaStream_t to, const cudaStream_t from[3], int mask, char *err, size_t en);

/* Checks the last launch; formats a CUDA error into err. */
int cu_check_launch(char *err, size_t en, const char *what, const char *func, int line);
#define CU_LAUNCHED(what) cu_check_launch(err, en, (what), __func__, __LINE__)
#define CU_TRY(call, what)                                                                    \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess)                                                                \
            return MPSCY_FAIL(err, en, e_ == cudaErrorMemoryAllocation ? MPSCY_OOM : MPSCY_DEVICE, \
                              CU, "%s: %s", (what), cudaGetErrorString(e_));                  \
    } while (0)

#include "kernel_util.cuh"  /* device code shared by the kernels (CUDA sources only) */

#include "launch.h"  /* cu_launch and the small launch arithmetic, which read cu_graph */

#endif /* MPSCY_CUDA_H */
