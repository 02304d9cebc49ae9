/* layers.c — the CPU backend's table of layer kinds: one line per kind naming its forward,
 * backward, workspace and commit functions. A kind left empty is rejected at graph build
 * with MPSCY_UNSUPPORTED. */
#include "cpu.h"

const cpu_layer_ops cpu_layers[MPSCY_LAYER_KIND_COUNT] = {
    [MPSCY_LAYER_DENSE] = {cpu_dense_forward, cpu_dense_backward, NULL, NULL},
    [MPSCY_LAYER_RELU] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_LEAKYRELU] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_ELU] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_SIGMOID] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_TANH] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_SWISH] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_GELU] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_SOFTMAX] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_FLATTEN] = {cpu_flatten_forward, cpu_flatten_backward, NULL, NULL},
    [MPSCY_LAYER_CONV2D] = {cpu_conv_forward, cpu_conv_backward, cpu_conv_workspace, NULL},
    [MPSCY_LAYER_MAXPOOL2D] = {cpu_pool_forward, cpu_pool_backward, NULL, NULL},
    [MPSCY_LAYER_AVGPOOL2D] = {cpu_pool_forward, cpu_pool_backward, NULL, NULL},
    [MPSCY_LAYER_GLOBALAVGPOOL2D] = {cpu_pool_forward, cpu_pool_backward, NULL, NULL},
    [MPSCY_LAYER_UPSAMPLE2D] = {cpu_pool_forward, cpu_pool_backward, cpu_pool_workspace, NULL},
    [MPSCY_LAYER_CONVTRANSPOSE2D] = {cpu_convt_forward, cpu_convt_backward, cpu_conv_workspace, NULL},
    [MPSCY_LAYER_BATCHNORM] = {cpu_batchnorm_forward, cpu_batchnorm_backward, NULL, cpu_batchnorm_commit},
    [MPSCY_LAYER_LAYERNORM] = {cpu_layernorm_forward, cpu_layernorm_backward, cpu_layernorm_workspace, NULL},
    [MPSCY_LAYER_DROPOUT] = {cpu_dropout_forward, cpu_dropout_backward, NULL, NULL},
    [MPSCY_LAYER_ADD] = {cpu_add_forward, cpu_add_backward, NULL, NULL},
    [MPSCY_LAYER_CONCAT] = {cpu_concat_forward, cpu_concat_backward, NULL, NULL},
    [MPSCY_LAYER_RELU6] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_HARDSIGMOID] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_HARDSWISH] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_SOFTPLUS] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
    [MPSCY_LAYER_MISH] = {cpu_activation_forward, cpu_activation_backward, NULL, NULL},
};
