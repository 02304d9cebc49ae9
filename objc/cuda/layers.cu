/* layers.cu — the CUDA backend's table of layer kinds: one line per kind naming its forward,
 * backward, workspace and commit functions, in mpscy_layer_kind order (C++ has no array
 * designators). A kind left empty is rejected at graph build with MPSCY_UNSUPPORTED. */
#include "cuda.h"

#define NONE {NULL, NULL, NULL, NULL}
#define ACT {cu_activation_forward, cu_activation_backward, NULL, NULL}

const cu_layer_ops cu_layers[MPSCY_LAYER_KIND_COUNT] = {
    /* INPUT */ NONE,
    /* DENSE */ {cu_dense_forward, cu_dense_backward, NULL, NULL},
    /* RELU */ ACT,
    /* CONV2D */ NONE,
    /* MAXPOOL2D */ NONE,
    /* AVGPOOL2D */ NONE,
    /* GLOBALAVGPOOL2D */ NONE,
    /* FLATTEN */ {cu_flatten_forward, cu_flatten_backward, NULL, NULL},
    /* BATCHNORM */ NONE,
    /* LAYERNORM */ NONE,
    /* DROPOUT */ NONE,
    /* LEAKYRELU */ ACT,
    /* ELU */ ACT,
    /* SIGMOID */ ACT,
    /* TANH */ ACT,
    /* SWISH */ ACT,
    /* GELU */ ACT,
    /* SOFTMAX */ ACT,
    /* ADD */ NONE,
    /* CONCAT */ NONE,
};
static_assert(MPSCY_LAYER_CONCAT == 19 && MPSCY_LAYER_KIND_COUNT == 20, "the table follows mpscy_layer_kind");
