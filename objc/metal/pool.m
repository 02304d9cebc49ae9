/* pool.m — MaxPool2D and AvgPool2D (torch.nn semantics: floor output size, implicit padding
 * ignored by max, counted by avg when count_include_pad) on MPSGraph's 2D pooling with NCHW
 * data, their backward through MPSGraph's pooling gradient operations, GlobalAvgPool2D as a mean
 * over H and W, and Upsample2D: nearest as a broadcast (its gradient a sum over each block),
 * bilinear as MPSGraph's resize and its gradient, mapped as PyTorch's MPS backend maps torch's. */
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

/* Upsample2D, bilinear (ints[3] align_corners): torch's upsample_bilinear2d from the sizes
 * (common/resize_math.h) as MPSGraph's resize with centerResult YES and alignCorners = align_corners,
 * the flags PyTorch's MPS backend passes for it from sizes (aten/src/ATen/native/mps/operations/
 * UpSample.mm: forward and backward on every macOS before its Metal kernel, still its backward).
 * MPSGraphResizeOps.h (macOS 11): centerResult behaves as TensorFlow 2's resize, src = (o + 0.5) in /
 * out - 0.5 with both taps clamped into the input, so a negative src (torch clamps it to 0) reads
 * index 0 alone, as torch's; alignCorners scales by (out - 1) / (in - 1), i.e. src = o (in - 1) /
 * (out - 1), and makes centerResult do nothing. Equal to torch up to float rounding, not to the bit. */
typedef struct bilinear_geom {
    int64_t h, w, oh, ow;   /* input and output sizes */
    BOOL align;
    BOOL fh, fw;            /* align_corners axis with a 1 on either side (below) */
} bilinear_geom;

/* With align_corners, torch's ratio is 0 where in or out is 1 (index 0 alone is read), but the
 * header's factor (out - 1) / (in - 1) is 0, infinite or 0/0 there, and pytorch/pytorch#144245
 * reports NaN from MPS on such sizes. So such a "flat" axis is not left to the resize: x is cut to
 * index 0 on it, widened to 2 equal rows that a 2 -> 2 resize copies (factor 1), cut back, broadcast. */
static bilinear_geom bilinear_geom_of(MetalBuilder *c, const mpscy_node *n) {
    const mpscy_node *src = &c.plan->nodes[n->in[0]];
    bilinear_geom q = {src->shape[1], src->shape[2], n->shape[1], n->shape[2], n->ints[3] != 0, NO, NO};
    q.fh = q.align && (q.h == 1 || q.oh == 1);
    q.fw = q.align && (q.w == 1 || q.ow == 1);
    return q;
}

/* t with zeros of shape z after it along dim */
static MPSGraphTensor *append_zeros(MetalBuilder *c, MPSGraphTensor *t, NSInteger dim, MPSShape *z) {
    MPSGraphTensor *zeros = [c.g constantWithScalar:0.0 shape:z dataType:MPSDataTypeFloat32];
    return [c.g concatTensors:@[t, zeros] dimension:dim name:nil];
}

static MPSGraphTensor *bilinear_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    bilinear_geom q = bilinear_geom_of(c, n);
    NSNumber *b = @(c.b), *ch = @(n->shape[0]);
    MPSGraphTensor *t = mt_y(c, n->in[0]);                                          // (b, C, H, W)
    if (q.fh) t = [c.g sliceTensor:t dimension:2 start:0 length:1 name:nil];         // (b, C, 1, W)
    if (q.fw) t = [c.g sliceTensor:t dimension:3 start:0 length:1 name:nil];
    if (!(q.fh && q.fw)) {
        if (q.fh || q.fw)
            t = [c.g broadcastTensor:t toShape:@[b, ch, q.fh ? @2 : @(q.h), q.fw ? @2 : @(q.w)] name:nil];
        c.saved[(NSUInteger)i] = @[t];                                               // the resize's input
        t = [c.g resizeTensor:t
                         size:@[q.fh ? @2 : @(q.oh), q.fw ? @2 : @(q.ow)]
                         mode:MPSGraphResizeBilinear
                 centerResult:YES
                 alignCorners:q.align
                       layout:MPSGraphTensorNamedDataLayoutNCHW
                         name:nil];
        if (q.fh) t = [c.g sliceTensor:t dimension:2 start:0 length:1 name:nil];
        if (q.fw) t = [c.g sliceTensor:t dimension:3 start:0 length:1 name:nil];
    }
    if (q.fh || q.fw) t = [c.g broadcastTensor:t toShape:mt_shape(c.b, n) name:nil];
    return t;                                                                        // (b, C, OH, OW)
}

/* the forward's steps in reverse: a broadcast sums, a cut pads with zeros */
static void bilinear_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    bilinear_geom q = bilinear_geom_of(c, n);
    NSNumber *b = @(c.b), *ch = @(n->shape[0]);
    MPSGraphTensor *g = mt_dy(c, i);                                                 // (b, C, OH, OW)
    if (q.fh) g = mt_sum(c, g, @[@2]);                                               // (b, C, 1, OW)
    if (q.fw) g = mt_sum(c, g, @[@3]);
    if (!(q.fh && q.fw)) {
        NSArray *saved = mt_get(c.saved, (NSUInteger)i);
        MPSGraphTensor *x = saved[0];
        if (q.fh) g = append_zeros(c, g, 2, @[b, ch, @1, q.fw ? @1 : @(q.ow)]);     // row 1 was cut away
        if (q.fw) g = append_zeros(c, g, 3, @[b, ch, q.fh ? @2 : @(q.oh), @1]);
        g = [c.g resizeWithGradientTensor:g
                                    input:x
                                     mode:MPSGraphResizeBilinear
                             centerResult:YES
                             alignCorners:q.align
                                   layout:MPSGraphTensorNamedDataLayoutNCHW
                                     name:nil];
        if (q.fh) g = mt_sum(c, g, @[@2]);                                           // the 2 equal rows
        if (q.fw) g = mt_sum(c, g, @[@3]);
    }
    if (q.fh && q.h > 1) g = append_zeros(c, g, 2, @[b, ch, @(q.h - 1), q.fw ? @1 : @(q.w)]);
    if (q.fw && q.w > 1) g = append_zeros(c, g, 3, @[b, ch, @(q.h), @(q.w - 1)]);
    mt_acc(c, n->in[0], g);                                                          // (b, C, H, W)
}

/* Upsample2D, nearest: x (b, C, H, W) viewed as (b, C, H, 1, W, 1), broadcast to (b, C, H, sh, W, sw) */
MPSGraphTensor *metal_upsample_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    if (n->ints[2] == 1) return bilinear_forward(c, n, i);
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
    if (n->ints[2] == 1) {
        bilinear_backward(c, n, i);
        return;
    }
    NSNumber *b = @(c.b), *ch = @(src->shape[0]), *h = @(src->shape[1]), *w = @(src->shape[2]);
    MPSGraphTensor *dy = mt_reshape(c, mt_dy(c, i), @[b, ch, h, @(n->ints[0]), w, @(n->ints[1])]);
    mt_acc(c, n->in[0], mt_reshape(c, mt_sum(c, dy, @[@3, @5]), mt_shape(c.b, src)));  // (b, C, H, W)
}
