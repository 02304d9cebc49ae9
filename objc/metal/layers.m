/* layers.m — the Metal backend's table of layer kinds: one line per kind naming the functions
 * that write its forward and backward MPSGraph nodes. A kind left empty is rejected at graph
 * build with MPSCY_UNSUPPORTED (none is: every kind of mpscy.h is here). */
#import "metal.h"

const metal_layer_ops metal_layers[MPSCY_LAYER_KIND_COUNT] = {
    [MPSCY_LAYER_DENSE] = {metal_dense_forward, metal_dense_backward},
    [MPSCY_LAYER_RELU] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_CONV2D] = {metal_conv_forward, metal_conv_backward},
    [MPSCY_LAYER_CONVTRANSPOSE2D] = {metal_convt_forward, metal_convt_backward},
    [MPSCY_LAYER_MAXPOOL2D] = {metal_pool_forward, metal_pool_backward},
    [MPSCY_LAYER_AVGPOOL2D] = {metal_pool_forward, metal_pool_backward},
    [MPSCY_LAYER_GLOBALAVGPOOL2D] = {metal_global_pool_forward, metal_global_pool_backward},
    [MPSCY_LAYER_UPSAMPLE2D] = {metal_upsample_forward, metal_upsample_backward},
    [MPSCY_LAYER_FLATTEN] = {metal_flatten_forward, metal_flatten_backward},
    [MPSCY_LAYER_BATCHNORM] = {metal_batchnorm_forward, metal_batchnorm_backward},
    [MPSCY_LAYER_LAYERNORM] = {metal_layernorm_forward, metal_layernorm_backward},
    [MPSCY_LAYER_DROPOUT] = {metal_dropout_forward, metal_dropout_backward},
    [MPSCY_LAYER_LEAKYRELU] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_ELU] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_SIGMOID] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_TANH] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_SWISH] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_GELU] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_SOFTMAX] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_ADD] = {metal_add_forward, metal_add_backward},
    [MPSCY_LAYER_CONCAT] = {metal_concat_forward, metal_concat_backward},
    [MPSCY_LAYER_RELU6] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_HARDSIGMOID] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_HARDSWISH] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_SOFTPLUS] = {metal_activation_forward, metal_activation_backward},
    [MPSCY_LAYER_MISH] = {metal_activation_forward, metal_activation_backward},
};
