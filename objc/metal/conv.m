/* conv.m — Conv2D (torch.nn.Conv2d: zero padding, stride, dilation, groups, optional bias) on
 * MPSGraph's 2D convolution with NCHW data and OIHW weights, the PyTorch layouts. Backward uses
 * MPSGraph's data and weights gradient operations with the forward descriptor; the bias
 * gradient is the sum of dy over batch and space. ConvTranspose2D runs the same three operations
 * in the other roles. Shapes come from the plan. */
#import "metal.h"

/* ints: out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups (ConvTranspose2D: then oph, opw) */
static MPSGraphConvolution2DOpDescriptor *conv_descriptor(const mpscy_node *n) {
    const int32_t *q = n->ints;
    return [MPSGraphConvolution2DOpDescriptor descriptorWithStrideInX:(NSUInteger)q[4]
                                                            strideInY:(NSUInteger)q[3]
                                                      dilationRateInX:(NSUInteger)q[8]
                                                      dilationRateInY:(NSUInteger)q[7]
                                                               groups:(NSUInteger)q[9]
                                                          paddingLeft:(NSUInteger)q[6]
                                                         paddingRight:(NSUInteger)q[6]
                                                           paddingTop:(NSUInteger)q[5]
                                                        paddingBottom:(NSUInteger)q[5]
                                                         paddingStyle:MPSGraphPaddingStyleExplicit
                                                           dataLayout:MPSGraphTensorNamedDataLayoutNCHW
                                                        weightsLayout:MPSGraphTensorNamedDataLayoutOIHW];
}

MPSGraphTensor *metal_conv_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *x = mt_y(c, n->in[0]);      // (b, C, H, W)
    MPSGraphTensor *w = mt_param(c, n, 0);      // (out_c, C / groups, kh, kw)
    MPSGraphTensor *y = [c.g convolution2DWithSourceTensor:x weightsTensor:w descriptor:conv_descriptor(n)
                                                      name:nil];   // (b, out_c, OH, OW)
    MPSGraphTensor *bias = mt_param(c, n, 1);   // (out_c) or nil
    if (bias) y = mt_add(c, y, mt_reshape(c, bias, @[@1, @(n->shape[0]), @1, @1]));
    return y;
}

/* the weight gradient of the convolution desc (from `source` to the tensor whose gradient is
 * `incoming`) into slot 0, and the bias gradient, dy summed over batch and space, into slot 1 */
static void param_grads(MetalBuilder *c, const mpscy_node *n, MPSGraphConvolution2DOpDescriptor *desc,
                        MPSGraphTensor *incoming, MPSGraphTensor *source, MPSGraphTensor *dy) {
    int32_t wt = mt_tensor_index(c.plan, n, MPSCY_ROLE_PARAM, 0);
    const mpscy_tensor_info *wi = &c.plan->tensors[wt].info;
    mt_set_grad(c, n, 0, [c.g convolution2DWeightsGradientWithIncomingGradientTensor:incoming sourceTensor:source
                                                                         outputShape:mt_dims(wi->rank, wi->shape)
                                                        forwardConvolutionDescriptor:desc name:nil]);
    if (n->flags & MPSCY_FLAG_BIAS)
        mt_set_grad(c, n, 1, mt_reshape(c, mt_sum(c, dy, @[@0, @2, @3]), @[@(n->shape[0])]));
}

void metal_conv_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    MPSGraphConvolution2DOpDescriptor *desc = conv_descriptor(n);
    MPSGraphTensor *dy = mt_dy(c, i);           // (b, out_c, OH, OW)
    MPSGraphTensor *x = mt_y(c, n->in[0]);      // (b, C, H, W)
    MPSGraphTensor *w = mt_param(c, n, 0);      // (out_c, C / groups, kh, kw)
    param_grads(c, n, desc, dy, x, dy);
    if (src->grad)
        mt_acc(c, n->in[0], [c.g convolution2DDataGradientWithIncomingGradientTensor:dy weightsTensor:w
                                                                          outputShape:mt_shape(c.b, src)
                                                         forwardConvolutionDescriptor:desc name:nil]);
}

/* ConvTranspose2D (torch.nn.ConvTranspose2d, weight (C, out_c / groups, kh, kw)) as the convolution
 * it transposes, from the node's output (b, out_c, OH, OW) back to its input (b, C, H, W), whose
 * descriptor is the node's own ints and whose OIHW weight is the node's: the forward is that
 * convolution's data gradient with x as its incoming gradient (the explicit output shape carries
 * output_padding's extra row and column), the input gradient its forward, the weight gradient its
 * weights gradient with dy as its source and x as its incoming gradient. An output padding at or
 * above the stride (below the dilation, as torch allows) is refused at build (graph.m): that
 * convolution would map the output onto more rows than x has. */
MPSGraphTensor *metal_convt_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *x = mt_y(c, n->in[0]);      // (b, C, H, W)
    MPSGraphTensor *w = mt_param(c, n, 0);      // (C, out_c / groups, kh, kw)
    MPSGraphTensor *y = [c.g convolution2DDataGradientWithIncomingGradientTensor:x weightsTensor:w
                                                                     outputShape:mt_shape(c.b, n)
                                                    forwardConvolutionDescriptor:conv_descriptor(n) name:nil];
    MPSGraphTensor *bias = mt_param(c, n, 1);   // (out_c) or nil
    if (bias) y = mt_add(c, y, mt_reshape(c, bias, @[@1, @(n->shape[0]), @1, @1]));
    return y;                                   // (b, out_c, OH, OW)
}

void metal_convt_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    MPSGraphConvolution2DOpDescriptor *desc = conv_descriptor(n);
    MPSGraphTensor *dy = mt_dy(c, i);           // (b, out_c, OH, OW)
    MPSGraphTensor *x = mt_y(c, n->in[0]);      // (b, C, H, W)
    MPSGraphTensor *w = mt_param(c, n, 0);
    param_grads(c, n, desc, x, dy, dy);         // the transposed convolution: from dy to x
    if (src->grad) mt_acc(c, n->in[0], [c.g convolution2DWithSourceTensor:dy weightsTensor:w descriptor:desc name:nil]);
}
