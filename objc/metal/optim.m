/* optim.m — everything after backward, inside the train executable: the flat gradient (every
 * trainable parameter's gradient in slab order), its finiteness and global L2 norm, clipping by norm or
 * value (torch.nn.utils), and the optimizer update over the flat slab, written in graph
 * arithmetic with the element rules of common/optim_math.h in the same float32 order (SGD,
 * Adam, AdamW, RMSprop, Adagrad, Adadelta, NAdam). MPSGraph's own Adam/SGD ops are not used:
 * their definitions differ. New parameters,
 * optimizer slots and running statistics are selected on (finite and apply), so a non-finite
 * or gradient-only step writes the old values back; step.m then keeps the current slabs.
 * Per-step coefficients come from the hyper buffer, filled on the host, so no schedule
 * recompiles. L-BFGS is not an element rule: lbfgs.m. */
#import "metal.h"
#include "../common/optim_math.h"

#include <math.h>

int metal_optim_supported(int32_t kind) {
    return kind >= MPSCY_OPTIM_SGD && kind <= MPSCY_OPTIM_LBFGS;
}

void metal_optim_hyper(float *h, const mpscy_optim_desc *o, const mpscy_step_args *a, int64_t t, int apply,
                       double mu_product, double *mu_next) {
    /* the same coefficients as the CPU backend, from the shared common/optim_math.h */
    *mu_next = mu_product;
    mpscy_optim_coef k = mpscy_optim_coef_make(o, a, t, mu_next);
    h[METAL_H_LR] = k.lr;
    h[METAL_H_MOMENTUM] = k.momentum;
    h[METAL_H_WD] = k.weight_decay;
    h[METAL_H_BETA2] = k.beta2;
    h[METAL_H_EPS] = k.eps;
    h[METAL_H_STEP_SIZE] = k.step_size;
    h[METAL_H_BC2_SQRT] = k.bc2_sqrt;
    h[METAL_H_DECAY] = k.decay;
    h[METAL_H_FIRST] = (float)k.first;
    h[METAL_H_ALPHA] = k.alpha;
    h[METAL_H_RHO] = k.rho;
    h[METAL_H_CLR] = k.clr;
    h[METAL_H_BC2] = k.bc2;
    h[METAL_H_NADAM_G] = k.nadam_g;
    h[METAL_H_NADAM_M] = k.nadam_m;
    h[METAL_H_APPLY] = apply ? 1.0f : 0.0f;
    h[METAL_H_COMMIT] = apply ? 1.0f : 0.0f;
    h[METAL_H_OMB1] = k.omb1;
    h[METAL_H_OMB2] = k.omb2;
    h[METAL_H_OMALPHA] = k.omalpha;
    h[METAL_H_OMRHO] = k.omrho;
    h[METAL_H_OMDAMP] = k.omdamp;
}

static MPSGraphTensor *flag(MetalBuilder *c, int slot) {
    return mt_gt(c, mt_hyper(c, slot), mt_const(c, 0.5));
}

static MPSGraphTensor *nonzero(MetalBuilder *c, MPSGraphTensor *v) {
    return [c.g notEqualWithPrimaryTensor:v secondaryTensor:mt_const(c, 0.0) name:nil];
}

/* mpscy_sgd_elem over the slab: p (n), g (n), buf (n) -> new p, new buf. */
static void sgd(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g, MPSGraphTensor *buf,
                MPSGraphTensor *__strong *p_new, MPSGraphTensor *__strong *buf_new) {
    MPSGraphTensor *lr = mt_hyper(c, METAL_H_LR), *mom = mt_hyper(c, METAL_H_MOMENTUM);
    MPSGraphTensor *wd = mt_hyper(c, METAL_H_WD);
    if (flags & MPSCY_OPTIM_MAXIMIZE) g = mt_neg(c, g);
    g = mt_select(c, nonzero(c, wd), mt_add(c, g, mt_mul(c, wd, p)), g);
    MPSGraphTensor *b = mt_select(c, flag(c, METAL_H_FIRST), g,
                                  mt_add(c, mt_mul(c, mom, buf), mt_mul(c, mt_hyper(c, METAL_H_OMDAMP), g)));
    MPSGraphTensor *has_mom = nonzero(c, mom);
    *buf_new = mt_select(c, has_mom, b, buf);
    MPSGraphTensor *step = (flags & MPSCY_OPTIM_NESTEROV) ? mt_add(c, g, mt_mul(c, mom, b)) : b;
    g = mt_select(c, has_mom, step, g);
    *p_new = mt_sub(c, p, mt_mul(c, lr, g));
}

/* mpscy_adam_elem over the slab: slots m, v (, vmax) -> new p and new slots. */
static void adam(MetalBuilder *c, int32_t flags, int decoupled, MPSGraphTensor *p, MPSGraphTensor *g,
                 NSArray<MPSGraphTensor *> *slots, MPSGraphTensor *__strong *p_new, NSMutableArray *slots_new) {
    MPSGraphTensor *b2 = mt_hyper(c, METAL_H_BETA2);
    MPSGraphTensor *wd = mt_hyper(c, METAL_H_WD), *m = slots[0], *v = slots[1];
    if (flags & MPSCY_OPTIM_MAXIMIZE) g = mt_neg(c, g);
    MPSGraphTensor *x = p;
    if (decoupled) x = mt_mul(c, x, mt_hyper(c, METAL_H_DECAY));
    else g = mt_select(c, nonzero(c, wd), mt_add(c, g, mt_mul(c, wd, x)), g);
    MPSGraphTensor *mm = mt_add(c, m, mt_mul(c, mt_hyper(c, METAL_H_OMB1), mt_sub(c, g, m)));
    MPSGraphTensor *vv = mt_add(c, mt_mul(c, b2, v), mt_mul(c, mt_mul(c, mt_hyper(c, METAL_H_OMB2), g), g));
    [slots_new addObject:mm];
    [slots_new addObject:vv];
    if (flags & MPSCY_OPTIM_AMSGRAD) {
        MPSGraphTensor *vmax = slots[2];
        vv = mt_select(c, mt_gt(c, vmax, vv), vmax, vv);
        [slots_new addObject:vv];
    }
    MPSGraphTensor *denom = mt_add(c, mt_div(c, mt_sqrt(c, vv), mt_hyper(c, METAL_H_BC2_SQRT)),
                                   mt_hyper(c, METAL_H_EPS));
    *p_new = mt_sub(c, x, mt_mul(c, mt_hyper(c, METAL_H_STEP_SIZE), mt_div(c, mm, denom)));
}

/* g with maximize and L2 weight decay applied, as every rule below starts. */
static MPSGraphTensor *decayed(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g) {
    MPSGraphTensor *wd = mt_hyper(c, METAL_H_WD);
    if (flags & MPSCY_OPTIM_MAXIMIZE) g = mt_neg(c, g);
    return mt_select(c, nonzero(c, wd), mt_add(c, g, mt_mul(c, wd, p)), g);
}

/* RMSprop (torch.optim.RMSprop): slots square_avg, momentum_buffer [, grad_avg]; the momentum
 * buffer is used while the step's momentum > 0. */
static void rmsprop(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g,
                    NSArray<MPSGraphTensor *> *slots, MPSGraphTensor *__strong *p_new, NSMutableArray *slots_new) {
    MPSGraphTensor *al = mt_hyper(c, METAL_H_ALPHA), *lr = mt_hyper(c, METAL_H_LR);
    MPSGraphTensor *mom = mt_hyper(c, METAL_H_MOMENTUM), *buf = slots[1];
    g = decayed(c, flags, p, g);
    MPSGraphTensor *s = mt_add(c, mt_mul(c, al, slots[0]), mt_mul(c, mt_mul(c, mt_hyper(c, METAL_H_OMALPHA), g), g));
    MPSGraphTensor *avg, *ga = nil;
    if (flags & MPSCY_OPTIM_CENTERED) {
        ga = mt_add(c, slots[2], mt_mul(c, mt_hyper(c, METAL_H_OMALPHA), mt_sub(c, g, slots[2])));
        avg = mt_sqrt(c, mt_sub(c, s, mt_mul(c, ga, ga)));
    } else {
        avg = mt_sqrt(c, s);
    }
    avg = mt_add(c, avg, mt_hyper(c, METAL_H_EPS));
    MPSGraphTensor *use = mt_gt(c, mom, mt_const(c, 0.0));
    MPSGraphTensor *b = mt_add(c, mt_mul(c, mom, buf), mt_div(c, g, avg));
    [slots_new addObject:s];
    [slots_new addObject:mt_select(c, use, b, buf)];
    if (ga) [slots_new addObject:ga];
    *p_new = mt_sub(c, p, mt_mul(c, lr, mt_select(c, use, b, mt_div(c, g, avg))));
}

/* Adagrad (torch.optim.Adagrad): slot sum (starts at initial_accumulator_value), decayed lr. */
static void adagrad(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g,
                    NSArray<MPSGraphTensor *> *slots, MPSGraphTensor *__strong *p_new, NSMutableArray *slots_new) {
    g = decayed(c, flags, p, g);
    MPSGraphTensor *s = mt_add(c, slots[0], mt_mul(c, g, g));
    [slots_new addObject:s];
    MPSGraphTensor *den = mt_add(c, mt_sqrt(c, s), mt_hyper(c, METAL_H_EPS));
    *p_new = mt_sub(c, p, mt_mul(c, mt_hyper(c, METAL_H_CLR), mt_div(c, g, den)));
}

/* Adadelta (torch.optim.Adadelta): slots square_avg, acc_delta; eps inside both roots. */
static void adadelta(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g,
                     NSArray<MPSGraphTensor *> *slots, MPSGraphTensor *__strong *p_new, NSMutableArray *slots_new) {
    MPSGraphTensor *rho = mt_hyper(c, METAL_H_RHO), *omrho = mt_hyper(c, METAL_H_OMRHO), *eps = mt_hyper(c, METAL_H_EPS);
    g = decayed(c, flags, p, g);
    MPSGraphTensor *s = mt_add(c, mt_mul(c, rho, slots[0]), mt_mul(c, mt_mul(c, omrho, g), g));
    MPSGraphTensor *std = mt_sqrt(c, mt_add(c, s, eps));
    MPSGraphTensor *delta = mt_mul(c, mt_div(c, mt_sqrt(c, mt_add(c, slots[1], eps)), std), g);
    MPSGraphTensor *acc = mt_add(c, mt_mul(c, rho, slots[1]), mt_mul(c, mt_mul(c, omrho, delta), delta));
    [slots_new addObject:s];
    [slots_new addObject:acc];
    *p_new = mt_sub(c, p, mt_mul(c, mt_hyper(c, METAL_H_LR), delta));
}

/* NAdam (torch.optim.NAdam): Adam moments, momentum-decay schedule coefficients from the host,
 * L2 or decoupled weight decay. */
static void nadam(MetalBuilder *c, int32_t flags, MPSGraphTensor *p, MPSGraphTensor *g,
                  NSArray<MPSGraphTensor *> *slots, MPSGraphTensor *__strong *p_new, NSMutableArray *slots_new) {
    MPSGraphTensor *wd = mt_hyper(c, METAL_H_WD);
    MPSGraphTensor *b2 = mt_hyper(c, METAL_H_BETA2), *m = slots[0], *v = slots[1];
    if (flags & MPSCY_OPTIM_MAXIMIZE) g = mt_neg(c, g);
    MPSGraphTensor *x = p;
    if (flags & MPSCY_OPTIM_DECOUPLED_WD) x = mt_select(c, nonzero(c, wd), mt_mul(c, x, mt_hyper(c, METAL_H_DECAY)), x);
    else g = mt_select(c, nonzero(c, wd), mt_add(c, g, mt_mul(c, wd, x)), g);
    MPSGraphTensor *mm = mt_add(c, m, mt_mul(c, mt_hyper(c, METAL_H_OMB1), mt_sub(c, g, m)));
    MPSGraphTensor *vv = mt_add(c, mt_mul(c, b2, v), mt_mul(c, mt_mul(c, mt_hyper(c, METAL_H_OMB2), g), g));
    [slots_new addObject:mm];
    [slots_new addObject:vv];
    MPSGraphTensor *denom = mt_add(c, mt_sqrt(c, mt_div(c, vv, mt_hyper(c, METAL_H_BC2))), mt_hyper(c, METAL_H_EPS));
    x = mt_add(c, x, mt_mul(c, mt_hyper(c, METAL_H_NADAM_G), mt_div(c, g, denom)));
    *p_new = mt_add(c, x, mt_mul(c, mt_hyper(c, METAL_H_NADAM_M), mt_div(c, mm, denom)));
}

/* torch.nn.utils.clip_grad_norm_ (coef = max_norm / (norm + 1e-6), applied when < 1), then
 * clip_grad_value_, as cpu_clip. */
static MPSGraphTensor *clip(MetalBuilder *c, MPSGraphTensor *g, MPSGraphTensor *norm, const mpscy_optim_desc *o) {
    if (o->clip_grad_norm > 0) {
        MPSGraphTensor *coef = mt_div(c, mt_const(c, o->clip_grad_norm), mt_add(c, norm, mt_const(c, 1e-6)));
        g = mt_select(c, mt_lt(c, coef, mt_const(c, 1.0)), mt_mul(c, g, coef), g);
    }
    if (o->clip_grad_value > 0) {
        MPSGraphTensor *v = mt_const(c, o->clip_grad_value), *nv = mt_const(c, -o->clip_grad_value);
        g = mt_select(c, mt_gt(c, g, v), v, mt_select(c, mt_lt(c, g, nv), nv, g));
    }
    return g;
}

void metal_update(MetalBuilder *c, MPSGraphTensor *params, MPSGraphTensor *loss, MPSGraphTensor *correct) {
    const mpscy_plan *p = c.plan;
    int64_t np = p->n_train, nf = p->n_frozen;   /* the optimizer's range, then the frozen layers' */
    MPSGraphTensor *zero = mt_const(c, 0.0), *one = mt_const(c, 1.0);
    MPSGraphTensor *finite = [c.g isFiniteWithTensor:loss name:nil];   // (1) bool
    MPSGraphTensor *norm = mt_scalar1(c, zero), *flat = nil;          // flat: (np) gradients
    if (np > 0) {
        NSMutableArray<MPSGraphTensor *> *parts = [NSMutableArray array];
        for (int32_t t = 0; t < p->n_tensors; t++) {
            const mpscy_tensor_info *ti = &p->tensors[t].info;
            if (!mpscy_tensor_trained(p, &p->tensors[t])) continue;
            MPSGraphTensor *gt = mt_get(c.grad, (NSUInteger)t);
            if (!gt) gt = [c.g constantWithScalar:0.0 shape:@[@(ti->count)] dataType:MPSDataTypeFloat32];
            [parts addObject:mt_reshape(c, gt, @[@(ti->count)])];
        }
        flat = parts.count == 1 ? parts[0] : [c.g concatTensors:parts dimension:0 name:nil];
        /* all finite: the minimum of isFinite as 0/1 is exactly 1 */
        MPSGraphTensor *ok = [c.g reductionMinimumWithTensor:mt_float(c, [c.g isFiniteWithTensor:flat name:nil])
                                                        axes:@[@0] name:nil];
        finite = mt_and(c, finite, mt_gt(c, mt_scalar1(c, ok), mt_const(c, 0.5)));
        /* sqrt(sum g^2), scaled by max |g| so finite float32 gradients cannot overflow (the
         * CPU accumulates in double); the plain sum reports inf or NaN as the CPU would */
        MPSGraphTensor *mx = mt_scalar1(c, [c.g reductionMaximumWithTensor:mt_abs(c, flat) axes:@[@0] name:nil]);
        MPSGraphTensor *s = mt_select(c, mt_gt(c, mx, zero), mx, one);
        MPSGraphTensor *u = mt_div(c, flat, s);
        MPSGraphTensor *scaled = mt_mul(c, s, mt_sqrt(c, mt_scalar1(c, mt_sum(c, mt_mul(c, u, u), @[@0]))));
        MPSGraphTensor *plain = mt_sqrt(c, mt_scalar1(c, mt_sum(c, mt_mul(c, flat, flat), @[@0])));
        norm = mt_select(c, finite, scaled, plain);
    }
    /* the update happens exactly when the step is finite and a train step (not grad-only);
     * running statistics are kept on the same condition, or after a finite L-BFGS evaluation */
    MPSGraphTensor *apply = mt_and(c, finite, flag(c, METAL_H_APPLY));
    MPSGraphTensor *commit = mt_and(c, finite, flag(c, METAL_H_COMMIT));

    if (np > 0 && metal_is_lbfgs(p)) {
        /* L-BFGS moves the parameters on the host (lbfgs.m): only the raw gradient is a result */
        mt_result(c, flat, @[@(np)], MPSDataTypeFloat32, METAL_BIND_GRADS, 0);
    } else if (np == 0 && nf > 0 && !metal_is_lbfgs(p)) {
        /* every layer frozen: the other parity's slab still gets the parameters */
        mt_result(c, params, @[@(nf)], MPSDataTypeFloat32, METAL_BIND_PARAMS, 0);
    } else if (np > 0) {
        const mpscy_optim_desc *o = &p->optim;
        MPSGraphTensor *all_params = params;   /* (np + nf): the frozen tail is copied as it is */
        if (nf > 0) params = [c.g sliceTensor:all_params dimension:0 start:0 length:(NSInteger)np name:nil];
        MPSGraphTensor *g = clip(c, flat, norm, o);
        int32_t ns = p->n_vec_slots;
        MPSGraphTensor *slab = ns > 0 ? mt_placeholder(c, @[@(ns * np)], MPSDataTypeFloat32, METAL_BIND_OPTIM, 0)
                                      : nil;
        NSMutableArray<MPSGraphTensor *> *slots = [NSMutableArray array], *fresh = [NSMutableArray array];
        for (int32_t s = 0; s < ns; s++)
            [slots addObject:[c.g sliceTensor:slab dimension:0 start:(NSInteger)(s * np) length:(NSInteger)np name:nil]];
        MPSGraphTensor *p_new = params;
        switch (o->kind) {
        case MPSCY_OPTIM_SGD: {
            MPSGraphTensor *buf_new = nil;
            sgd(c, o->flags, params, g, slots[0], &p_new, &buf_new);
            [fresh addObject:buf_new];
            break;
        }
        case MPSCY_OPTIM_RMSPROP: rmsprop(c, o->flags, params, g, slots, &p_new, fresh); break;
        case MPSCY_OPTIM_ADAGRAD: adagrad(c, o->flags, params, g, slots, &p_new, fresh); break;
        case MPSCY_OPTIM_ADADELTA: adadelta(c, o->flags, params, g, slots, &p_new, fresh); break;
        case MPSCY_OPTIM_NADAM: nadam(c, o->flags, params, g, slots, &p_new, fresh); break;
        default:
            adam(c, o->flags, o->kind == MPSCY_OPTIM_ADAMW || (o->flags & MPSCY_OPTIM_DECOUPLED_WD), params, g,
                 slots, &p_new, fresh);
        }
        MPSGraphTensor *p_out = mt_select(c, apply, p_new, params);
        if (nf > 0) {
            MPSGraphTensor *frozen = [c.g sliceTensor:all_params dimension:0 start:(NSInteger)np length:(NSInteger)nf
                                                 name:nil];
            p_out = [c.g concatTensors:@[p_out, frozen] dimension:0 name:nil];
        }
        mt_result(c, p_out, @[@(np + nf)], MPSDataTypeFloat32, METAL_BIND_PARAMS, 0);
        if (ns > 0) {
            NSMutableArray<MPSGraphTensor *> *kept = [NSMutableArray array];
            for (int32_t s = 0; s < ns; s++) [kept addObject:mt_select(c, apply, fresh[(NSUInteger)s], slots[(NSUInteger)s])];
            MPSGraphTensor *all = ns == 1 ? kept[0] : [c.g concatTensors:kept dimension:0 name:nil];
            mt_result(c, all, @[@(ns * np)], MPSDataTypeFloat32, METAL_BIND_OPTIM, 0);
        }
        /* readable ".grad": clipped when the update ran, as the CPU leaves its slab */
        mt_result(c, mt_select(c, apply, g, flat), @[@(np)], MPSDataTypeFloat32, METAL_BIND_GRADS, 0);
    }

    if (p->n_buffers > 0) {
        NSMutableArray<MPSGraphTensor *> *parts = [NSMutableArray array];
        for (int32_t t = 0; t < p->n_tensors; t++) {
            const mpscy_tensor_info *ti = &p->tensors[t].info;
            if (ti->role != MPSCY_ROLE_BUFFER) continue;
            MPSGraphTensor *old = mt_get(c.view, (NSUInteger)t), *v = mt_get(c.fresh, (NSUInteger)t);
            MPSGraphTensor *kept = v ? mt_select(c, commit, v, old) : old;
            [parts addObject:mt_reshape(c, kept, @[@(ti->count)])];
        }
        MPSGraphTensor *all = parts.count == 1 ? parts[0] : [c.g concatTensors:parts dimension:0 name:nil];
        mt_result(c, all, @[@(p->n_buffers)], MPSDataTypeFloat32, METAL_BIND_BUFFERS, 0);
    }

    NSArray<MPSGraphTensor *> *stats = @[loss, correct ? correct : mt_scalar1(c, zero), norm,
                                         mt_float(c, finite)];
    mt_result(c, [c.g concatTensors:stats dimension:0 name:nil], @[@(METAL_S_COUNT)], MPSDataTypeFloat32,
              METAL_BIND_STATS, 0);
}
