/* pool.m — MaxPool2D and AvgPool2D (torch.nn semantics: floor output size, implicit padding
 * ignored by max, counted by avg when count_include_pad) on MPSGraph's 2D pooling with NCHW
 * data, their backward through MPSGraph's pooling gradient operations, GlobalAvgPool2D as a mean
 * over H and W, and nearest-neighbour Upsample2D as a broadcast (its gradient a sum over each
 * block). */
#import "metal.h"

/* ints: kh, kw, sh, sw, ph, pw [, count_include_pad] */
static MPSGraphPooling2DOpDescriptor *pool_descriptor(const mpscy_node *n) {
    const int32_t *q = n->ints;
    MPSGraphPooling2DOpDescriptor *d =
        [MPSGraphPooling2DOpDescriptor descriptorWithKernelWidth:(NSUInteger)q[1]
                                                    kernelHeight:(NSUInteger)q[0]
                                                       strideInX:(NSUInteger)q[3]
                                                       strideInY:(NSUInteger)q[2]
                                                 dilationRateInX:1
                                                 dilationRateInY:1
                                                     paddingLeft:(NSUInteger)q[5]
                                                    paddingRight:(NSUInteger)q[5]
                                                      paddingTop:(NSUInteger)q[4]
                                                   paddingBottom:(NSUInteger)q[4]
                                                    paddingStyle:MPSGraphPaddingStyleExplicit
                                                      dataLayout:MPSGraphTensorNamedDataLayoutNCHW];
    d.ceilMode = NO;
    if (n->kind == MPSCY_LAYER_AVGPOOL2D) d.includeZeroPadToAverage = q[6] ? YES : NO;
    return d;
}

MPSGraphTensor *metal_pool_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *x = mt_y(c, n->in[0]);   // (b, C, H, W)
    if (n->kind == MPSCY_LAYER_MAXPOOL2D)
        return [c.g maxPooling2DWithSourceTensor:x descriptor:pool_descriptor(n) name:nil];  // (b, C, OH, OW)
    return [c.g avgPooling2DWithSourceTensor:x descriptor:pool_descriptor(n) name:nil];
}

void metal_pool_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    if (!c.plan->nodes[n->in[0]].grad) return;
    MPSGraphTensor *dy = mt_dy(c, i), *x = mt_y(c, n->in[0]);   // (b, C, OH, OW), (b, C, H, W)
    MPSGraphTensor *dx = n->kind == MPSCY_LAYER_MAXPOOL2D
        ? [c.g maxPooling2DGradientWithGradientTensor:dy sourceTensor:x descriptor:pool_descriptor(n) name:nil]
        : [c.g avgPooling2DGradientWithGradientTensor:dy sourceTensor:x descriptor:pool_descriptor(n) name:nil];
    mt_acc(c, n->in[0], dx);
}

MPSGraphTensor *metal_global_pool_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *x = mt_y(c, n->in[0]);                           // (b, C, H, W)
    return mt_reshape(c, mt_mean(c, x, @[@2, @3]), mt_shape(c.b, n)); // (b, C)
}

void metal_global_pool_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    if (!src->grad) return;
    double hw = (double)(src->shape[1] * src->shape[2]);
    MPSGraphTensor *dy = mt_reshape(c, mt_dy(c, i), @[@(c.b), @(n->shape[0]), @1, @1]);  // (b, C, 1, 1)
    MPSGraphTensor *d = mt_div(c, dy, mt_const(c, hw));
    mt_acc(c, n->in[0], [c.g broadcastTensor:d toShape:mt_shape(c.b, src) name:nil]);     // (b, C, H, W)
}

/* Upsample2D, nearest: x (b, C, H, W) viewed as (b, C, H, 1, W, 1), broadcast to (b, C, H, sh, W, sw) */
MPSGraphTensor *metal_upsample_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    NSNumber *b = @(c.b), *ch = @(src->shape[0]), *h = @(src->shape[1]), *w = @(src->shape[2]);
    MPSGraphTensor *x = mt_reshape(c, mt_y(c, n->in[0]), @[b, ch, h, @1, w, @1]);
    MPSGraphTensor *y = [c.g broadcastTensor:x toShape:@[b, ch, h, @(n->ints[0]), w, @(n->ints[1])] name:nil];
    return mt_reshape(c, y, mt_shape(c.b, n));  // (b, C, H sh, W sw)
}

/* each input pixel's gradient: the sum of its sh x sw block of dy */
void metal_upsample_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    if (!src->grad) return;
    NSNumber *b = @(c.b), *ch = @(src->shape[0]), *h = @(src->shape[1]), *w = @(src->shape[2]);
    MPSGraphTensor *dy = mt_reshape(c, mt_dy(c, i), @[b, ch, h, @(n->ints[0]), w, @(n->ints[1])]);
    mt_acc(c, n->in[0], mt_reshape(c, mt_sum(c, dy, @[@3, @5]), mt_shape(c.b, src)));  // (b, C, H, W)
}
