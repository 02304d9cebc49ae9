/* activation.m — element-wise activations (ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Swish/SiLU,
 * GELU exact and tanh), Softmax over one axis, and Flatten, as MPSGraph arithmetic with the
 * derivatives objc/cpu/activation.c uses (ReLU's is taken from the output, 0 at 0). Each
 * backward reads only the layer's input and output tensors. */
#import "metal.h"

#define SQRT_2_OVER_PI 0.7978845608028654
#define GELU_C 0.044715

static MPSGraphTensor *sigmoid(MetalBuilder *c, MPSGraphTensor *x) {
    /* 1 / (1 + exp(-x)), the CPU formula, rather than MPSGraph's own sigmoid kernel */
    MPSGraphTensor *one = mt_const(c, 1.0);
    return mt_div(c, one, mt_add(c, one, mt_exp(c, mt_neg(c, x))));
}

static MPSGraphTensor *gelu_inner(MetalBuilder *c, MPSGraphTensor *x) {
    // u = sqrt(2/pi) * (x + 0.044715 x^3)
    MPSGraphTensor *x3 = mt_mul(c, mt_mul(c, x, x), x);
    return mt_mul(c, mt_const(c, SQRT_2_OVER_PI), mt_add(c, x, mt_mul(c, mt_const(c, GELU_C), x3)));
}

MPSGraphTensor *metal_activation_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *x = mt_y(c, n->in[0]);   // (b, *shape)
    MPSGraphTensor *zero = mt_const(c, 0.0), *one = mt_const(c, 1.0), *half = mt_const(c, 0.5);
    switch (n->kind) {
    case MPSCY_LAYER_RELU:   // 0 where x <= 0, else x: a NaN passes, as torch's relu keeps it
        return mt_select(c, mt_le(c, x, zero), zero, x);
    case MPSCY_LAYER_LEAKYRELU:
        return mt_select(c, mt_gt(c, x, zero), x, mt_mul(c, x, mt_const(c, n->reals[0])));
    case MPSCY_LAYER_ELU:
        return mt_select(c, mt_gt(c, x, zero), x, mt_mul(c, mt_const(c, n->reals[0]), mt_expm1(c, x)));
    case MPSCY_LAYER_SIGMOID:
        return sigmoid(c, x);
    case MPSCY_LAYER_TANH:
        return [c.g tanhWithTensor:x name:nil];
    case MPSCY_LAYER_SWISH:
        return mt_div(c, x, mt_add(c, one, mt_exp(c, mt_neg(c, x))));
    case MPSCY_LAYER_GELU: {
        MPSGraphTensor *inner = n->ints[0]
            ? [c.g tanhWithTensor:gelu_inner(c, x) name:nil]
            : [c.g erfWithTensor:mt_mul(c, x, mt_const(c, 0.7071067811865476)) name:nil];
        return mt_mul(c, mt_mul(c, half, x), mt_add(c, one, inner));
    }
    case MPSCY_LAYER_SOFTMAX:
        return [c.g softMaxWithTensor:x axis:n->ints[0] + 1 name:nil];
    default:
        return nil;
    }
}

void metal_activation_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    if (!c.plan->nodes[n->in[0]].grad) return;
    MPSGraphTensor *dy = mt_dy(c, i), *x = mt_y(c, n->in[0]), *y = mt_y(c, i);   // (b, *shape) each
    MPSGraphTensor *zero = mt_const(c, 0.0), *one = mt_const(c, 1.0), *half = mt_const(c, 0.5);
    MPSGraphTensor *d = nil;
    switch (n->kind) {
    case MPSCY_LAYER_RELU:
        d = mt_select(c, mt_le(c, y, zero), zero, dy);
        break;
    case MPSCY_LAYER_LEAKYRELU:
        d = mt_select(c, mt_gt(c, x, zero), dy, mt_mul(c, dy, mt_const(c, n->reals[0])));
        break;
    case MPSCY_LAYER_ELU:
        d = mt_select(c, mt_gt(c, x, zero), dy, mt_mul(c, mt_mul(c, dy, mt_const(c, n->reals[0])), mt_exp(c, x)));
        break;
    case MPSCY_LAYER_SIGMOID:
        d = mt_mul(c, mt_mul(c, dy, y), mt_sub(c, one, y));
        break;
    case MPSCY_LAYER_TANH:
        d = mt_mul(c, dy, mt_sub(c, one, mt_mul(c, y, y)));
        break;
    case MPSCY_LAYER_SWISH: {
        MPSGraphTensor *s = sigmoid(c, x);
        d = mt_mul(c, mt_mul(c, dy, s), mt_add(c, one, mt_mul(c, x, mt_sub(c, one, s))));
        break;
    }
    case MPSCY_LAYER_GELU:
        if (n->ints[0]) {
            // 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3c x^2), t = tanh(u)
            MPSGraphTensor *t = [c.g tanhWithTensor:gelu_inner(c, x) name:nil];
            MPSGraphTensor *du = mt_mul(c, mt_const(c, SQRT_2_OVER_PI),
                                        mt_add(c, one, mt_mul(c, mt_const(c, 3.0 * GELU_C), mt_mul(c, x, x))));
            MPSGraphTensor *a = mt_mul(c, half, mt_add(c, one, t));
            MPSGraphTensor *b = mt_mul(c, mt_mul(c, mt_mul(c, half, x), mt_sub(c, one, mt_mul(c, t, t))), du);
            d = mt_mul(c, dy, mt_add(c, a, b));
        } else {
            // Phi(x) + x phi(x)
            MPSGraphTensor *cdf = mt_mul(c, half, mt_add(c, one, [c.g erfWithTensor:mt_mul(c, x, mt_const(c, 0.7071067811865476)) name:nil]));
            MPSGraphTensor *pdf = mt_mul(c, mt_exp(c, mt_mul(c, mt_const(c, -0.5), mt_mul(c, x, x))),
                                         mt_const(c, 0.3989422804014327));
            d = mt_mul(c, dy, mt_add(c, cdf, mt_mul(c, x, pdf)));
        }
        break;
    case MPSCY_LAYER_SOFTMAX: {
        // y (dy - sum(dy y)) along the softmax axis
        MPSGraphTensor *dot = mt_sum(c, mt_mul(c, dy, y), @[@(n->ints[0] + 1)]);
        d = mt_mul(c, y, mt_sub(c, dy, dot));
        break;
    }
    default:
        return;
    }
    mt_acc(c, n->in[0], d);
}

MPSGraphTensor *metal_flatten_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    return mt_reshape(c, mt_y(c, n->in[0]), mt_shape(c.b, n));
}

void metal_flatten_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    if (src->grad) mt_acc(c, n->in[0], mt_reshape(c, mt_dy(c, i), mt_shape(c.b, src)));
}
