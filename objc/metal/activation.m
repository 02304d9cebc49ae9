/* activation.m — element-wise activations (ReLU, LeakyReLU, ELU, Sigmoid, Tanh, Swish/SiLU,
 * GELU exact and tanh, ReLU6, Hardsigmoid, Hardswish, Softplus, Mish), Softmax over one axis, and Flatten, as MPSGraph arithmetic with the
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

static MPSGraphTensor *clamp6(MetalBuilder *c, MPSGraphTensor *v) {
    /* min(max(v, 0), 6) as selects, so that a NaN passes (objc/common/activation_math.h) */
    MPSGraphTensor *zero = mt_const(c, 0.0), *six = mt_const(c, 6.0);
    return mt_select(c, mt_lt(c, v, zero), zero, mt_select(c, mt_gt(c, v, six), six, v));
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
        if (n->ints[0])   // 0.5 x (1 + tanh(u)) as x sigmoid(2u): no cancellation for negative x
            return mt_mul(c, x, sigmoid(c, mt_mul(c, mt_const(c, 2.0), gelu_inner(c, x))));
        MPSGraphTensor *inner = [c.g erfWithTensor:mt_mul(c, x, mt_const(c, 0.7071067811865476)) name:nil];
        return mt_mul(c, mt_mul(c, half, x), mt_add(c, one, inner));
    }
    case MPSCY_LAYER_SOFTMAX:
        return [c.g softMaxWithTensor:x axis:n->ints[0] + 1 name:nil];
    case MPSCY_LAYER_RELU6:
        return clamp6(c, x);
    case MPSCY_LAYER_HARDSIGMOID:
        return mt_div(c, clamp6(c, mt_add(c, x, mt_const(c, 3.0))), mt_const(c, 6.0));
    case MPSCY_LAYER_HARDSWISH:
        return mt_div(c, mt_mul(c, x, clamp6(c, mt_add(c, x, mt_const(c, 3.0)))), mt_const(c, 6.0));
    case MPSCY_LAYER_SOFTPLUS: {   // x where beta x > threshold, else log1p(exp(beta x)) / beta
        MPSGraphTensor *bx = mt_mul(c, x, mt_const(c, n->reals[0]));
        MPSGraphTensor *soft = mt_div(c, mt_log1p(c, mt_exp(c, bx)), mt_const(c, n->reals[0]));
        return mt_select(c, mt_gt(c, bx, mt_const(c, n->reals[1])), x, soft);
    }
    case MPSCY_LAYER_MISH:
        return mt_mul(c, x, [c.g tanhWithTensor:mt_log1p(c, mt_exp(c, x)) name:nil]);
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
            // s + x s (1 - s) 2u', s = sigmoid(2u) = 0.5 (1 + tanh(u)), 2u' = 2 sqrt(2/pi) (1 + 3c x^2)
            MPSGraphTensor *s = sigmoid(c, mt_mul(c, mt_const(c, 2.0), gelu_inner(c, x)));
            MPSGraphTensor *du = mt_mul(c, mt_const(c, 2.0 * SQRT_2_OVER_PI),
                                        mt_add(c, one, mt_mul(c, mt_const(c, 3.0 * GELU_C), mt_mul(c, x, x))));
            MPSGraphTensor *ss = mt_mul(c, s, mt_sub(c, one, s));
            MPSGraphTensor *b = mt_mul(c, mt_mul(c, x, ss), du);   // x 0 where the slope is 0 (x^2 overflows past 1.8e19)
            b = mt_select(c, mt_eq(c, ss, zero), mt_mul(c, x, zero), b);
            d = mt_mul(c, dy, mt_add(c, s, b));
        } else {
            // Phi(x) + x phi(x)
            MPSGraphTensor *cdf = mt_mul(c, half, mt_add(c, one, [c.g erfWithTensor:mt_mul(c, x, mt_const(c, 0.7071067811865476)) name:nil]));
            MPSGraphTensor *pdf = mt_mul(c, mt_exp(c, mt_mul(c, mt_const(c, -0.5), mt_mul(c, x, x))),
                                         mt_const(c, 0.3989422804014327));
            d = mt_mul(c, dy, mt_add(c, cdf, mt_mul(c, x, pdf)));
        }
        break;
    case MPSCY_LAYER_RELU6:   // 0 where x <= 0 or x >= 6 (torch's hardtanh_backward)
        d = mt_select(c, mt_le(c, x, zero), zero, mt_select(c, mt_le(c, mt_const(c, 6.0), x), zero, dy));
        break;
    case MPSCY_LAYER_HARDSIGMOID:   // dy / 6 strictly between -3 and 3
        d = mt_select(c, mt_and(c, mt_gt(c, x, mt_const(c, -3.0)), mt_lt(c, x, mt_const(c, 3.0))),
                      mt_mul(c, dy, mt_const(c, 1.0 / 6.0)), zero);
        break;
    case MPSCY_LAYER_HARDSWISH:   // 0 up to -3, dy (x / 3 + 1/2) strictly between, dy from 3
        d = mt_select(c, mt_le(c, x, mt_const(c, -3.0)), zero,
                      mt_select(c, mt_lt(c, x, mt_const(c, 3.0)),
                                mt_mul(c, dy, mt_add(c, mt_div(c, x, mt_const(c, 3.0)), half)), dy));
        break;
    case MPSCY_LAYER_SOFTPLUS: {   // dy z / (z + 1), z = exp(beta x); dy where beta x > threshold
        MPSGraphTensor *bx = mt_mul(c, x, mt_const(c, n->reals[0])), *z = mt_exp(c, bx);
        d = mt_select(c, mt_gt(c, bx, mt_const(c, n->reals[1])), dy, mt_div(c, mt_mul(c, dy, z), mt_add(c, z, one)));
        break;
    }
    case MPSCY_LAYER_MISH: {   // dy (t + x s (1 - t^2)), s = sigmoid(x), t = tanh(softplus(x))
        MPSGraphTensor *s = sigmoid(c, x), *t = [c.g tanhWithTensor:mt_log1p(c, mt_exp(c, x)) name:nil];
        d = mt_mul(c, dy, mt_add(c, t, mt_mul(c, mt_mul(c, x, s), mt_sub(c, one, mt_mul(c, t, t)))));
        break;
    }
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
