/* compile.m — from the shared plan to an MPSGraphExecutable: one MPSGraph per executable kind
 * (train, eval, predict) and batch size, built node by node through the layer table (forward,
 * the explicit loss gradient, backward in reverse node order, then the update of optim.m),
 * compiled for static shapes, with its tensor data bound once per parity of the ping-pong
 * slabs. Executables are cached by (kind, rows). Only shapes from the plan are used. */
#import "metal.h"

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), METAL_C, __VA_ARGS__)

@implementation MetalExec
@end

@implementation MetalBuilder
@end

static const char *kind_name(int kind) {
    return kind == METAL_TRAIN ? "train" : kind == METAL_EVAL ? "eval" : "predict";
}

/* The value of PARAM or BUFFER tensor t: a slice of its slab placeholder, in its own shape. */
static MPSGraphTensor *slab_view(MetalBuilder *c, MPSGraphTensor *slab, int64_t offset,
                                 const mpscy_tensor_info *info) {
    MPSGraphTensor *flat = [c.g sliceTensor:slab dimension:0 start:(NSInteger)offset
                                     length:(NSInteger)info->count name:nil];
    return mt_reshape(c, flat, mt_dims(info->rank, info->shape));
}

static void build_graph(MetalBuilder *c, int kind) {
    const mpscy_plan *p = c.plan;
    const mpscy_node *out_node = &p->nodes[p->output];
    MPSGraphTensor *params = nil, *buffers = nil;
    if (p->n_params > 0)
        params = mt_placeholder(c, @[@(p->n_params)], MPSDataTypeFloat32, METAL_BIND_PARAMS, 0);
    if (p->n_buffers > 0)
        buffers = mt_placeholder(c, @[@(p->n_buffers)], MPSDataTypeFloat32, METAL_BIND_BUFFERS, 0);
    for (int32_t t = 0; t < p->n_tensors; t++) {
        const mpscy_tensor_info *info = &p->tensors[t].info;
        if (info->role == MPSCY_ROLE_PARAM)
            mt_set(c.view, (NSUInteger)t, slab_view(c, params, info->offset, info));
        else if (info->role == MPSCY_ROLE_BUFFER)
            mt_set(c.view, (NSUInteger)t, slab_view(c, buffers, info->offset - p->n_params, info));
    }

    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        MPSGraphTensor *y = node->kind == MPSCY_LAYER_INPUT
            ? mt_placeholder(c, mt_shape(c.b, node), MPSDataTypeFloat32, METAL_BIND_INPUT, node->input_index)
            : metal_layers[node->kind].forward(c, node, i);
        mt_set(c.y, (NSUInteger)i, y);
    }
    MPSGraphTensor *out = mt_y(c, p->output);   // (b, *output shape)
    if (kind == METAL_PREDICT) {
        mt_result(c, out, mt_shape(c.b, out_node), MPSDataTypeFloat32, METAL_BIND_OUTPUT, 0);
        return;
    }

    MPSGraphTensor *target = p->target == MPSCY_TARGET_INDEX
        ? mt_placeholder(c, @[@(c.b * p->target_size)], MPSDataTypeInt32, METAL_BIND_TARGET, 0)
        : mt_placeholder(c, mt_shape(c.b, out_node), MPSDataTypeFloat32, METAL_BIND_TARGET, 0);
    MPSGraphTensor *loss = nil, *correct = nil, *dy = nil;
    metal_loss(c, out, target, &loss, &correct, kind == METAL_TRAIN ? &dy : NULL);
    if (kind == METAL_EVAL) {
        MPSGraphTensor *hits = correct ? correct : mt_scalar1(c, mt_const(c, 0.0));
        mt_result(c, [c.g concatTensors:@[loss, hits] dimension:0 name:nil], @[@2], MPSDataTypeFloat32,
                  METAL_BIND_STATS, 0);
        return;
    }

    /* backward visits nodes from last to first, as the CPU backend: every consumer of a node
     * comes after it, so its gradient is complete when the node is reached */
    mt_acc(c, p->output, dy);
    for (int32_t i = p->n_nodes - 1; i >= 0; i--) {
        const mpscy_node *node = &p->nodes[i];
        if (node->grad && node->kind != MPSCY_LAYER_INPUT && mt_dy(c, i))
            metal_layers[node->kind].backward(c, node, i);
    }
    metal_update(c, params, loss, correct);
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind != MPSCY_LAYER_INPUT || !node->grad) continue;
        MPSGraphTensor *dx = mt_dy(c, i);
        if (!dx) dx = [c.g constantWithScalar:0.0 shape:mt_shape(c.b, node) dataType:MPSDataTypeFloat32];
        mt_result(c, dx, mt_shape(c.b, node), MPSDataTypeFloat32, METAL_BIND_INPUT_GRAD, node->input_index);
    }
}

/* The buffer a feed (result == 0) or a result binds to: state slabs are read from the current
 * parity and written into the other one. */
static id<MTLBuffer> bound_buffer(MetalGraphState *st, int bind, int parity, int result) {
    int role = bind >> 16, index = bind & 0xffff, other = result ? 1 - parity : parity;
    switch (role) {
    case METAL_BIND_INPUT: return st.inputs[(NSUInteger)index];
    case METAL_BIND_TARGET: return st.target;
    case METAL_BIND_OUTPUT: return st.output;
    case METAL_BIND_INPUT_GRAD: return mt_get(st.inputGrads, (NSUInteger)index);
    case METAL_BIND_PARAMS: return other && st.params1 ? st.params1 : st.params0;   /* L-BFGS: one slab */
    case METAL_BIND_BUFFERS: return other ? st.buffers1 : st.buffers0;
    case METAL_BIND_OPTIM: return other && st.optim1 ? st.optim1 : st.optim0;
    case METAL_BIND_GRADS: return st.grads;
    case METAL_BIND_HYPER: return st.hyper;
    case METAL_BIND_STATS: return st.stats;
    case METAL_BIND_MASK: return mt_get(st.masks, (NSUInteger)index);
    default: return nil;
    }
}

/* Tensor data for `order` (the executable's feed or target order), found in the builder's
 * lists by identity. */
static NSArray<MPSGraphTensorData *> *bind_all(MetalGraphState *st, NSArray<MPSGraphTensor *> *order,
                                               NSArray<MPSGraphTensor *> *mine, NSArray<NSNumber *> *binds,
                                               NSArray<MPSGraphShapedType *> *types, int parity, int result) {
    NSMutableArray<MPSGraphTensorData *> *data = [NSMutableArray arrayWithCapacity:order.count];
    for (MPSGraphTensor *t in order) {
        NSUInteger k = [mine indexOfObjectIdenticalTo:t];
        if (k == NSNotFound) return nil;
        id<MTLBuffer> buf = bound_buffer(st, binds[k].intValue, parity, result);
        if (!buf) return nil;
        MPSGraphTensorData *td = [[MPSGraphTensorData alloc] initWithMTLBuffer:buf shape:types[k].shape
                                                                     dataType:types[k].dataType];
        if (!td) return nil;
        [data addObject:td];
    }
    return data;
}

static int compile_exec(metal_graph *g, int kind, int64_t b, MetalExec *__strong *out, char *err, size_t n) {
    MetalGraphState *st = metal_state(g);
    const mpscy_plan *p = &g->plan;
    MetalBuilder *c = [MetalBuilder new];
    c.g = [MPSGraph new];
    c.plan = p;
    c.b = b;
    c.train = kind == METAL_TRAIN;
    c.y = mt_slots((NSUInteger)p->n_nodes);
    c.dy = mt_slots((NSUInteger)p->n_nodes);
    c.saved = mt_slots((NSUInteger)p->n_nodes);
    c.mask = mt_slots((NSUInteger)p->n_nodes);
    c.view = mt_slots((NSUInteger)p->n_tensors);
    c.grad = mt_slots((NSUInteger)p->n_tensors);
    c.fresh = mt_slots((NSUInteger)p->n_tensors);
    c.feeds = [NSMutableArray array];
    c.feedBinds = [NSMutableArray array];
    c.feedTypes = [NSMutableArray array];
    c.results = [NSMutableArray array];
    c.resultBinds = [NSMutableArray array];
    c.resultTypes = [NSMutableArray array];
    build_graph(c, kind);

    NSMutableDictionary<MPSGraphTensor *, MPSGraphShapedType *> *feeds = [NSMutableDictionary dictionary];
    for (NSUInteger k = 0; k < c.feeds.count; k++) feeds[c.feeds[k]] = c.feedTypes[k];
    MPSGraphExecutable *exe = [c.g compileWithDevice:[MPSGraphDevice deviceWithMTLDevice:st.device]
                                               feeds:feeds
                                       targetTensors:c.results
                                    targetOperations:nil
                               compilationDescriptor:nil];
    if (!exe) return FAIL(MPSCY_DEVICE, "MPSGraph compile of the %s graph for %lld rows returned nil",
                          kind_name(kind), (long long)b);
    /* inputs and results are passed in the executable's own order */
    NSArray<MPSGraphTensor *> *in_order = exe.feedTensors ? exe.feedTensors : c.feeds;
    NSArray<MPSGraphTensor *> *out_order = exe.targetTensors ? exe.targetTensors : c.results;
    NSMutableArray *feed_sets = [NSMutableArray array], *result_sets = [NSMutableArray array];
    for (int parity = 0; parity < 2; parity++) {
        NSArray *f = bind_all(st, in_order, c.feeds, c.feedBinds, c.feedTypes, parity, 0);
        NSArray *r = bind_all(st, out_order, c.results, c.resultBinds, c.resultTypes, parity, 1);
        if (!f || !r)
            return FAIL(MPSCY_DEVICE, "binding the %s executable for %lld rows: a tensor of its feed or target "
                        "list has no buffer", kind_name(kind), (long long)b);
        [feed_sets addObject:f];
        [result_sets addObject:r];
    }
    MetalExec *x = [MetalExec new];
    x.exe = exe;
    x.feeds = feed_sets;
    x.results = result_sets;
    *out = x;
    return MPSCY_OK;
}

int metal_exec_get(metal_graph *g, int kind, int64_t b, MetalExec *__strong *out, char *err, size_t n) {
    MetalGraphState *st = metal_state(g);
    NSNumber *key = @((long long)kind * (g->plan.batch + 1) + b);
    MetalExec *x = st.execs[key];
    if (x) {
        *out = x;
        return MPSCY_OK;
    }
    int rc;
    @try {
        rc = compile_exec(g, kind, b, &x, err, n);
    } @catch (NSException *e) {
        return FAIL(MPSCY_DEVICE, "MPSGraph rejected the %s graph for %lld rows: %s", kind_name(kind),
                    (long long)b, metal_exception_text(e));
    }
    if (rc != MPSCY_OK) return rc;
    st.execs[key] = x;
    *out = x;
    return MPSCY_OK;
}
