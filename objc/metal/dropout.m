/* dropout.m — inverted dropout. The mask is drawn on the host, before each train step, into a
 * shared buffer per dropout node, by the same Philox function of (seed, counter, node,
 * element) as the CPU backend (common/rng.h); the graph multiplies by it. Why the host and not
 * MPSGraph integer ops: Philox needs 32x32->64-bit products, which MPSGraph's documented
 * integer arithmetic does not promise, and one shared generator keeps every backend's masks
 * identical by construction. Eval mode is the identity. */
#import "metal.h"
#include "../common/rng.h"


MPSGraphTensor *metal_dropout_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *x = mt_y(c, n->in[0]);   // (b, *shape)
    if (!c.train || n->reals[0] <= 0.0) return x;
    MPSGraphTensor *mask = mt_placeholder(c, mt_shape(c.b, n), MPSDataTypeFloat32, METAL_BIND_MASK, i);
    mt_set(c.mask, (NSUInteger)i, mask);     // (b, *shape): 0 or 1 / (1 - rate)
    return mt_mul(c, x, mask);
}

void metal_dropout_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *dy = mt_dy(c, i), *mask = mt_get(c.mask, (NSUInteger)i);
    mt_acc(c, n->in[0], mask ? mt_mul(c, dy, mask) : dy);
}

void metal_dropout_masks(metal_graph *g, const mpscy_step_args *a, int64_t b) {
    const mpscy_plan *p = &g->plan;
    MetalGraphState *st = metal_state(g);
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *n = &p->nodes[i];
        id<MTLBuffer> buf = mt_get(st.masks, (NSUInteger)i);
        if (n->kind != MPSCY_LAYER_DROPOUT || !buf) continue;
        /* the CPU's float arithmetic exactly, so the same elements are kept with the same scale */
        const float rate = (float)n->reals[0];
        float *m = buf.contents;   // (b, *shape)
        for (int64_t e = 0; e < b * n->size; e++)
            m[e] = mpscy_dropout_multiplier(a->seed, a->counter, (uint32_t)i, (uint64_t)e, rate);
    }
}
