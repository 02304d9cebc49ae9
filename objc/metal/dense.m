/* dense.m — the fully connected layer as MPSGraph matrix products: y = x W^T + b with W stored
 * (out, in) as in PyTorch, inputs of higher rank read row-major as (b, in). Backward, written
 * out as on the CPU: dW = dy^T x, db = column sums of dy, dx = dy W. */
#import "metal.h"

MPSGraphTensor *metal_dense_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    MPSGraphTensor *x = mt_reshape(c, mt_y(c, n->in[0]), @[@(c.b), @(src->size)]);  // (b, in)
    MPSGraphTensor *w = mt_param(c, n, 0);                                           // (out, in)
    MPSGraphTensor *wt = [c.g transposeTensor:w dimension:0 withDimension:1 name:nil]; // (in, out)
    MPSGraphTensor *y = [c.g matrixMultiplicationWithPrimaryTensor:x secondaryTensor:wt name:nil];
    MPSGraphTensor *bias = mt_param(c, n, 1);                                        // (out) or nil
    return bias ? mt_add(c, y, bias) : y;                                            // (b, out)
}

void metal_dense_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    MPSGraphTensor *dy = mt_dy(c, i);                                                // (b, out)
    MPSGraphTensor *x = mt_reshape(c, mt_y(c, n->in[0]), @[@(c.b), @(src->size)]);  // (b, in)
    MPSGraphTensor *w = mt_param(c, n, 0);                                           // (out, in)
    MPSGraphTensor *dyt = [c.g transposeTensor:dy dimension:0 withDimension:1 name:nil];
    mt_set_grad(c, n, 0, [c.g matrixMultiplicationWithPrimaryTensor:dyt secondaryTensor:x name:nil]);
    if (n->flags & MPSCY_FLAG_BIAS)
        mt_set_grad(c, n, 1, mt_reshape(c, mt_sum(c, dy, @[@0]), @[@(n->size)]));
    if (src->grad) {
        MPSGraphTensor *dx = [c.g matrixMultiplicationWithPrimaryTensor:dy secondaryTensor:w name:nil];
        mt_acc(c, n->in[0], mt_reshape(c, dx, mt_shape(c.b, src)));
    }
}
