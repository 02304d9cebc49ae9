/* merge.m — the layers with several inputs: Add (element-wise sum of equal shapes; each input
 * receives dy) and Concatenate (along one per-sample axis; each input receives its slice of
 * dy). Shapes were checked by the plan. */
#import "metal.h"

MPSGraphTensor *metal_add_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    MPSGraphTensor *y = mt_y(c, n->in[0]);   // (b, *shape)
    for (int32_t j = 1; j < n->n_in; j++) y = mt_add(c, y, mt_y(c, n->in[j]));
    return y;
}

void metal_add_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *dy = mt_dy(c, i);
    for (int32_t j = 0; j < n->n_in; j++) mt_acc(c, n->in[j], dy);
}

MPSGraphTensor *metal_concat_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    (void)i;
    NSMutableArray<MPSGraphTensor *> *parts = [NSMutableArray arrayWithCapacity:(NSUInteger)n->n_in];
    for (int32_t j = 0; j < n->n_in; j++) [parts addObject:mt_y(c, n->in[j])];
    if (n->n_in == 1) return parts[0];
    return [c.g concatTensors:parts dimension:n->ints[0] + 1 name:nil];   // (b, *shape)
}

void metal_concat_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *dy = mt_dy(c, i);
    int32_t ax = n->ints[0];
    int64_t start = 0;
    for (int32_t j = 0; j < n->n_in; j++) {
        int64_t len = c.plan->nodes[n->in[j]].shape[ax];
        if (c.plan->nodes[n->in[j]].grad)
            mt_acc(c, n->in[j], [c.g sliceTensor:dy dimension:(NSUInteger)(ax + 1) start:(NSInteger)start
                                          length:(NSInteger)len name:nil]);
        start += len;
    }
}
