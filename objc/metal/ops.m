/* ops.m — short helpers over the MPSGraph calls every layer file uses (float32 arithmetic,
 * comparisons, select, keep-dims reductions, reshape), the feed and result bookkeeping of the
 * builder, and lookups of a node's parameter and buffer tensors in the shared plan. Each
 * helper is one documented MPSGraph call or a fixed composition of them (API_NOTES.md). */
#import "metal.h"

id mt_get(NSMutableArray *a, NSUInteger i) {
    id v = a[i];
    return v == [NSNull null] ? nil : v;
}

void mt_set(NSMutableArray *a, NSUInteger i, id value) {
    a[i] = value ? value : [NSNull null];
}

NSMutableArray *mt_slots(NSUInteger count) {
    NSMutableArray *a = [NSMutableArray arrayWithCapacity:count];
    for (NSUInteger i = 0; i < count; i++) [a addObject:[NSNull null]];
    return a;
}

MPSShape *mt_dims(int32_t rank, const int64_t *dims) {
    NSMutableArray<NSNumber *> *s = [NSMutableArray arrayWithCapacity:(NSUInteger)rank];
    for (int32_t d = 0; d < rank; d++) [s addObject:@(dims[d])];
    return s;
}

MPSShape *mt_shape(int64_t b, const mpscy_node *n) {
    NSMutableArray<NSNumber *> *s = [NSMutableArray arrayWithCapacity:(NSUInteger)n->rank + 1];
    [s addObject:@(b)];
    for (int32_t d = 0; d < n->rank; d++) [s addObject:@(n->shape[d])];
    return s;
}

MPSGraphTensor *mt_y(MetalBuilder *c, int32_t node) { return mt_get(c.y, (NSUInteger)node); }
MPSGraphTensor *mt_dy(MetalBuilder *c, int32_t node) { return mt_get(c.dy, (NSUInteger)node); }

MPSGraphTensor *mt_const(MetalBuilder *c, double v) {
    return [c.g constantWithScalar:v dataType:MPSDataTypeFloat32];
}

MPSGraphTensor *mt_add(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g additionWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_sub(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g subtractionWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_mul(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g multiplicationWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_div(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g divisionWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_neg(MetalBuilder *c, MPSGraphTensor *x) { return [c.g negativeWithTensor:x name:nil]; }
MPSGraphTensor *mt_exp(MetalBuilder *c, MPSGraphTensor *x) { return [c.g exponentWithTensor:x name:nil]; }
MPSGraphTensor *mt_log(MetalBuilder *c, MPSGraphTensor *x) { return [c.g logarithmWithTensor:x name:nil]; }
MPSGraphTensor *mt_sqrt(MetalBuilder *c, MPSGraphTensor *x) { return [c.g squareRootWithTensor:x name:nil]; }
MPSGraphTensor *mt_abs(MetalBuilder *c, MPSGraphTensor *x) { return [c.g absoluteWithTensor:x name:nil]; }

MPSGraphTensor *mt_gt(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g greaterThanWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_lt(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g lessThanWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_le(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g lessThanOrEqualToWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_eq(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g equalWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_and(MetalBuilder *c, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g logicalANDWithPrimaryTensor:a secondaryTensor:b name:nil];
}

MPSGraphTensor *mt_select(MetalBuilder *c, MPSGraphTensor *pred, MPSGraphTensor *a, MPSGraphTensor *b) {
    return [c.g selectWithPredicateTensor:pred truePredicateTensor:a falsePredicateTensor:b name:nil];
}

MPSGraphTensor *mt_sum(MetalBuilder *c, MPSGraphTensor *x, NSArray<NSNumber *> *axes) {
    return [c.g reductionSumWithTensor:x axes:axes name:nil];
}

MPSGraphTensor *mt_mean(MetalBuilder *c, MPSGraphTensor *x, NSArray<NSNumber *> *axes) {
    return [c.g meanOfTensor:x axes:axes name:nil];
}

MPSGraphTensor *mt_reshape(MetalBuilder *c, MPSGraphTensor *x, MPSShape *shape) {
    return [c.g reshapeTensor:x withShape:shape name:nil];
}

MPSGraphTensor *mt_float(MetalBuilder *c, MPSGraphTensor *x) {
    return [c.g castTensor:x toType:MPSDataTypeFloat32 name:nil];
}

MPSGraphTensor *mt_scalar1(MetalBuilder *c, MPSGraphTensor *x) { return mt_reshape(c, x, @[@1]); }

MPSGraphTensor *mt_expm1(MetalBuilder *c, MPSGraphTensor *x) {
    /* Kahan near 0: u = exp(x); u == 1 ? x : (u - 1) x / log(u); plain u - 1 for |x| >= 0.5,
     * where it is already accurate (and where u may underflow to 0). Unselected branches may
     * hold 0/0; select discards them (forward values only: every backward is explicit). */
    MPSGraphTensor *u = mt_exp(c, x), *one = mt_const(c, 1.0), *um1 = mt_sub(c, u, one);
    MPSGraphTensor *kahan = mt_select(c, mt_eq(c, u, one), x, mt_div(c, mt_mul(c, um1, x), mt_log(c, u)));
    return mt_select(c, mt_lt(c, mt_abs(c, x), mt_const(c, 0.5)), kahan, um1);
}

MPSGraphTensor *mt_log1p(MetalBuilder *c, MPSGraphTensor *x) {
    /* Kahan near 0: u = 1 + x; u == 1 ? x : log(u) x / (u - 1); plain log(u) for |x| >= 0.5 */
    MPSGraphTensor *one = mt_const(c, 1.0), *u = mt_add(c, one, x), *lu = mt_log(c, u);
    MPSGraphTensor *kahan = mt_select(c, mt_eq(c, u, one), x, mt_div(c, mt_mul(c, lu, x), mt_sub(c, u, one)));
    return mt_select(c, mt_lt(c, mt_abs(c, x), mt_const(c, 0.5)), kahan, lu);
}

MPSGraphTensor *mt_hyper(MetalBuilder *c, int slot) {
    if (!c.hyper)
        c.hyper = mt_placeholder(c, @[@(METAL_H_COUNT)], MPSDataTypeFloat32, METAL_BIND_HYPER, 0);
    return [c.g sliceTensor:c.hyper dimension:0 start:slot length:1 name:nil];
}

MPSGraphTensor *mt_placeholder(MetalBuilder *c, MPSShape *shape, MPSDataType type, int role, int index) {
    MPSGraphTensor *t = [c.g placeholderWithShape:shape dataType:type name:nil];
    [c.feeds addObject:t];
    [c.feedBinds addObject:@((role << 16) | index)];
    [c.feedTypes addObject:[[MPSGraphShapedType alloc] initWithShape:shape dataType:type]];
    return t;
}

void mt_result(MetalBuilder *c, MPSGraphTensor *t, MPSShape *shape, MPSDataType type, int role, int index) {
    /* identity: two results (two input gradients of one Add, say) must be distinct tensors,
     * and a result must not be a placeholder itself */
    MPSGraphTensor *r = [c.g identityWithTensor:mt_reshape(c, t, shape) name:nil];
    [c.results addObject:r];
    [c.resultBinds addObject:@((role << 16) | index)];
    [c.resultTypes addObject:[[MPSGraphShapedType alloc] initWithShape:shape dataType:type]];
}

void mt_acc(MetalBuilder *c, int32_t node, MPSGraphTensor *g) {
    if (!c.plan->nodes[node].grad) return;
    MPSGraphTensor *old = mt_dy(c, node);
    mt_set(c.dy, (NSUInteger)node, old ? mt_add(c, old, g) : g);
}

int32_t mt_tensor_index(const mpscy_plan *p, const mpscy_node *n, int32_t role, int32_t slot) {
    return mpscy_node_tensor(p, n, role, slot);
}

MPSGraphTensor *mt_param(MetalBuilder *c, const mpscy_node *n, int32_t slot) {
    int32_t t = mt_tensor_index(c.plan, n, MPSCY_ROLE_PARAM, slot);
    return t < 0 ? nil : mt_get(c.view, (NSUInteger)t);
}

MPSGraphTensor *mt_buffer(MetalBuilder *c, const mpscy_node *n, int32_t slot) {
    int32_t t = mt_tensor_index(c.plan, n, MPSCY_ROLE_BUFFER, slot);
    return t < 0 ? nil : mt_get(c.view, (NSUInteger)t);
}

void mt_set_grad(MetalBuilder *c, const mpscy_node *n, int32_t slot, MPSGraphTensor *g) {
    int32_t t = mt_tensor_index(c.plan, n, MPSCY_ROLE_PARAM, slot);
    if (t >= 0) mt_set(c.grad, (NSUInteger)t, g);
}

void mt_set_fresh(MetalBuilder *c, const mpscy_node *n, int32_t slot, MPSGraphTensor *v) {
    int32_t t = mt_tensor_index(c.plan, n, MPSCY_ROLE_BUFFER, slot);
    if (t >= 0) mt_set(c.fresh, (NSUInteger)t, v);
}
