/* layers.cu — the CUDA backend's table of layer kinds: one line per kind naming its forward,
 * backward, workspace and commit functions, in mpscy_layer_kind order (C++ has no array
 * designators). A kind left empty is rejected at graph build with MPSCY_UNSUPPORTED. */
#include "cuda.h"

#define NONE {NULL, NULL, NULL, NULL}
#define ACT {cu_activation_forward, cu_activation_backward, NULL, NULL}

const cu_layer_ops cu_layers[MPSCY_LAYER_KIND_COUNT] = {
    /* INPUT */ NONE,
    /* DENSE */ {cu_dense_forward, cu_dense_backward, cu_dense_workspace, NULL},
    /* RELU */ ACT,
    /* CONV2D */ {cu_conv_forward, cu_conv_backward, cu_conv_workspace, NULL},
    /* MAXPOOL2D */ {cu_pool_forward, cu_pool_backward, NULL, NULL},
    /* AVGPOOL2D */ {cu_pool_forward, cu_pool_backward, NULL, NULL},
    /* GLOBALAVGPOOL2D */ {cu_pool_forward, cu_pool_backward, NULL, NULL},
    /* FLATTEN */ {cu_flatten_forward, cu_flatten_backward, NULL, NULL},
    /* BATCHNORM */ {cu_batchnorm_forward, cu_batchnorm_backward, cu_batchnorm_workspace, cu_batchnorm_commit},
    /* LAYERNORM */ {cu_layernorm_forward, cu_layernorm_backward, NULL, NULL},
    /* DROPOUT */ {cu_dropout_forward, cu_dropout_backward, NULL, NULL},
    /* LEAKYRELU */ ACT,
    /* ELU */ ACT,
    /* SIGMOID */ ACT,
    /* TANH */ ACT,
    /* SWISH */ ACT,
    /* GELU */ ACT,
    /* SOFTMAX */ ACT,
    /* ADD */ {cu_merge_forward, cu_merge_backward, NULL, NULL},
    /* CONCAT */ {cu_merge_forward, cu_merge_backward, NULL, NULL},
    /* RELU6 */ ACT,
    /* HARDSIGMOID */ ACT,
    /* HARDSWISH */ ACT,
    /* SOFTPLUS */ ACT,
    /* MISH */ ACT,
    /* UPSAMPLE2D */ {cu_pool_forward, cu_pool_backward, NULL, NULL},
    /* CONVTRANSPOSE2D */ {cu_convt_forward, cu_convt_backward, cu_convt_workspace, NULL},
};
static_assert(MPSCY_LAYER_CONVTRANSPOSE2D == 26 && MPSCY_LAYER_KIND_COUNT == 27, "the table follows mpscy_layer_kind");
