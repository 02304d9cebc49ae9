/* mpscy.h — the whole C ABI of mpscy: device, buffer, graph build, step execution.
 * Plain C99 with only <stddef.h>/<stdint.h>: no Objective-C, CUDA or C++ type appears here.
 * Every backend (cpu, cuda, metal, null) implements it behind one table of function pointers.
 * Fallible calls return an mpscy_status and fill a caller-owned error buffer with one line,
 * "[backend::function] what failed: detail (file:line)". Native code never exits, aborts or prints. */
#ifndef MPSCY_H
#define MPSCY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MPSCY_ABI_VERSION 7
#define MPSCY_MAX_RANK 6          /* per-sample rank of any tensor (batch excluded) */
#define MPSCY_MAX_INPUTS 8        /* inputs of one layer node */
#define MPSCY_NAME_LEN 64
#define MPSCY_ERR_LEN 512         /* a sufficient size for error buffers */
#define MPSCY_MAX_THREADS 64      /* the most worker threads a graph's pool runs (graph_desc.threads) */

/* ------------------------------------------------------------------ status */

typedef enum mpscy_status {
    MPSCY_OK = 0,
    MPSCY_INVALID = 1,      /* an argument or descriptor field is invalid */
    MPSCY_SHAPE = 2,        /* shapes or sizes do not agree */
    MPSCY_OOM = 3,          /* host or device memory could not be allocated */
    MPSCY_DEVICE = 4,       /* the device failed, is absent, or its backend was not built */
    MPSCY_UNSUPPORTED = 5,  /* a valid request this backend does not implement */
    MPSCY_NONFINITE = 6     /* loss or gradients not finite: the update was not applied */
} mpscy_status;

/* Compile-time ABI version of the linked library (checked by the Python package at import). */
int32_t mpscy_abi_version(void);

/* ------------------------------------------------------------------ device */

typedef struct mpscy_device_ *mpscy_device;
typedef struct mpscy_buffer_ *mpscy_buffer;
typedef struct mpscy_graph_ *mpscy_graph;

typedef struct mpscy_device_info {
    char backend[16];         /* "cpu", "cuda", "metal" */
    char name[128];           /* human-readable device name */
    int32_t unified_memory;   /* 1 when host and device share memory */
    int32_t threads;          /* worker threads (cpu) or multiprocessors (gpu) */
    int64_t memory_bytes;     /* total (or recommended working set) memory, 0 if unknown */
    int64_t stage_min_bytes;  /* > 0: for a one-input graph whose batch of input 0 has at least this
                               * many bytes, pass mpscy_step_args.x_src (the backend stages it
                               * itself, cuda while the step runs); 0: never */
} mpscy_device_info;

/* Native counters of one device: every host or device allocation made by the backend for
 * this device and its graphs, and every ABI call made on it. */
typedef struct mpscy_stats {
    int64_t allocations;      /* allocations made so far */
    int64_t frees;            /* allocations released so far */
    int64_t bytes_in_use;     /* bytes currently allocated */
    int64_t peak_bytes;       /* largest bytes_in_use seen */
    int64_t steps;            /* mpscy_graph_step calls */
    int64_t predicts;         /* mpscy_graph_predict calls */
    int64_t calls;            /* every ABI call on this device or its objects, except stats */
} mpscy_stats;

/* Creates a device of the named backend ("cpu", "cuda", "metal"). A backend that was not
 * built yields MPSCY_DEVICE with a message saying so. */
int mpscy_device_create(const char *backend, mpscy_device *out, char *err, size_t errlen);
void mpscy_device_destroy(mpscy_device dev);  /* accepts NULL; graphs and buffers go first */
int mpscy_device_info_get(mpscy_device dev, mpscy_device_info *out, char *err, size_t errlen);
int mpscy_device_stats(mpscy_device dev, mpscy_stats *out, char *err, size_t errlen);
/* Waits until the device has finished all the work it was given, and reports that work's
 * failure. A cuda training step returns as soon as its loss and its decision (update applied or
 * not) are known, while the update itself may still run; every other call on the device waits
 * for it first, so this is needed only to time steps or to hand the device to other code. */
int mpscy_device_synchronize(mpscy_device dev, char *err, size_t errlen);

/* ------------------------------------------------------------------ buffer */

typedef enum mpscy_storage {
    MPSCY_STORAGE_SHARED = 0,   /* host-visible: mpscy_buffer_host_pointer works */
    MPSCY_STORAGE_PRIVATE = 1   /* device-only: read/write copy through the ABI */
} mpscy_storage;

int mpscy_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out,
                        char *err, size_t errlen);
/* Accepts NULL. Buffers handed out by mpscy_graph_io belong to their graph and are ignored. */
void mpscy_buffer_destroy(mpscy_buffer buf);
int mpscy_buffer_host_pointer(mpscy_buffer buf, void **out, size_t *bytes, char *err, size_t errlen);
int mpscy_buffer_read(mpscy_buffer buf, size_t offset, void *dst, size_t bytes,
                      char *err, size_t errlen);
int mpscy_buffer_write(mpscy_buffer buf, size_t offset, const void *src, size_t bytes,
                       char *err, size_t errlen);

/* ------------------------------------------------------------------ graph */

/* Layer kinds. A node's per-kind options live in ints[]/reals[] as listed. */
typedef enum mpscy_layer_kind {
    MPSCY_LAYER_INPUT = 0,       /* a graph input; shape = per-sample input shape */
    MPSCY_LAYER_DENSE = 1,       /* ints[0]=units; flags BIAS; input flattened row-major */
    MPSCY_LAYER_RELU = 2,
    MPSCY_LAYER_CONV2D = 3,      /* ints: out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups; BIAS */
    MPSCY_LAYER_MAXPOOL2D = 4,   /* ints: kh, kw, sh, sw, ph, pw */
    MPSCY_LAYER_AVGPOOL2D = 5,   /* ints: kh, kw, sh, sw, ph, pw, count_include_pad */
    MPSCY_LAYER_GLOBALAVGPOOL2D = 6, /* (C, H, W) -> (C) */
    MPSCY_LAYER_FLATTEN = 7,     /* ints[0] = 0: (size,); ints[0] = r > 0: the per-sample shape ints[1..r] of
                                  * as many elements (Reshape), the same bytes row-major */
    MPSCY_LAYER_BATCHNORM = 8,   /* reals: momentum, eps; flags AFFINE */
    MPSCY_LAYER_LAYERNORM = 9,   /* ints[0]=normalized trailing dims; reals[1]=eps; AFFINE */
    MPSCY_LAYER_DROPOUT = 10,    /* reals[0]=rate */
    MPSCY_LAYER_LEAKYRELU = 11,  /* reals[0]=negative_slope */
    MPSCY_LAYER_ELU = 12,        /* reals[0]=alpha */
    MPSCY_LAYER_SIGMOID = 13,
    MPSCY_LAYER_TANH = 14,
    MPSCY_LAYER_SWISH = 15,
    MPSCY_LAYER_GELU = 16,       /* ints[0]=1 for the tanh approximation */
    MPSCY_LAYER_SOFTMAX = 17,    /* ints[0]=axis in the per-sample shape */
    MPSCY_LAYER_ADD = 18,        /* n_inputs >= 2, equal shapes */
    MPSCY_LAYER_CONCAT = 19,     /* ints[0]=axis in the per-sample shape */
    MPSCY_LAYER_RELU6 = 20,      /* min(max(x, 0), 6) */
    MPSCY_LAYER_HARDSIGMOID = 21, /* min(max(x + 3, 0), 6) / 6 */
    MPSCY_LAYER_HARDSWISH = 22,  /* x min(max(x + 3, 0), 6) / 6 */
    MPSCY_LAYER_SOFTPLUS = 23,   /* reals[0]=beta, reals[1]=threshold: log1p(exp(beta x)) / beta, or x
                                  * where beta x > threshold */
    MPSCY_LAYER_MISH = 24,       /* x tanh(log1p(exp(x))) */
    MPSCY_LAYER_UPSAMPLE2D = 25, /* ints: sh, sw, mode, align_corners, OH, OW. mode 0, nearest neighbour:
                                  * (C, H, W) -> (C, H sh, W sw), each input pixel repeated over an sh x sw
                                  * block (torch's Upsample(mode="nearest") with integer scale factors; ints
                                  * 3..5 are 0). mode 1, bilinear: (C, H, W) -> (C, OH, OW) as torch's
                                  * Upsample(mode="bilinear", align_corners) computes it from the sizes
                                  * (common/resize_math.h; sh, sw are 0) */
    MPSCY_LAYER_CONVTRANSPOSE2D = 26, /* ints: out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups, oph, opw:
                                  * torch's ConvTranspose2d, weight (C, out_c / groups, kh, kw), bias (out_c),
                                  * (C, H, W) -> (out_c, (H - 1) sh - 2 ph + dh (kh - 1) + oph + 1, ...);
                                  * output padding below the stride or the dilation */
    MPSCY_LAYER_KIND_COUNT = 27
} mpscy_layer_kind;

enum {
    MPSCY_FLAG_BIAS = 1,         /* the layer has a bias */
    MPSCY_FLAG_AFFINE = 2,       /* a normalization layer has weight and bias */
    MPSCY_FLAG_FROZEN = 4        /* the layer's parameters are not trained (torch's requires_grad=False):
                                  * read by forward and backward, never updated; they have no ".grad"
                                  * tensor or optimizer state and no share of the gradient norm.
                                  * Running statistics still update in train mode, as in torch. */
};

typedef struct mpscy_layer_desc {
    int32_t kind;                     /* mpscy_layer_kind */
    int32_t flags;                    /* MPSCY_FLAG_* */
    int32_t n_inputs;                 /* 0 for INPUT nodes */
    int32_t inputs[MPSCY_MAX_INPUTS]; /* producing node indices, each < this node's index */
    int32_t rank;                     /* per-sample output rank */
    int64_t shape[MPSCY_MAX_RANK];    /* per-sample output shape, resolved by the caller */
    int32_t ints[12];                 /* kind-specific integers */
    double reals[4];                  /* kind-specific reals */
    char name[MPSCY_NAME_LEN];        /* at most 40 bytes; parameters are "<name>.weight", ... */
} mpscy_layer_desc;

typedef enum mpscy_loss_kind {
    MPSCY_LOSS_SPARSE_CE = 1,        /* logits vs int labels; reals label_smoothing */
    MPSCY_LOSS_CE = 2,               /* logits vs class probabilities; label_smoothing */
    MPSCY_LOSS_BCE = 3,              /* probabilities vs targets in [0, 1] */
    MPSCY_LOSS_BCE_LOGITS = 4,       /* logits vs targets in [0, 1] */
    MPSCY_LOSS_CATEGORICAL_CE = 5,   /* probabilities vs one-hot / probabilities */
    MPSCY_LOSS_MSE = 6,
    MPSCY_LOSS_MAE = 7,
    MPSCY_LOSS_HUBER = 8             /* delta */
} mpscy_loss_kind;

typedef enum mpscy_accuracy_kind {
    MPSCY_ACCURACY_NONE = 0,         /* regression: correct is reported as -1 */
    MPSCY_ACCURACY_ARGMAX = 1,       /* argmax of output vs label (or argmax of target) */
    MPSCY_ACCURACY_THRESHOLD = 2     /* single output: output > threshold vs target > 0.5 */
} mpscy_accuracy_kind;

typedef struct mpscy_loss_desc {
    int32_t kind;                /* mpscy_loss_kind */
    int32_t accuracy;            /* mpscy_accuracy_kind */
    double label_smoothing;      /* cross-entropy losses */
    double delta;                /* huber */
    double threshold;            /* MPSCY_ACCURACY_THRESHOLD: 0.5 for probabilities, 0 for logits */
    const float *class_weight;   /* NULL, or one weight >= 0 per class (the output's first dimension) for
                                  * SPARSE_CE and CE, torch's weight=: each row's terms scaled by
                                  * their class's weight; the mean divides by the summed weights of
                                  * the rows' labels (SPARSE_CE) or by the rows (CE). Copied at build.
                                  * SPARSE_CE and CE take an output (C,) or (C, d1, ...), as torch's
                                  * (n, C, d1, ...): a row is one position's C logits (labels
                                  * (n, d1, ...) for SPARSE_CE), the mean over the batch's positions. */
    const float *pos_weight;     /* NULL, or for BCE_LOGITS one weight >= 0 per element of the output's
                                  * last axis (torch's pos_weight): the positive term z log sigmoid(x)
                                  * of each element scaled by its own. Copied at build. */
    int32_t ignore;              /* SPARSE_CE: 1 = labels equal to ignore_index are left out (torch's
                                  * ignore_index): no loss, zero gradient, not in the mean's divisor (the
                                  * rows, or the labels' summed weights) nor in the correct count */
    int32_t ignore_index;
} mpscy_loss_desc;

typedef enum mpscy_optim_kind {
    MPSCY_OPTIM_SGD = 1,
    MPSCY_OPTIM_ADAM = 2,
    MPSCY_OPTIM_ADAMW = 3,
    MPSCY_OPTIM_RMSPROP = 4,
    MPSCY_OPTIM_ADAGRAD = 5,
    MPSCY_OPTIM_ADADELTA = 6,
    MPSCY_OPTIM_NADAM = 7,
    MPSCY_OPTIM_LBFGS = 8
} mpscy_optim_kind;

enum {
    MPSCY_OPTIM_NESTEROV = 1,
    MPSCY_OPTIM_AMSGRAD = 2,
    MPSCY_OPTIM_MAXIMIZE = 4,
    MPSCY_OPTIM_CENTERED = 8,
    MPSCY_OPTIM_DECOUPLED_WD = 16
};

/* Build-time optimizer options. lr, momentum, betas and weight_decay are the initial values;
 * each step carries its own (mpscy_step_args), so schedules never rebuild. */
typedef struct mpscy_optim_desc {
    int32_t kind;                /* mpscy_optim_kind */
    int32_t flags;               /* MPSCY_OPTIM_* */
    double lr, momentum, dampening, weight_decay;
    double beta1, beta2, eps;
    double alpha, rho, lr_decay, initial_accumulator_value, momentum_decay;
    double clip_grad_norm;       /* <= 0: off */
    double clip_grad_value;      /* <= 0: off */
    int32_t history_size, max_iter, line_search;  /* LBFGS; line_search 1 = strong Wolfe */
    double tolerance_grad, tolerance_change;      /* LBFGS */
} mpscy_optim_desc;

typedef enum mpscy_target_kind {
    MPSCY_TARGET_INDEX = 0,      /* int32 class labels, shape (batch,) */
    MPSCY_TARGET_DENSE = 1       /* float32, shaped like the output */
} mpscy_target_kind;

typedef enum mpscy_precision {
    MPSCY_PRECISION_FP32 = 0,
    MPSCY_PRECISION_TF32 = 1
} mpscy_precision;

typedef struct mpscy_graph_desc {
    int32_t n_layers;
    const mpscy_layer_desc *layers;  /* topologically ordered; INPUT nodes are the inputs */
    int32_t output;                  /* node index of the model output */
    int32_t batch;                   /* built (largest) batch size */
    int32_t target;                  /* mpscy_target_kind */
    int32_t precision;               /* mpscy_precision */
    int32_t threads;                 /* cpu worker threads, 0 = backend default */
    int32_t input_grad;              /* 1: also compute d(loss)/d(inputs) (MPSCY_IO_INPUT_GRAD) */
    mpscy_loss_desc loss;
    mpscy_optim_desc optim;
} mpscy_graph_desc;

int mpscy_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out,
                      char *err, size_t errlen);
void mpscy_graph_destroy(mpscy_graph g);   /* accepts NULL */

typedef enum mpscy_io_kind {
    MPSCY_IO_INPUT = 0,    /* float32 (batch, *input shape), one per INPUT node, in node order */
    MPSCY_IO_TARGET = 1,   /* int32 (batch,) or float32 (batch, *output shape) */
    MPSCY_IO_OUTPUT = 2,   /* float32 (batch, *output shape), written by mpscy_graph_predict */
    MPSCY_IO_INPUT_GRAD = 3 /* float32 d(loss)/d(input), per input, after a TRAIN or GRAD step
                               of a graph built with input_grad = 1 */
} mpscy_io_kind;

/* The graph's shared (host-visible) staging buffers. The caller fills inputs and targets
 * before a step and reads the output after a predict. They belong to the graph. */
int mpscy_graph_io(mpscy_graph g, int32_t kind, int32_t index, mpscy_buffer *out,
                   char *err, size_t errlen);

/* Named tensors of a graph: parameters, buffers (running statistics) and optimizer state. */
typedef enum mpscy_tensor_role {
    MPSCY_ROLE_PARAM = 0,        /* a parameter, updated by the optimizer unless its layer is frozen */
    MPSCY_ROLE_BUFFER = 1,       /* non-trainable state such as running statistics */
    MPSCY_ROLE_OPTIM = 2,        /* optimizer state over the flat trainable slab */
    MPSCY_ROLE_GRAD = 3          /* "<param>.grad": the last TRAIN/GRAD step's gradient (read-only) */
} mpscy_tensor_role;

typedef enum mpscy_dtype {
    MPSCY_F32 = 0,
    MPSCY_F64 = 1,
    MPSCY_I64 = 2
} mpscy_dtype;

typedef struct mpscy_tensor_info {
    char name[MPSCY_NAME_LEN];   /* "dense_0.weight", "bn_1.running_mean", "exp_avg", "step" */
    int32_t role;                /* mpscy_tensor_role */
    int32_t dtype;               /* mpscy_dtype */
    int32_t rank;
    int64_t shape[MPSCY_MAX_RANK];  /* PyTorch/ONNX layouts: Dense weight (out, in) */
    int64_t count;               /* elements */
    int64_t offset;              /* PARAM: element offset in the parameter slab: the trainable ones
                                  * first (the optimizer's flat slab), then the frozen ones */
} mpscy_tensor_info;

int mpscy_graph_tensor_count(mpscy_graph g, int32_t *out, char *err, size_t errlen);
int mpscy_graph_tensor_info(mpscy_graph g, int32_t index, mpscy_tensor_info *out,
                            char *err, size_t errlen);
/* Copy a whole tensor out of / into the graph; bytes must equal count * dtype size. */
int mpscy_graph_tensor_read(mpscy_graph g, int32_t index, void *dst, size_t bytes,
                            char *err, size_t errlen);
int mpscy_graph_tensor_write(mpscy_graph g, int32_t index, const void *src, size_t bytes,
                             char *err, size_t errlen);

/* ------------------------------------------------------------------ step */

typedef enum mpscy_mode {
    MPSCY_MODE_TRAIN = 0,    /* forward (train mode), loss, backward, clip, update */
    MPSCY_MODE_EVAL = 1,     /* forward (eval mode) and loss: nothing is modified */
    MPSCY_MODE_GRAD = 2,     /* forward (train mode), loss, backward: gradients only */
    MPSCY_MODE_LBFGS = 3     /* one call of an L-BFGS step: the lbfgs_ops bits, in the order below */
} mpscy_mode;

/* An L-BFGS step (torch.optim.LBFGS) is a short loop driven by the caller; every loss evaluation
 * is one MPSCY_MODE_LBFGS call, and all vector work runs in these calls, in this order:
 * ROLLBACK; FINALIZE: params = base + lbfgs_t_prev * d; DIRECTION: new direction d from the
 * gradient in register lbfgs_flat_reg and the history (s = lbfgs_t_prev * d), which skips the
 * rest of the call when g.d > -tolerance_change; MOVE: params = base + lbfgs_t * d (after
 * DIRECTION, base = params first); EVAL: forward, loss (+ weight_decay/2 |params|^2), backward,
 * gradient copied into register lbfgs_reg. BEGIN (with the step's first EVAL) saves what a
 * non-finite evaluation later in the step restores (parameters and optimizer state), before
 * that call returns MPSCY_NONFINITE. */
enum {
    MPSCY_LBFGS_BEGIN = 1,
    MPSCY_LBFGS_FINALIZE = 2,
    MPSCY_LBFGS_DIRECTION = 4,
    MPSCY_LBFGS_FIRST = 8,       /* with DIRECTION: the optimizer's first iteration: d = -g */
    MPSCY_LBFGS_MOVE = 16,
    MPSCY_LBFGS_EVAL = 32,
    MPSCY_LBFGS_COUNT = 64,      /* with MOVE: this move counts the step in "step" */
    MPSCY_LBFGS_ROLLBACK = 128   /* restore what BEGIN saved (a step abandoned by the caller) */
};
#define MPSCY_LBFGS_REGISTERS 4  /* gradient registers a line search keeps */

/* Values that may change every step; they never force a rebuild. */
typedef struct mpscy_step_args {
    int32_t batch;           /* rows already staged, 1..built batch */
    int32_t mode;            /* mpscy_mode (predict ignores it: always eval) */
    double lr;               /* learning rate of this step */
    double momentum;         /* SGD / RMSprop momentum */
    double beta1, beta2;     /* Adam-family betas */
    double weight_decay;
    uint64_t seed;           /* dropout generator key */
    uint64_t counter;        /* dropout generator counter: advance once per train step */
    int32_t lbfgs_ops;       /* MPSCY_MODE_LBFGS: MPSCY_LBFGS_* bits */
    int32_t lbfgs_reg;       /* gradient register (0..MPSCY_LBFGS_REGISTERS-1) EVAL fills */
    int32_t lbfgs_flat_reg;  /* gradient register DIRECTION starts from */
    double lbfgs_t_prev;     /* step length of the previous iteration (FINALIZE, DIRECTION) */
    double lbfgs_t;          /* step length of MOVE */
    /* Input 0's rows (batch * its size floats), not yet staged, on a device whose info has
     * stage_min_bytes, for a one-input graph in TRAIN or EVAL mode or predict (NULL: the caller
     * staged every input, as always). The backend copies and checks them itself — cuda while the
     * step's graph already runs. A NaN or Inf among them fails the call with MPSCY_NONFINITE,
     * x_nonfinite set and nothing modified that the caller can see: no update, no committed
     * statistics, no output. */
    const float *x_src;
} mpscy_step_args;

typedef struct mpscy_step_result {
    double loss;             /* mean loss over the staged rows */
    int64_t correct;         /* correct predictions, -1 when the loss has no accuracy */
    double grad_norm;        /* global L2 gradient norm before clipping (TRAIN/GRAD) */
    int32_t applied;         /* 1 when the optimizer update was applied */
    int32_t finite;          /* 0 when the loss or a gradient was not finite */
    /* MPSCY_MODE_LBFGS only */
    int32_t lbfgs_stopped;   /* DIRECTION found g.d > -tolerance_change: nothing after it ran */
    double lbfgs_gtd;        /* g.d of the new direction (DIRECTION) */
    double lbfgs_d_max;      /* max |d| of the new direction (DIRECTION) */
    double lbfgs_gtd_new;    /* g_new.d at the evaluated point (EVAL) */
    double lbfgs_g_max;      /* max |g_new| (EVAL) */
    double lbfgs_g_sum;      /* sum |g_new| (EVAL) */
    int32_t x_nonfinite;     /* 1: x_src held a NaN or Inf (the status is MPSCY_NONFINITE) */
    /* TRAIN on cuda, whose one-kernel step may return once its loss and decision are known, before
     * its weight gradients are (the decision then comes from a bound on them): grad_norm is NaN and
     * grad_norm_pending 1. The graph's next training step gives that norm as prev_grad_norm
     * (prev_grad_norm_ready 1), or mpscy_graph_grad_norm waits for it. */
    int32_t grad_norm_pending;
    int32_t prev_grad_norm_ready;
    double prev_grad_norm;
} mpscy_step_result;

/* One training (or evaluation) step over the batch staged in the graph's io buffers.
 * A non-finite loss or gradient returns MPSCY_NONFINITE with result filled and every
 * parameter, buffer and optimizer state exactly as before the call. */
int mpscy_graph_step(mpscy_graph g, const mpscy_step_args *args, mpscy_step_result *out,
                     char *err, size_t errlen);

/* The gradient norm of the graph's last training step, when that step's result had
 * grad_norm_pending and no later training step has given it as prev_grad_norm: waits for the
 * step's remaining work. MPSCY_INVALID when no norm is pending. */
int mpscy_graph_grad_norm(mpscy_graph g, double *out, char *err, size_t errlen);

/* Eval-mode forward of the staged inputs into the output io buffer. */
int mpscy_graph_predict(mpscy_graph g, const mpscy_step_args *args, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* MPSCY_H */
