# _abi.pxd — objc/mpscy.h for Cython, declaration for declaration, in the header's order.
# Keep it in step with the header; MPSCY_ABI_VERSION is checked when mpscy imports.
from libc.stdint cimport int32_t, int64_t, uint64_t

cdef extern from "mpscy.h" nogil:
    enum:
        MPSCY_ABI_VERSION
        MPSCY_MAX_RANK
        MPSCY_MAX_INPUTS
        MPSCY_NAME_LEN
        MPSCY_ERR_LEN
        MPSCY_MAX_THREADS

    # status
    enum mpscy_status:
        MPSCY_OK
        MPSCY_INVALID
        MPSCY_SHAPE
        MPSCY_OOM
        MPSCY_DEVICE
        MPSCY_UNSUPPORTED
        MPSCY_NONFINITE
    int32_t mpscy_abi_version()

    # device
    ctypedef struct mpscy_device_:
        pass
    ctypedef struct mpscy_buffer_:
        pass
    ctypedef struct mpscy_graph_:
        pass
    ctypedef mpscy_device_ *mpscy_device
    ctypedef mpscy_buffer_ *mpscy_buffer
    ctypedef mpscy_graph_ *mpscy_graph

    ctypedef struct mpscy_device_info:
        char backend[16]
        char name[128]
        int32_t unified_memory
        int32_t threads
        int64_t memory_bytes
        int64_t stage_min_bytes

    ctypedef struct mpscy_stats:
        int64_t allocations
        int64_t frees
        int64_t bytes_in_use
        int64_t peak_bytes
        int64_t steps
        int64_t predicts
        int64_t calls

    int mpscy_device_create(const char *backend, mpscy_device *out, char *err, size_t errlen)
    void mpscy_device_destroy(mpscy_device dev)
    int mpscy_device_info_get(mpscy_device dev, mpscy_device_info *out, char *err, size_t errlen)
    int mpscy_device_stats(mpscy_device dev, mpscy_stats *out, char *err, size_t errlen)
    int mpscy_device_synchronize(mpscy_device dev, char *err, size_t errlen)

    # buffer
    enum mpscy_storage:
        MPSCY_STORAGE_SHARED
        MPSCY_STORAGE_PRIVATE
    int mpscy_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out,
                            char *err, size_t errlen)
    void mpscy_buffer_destroy(mpscy_buffer buf)
    int mpscy_buffer_host_pointer(mpscy_buffer buf, void **out, size_t *nbytes, char *err, size_t errlen)
    int mpscy_buffer_read(mpscy_buffer buf, size_t offset, void *dst, size_t nbytes, char *err, size_t errlen)
    int mpscy_buffer_write(mpscy_buffer buf, size_t offset, const void *src, size_t nbytes,
                           char *err, size_t errlen)

    # graph
    enum mpscy_layer_kind:
        MPSCY_LAYER_INPUT
        MPSCY_LAYER_DENSE
        MPSCY_LAYER_RELU
        MPSCY_LAYER_CONV2D
        MPSCY_LAYER_MAXPOOL2D
        MPSCY_LAYER_AVGPOOL2D
        MPSCY_LAYER_GLOBALAVGPOOL2D
        MPSCY_LAYER_FLATTEN
        MPSCY_LAYER_BATCHNORM
        MPSCY_LAYER_LAYERNORM
        MPSCY_LAYER_DROPOUT
        MPSCY_LAYER_LEAKYRELU
        MPSCY_LAYER_ELU
        MPSCY_LAYER_SIGMOID
        MPSCY_LAYER_TANH
        MPSCY_LAYER_SWISH
        MPSCY_LAYER_GELU
        MPSCY_LAYER_SOFTMAX
        MPSCY_LAYER_ADD
        MPSCY_LAYER_CONCAT
        MPSCY_LAYER_RELU6
        MPSCY_LAYER_HARDSIGMOID
        MPSCY_LAYER_HARDSWISH
        MPSCY_LAYER_SOFTPLUS
        MPSCY_LAYER_MISH
        MPSCY_LAYER_UPSAMPLE2D
        MPSCY_LAYER_CONVTRANSPOSE2D
        MPSCY_LAYER_KIND_COUNT
    enum:
        MPSCY_FLAG_BIAS
        MPSCY_FLAG_AFFINE
        MPSCY_FLAG_FROZEN

    ctypedef struct mpscy_layer_desc:
        int32_t kind
        int32_t flags
        int32_t n_inputs
        int32_t inputs[8]
        int32_t rank
        int64_t shape[6]
        int32_t ints[12]
        double reals[4]
        char name[64]

    enum mpscy_loss_kind:
        MPSCY_LOSS_SPARSE_CE
        MPSCY_LOSS_CE
        MPSCY_LOSS_BCE
        MPSCY_LOSS_BCE_LOGITS
        MPSCY_LOSS_CATEGORICAL_CE
        MPSCY_LOSS_MSE
        MPSCY_LOSS_MAE
        MPSCY_LOSS_HUBER
    enum mpscy_accuracy_kind:
        MPSCY_ACCURACY_NONE
        MPSCY_ACCURACY_ARGMAX
        MPSCY_ACCURACY_THRESHOLD

    ctypedef struct mpscy_loss_desc:
        int32_t kind
        int32_t accuracy
        double label_smoothing
        double delta
        double threshold
        const float *class_weight
        const float *pos_weight
        int32_t ignore
        int32_t ignore_index

    enum mpscy_optim_kind:
        MPSCY_OPTIM_SGD
        MPSCY_OPTIM_ADAM
        MPSCY_OPTIM_ADAMW
        MPSCY_OPTIM_RMSPROP
        MPSCY_OPTIM_ADAGRAD
        MPSCY_OPTIM_ADADELTA
        MPSCY_OPTIM_NADAM
        MPSCY_OPTIM_LBFGS
    enum:
        MPSCY_OPTIM_NESTEROV
        MPSCY_OPTIM_AMSGRAD
        MPSCY_OPTIM_MAXIMIZE
        MPSCY_OPTIM_CENTERED
        MPSCY_OPTIM_DECOUPLED_WD

    ctypedef struct mpscy_optim_desc:
        int32_t kind
        int32_t flags
        double lr, momentum, dampening, weight_decay
        double beta1, beta2, eps
        double alpha, rho, lr_decay, initial_accumulator_value, momentum_decay
        double clip_grad_norm
        double clip_grad_value
        int32_t history_size, max_iter, line_search
        double tolerance_grad, tolerance_change

    enum mpscy_target_kind:
        MPSCY_TARGET_INDEX
        MPSCY_TARGET_DENSE
    enum mpscy_precision:
        MPSCY_PRECISION_FP32
        MPSCY_PRECISION_TF32

    ctypedef struct mpscy_graph_desc:
        int32_t n_layers
        const mpscy_layer_desc *layers
        int32_t output
        int32_t batch
        int32_t target
        int32_t precision
        int32_t threads
        int32_t input_grad
        mpscy_loss_desc loss
        mpscy_optim_desc optim

    int mpscy_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out,
                          char *err, size_t errlen)
    void mpscy_graph_destroy(mpscy_graph g)

    enum mpscy_io_kind:
        MPSCY_IO_INPUT
        MPSCY_IO_TARGET
        MPSCY_IO_OUTPUT
        MPSCY_IO_INPUT_GRAD
    int mpscy_graph_io(mpscy_graph g, int32_t kind, int32_t index, mpscy_buffer *out,
                       char *err, size_t errlen)

    enum mpscy_tensor_role:
        MPSCY_ROLE_PARAM
        MPSCY_ROLE_BUFFER
        MPSCY_ROLE_OPTIM
        MPSCY_ROLE_GRAD
    enum mpscy_dtype:
        MPSCY_F32
        MPSCY_F64
        MPSCY_I64

    ctypedef struct mpscy_tensor_info:
        char name[64]
        int32_t role
        int32_t dtype
        int32_t rank
        int64_t shape[6]
        int64_t count
        int64_t offset

    int mpscy_graph_tensor_count(mpscy_graph g, int32_t *out, char *err, size_t errlen)
    int mpscy_graph_tensor_info(mpscy_graph g, int32_t index, mpscy_tensor_info *out,
                                char *err, size_t errlen)
    int mpscy_graph_tensor_read(mpscy_graph g, int32_t index, void *dst, size_t nbytes,
                                char *err, size_t errlen)
    int mpscy_graph_tensor_write(mpscy_graph g, int32_t index, const void *src, size_t nbytes,
                                 char *err, size_t errlen)

    # step
    enum mpscy_mode:
        MPSCY_MODE_TRAIN
        MPSCY_MODE_EVAL
        MPSCY_MODE_GRAD
        MPSCY_MODE_LBFGS

    enum:
        MPSCY_LBFGS_BEGIN
        MPSCY_LBFGS_FINALIZE
        MPSCY_LBFGS_DIRECTION
        MPSCY_LBFGS_FIRST
        MPSCY_LBFGS_MOVE
        MPSCY_LBFGS_EVAL
        MPSCY_LBFGS_COUNT
        MPSCY_LBFGS_ROLLBACK
    enum:
        MPSCY_LBFGS_REGISTERS

    ctypedef struct mpscy_step_args:
        int32_t batch
        int32_t mode
        double lr
        double momentum
        double beta1, beta2
        double weight_decay
        uint64_t seed
        uint64_t counter
        int32_t lbfgs_ops
        int32_t lbfgs_reg
        int32_t lbfgs_flat_reg
        double lbfgs_t_prev
        double lbfgs_t
        const float *x_src

    ctypedef struct mpscy_step_result:
        double loss
        int64_t correct
        double grad_norm
        int32_t applied
        int32_t finite
        int32_t lbfgs_stopped
        double lbfgs_gtd
        double lbfgs_d_max
        double lbfgs_gtd_new
        double lbfgs_g_max
        double lbfgs_g_sum
        int32_t x_nonfinite
        int32_t grad_norm_pending
        int32_t prev_grad_norm_ready
        double prev_grad_norm

    int mpscy_graph_step(mpscy_graph g, const mpscy_step_args *args, mpscy_step_result *out,
                         char *err, size_t errlen)
    int mpscy_graph_predict(mpscy_graph g, const mpscy_step_args *args, char *err, size_t errlen)
    int mpscy_graph_grad_norm(mpscy_graph g, double *out, char *err, size_t errlen)
