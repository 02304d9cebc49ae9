/* loss.m — every loss as objc/cpu/loss.c defines it (torch.nn.functional, reduction="mean":
 * over all elements, over rows for the cross-entropies), written as MPSGraph arithmetic; its
 * gradient with respect to the model output written out explicitly with the same conventions
 * (BCE's -100 log clamp and 1e-12 denominator, 0 at ties for MAE and Huber); and the
 * correct-prediction count of the plan's accuracy kind. */
#import "metal.h"

#include <math.h>

static MPSGraphTensor *sign3(MetalBuilder *c, MPSGraphTensor *d) {
    // (d > 0) - (d < 0), 0 at 0
    MPSGraphTensor *zero = mt_const(c, 0.0);
    return mt_select(c, mt_gt(c, d, zero), mt_const(c, 1.0),
                     mt_select(c, mt_lt(c, d, zero), mt_const(c, -1.0), zero));
}

static MPSGraphTensor *log_clamped(MetalBuilder *c, MPSGraphTensor *logv) {
    // max(log, -100) written as a select so a -inf log becomes -100
    MPSGraphTensor *floor100 = mt_const(c, -100.0);
    return mt_select(c, mt_lt(c, logv, floor100), floor100, logv);
}

static MPSGraphTensor *argmax_rows(MetalBuilder *c, MPSGraphTensor *v, int64_t rows) {
    // (rows, C) -> (rows) float32 index of the row maximum, a NaN counting as larger than any number
    // (the cpu's argmax, numpy's and torch's): the first NaN of a row that has one
    MPSGraphTensor *nan = mt_float(c, [c.g isNaNWithTensor:v name:nil]);                  // (b, C) 0/1
    MPSGraphTensor *k = mt_float(c, [c.g reductionArgMaximumWithTensor:v axis:1 name:nil]);
    MPSGraphTensor *kn = mt_float(c, [c.g reductionArgMaximumWithTensor:nan axis:1 name:nil]);
    MPSGraphTensor *any = [c.g reductionMaximumWithTensor:nan axes:@[@1] name:nil];         // (b, 1)
    return mt_reshape(c, mt_select(c, mt_gt(c, any, mt_const(c, 0.0)), kn, k), @[@(rows)]);
}

static MPSGraphTensor *as_rows(MetalBuilder *c, MPSGraphTensor *v, int64_t cls, int64_t npos) {
    // (b, C, S) -> (b S, C): a row per position, its classes last (npos 1: (b, C) as it lies)
    if (npos == 1) return mt_reshape(c, v, @[@(c.b), @(cls)]);
    MPSGraphTensor *bcs = mt_reshape(c, v, @[@(c.b), @(cls), @(npos)]);
    return mt_reshape(c, [c.g transposeTensor:bcs dimension:1 withDimension:2 name:nil], @[@(c.b * npos), @(cls)]);
}

void metal_loss(MetalBuilder *c, MPSGraphTensor *y, MPSGraphTensor *target, MPSGraphTensor *__strong *loss,
                MPSGraphTensor *__strong *correct, MPSGraphTensor *__strong *dy) {
    const mpscy_plan *p = c.plan;
    // the cross-entropies over (C, d1, ...) take each of the S = d1 x ... positions as a row: the
    // output (b, C, S) transposed to (b S, C), labels (b S), dense targets as the output; every
    // other loss has S = 1 and rows of the whole output
    int64_t cls = p->classes, npos = p->positions, b = c.b * npos;
    MPSGraphTensor *yf = as_rows(c, y, cls, npos);   // (b S, C)
    MPSGraphTensor *labels = p->target == MPSCY_TARGET_INDEX ? target : nil;   // (b S) int32
    MPSGraphTensor *t = labels ? nil : as_rows(c, target, cls, npos);         // (b S, C)
    // torch's ignore_index: valid (b S, 1) is 0 where the label is ignored, and those labels read
    // as class 0 (whose one-hot valid then zeroes)
    MPSGraphTensor *classes = labels, *valid = nil, *valid_rows = nil;
    if (labels && p->loss.ignore) {
        MPSGraphTensor *ign = [c.g constantWithScalar:(double)p->loss.ignore_index dataType:MPSDataTypeInt32];
        MPSGraphTensor *skip = mt_eq(c, labels, ign);
        classes = mt_select(c, skip, [c.g constantWithScalar:0.0 dataType:MPSDataTypeInt32], labels);
        valid_rows = mt_select(c, skip, mt_const(c, 0.0), mt_const(c, 1.0));   // (b S)
        valid = mt_reshape(c, valid_rows, @[@(b), @1]);
    }
    MPSGraphTensor *inv_b = mt_const(c, 1.0 / (double)b), *inv_n = mt_const(c, 1.0 / (double)(b * cls));
    MPSGraphTensor *one = mt_const(c, 1.0), *zero = mt_const(c, 0.0), *half = mt_const(c, 0.5);
    NSArray<NSNumber *> *all = @[@0, @1], *row = @[@1];
    double eps = p->loss.label_smoothing;
    MPSGraphTensor *l = nil, *d = nil;   // loss (1, 1), gradient (b, C)

    switch (p->loss.kind) {
    case MPSCY_LOSS_SPARSE_CE:
    case MPSCY_LOSS_CE: {
        MPSGraphTensor *q = labels ? [c.g oneHotWithIndicesTensor:classes depth:(NSUInteger)cls
                                                         dataType:MPSDataTypeFloat32 name:nil]
                                   : t;   // (b, C)
        q = mt_add(c, mt_mul(c, mt_const(c, 1.0 - eps), q), mt_const(c, eps / (double)cls));
        MPSGraphTensor *inv_d = inv_b;   // the mean's divisor: the rows, or the labels' summed weights
        if (valid) {                     // torch's ignore_index: an ignored row's q is 0 (no term, no gradient)
            q = mt_mul(c, q, valid);
            inv_d = mt_div(c, one, mt_sum(c, valid, all));
        }
        if (p->class_weight) {           // torch's weight=: q scaled by its class's weight
            MPSGraphTensor *w = [c.g constantWithData:[NSData dataWithBytes:p->class_weight
                                                                      length:(NSUInteger)cls * sizeof(float)]
                                                shape:@[@1, @(cls)] dataType:MPSDataTypeFloat32];
            if (labels) {
                MPSGraphTensor *hot = [c.g oneHotWithIndicesTensor:classes depth:(NSUInteger)cls
                                                          dataType:MPSDataTypeFloat32 name:nil];
                if (valid) hot = mt_mul(c, hot, valid);
                inv_d = mt_div(c, one, mt_sum(c, mt_mul(c, hot, w), all));
            }
            q = mt_mul(c, q, w);
        }
        MPSGraphTensor *z = mt_sub(c, yf, [c.g reductionMaximumWithTensor:yf axes:row name:nil]);
        MPSGraphTensor *logp = mt_sub(c, z, mt_log(c, mt_sum(c, mt_exp(c, z), row)));   // (b, C)
        MPSGraphTensor *qlogp = mt_mul(c, q, logp);
        // labels: a class of weight 0 adds nothing, even at a logit of -inf (cpu/loss.c, torch's
        // nll_loss); soft targets keep torch's 0 * -inf
        if (labels) qlogp = mt_select(c, mt_eq(c, q, zero), zero, qlogp);
        l = mt_mul(c, mt_neg(c, mt_sum(c, qlogp, all)), inv_d);
        d = mt_mul(c, mt_sub(c, mt_mul(c, mt_exp(c, logp), mt_sum(c, q, row)), q), inv_d);
        break;
    }
    case MPSCY_LOSS_CATEGORICAL_CE: {
        MPSGraphTensor *q = mt_add(c, mt_mul(c, mt_const(c, 1.0 - eps), t), mt_const(c, eps / (double)cls));
        MPSGraphTensor *tiny = mt_const(c, 1e-7), *clamped = mt_lt(c, yf, tiny);
        MPSGraphTensor *pc = mt_select(c, clamped, tiny, yf);
        l = mt_mul(c, mt_neg(c, mt_sum(c, mt_mul(c, q, mt_log(c, pc)), all)), inv_b);
        d = mt_select(c, clamped, zero, mt_mul(c, mt_neg(c, mt_div(c, q, pc)), inv_b));
        break;
    }
    case MPSCY_LOSS_MSE: {
        MPSGraphTensor *e = mt_sub(c, yf, t);
        l = mt_mul(c, mt_sum(c, mt_mul(c, e, e), all), inv_n);
        d = mt_mul(c, mt_mul(c, mt_const(c, 2.0), e), inv_n);
        break;
    }
    case MPSCY_LOSS_MAE: {
        MPSGraphTensor *e = mt_sub(c, yf, t);
        l = mt_mul(c, mt_sum(c, mt_abs(c, e), all), inv_n);
        d = mt_mul(c, sign3(c, e), inv_n);
        break;
    }
    case MPSCY_LOSS_HUBER: {
        MPSGraphTensor *e = mt_sub(c, yf, t), *a = mt_abs(c, e), *delta = mt_const(c, p->loss.delta);
        MPSGraphTensor *small = mt_lt(c, a, delta);
        MPSGraphTensor *quad = mt_mul(c, half, mt_mul(c, e, e));
        MPSGraphTensor *lin = mt_mul(c, delta, mt_sub(c, a, mt_mul(c, half, delta)));
        l = mt_mul(c, mt_sum(c, mt_select(c, small, quad, lin), all), inv_n);
        d = mt_mul(c, mt_select(c, small, e, mt_mul(c, delta, sign3(c, e))), inv_n);
        break;
    }
    case MPSCY_LOSS_BCE: {
        MPSGraphTensor *m100 = mt_const(c, -100.0);
        MPSGraphTensor *lp = mt_select(c, mt_gt(c, yf, zero), log_clamped(c, mt_log(c, yf)), m100);
        MPSGraphTensor *lq = mt_select(c, mt_lt(c, yf, one), log_clamped(c, mt_log1p(c, mt_neg(c, yf))), m100);
        MPSGraphTensor *term = mt_add(c, mt_mul(c, t, lp), mt_mul(c, mt_sub(c, one, t), lq));
        l = mt_mul(c, mt_neg(c, mt_sum(c, term, all)), inv_n);
        MPSGraphTensor *den = mt_mul(c, yf, mt_sub(c, one, yf)), *tiny = mt_const(c, 1e-12);
        den = mt_select(c, mt_gt(c, den, tiny), den, tiny);
        d = mt_mul(c, mt_div(c, mt_sub(c, yf, t), den), inv_n);
        break;
    }
    case MPSCY_LOSS_BCE_LOGITS: {
        // max(x, 0) - x z + log1p(exp(-|x|)); d = (sigmoid(x) - z) / n
        MPSGraphTensor *soft = mt_log1p(c, mt_exp(c, mt_neg(c, mt_abs(c, yf))));
        MPSGraphTensor *sig = mt_div(c, one, mt_add(c, one, mt_exp(c, mt_neg(c, yf))));
        if (p->pos_weight) {
            // torch's form: (1 - z) x + lw softplus(-x), lw = 1 + (pw - 1) z; d = ((1 - z) + lw (sigmoid(x) - 1)) / n
            MPSGraphTensor *pw = [c.g constantWithData:[NSData dataWithBytes:p->pos_weight
                                                                       length:(NSUInteger)cls * sizeof(float)]
                                                 shape:@[@1, @(cls)] dataType:MPSDataTypeFloat32];
            MPSGraphTensor *lw = mt_add(c, one, mt_mul(c, mt_sub(c, pw, one), t));
            MPSGraphTensor *negpart = mt_select(c, mt_lt(c, yf, zero), mt_neg(c, yf), zero);
            MPSGraphTensor *term = mt_add(c, mt_mul(c, mt_sub(c, one, t), yf), mt_mul(c, lw, mt_add(c, soft, negpart)));
            l = mt_mul(c, mt_sum(c, term, all), inv_n);
            d = mt_mul(c, mt_add(c, mt_sub(c, one, t), mt_mul(c, lw, mt_sub(c, sig, one))), inv_n);
            break;
        }
        MPSGraphTensor *pos = mt_select(c, mt_gt(c, yf, zero), yf, zero);
        l = mt_mul(c, mt_sum(c, mt_add(c, mt_sub(c, pos, mt_mul(c, yf, t)), soft), all), inv_n);
        d = mt_mul(c, mt_sub(c, sig, t), inv_n);
        break;
    }
    default:
        l = mt_const(c, NAN);
        d = mt_mul(c, yf, zero);
    }
    *loss = mt_scalar1(c, l);
    if (dy && npos > 1) {   // (b S, C) back to (b, C, S)
        MPSGraphTensor *bsc = mt_reshape(c, d, @[@(c.b), @(npos), @(cls)]);
        d = [c.g transposeTensor:bsc dimension:1 withDimension:2 name:nil];
    }
    if (dy) *dy = mt_reshape(c, d, mt_shape(c.b, &p->nodes[p->output]));

    *correct = nil;
    if (p->loss.accuracy == MPSCY_ACCURACY_ARGMAX) {
        MPSGraphTensor *want = labels ? mt_float(c, labels) : argmax_rows(c, t, b);   // (b S)
        MPSGraphTensor *hit = mt_float(c, mt_eq(c, argmax_rows(c, yf, b), want));
        if (valid_rows) hit = mt_mul(c, hit, valid_rows);   // ignored labels are not counted
        *correct = mt_scalar1(c, mt_sum(c, hit, @[@0]));
    } else if (p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD && t) {
        MPSGraphTensor *pred = mt_float(c, mt_gt(c, yf, mt_const(c, p->loss.threshold)));
        MPSGraphTensor *truth = mt_float(c, mt_gt(c, t, half));
        *correct = mt_scalar1(c, mt_sum(c, mt_float(c, mt_eq(c, pred, truth)), all));
    }
}
