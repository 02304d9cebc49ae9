/* metal.h — internals of the Metal backend: the device and graph objects, the Objective-C
 * holders of every Metal object a graph owns, the builder each layer file writes MPSGraph
 * nodes into, and the per-kind layer table. Only the .m files of this folder include it;
 * the ABI sees mpscy_metal_backend alone. No shape is decided here: common/plan.h does that. */
#ifndef MPSCY_METAL_H
#define MPSCY_METAL_H

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#import <MetalPerformanceShaders/MetalPerformanceShaders.h>
#import <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>

#include "../backend.h"
#include "../common/plan.h"

#define METAL_C "metal"   /* the component in every error line: "[metal::function] ..." */

/* Per-step scalars in the shared hyper buffer (float32), read by the train executable, so a
 * schedule never recompiles. Written by step.m from mpscy_optim_coef_make (optim_math.h). */
enum {
    METAL_H_LR, METAL_H_MOMENTUM, METAL_H_WD, METAL_H_BETA2,
    METAL_H_EPS, METAL_H_STEP_SIZE, METAL_H_BC2_SQRT, METAL_H_DECAY, METAL_H_FIRST, METAL_H_APPLY,
    METAL_H_ALPHA, METAL_H_RHO, METAL_H_CLR, METAL_H_BC2, METAL_H_NADAM_G, METAL_H_NADAM_M,
    METAL_H_COMMIT,   /* keep the new running statistics (a train step, or an L-BFGS evaluation) */
    METAL_H_OMB1, METAL_H_OMB2, METAL_H_OMALPHA, METAL_H_OMRHO, METAL_H_OMDAMP,  /* 1 - beta1 ... (optim_math.h) */
    METAL_H_COUNT = 24
};
_Static_assert(METAL_H_OMDAMP < METAL_H_COUNT, "the hyper buffer holds every scalar");

/* What a step reads back from the shared stats buffer (float32). */
enum { METAL_S_LOSS, METAL_S_CORRECT, METAL_S_NORM, METAL_S_FINITE, METAL_S_COUNT };

/* Executable kinds: a train or gradient step, an eval step (loss only), a predict batch. */
enum { METAL_TRAIN = 0, METAL_EVAL = 1, METAL_PREDICT = 2, METAL_KINDS = 3 };

/* Where a placeholder (feed) or a target tensor (result) is bound: a role and an index. */
enum {
    METAL_BIND_INPUT,       /* io input k: (b, *shape) */
    METAL_BIND_TARGET,      /* io target: int32 (b) or float32 (b, *output shape) */
    METAL_BIND_OUTPUT,      /* io output: (b, *output shape) */
    METAL_BIND_INPUT_GRAD,  /* io input gradient k: (b, *shape) */
    METAL_BIND_PARAMS,      /* parameter slab (trainable, then frozen): the current one as a feed, the
                             * next one as a result */
    METAL_BIND_BUFFERS,     /* running-statistics slab, ping-ponged like the parameters */
    METAL_BIND_OPTIM,       /* optimizer slots (n_vec_slots, n_train), ping-ponged */
    METAL_BIND_GRADS,       /* (n_train) gradients of the last train or grad step */
    METAL_BIND_HYPER,       /* (METAL_H_COUNT) per-step scalars */
    METAL_BIND_STATS,       /* (METAL_S_COUNT) loss, correct, gradient norm, finite */
    METAL_BIND_MASK,        /* dropout mask of node k: (b, *shape) */
    METAL_BIND_ROLES
};

typedef struct metal_device {
    struct mpscy_device_ base;
    void *device;   /* id<MTLDevice>, owned through CFBridgingRetain */
    void *queue;    /* id<MTLCommandQueue>, owned likewise */
} metal_device;

typedef struct metal_graph {
    struct mpscy_graph_ base;
    mpscy_plan plan;
    void *state;                    /* MetalGraphState, owned through CFBridgingRetain */
    int32_t parity;                 /* which of the two slabs per role holds the current state */
    double scalars[MPSCY_MAX_SCALARS]; /* optimizer scalars; [0] is the applied step count */
    float *hyper;                   /* (METAL_H_COUNT) host view of the shared hyper buffer */
    float *stats;                   /* (METAL_S_COUNT) host view of the shared stats buffer */
    struct mpscy_buffer_ *io_bufs;  /* 2 * n_inputs + 2 borrowed heads over the shared io buffers */
    size_t io_heads_bytes;
} metal_graph;

/* One compiled executable and its tensor data, bound once per parity of the ping-pong slabs
 * so that a step creates no binding. */
@interface MetalExec : NSObject
@property (nonatomic, strong) MPSGraphExecutable *exe;
@property (nonatomic, strong) NSArray<NSArray<MPSGraphTensorData *> *> *feeds;    /* [parity] */
@property (nonatomic, strong) NSArray<NSArray<MPSGraphTensorData *> *> *results;  /* [parity] */
@end

/* Every Metal object one graph owns. Slabs that a role does not need are nil. */
@interface MetalGraphState : NSObject
@property (nonatomic, strong) id<MTLDevice> device;
@property (nonatomic, strong) id<MTLCommandQueue> queue;
@property (nonatomic, strong) NSMutableArray<id<MTLBuffer>> *owned;  /* all, for the free count */
@property (nonatomic, strong) id<MTLBuffer> params0, params1;        /* (n_params); L-BFGS: params0 only */
@property (nonatomic, strong) id<MTLBuffer> buffers0, buffers1;      /* (n_buffers) */
@property (nonatomic, strong) id<MTLBuffer> optim0, optim1;          /* (metal_optim_floats); L-BFGS: optim0 only */
@property (nonatomic, strong) id<MTLBuffer> grads;                   /* (n_params) */
@property (nonatomic, strong) NSMutableArray<id<MTLBuffer>> *inputs;     /* per input node */
@property (nonatomic, strong) NSMutableArray *inputGrads;                /* per input: buffer or NSNull */
@property (nonatomic, strong) id<MTLBuffer> target, output, hyper, stats;
@property (nonatomic, strong) NSMutableArray *masks;                     /* per node: buffer or NSNull */
@property (nonatomic, strong) NSMutableDictionary<NSNumber *, MetalExec *> *execs;
@end

/* What a layer's graph builder reads and writes. Per-node arrays hold NSNull where empty. */
@interface MetalBuilder : NSObject
@property (nonatomic, strong) MPSGraph *g;
@property (nonatomic, assign) const mpscy_plan *plan;
@property (nonatomic, assign) int64_t b;          /* rows of this executable */
@property (nonatomic, assign) BOOL train;         /* train-mode forward: batch statistics, dropout */
@property (nonatomic, strong) NSMutableArray *y;      /* per node: output (b, *shape) */
@property (nonatomic, strong) NSMutableArray *dy;     /* per node: d(loss)/d(output), when needed */
@property (nonatomic, strong) NSMutableArray *saved;  /* per node: NSArray kept for backward */
@property (nonatomic, strong) NSMutableArray *mask;   /* per node: dropout mask placeholder */
@property (nonatomic, strong) NSMutableArray *view;   /* per plan tensor: PARAM/BUFFER value */
@property (nonatomic, strong) NSMutableArray *grad;   /* per plan tensor: PARAM gradient */
@property (nonatomic, strong) NSMutableArray *fresh;  /* per plan tensor: BUFFER after this step */
@property (nonatomic, strong) MPSGraphTensor *hyper;  /* (METAL_H_COUNT), made on first use */
@property (nonatomic, strong) NSMutableArray<MPSGraphTensor *> *feeds;    /* placeholders */
@property (nonatomic, strong) NSMutableArray<NSNumber *> *feedBinds;      /* role << 16 | index */
@property (nonatomic, strong) NSMutableArray<MPSGraphShapedType *> *feedTypes;
@property (nonatomic, strong) NSMutableArray<MPSGraphTensor *> *results;
@property (nonatomic, strong) NSMutableArray<NSNumber *> *resultBinds;
@property (nonatomic, strong) NSMutableArray<MPSGraphShapedType *> *resultTypes;
@end

/* ------------------------------------------------------------------ device.m */
/* Counted allocations: every MTLBuffer and host block the backend holds goes through these. */
id<MTLBuffer> metal_new_buffer(mpscy_device dev, size_t bytes, int32_t storage);
void metal_count_buffer_free(mpscy_device dev, id<MTLBuffer> buf);
void *metal_host_alloc(mpscy_device dev, size_t bytes);
void metal_host_free(mpscy_device dev, void *ptr, size_t bytes);
id<MTLDevice> metal_mtl_device(mpscy_device dev);
id<MTLCommandQueue> metal_queue(mpscy_device dev);
/* The readable part of an NSError or NSException, never NULL. */
const char *metal_error_text(NSError *error);
const char *metal_exception_text(NSException *exception);
/* Status and error of a finished command buffer (MPSGraph may have split it: root too). */
int metal_check_command_buffer(id<MTLCommandBuffer> cb, id<MTLCommandBuffer> root, const char *what,
                               char *err, size_t n);

/* ------------------------------------------------------------------ table entries */
MPSCY_BACKEND_ENTRIES(metal_)

static inline MetalGraphState *metal_state(const metal_graph *g) {
    return (__bridge MetalGraphState *)g->state;
}

/* L-BFGS keeps its parameters and optimizer slab in one buffer each, changed by the host
 * between evaluations; every other optimizer ping-pongs them through the executable. */
static inline int metal_is_lbfgs(const mpscy_plan *p) { return p->optim.kind == MPSCY_OPTIM_LBFGS; }

/* Floats of the optimizer slab: its named slots (and L-BFGS's scratch). */
static inline int64_t metal_optim_floats(const mpscy_plan *p) { return p->optim_floats; }

/* ------------------------------------------------------------------ step.m, lbfgs.m */
/* Runs the train executable for b rows with the hyper flags apply (optimizer update) and
 * commit (running statistics), after filling the dropout masks; stats are then in g->stats. */
int metal_run_train(metal_graph *g, const mpscy_step_args *a, int apply, int commit, int64_t t,
                    double *mu_next, char *err, size_t n);
/* One MPSCY_MODE_LBFGS call: objc/cpu/lbfgs.c's vector work on the shared slabs. */
int metal_lbfgs_step(metal_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);

/* ------------------------------------------------------------------ compile.m */
/* The executable of `kind` for b rows, compiled on first use and cached (build compiles the
 * built batch size; a partial batch compiles once per size). */
int metal_exec_get(metal_graph *g, int kind, int64_t b, MetalExec *__strong *out, char *err, size_t n);

/* ------------------------------------------------------------------ ops.m: graph helpers */
id mt_get(NSMutableArray *a, NSUInteger i);                 /* nil where NSNull */
void mt_set(NSMutableArray *a, NSUInteger i, id value);      /* nil stores NSNull */
NSMutableArray *mt_slots(NSUInteger count);                  /* count NSNull entries */
MPSShape *mt_dims(int32_t rank, const int64_t *dims);
MPSShape *mt_shape(int64_t b, const mpscy_node *n);          /* (b, *n->shape) */
MPSGraphTensor *mt_y(MetalBuilder *c, int32_t node);
MPSGraphTensor *mt_dy(MetalBuilder *c, int32_t node);
MPSGraphTensor *mt_const(MetalBuilder *c, double v);         /* float32 scalar */
MPSGraphTensor *mt_add(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_sub(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_mul(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_div(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_neg(MetalBuilder *c, MPSGraphTensor *x);
MPSGraphTensor *mt_exp(MetalBuilder *c, MPSGraphTensor *x);
MPSGraphTensor *mt_log(MetalBuilder *c, MPSGraphTensor *x);
MPSGraphTensor *mt_sqrt(MetalBuilder *c, MPSGraphTensor *x);
MPSGraphTensor *mt_abs(MetalBuilder *c, MPSGraphTensor *x);
MPSGraphTensor *mt_gt(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_lt(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_le(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_eq(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_and(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_select(MetalBuilder *c, MPSGraphTensor *pred, MPSGraphTensor *a, MPSGraphTensor *b);
MPSGraphTensor *mt_sum(MetalBuilder *c, MPSGraphTensor *x, NSArray<NSNumber *> *axes);   /* keeps dims */
MPSGraphTensor *mt_mean(MetalBuilder *c, MPSGraphTensor *x, NSArray<NSNumber *> *axes);  /* keeps dims */
MPSGraphTensor *mt_reshape(MetalBuilder *c, MPSGraphTensor *x, MPSShape *shape);
MPSGraphTensor *mt_float(MetalBuilder *c, MPSGraphTensor *x);    /* cast to float32 */
MPSGraphTensor *mt_scalar1(MetalBuilder *c, MPSGraphTensor *x);  /* any one-element tensor -> (1) */
MPSGraphTensor *mt_expm1(MetalBuilder *c, MPSGraphTensor *x);    /* exp(x) - 1, accurate near 0 */
MPSGraphTensor *mt_log1p(MetalBuilder *c, MPSGraphTensor *x);    /* log(1 + x), accurate near 0 */
MPSGraphTensor *mt_hyper(MetalBuilder *c, int slot);             /* (1) per-step scalar */
MPSGraphTensor *mt_placeholder(MetalBuilder *c, MPSShape *shape, MPSDataType type, int role, int index);
void mt_result(MetalBuilder *c, MPSGraphTensor *t, MPSShape *shape, MPSDataType type, int role, int index);
/* d(node) += g, only when backward needs d(node) (plan: node->grad). */
void mt_acc(MetalBuilder *c, int32_t node, MPSGraphTensor *g);
/* Node n's PARAM (slot 0 weight, 1 bias) or BUFFER (0 running_mean, 1 running_var) tensor. */
int32_t mt_tensor_index(const mpscy_plan *p, const mpscy_node *n, int32_t role, int32_t slot);
MPSGraphTensor *mt_param(MetalBuilder *c, const mpscy_node *n, int32_t slot);
MPSGraphTensor *mt_buffer(MetalBuilder *c, const mpscy_node *n, int32_t slot);
void mt_set_grad(MetalBuilder *c, const mpscy_node *n, int32_t slot, MPSGraphTensor *g);
void mt_set_fresh(MetalBuilder *c, const mpscy_node *n, int32_t slot, MPSGraphTensor *v);

/* ------------------------------------------------------------------ layers */
/* forward returns node i's output (b, *shape); backward reads c.dy[i] and adds into each
 * input's gradient through mt_acc and sets its parameter gradients through mt_set_grad. */
typedef MPSGraphTensor *(*metal_forward_fn)(MetalBuilder *c, const mpscy_node *n, int32_t i);
typedef void (*metal_backward_fn)(MetalBuilder *c, const mpscy_node *n, int32_t i);
typedef struct metal_layer_ops {
    metal_forward_fn forward;
    metal_backward_fn backward;
} metal_layer_ops;

extern const metal_layer_ops metal_layers[MPSCY_LAYER_KIND_COUNT];

MPSGraphTensor *metal_dense_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_dense_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_activation_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_activation_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_flatten_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_flatten_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_conv_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_conv_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_convt_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_convt_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_pool_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_pool_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_global_pool_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_global_pool_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_upsample_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_upsample_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_batchnorm_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_batchnorm_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_layernorm_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_layernorm_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_dropout_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_dropout_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_add_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_add_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);
MPSGraphTensor *metal_concat_forward(MetalBuilder *c, const mpscy_node *n, int32_t i);
void metal_concat_backward(MetalBuilder *c, const mpscy_node *n, int32_t i);

/* dropout.m: fills each dropout node's shared mask buffer for b rows from common/rng.h. */
void metal_dropout_masks(metal_graph *g, const mpscy_step_args *a, int64_t b);

/* ------------------------------------------------------------------ loss.m, optim.m */
/* Mean loss (1), correct count (1) or nil, and, when dy is given, d(loss)/d(y) (b, *out). */
void metal_loss(MetalBuilder *c, MPSGraphTensor *y, MPSGraphTensor *target, MPSGraphTensor *__strong *loss,
                MPSGraphTensor *__strong *correct, MPSGraphTensor *__strong *dy);
/* After backward: flat gradients, finiteness, norm, clipping, the optimizer update selected
 * on (finite and apply), and every train result (slabs, gradients, stats). */
void metal_update(MetalBuilder *c, MPSGraphTensor *params, MPSGraphTensor *loss, MPSGraphTensor *correct);
int metal_optim_supported(int32_t kind);
/* The per-step coefficients of applied step t written into the hyper buffer (slots METAL_H_*).
 * mu_product is the running scalar (scalars[1]: NAdam's mu_product, SGD's momentum_started);
 * *mu_next receives its value after step t, which the caller keeps only if the step is applied
 * (as the CPU backend updates it only then). */
void metal_optim_hyper(float *hyper, const mpscy_optim_desc *o, const mpscy_step_args *a, int64_t t, int apply,
                       double mu_product, double *mu_next);

#endif /* MPSCY_METAL_H */
