/* plan.h — the shared, backend-independent half of graph building: validating a descriptor,
 * checking every resolved shape, naming parameters, buffers and optimizer state, and laying
 * out the slabs (one per role) that a backend then allocates once. Backends add only their own
 * workspace sizes and kernels; no shape logic lives in a backend folder. */
#ifndef MPSCY_PLAN_H
#define MPSCY_PLAN_H

#include "../mpscy.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MPSCY_MAX_OPTIM_SLOTS 12
#define MPSCY_MAX_SCALARS 8          /* optimizer scalars, named ones first, then scratch */

/* Float offsets, in the optimizer slab, of L-BFGS's state (d, prev_flat_grad, the history ring
 * of cap = history_size + max_iter rows, ro) and of its per-step scratch vectors. The ring has
 * max_iter spare rows so that the rows alive when a step began are never overwritten during
 * it: a failed step restores by resetting hist_start/hist_len. */
typedef struct mpscy_lbfgs_layout {
    int64_t cap;                     /* history ring rows */
    int64_t d, prev_flat_grad;       /* (n) */
    int64_t old_dirs, old_stps;      /* (cap, n): y = g - g_prev and s = t d of each iteration */
    int64_t ro;                      /* (cap): 1 / y.s */
    int64_t base;                    /* (n) params at the start of the current iteration */
    int64_t x0, d0, prev0;           /* (n) params, d and prev_flat_grad when the step began */
    int64_t buf0;                    /* (n_buffers) running statistics when the step began */
    int64_t reg[MPSCY_LBFGS_REGISTERS]; /* (n) gradient registers */
    int64_t al;                      /* (cap) doubles: the two-loop recursion's alphas */
} mpscy_lbfgs_layout;

/* L-BFGS scalars: named (state) ones, then the copies BEGIN saves. */
enum { MPSCY_LBFGS_S_STEP = 0, MPSCY_LBFGS_S_H_DIAG = 1, MPSCY_LBFGS_S_START = 2, MPSCY_LBFGS_S_LEN = 3,
       MPSCY_LBFGS_S_SAVED = 4 };

typedef struct mpscy_node {
    int32_t kind, flags, n_in;
    int32_t in[MPSCY_MAX_INPUTS];
    int32_t rank;
    int64_t shape[MPSCY_MAX_RANK];   /* per-sample output shape */
    int64_t size;                    /* per-sample output elements */
    int32_t ints[12];
    double reals[4];
    char name[MPSCY_NAME_LEN];
    int32_t input_index;             /* INPUT nodes: which io input, else -1 */
    int32_t tensor0, n_tensors;      /* this node's PARAM/BUFFER tensors in the table */
    int32_t grad;                    /* 1 when d(output) is needed by backward */
    int32_t accum[MPSCY_MAX_INPUTS]; /* 1: backward adds into this input's grad, 0: writes it */
    int32_t consumers;               /* nodes reading this one (the output counts once more) */
    int32_t live, written;           /* planning scratch: feeds the output; grad already written */
    int64_t out;                     /* output: float offset in the activation slab, batch*size */
    int64_t dout;                    /* d(output): float offset in the grad slab, -1 if unused */
    int64_t save;                    /* float offset of saved values in the save slab */
    int64_t save_size;               /* floats saved for backward (e.g. masks, statistics) */
} mpscy_node;

typedef struct mpscy_tensor {
    mpscy_tensor_info info;
    int32_t node;                    /* owning node, -1 for optimizer state */
    int32_t slot;                    /* OPTIM: slot index; PARAM: 0 weight, 1 bias; BUFFER: 0/1 */
} mpscy_tensor;

typedef struct mpscy_plan {
    int32_t n_nodes, output, batch, target, precision, threads, input_grad;
    mpscy_node *nodes;
    int32_t n_inputs;                /* INPUT nodes */
    int32_t n_tensors;
    mpscy_tensor *tensors;
    mpscy_loss_desc loss;
    mpscy_optim_desc optim;
    int64_t n_params;                /* parameter floats: n_train trainable, then n_frozen frozen */
    int64_t n_train;                 /* trainable floats, first in the slab: the optimizer's range,
                                      * and the gradients it normalizes, clips and checks */
    int64_t n_frozen;                /* floats of MPSCY_FLAG_FROZEN layers' parameters */
    int64_t n_buffers;               /* running statistics, stored after the params */
    int64_t act_floats;              /* every node's output at the built batch */
    int64_t grad_floats;             /* every needed d(output) at the built batch */
    int64_t save_floats;             /* everything saved for backward */
    int32_t n_vec_slots;             /* optimizer float slots (n_train floats each, except L-BFGS) */
    char vec_slots[MPSCY_MAX_OPTIM_SLOTS][MPSCY_NAME_LEN];
    int32_t vec_rank[MPSCY_MAX_OPTIM_SLOTS];      /* 1, or 2 for L-BFGS's history */
    int64_t vec_shape[MPSCY_MAX_OPTIM_SLOTS][2];
    int64_t vec_offset[MPSCY_MAX_OPTIM_SLOTS];    /* float offset in the optimizer slab */
    int64_t optim_floats;            /* the optimizer slab: slots, then L-BFGS scratch */
    int32_t n_scalar_slots;          /* named optimizer scalars: "step" (I64), others F64 */
    char scalar_slots[4][MPSCY_NAME_LEN];
    mpscy_lbfgs_layout lbfgs;        /* MPSCY_OPTIM_LBFGS only */
    float *class_weight;             /* (classes) the loss's class weights, the plan's copy, or NULL */
    float *pos_weight;               /* (out_size) BCE_LOGITS's pos_weight for each element of a sample
                                      * (the desc's, one per last-axis element, repeated), or NULL */
    int64_t target_size;             /* per-sample target elements (1 for INDEX; positions, below, per-position) */
    int64_t out_size;                /* per-sample output elements */
    /* the cross-entropies on logits (SPARSE_CE, CE) over an output (C, d1, ...): torch's over (n, C, d1,
     * ...), a softmax over the C classes at each of the d1 x ... positions, whose loss is the mean over
     * the batch's positions (or its labels' weights); rows b x positions, class i of sample s at
     * position q at y[(s C + i) positions + q]. For a (C,) output and every other loss: classes =
     * out_size, positions = 1 */
    int64_t classes, positions;
} mpscy_plan;

/* Validates desc and fills plan (allocating its node and tensor tables with calloc, which
 * the caller accounts for through mpscy_plan_bytes). On failure nothing stays allocated. */
int mpscy_plan_build(mpscy_plan *plan, const mpscy_graph_desc *desc, const char *component,
                     char *err, size_t errlen);
void mpscy_plan_free(mpscy_plan *plan);
size_t mpscy_plan_bytes(const mpscy_plan *plan);

/* Tensor `index` of the table, checked (and, when check_bytes, its byte size against `bytes`):
 * the lookup every backend's tensor_info/read/write starts with. NULL with *st set on error. */
const mpscy_tensor *mpscy_plan_tensor(const mpscy_plan *p, int32_t index, size_t bytes, int check_bytes,
                                      const char *component, char *err, size_t errlen, int *st);

/* The io buffer slot of (kind, index): inputs 0..n_inputs-1, target n_inputs, output n_inputs+1,
 * input gradients n_inputs+2+index (graphs built with input_grad). The layout every backend's
 * array of borrowed io buffer heads follows. */
int mpscy_plan_io_slot(const mpscy_plan *p, int32_t kind, int32_t index, int32_t *slot,
                       const char *component, char *err, size_t errlen);

/* Table index of node n's tensor of `role` and `slot` (0 weight / running_mean, 1 bias /
 * running_var), or -1 when the node has none. */
int32_t mpscy_node_tensor(const mpscy_plan *p, const mpscy_node *n, int32_t role, int32_t slot);

/* Whether tensor t is a parameter the optimizer trains: a PARAM of a layer not frozen. Those sit
 * at [0, n_train) of the parameter slab, with their gradients at the same offsets of the gradient
 * slab; a frozen layer's backward still writes its parameters' gradients, past n_train, where
 * nothing reads them. */
static inline int mpscy_tensor_trained(const mpscy_plan *p, const mpscy_tensor *t) {
    return t->info.role == MPSCY_ROLE_PARAM && t->node >= 0 && !(p->nodes[t->node].flags & MPSCY_FLAG_FROZEN);
}

/* Geometry of a Conv2D node (NCHW, weight (OC, C / groups, KH, KW)), resolved from the plan. For
 * a ConvTranspose2D node, the convolution it transposes, from its output (c, h, w) back to its
 * input (oc, oh, ow), whose weight (OC, C / groups, KH, KW) is the node's own: its forward is that
 * convolution's input gradient, its input gradient that convolution's forward. */
typedef struct mpscy_conv_geom {
    int64_t c, h, w;              /* input (C, H, W) */
    int64_t oc, oh, ow, ohw;      /* output (OC, OH, OW) */
    int64_t kh, kw, sh, sw, ph, pw, dh, dw;
    int64_t groups, ocg, kg, k;   /* per group: out channels, rows of W; all rows C*KH*KW */
} mpscy_conv_geom;
mpscy_conv_geom mpscy_conv_geometry(const mpscy_plan *p, const mpscy_node *n);

/* Floats needed at batch b for node n's output. */
static inline int64_t mpscy_node_floats(const mpscy_node *n, int64_t b) { return b * n->size; }

/* Element count of a per-sample shape. */
int64_t mpscy_shape_count(int32_t rank, const int64_t *shape);

#ifdef __cplusplus
}
#endif
#endif /* MPSCY_PLAN_H */
