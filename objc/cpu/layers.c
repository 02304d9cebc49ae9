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
};
