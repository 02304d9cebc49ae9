/* norm.m — BatchNorm (over the batch, and H and W for (C, H, W) inputs; running statistics
 * as torch.nn.BatchNorm: momentum-weighted, unbiased variance) and LayerNorm (over the
 * trailing dims), written as MPSGraph arithmetic with the standard backward. The new running
 * statistics are handed to the update (optim.m), which keeps them only on a finite train
 * step: the same deferred commit as the CPU backend's. */
#import "metal.h"

/* Batch-norm reduction axes and the broadcast shape of a per-channel vector. */
static NSArray<NSNumber *> *bn_axes(const mpscy_node *n) {
    return n->rank == 1 ? @[@0] : @[@0, @2, @3];
}

static MPSShape *bn_cshape(const mpscy_node *n) {
    return n->rank == 1 ? @[@1, @(n->shape[0])] : @[@1, @(n->shape[0]), @1, @1];
}

MPSGraphTensor *metal_batchnorm_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *x = mt_y(c, n->in[0]);   // (b, C) or (b, C, H, W)
    MPSShape *cs = bn_cshape(n);
    NSArray<NSNumber *> *axes = bn_axes(n);
    MPSShape *flat = @[@(n->shape[0])];
    double eps = n->reals[1], m = n->reals[0];
    MPSGraphTensor *rm = mt_buffer(c, n, 0), *rv = mt_buffer(c, n, 1);   // (C) each
    MPSGraphTensor *xhat, *invstd;
    if (c.train) {
        MPSGraphTensor *mean = mt_reshape(c, mt_mean(c, x, axes), cs);
        MPSGraphTensor *xc = mt_sub(c, x, mean);
        MPSGraphTensor *var = mt_reshape(c, mt_mean(c, mt_mul(c, xc, xc), axes), cs);   // biased
        invstd = mt_div(c, mt_const(c, 1.0), mt_sqrt(c, mt_add(c, var, mt_const(c, eps))));
        xhat = mt_mul(c, xc, invstd);
        c.saved[(NSUInteger)i] = @[xhat, invstd];
        /* running = (1 - momentum) running + momentum batch, with the unbiased variance */
        double count = (double)c.b * (n->rank == 1 ? 1.0 : (double)(n->shape[1] * n->shape[2]));
        double unbias = count > 1.0 ? count / (count - 1.0) : 1.0;
        MPSGraphTensor *keep = mt_const(c, 1.0 - m), *take = mt_const(c, m);
        mt_set_fresh(c, n, 0, mt_add(c, mt_mul(c, keep, rm), mt_mul(c, take, mt_reshape(c, mean, flat))));
        MPSGraphTensor *uvar = mt_mul(c, mt_reshape(c, var, flat), mt_const(c, unbias));
        mt_set_fresh(c, n, 1, mt_add(c, mt_mul(c, keep, rv), mt_mul(c, take, uvar)));
    } else {
        invstd = mt_div(c, mt_const(c, 1.0), mt_sqrt(c, mt_add(c, mt_reshape(c, rv, cs), mt_const(c, eps))));
        xhat = mt_mul(c, mt_sub(c, x, mt_reshape(c, rm, cs)), invstd);
    }
    MPSGraphTensor *w = mt_param(c, n, 0), *b = mt_param(c, n, 1);   // (C) each, or nil
    if (!w) return xhat;
    return mt_add(c, mt_mul(c, xhat, mt_reshape(c, w, cs)), mt_reshape(c, b, cs));
}

void metal_batchnorm_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    NSArray *saved = mt_get(c.saved, (NSUInteger)i);
    MPSGraphTensor *xhat = saved[0], *invstd = saved[1];
    MPSGraphTensor *dy = mt_dy(c, i);
    MPSShape *cs = bn_cshape(n), *flat = @[@(n->shape[0])];
    NSArray<NSNumber *> *axes = bn_axes(n);
    MPSGraphTensor *w = mt_param(c, n, 0);
    if (w) {
        mt_set_grad(c, n, 0, mt_reshape(c, mt_sum(c, mt_mul(c, dy, xhat), axes), flat));
        mt_set_grad(c, n, 1, mt_reshape(c, mt_sum(c, dy, axes), flat));
    }
    if (!c.plan->nodes[n->in[0]].grad) return;
    /* dx = invstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) over the batch axes */
    MPSGraphTensor *dxhat = w ? mt_mul(c, dy, mt_reshape(c, w, cs)) : dy;
    MPSGraphTensor *m1 = mt_reshape(c, mt_mean(c, dxhat, axes), cs);
    MPSGraphTensor *m2 = mt_reshape(c, mt_mean(c, mt_mul(c, dxhat, xhat), axes), cs);
    mt_acc(c, n->in[0], mt_mul(c, invstd, mt_sub(c, mt_sub(c, dxhat, m1), mt_mul(c, xhat, m2))));
}

/* LayerNorm normalizes the last k dims of the (b, *shape) tensor: tensor axes rank+1-k..rank. */
static NSArray<NSNumber *> *ln_axes(const mpscy_node *n, int lead) {
    int32_t k = n->ints[0];
    NSMutableArray<NSNumber *> *a = [NSMutableArray array];
    if (lead) for (int32_t d = 0; d <= n->rank - k; d++) [a addObject:@(d)];
    else for (int32_t d = n->rank + 1 - k; d <= n->rank; d++) [a addObject:@(d)];
    return a;
}

MPSGraphTensor *metal_layernorm_forward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    MPSGraphTensor *x = mt_y(c, n->in[0]);   // (b, *shape)
    NSArray<NSNumber *> *axes = ln_axes(n, 0);
    MPSGraphTensor *mean = mt_mean(c, x, axes);
    MPSGraphTensor *xc = mt_sub(c, x, mean);
    MPSGraphTensor *var = mt_mean(c, mt_mul(c, xc, xc), axes);   // biased, as torch
    MPSGraphTensor *invstd = mt_div(c, mt_const(c, 1.0), mt_sqrt(c, mt_add(c, var, mt_const(c, n->reals[1]))));
    MPSGraphTensor *xhat = mt_mul(c, xc, invstd);
    c.saved[(NSUInteger)i] = @[xhat, invstd];
    MPSGraphTensor *w = mt_param(c, n, 0), *b = mt_param(c, n, 1);   // trailing shape, broadcast
    return w ? mt_add(c, mt_mul(c, xhat, w), b) : xhat;
}

void metal_layernorm_backward(MetalBuilder *c, const mpscy_node *n, int32_t i) {
    NSArray *saved = mt_get(c.saved, (NSUInteger)i);
    MPSGraphTensor *xhat = saved[0], *invstd = saved[1];
    MPSGraphTensor *dy = mt_dy(c, i);
    NSArray<NSNumber *> *axes = ln_axes(n, 0), *lead = ln_axes(n, 1);
    MPSGraphTensor *w = mt_param(c, n, 0);
    if (w) {
        int32_t t = mt_tensor_index(c.plan, n, MPSCY_ROLE_PARAM, 0);
        MPSShape *ws = mt_dims(c.plan->tensors[t].info.rank, c.plan->tensors[t].info.shape);
        mt_set_grad(c, n, 0, mt_reshape(c, mt_sum(c, mt_mul(c, dy, xhat), lead), ws));
        mt_set_grad(c, n, 1, mt_reshape(c, mt_sum(c, dy, lead), ws));
    }
    if (!c.plan->nodes[n->in[0]].grad) return;
    MPSGraphTensor *dxhat = w ? mt_mul(c, dy, w) : dy;
    MPSGraphTensor *m1 = mt_mean(c, dxhat, axes), *m2 = mt_mean(c, mt_mul(c, dxhat, xhat), axes);
    mt_acc(c, n->in[0], mt_mul(c, invstd, mt_sub(c, mt_sub(c, dxhat, m1), mt_mul(c, xhat, m2))));
}
