/* plan_node.c — the per-kind rules of the planner (plan.c): each node's output shape from its
 * inputs and options, checked against the shape the caller sent, its parameter and buffer
 * tensors with PyTorch's names and layouts, and a convolution's geometry for the backends. */
#include "plan_caps.h"
#include "../backend.h"

#include <math.h>
#include <stdio.h>

#define FAIL(status, ...) MPSCY_FAIL(err, errlen, (status), component, __VA_ARGS__)

const char *mpscy_plan_kind_name(int32_t kind) {
    static const char *names[MPSCY_LAYER_KIND_COUNT] = {
        "Input", "Dense", "ReLU", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D",
        "Flatten", "BatchNorm", "LayerNorm", "Dropout", "LeakyReLU", "ELU", "Sigmoid",
        "Tanh", "Swish", "GELU", "Softmax", "Add", "Concatenate", "ReLU6", "Hardsigmoid", "Hardswish",
        "Softplus", "Mish", "Upsample2D", "ConvTranspose2D"};
    return (kind >= 0 && kind < MPSCY_LAYER_KIND_COUNT) ? names[kind] : "unknown";
}

static int64_t pool_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
    int64_t span = in + 2 * p - d * (k - 1) - 1;
    return span < 0 ? 0 : span / s + 1;
}

/* Adds a PARAM or BUFFER tensor of node n; counts floats into *params or *buffers. */
static void add_tensor(mpscy_plan *p, int32_t n, const char *suffix, int32_t role, int32_t slot,
                       int32_t rank, const int64_t *shape) {
    mpscy_tensor *t = &p->tensors[p->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->info.name, MPSCY_NAME_LEN, "%.40s.%.15s", p->nodes[n].name, suffix);
    t->info.role = role;
    t->info.dtype = MPSCY_F32;
    set_shape(&t->info.rank, t->info.shape, rank, shape);
    t->info.count = capped_count(rank, shape);
    if (role == MPSCY_ROLE_PARAM && (p->nodes[n].flags & MPSCY_FLAG_FROZEN)) {
        t->info.offset = p->n_frozen;   /* relative to the frozen region, fixed up later */
        p->n_frozen = cap_add(p->n_frozen, t->info.count);
    } else if (role == MPSCY_ROLE_PARAM) {
        t->info.offset = p->n_train;
        p->n_train = cap_add(p->n_train, t->info.count);
    } else {
        t->info.offset = p->n_buffers;  /* relative to the buffer region, fixed up later */
        p->n_buffers = cap_add(p->n_buffers, t->info.count);
    }
    t->node = n;
    t->slot = slot;
    p->nodes[n].n_tensors += 1;
}

/* Computes node i's output shape from its inputs, checks its options, adds its tensors. */
int mpscy_plan_node(mpscy_plan *p, int32_t i, const char *component, char *err, size_t errlen) {
    mpscy_node *n = &p->nodes[i];
    const mpscy_node *a = n->n_in > 0 ? &p->nodes[n->in[0]] : NULL;
    int64_t s[MPSCY_MAX_RANK] = {0};
    int32_t r = 0;
    const int32_t *q = n->ints;
    const char *kn = mpscy_plan_kind_name(n->kind);
    n->tensor0 = p->n_tensors;
    n->n_tensors = 0;

    switch (n->kind) {
    case MPSCY_LAYER_INPUT:
        if (n->rank < 1 || n->rank > MPSCY_MAX_RANK)
            return FAIL(MPSCY_SHAPE, "node %d (%s): input rank %d outside 1..%d", i, n->name,
                        n->rank, MPSCY_MAX_RANK);
        r = n->rank;
        memcpy(s, n->shape, sizeof s);
        break;
    case MPSCY_LAYER_DENSE: {
        int64_t in = a->size;
        if (q[0] <= 0) return FAIL(MPSCY_INVALID, "node %d (%s): Dense units %d must be > 0", i, n->name, q[0]);
        if (in > PLAN_BLAS_MAX)
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a Dense of %lld input features; at most 2^31 - 1", i, n->name,
                        (long long)in);
        r = 1;
        s[0] = q[0];
        int64_t w[2] = {q[0], in};
        add_tensor(p, i, "weight", MPSCY_ROLE_PARAM, 0, 2, w);
        if (n->flags & MPSCY_FLAG_BIAS) add_tensor(p, i, "bias", MPSCY_ROLE_PARAM, 1, 1, s);
        break;
    }
    case MPSCY_LAYER_RELU: case MPSCY_LAYER_LEAKYRELU: case MPSCY_LAYER_ELU:
    case MPSCY_LAYER_SIGMOID: case MPSCY_LAYER_TANH: case MPSCY_LAYER_SWISH:
    case MPSCY_LAYER_GELU: case MPSCY_LAYER_DROPOUT: case MPSCY_LAYER_SOFTMAX:
    case MPSCY_LAYER_RELU6: case MPSCY_LAYER_HARDSIGMOID: case MPSCY_LAYER_HARDSWISH:
    case MPSCY_LAYER_SOFTPLUS: case MPSCY_LAYER_MISH:
        r = a->rank;
        memcpy(s, a->shape, sizeof s);
        if (n->kind == MPSCY_LAYER_DROPOUT && !(n->reals[0] >= 0.0 && n->reals[0] < 1.0))
            return FAIL(MPSCY_INVALID, "node %d (%s): dropout rate %g outside [0, 1)", i, n->name, n->reals[0]);
        if (n->kind == MPSCY_LAYER_SOFTMAX && (q[0] < 0 || q[0] >= r))
            return FAIL(MPSCY_INVALID, "node %d (%s): softmax axis %d outside 0..%d", i, n->name, q[0], r - 1);
        if (n->kind == MPSCY_LAYER_SOFTPLUS && !(n->reals[0] > 0.0 && n->reals[0] < INFINITY && isfinite(n->reals[1])))
            return FAIL(MPSCY_INVALID, "node %d (%s): Softplus beta %g must be > 0 and threshold %g finite", i, n->name,
                        n->reals[0], n->reals[1]);
        if (n->kind == MPSCY_LAYER_DROPOUT) n->save_size = cap_mul(p->batch, a->size);
        break;
    case MPSCY_LAYER_CONV2D: case MPSCY_LAYER_MAXPOOL2D: case MPSCY_LAYER_AVGPOOL2D: {
        int conv = n->kind == MPSCY_LAYER_CONV2D;
        const int32_t *k = conv ? q + 1 : q;  /* kh, kw, sh, sw, ph, pw [, dh, dw, groups] */
        int32_t dh = conv ? q[7] : 1, dw = conv ? q[8] : 1, groups = conv ? q[9] : 1;
        if (a->rank != 3)
            return FAIL(MPSCY_SHAPE, "node %d (%s): %s needs (C, H, W) input, got rank %d", i, n->name, kn, a->rank);
        if (k[0] <= 0 || k[1] <= 0 || k[2] <= 0 || k[3] <= 0 || k[4] < 0 || k[5] < 0 || dh <= 0 || dw <= 0)
            return FAIL(MPSCY_INVALID, "node %d (%s): kernel, stride and dilation must be > 0 and padding >= 0", i, n->name);
        if (!conv && (2 * k[4] > k[0] || 2 * k[5] > k[1]))
            return FAIL(MPSCY_INVALID, "node %d (%s): padding (%d, %d) exceeds half the pool size (%d, %d)",
                        i, n->name, k[4], k[5], k[0], k[1]);
        int64_t c = a->shape[0];
        if (conv && (groups <= 0 || q[0] <= 0 || c % groups || q[0] % groups))
            return FAIL(MPSCY_INVALID, "node %d (%s): groups %d must divide in channels %lld and filters %d",
                        i, n->name, groups, (long long)c, q[0]);
        r = 3;
        s[0] = conv ? q[0] : c;
        s[1] = pool_out(a->shape[1], k[0], k[2], k[4], dh);
        s[2] = pool_out(a->shape[2], k[1], k[3], k[5], dw);
        if (s[1] <= 0 || s[2] <= 0)
            return FAIL(MPSCY_SHAPE, "node %d (%s): input (%lld, %lld) is smaller than the %s window",
                        i, n->name, (long long)a->shape[1], (long long)a->shape[2], kn);
        if (conv && (cap_mul(cap_mul(c / groups, k[0]), k[1]) > PLAN_BLAS_MAX || cap_mul(s[1], s[2]) > PLAN_BLAS_MAX))
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a Conv2D of %lld x %d x %d taps and %lld x %lld positions; "
                        "each product at most 2^31 - 1", i, n->name, (long long)(c / groups), k[0], k[1],
                        (long long)s[1], (long long)s[2]);
        if (conv) {
            int64_t w[4] = {q[0], c / groups, k[0], k[1]};
            add_tensor(p, i, "weight", MPSCY_ROLE_PARAM, 0, 4, w);
            if (n->flags & MPSCY_FLAG_BIAS) add_tensor(p, i, "bias", MPSCY_ROLE_PARAM, 1, 1, s);
        }
        if (n->kind == MPSCY_LAYER_MAXPOOL2D) n->save_size = cap_mul(p->batch, capped_count(3, s));
        break;
    }
    case MPSCY_LAYER_CONVTRANSPOSE2D: {  /* out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups, oph, opw */
        if (a->rank != 3)
            return FAIL(MPSCY_SHAPE, "node %d (%s): %s needs (C, H, W) input, got rank %d", i, n->name, kn, a->rank);
        if (q[1] <= 0 || q[2] <= 0 || q[3] <= 0 || q[4] <= 0 || q[5] < 0 || q[6] < 0 || q[7] <= 0 || q[8] <= 0)
            return FAIL(MPSCY_INVALID, "node %d (%s): kernel, stride and dilation must be > 0 and padding >= 0", i, n->name);
        if (q[10] < 0 || q[11] < 0 || (q[10] >= q[3] && q[10] >= q[7]) || (q[11] >= q[4] && q[11] >= q[8]))
            return FAIL(MPSCY_INVALID, "node %d (%s): output padding (%d, %d) must be >= 0 and below the stride (%d, %d) "
                        "or the dilation (%d, %d)", i, n->name, q[10], q[11], q[3], q[4], q[7], q[8]);
        int64_t c = a->shape[0];
        if (q[9] <= 0 || q[0] <= 0 || c % q[9] || q[0] % q[9])
            return FAIL(MPSCY_INVALID, "node %d (%s): groups %d must divide in channels %lld and filters %d",
                        i, n->name, q[9], (long long)c, q[0]);
        /* the products are a convolution's from the output back to the input, of K = out_c / groups x kh
         * x kw (and the forward's, C / groups x kh x kw) over the input's H x W positions */
        if (cap_mul(a->shape[1], a->shape[2]) > PLAN_BLAS_MAX)
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a ConvTranspose2D over %lld x %lld input positions; at most "
                        "2^31 - 1", i, n->name, (long long)a->shape[1], (long long)a->shape[2]);
        if (cap_mul(cap_mul(q[0] / q[9], q[1]), q[2]) > PLAN_BLAS_MAX || cap_mul(cap_mul(c / q[9], q[1]), q[2]) >
            PLAN_BLAS_MAX)
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a ConvTranspose2D of %lld or %d input or output channels a "
                        "group times %d x %d taps; each product at most 2^31 - 1", i, n->name, (long long)(c / q[9]),
                        q[0] / q[9], q[1], q[2]);
        r = 3;
        s[0] = q[0];
        for (int d = 0; d < 2; d++)  /* (in - 1) s - 2 p + d (k - 1) + op + 1: in < 2^31, so each term is below 2^62 */
            s[1 + d] = (a->shape[1 + d] - 1) * q[3 + d] - 2 * (int64_t)q[5 + d] + (int64_t)q[7 + d] * (q[1 + d] - 1) +
                       q[10 + d] + 1;
        if (s[1] <= 0 || s[2] <= 0)
            return FAIL(MPSCY_SHAPE, "node %d (%s): input (%lld, %lld) gives no output with padding (%d, %d)", i,
                        n->name, (long long)a->shape[1], (long long)a->shape[2], q[5], q[6]);
        if (s[1] + q[5] >= ((int64_t)1 << 32) || s[2] + q[6] >= ((int64_t)1 << 32))  /* cuda's gathers index in 32 bits */
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a ConvTranspose2D output of %lld x %lld; each side at most "
                        "2^32 - 1 with its padding", i, n->name, (long long)s[1], (long long)s[2]);
        int64_t w[4] = {c, q[0] / q[9], q[1], q[2]};
        add_tensor(p, i, "weight", MPSCY_ROLE_PARAM, 0, 4, w);
        if (n->flags & MPSCY_FLAG_BIAS) add_tensor(p, i, "bias", MPSCY_ROLE_PARAM, 1, 1, s);
        break;
    }
    case MPSCY_LAYER_GLOBALAVGPOOL2D:
        if (a->rank != 3)
            return FAIL(MPSCY_SHAPE, "node %d (%s): GlobalAvgPool2D needs (C, H, W) input, got rank %d", i, n->name, a->rank);
        r = 1;
        s[0] = a->shape[0];
        break;
    case MPSCY_LAYER_UPSAMPLE2D:
        if (a->rank != 3)
            return FAIL(MPSCY_SHAPE, "node %d (%s): Upsample2D needs (C, H, W) input, got rank %d", i, n->name, a->rank);
        if (q[2] != 0 && q[2] != 1)
            return FAIL(MPSCY_INVALID, "node %d (%s): Upsample2D mode %d is neither 0 (nearest) nor 1 (bilinear)", i,
                        n->name, q[2]);
        if (q[2] == 0 && (q[0] <= 0 || q[1] <= 0 || q[3] || q[4] || q[5]))
            return FAIL(MPSCY_INVALID, "node %d (%s): nearest Upsample2D scale factors (%d, %d) must be > 0 and ints "
                        "3..5 zero", i, n->name, q[0], q[1]);
        if (q[2] == 1 && (q[4] <= 0 || q[5] <= 0 || (q[3] != 0 && q[3] != 1) || q[0] || q[1]))
            return FAIL(MPSCY_INVALID, "node %d (%s): bilinear Upsample2D output size (%d, %d) must be > 0, "
                        "align_corners %d 0 or 1 and the factors zero", i, n->name, q[4], q[5], q[3]);
        r = 3;
        s[0] = a->shape[0];
        s[1] = q[2] ? q[4] : cap_mul(a->shape[1], q[0]);
        s[2] = q[2] ? q[5] : cap_mul(a->shape[2], q[1]);
        break;
    case MPSCY_LAYER_FLATTEN:  /* ints[0] = 0: flatten; else a reshape to the rank-ints[0] shape ints[1..] */
        if (q[0] < 0 || q[0] > MPSCY_MAX_RANK)
            return FAIL(MPSCY_INVALID, "node %d (%s): reshape rank %d outside 0..%d", i, n->name, q[0], MPSCY_MAX_RANK);
        r = q[0] ? q[0] : 1;
        s[0] = a->size;
        if (q[0]) {
            int64_t count = 1;
            for (int d = 0; d < r; d++) {
                if (q[1 + d] <= 0) return FAIL(MPSCY_INVALID, "node %d (%s): reshape dimension %d is %d", i, n->name, d,
                                               q[1 + d]);
                s[d] = q[1 + d];
                count = cap_mul(count, s[d]);
            }
            if (count != a->size)
                return FAIL(MPSCY_SHAPE, "node %d (%s): reshape to %lld elements of an input of %lld", i, n->name,
                            (long long)count, (long long)a->size);
        }
        break;
    case MPSCY_LAYER_BATCHNORM: {
        if (a->rank != 1 && a->rank != 3)
            return FAIL(MPSCY_SHAPE, "node %d (%s): BatchNorm needs (F) or (C, H, W) input, got rank %d", i, n->name, a->rank);
        if (!(n->reals[0] >= 0.0 && n->reals[0] <= 1.0) || !(n->reals[1] > 0.0))
            return FAIL(MPSCY_INVALID, "node %d (%s): BatchNorm momentum %g must be in [0, 1] and eps %g > 0",
                        i, n->name, n->reals[0], n->reals[1]);
        r = a->rank;
        memcpy(s, a->shape, sizeof s);
        int64_t c[1] = {a->shape[0]};
        if (n->flags & MPSCY_FLAG_AFFINE) {
            add_tensor(p, i, "weight", MPSCY_ROLE_PARAM, 0, 1, c);
            add_tensor(p, i, "bias", MPSCY_ROLE_PARAM, 1, 1, c);
        }
        add_tensor(p, i, "running_mean", MPSCY_ROLE_BUFFER, 0, 1, c);
        add_tensor(p, i, "running_var", MPSCY_ROLE_BUFFER, 1, 1, c);
        n->save_size = 3 * c[0];  /* the batch's mean, biased variance and 1/sqrt(variance + eps) */
        break;
    }
    case MPSCY_LAYER_LAYERNORM: {
        int32_t k = q[0];
        if (k < 1 || k > a->rank)
            return FAIL(MPSCY_INVALID, "node %d (%s): LayerNorm over %d trailing dims of a rank-%d input", i, n->name, k, a->rank);
        if (!(n->reals[1] > 0.0))
            return FAIL(MPSCY_INVALID, "node %d (%s): LayerNorm eps %g must be > 0", i, n->name, n->reals[1]);
        r = a->rank;
        memcpy(s, a->shape, sizeof s);
        if (n->flags & MPSCY_FLAG_AFFINE) {
            add_tensor(p, i, "weight", MPSCY_ROLE_PARAM, 0, k, a->shape + (a->rank - k));
            add_tensor(p, i, "bias", MPSCY_ROLE_PARAM, 1, k, a->shape + (a->rank - k));
        }
        n->save_size = cap_mul(2 * (int64_t)p->batch, a->size / mpscy_shape_count(k, a->shape + (a->rank - k)));
        break;
    }
    case MPSCY_LAYER_ADD:
        if (n->n_in < 2) return FAIL(MPSCY_INVALID, "node %d (%s): Add needs at least 2 inputs", i, n->name);
        for (int32_t j = 1; j < n->n_in; j++) {
            const mpscy_node *b = &p->nodes[n->in[j]];
            if (b->rank != a->rank || memcmp(b->shape, a->shape, sizeof a->shape))
                return FAIL(MPSCY_SHAPE, "node %d (%s): Add input %d shape differs from input 0", i, n->name, j);
        }
        r = a->rank;
        memcpy(s, a->shape, sizeof s);
        break;
    case MPSCY_LAYER_CONCAT: {
        int32_t ax = q[0];
        if (n->n_in < 1 || ax < 0 || ax >= a->rank)
            return FAIL(MPSCY_INVALID, "node %d (%s): Concatenate axis %d outside 0..%d", i, n->name, ax, a->rank - 1);
        r = a->rank;
        memcpy(s, a->shape, sizeof s);
        for (int32_t j = 1; j < n->n_in; j++) {
            const mpscy_node *b = &p->nodes[n->in[j]];
            int ok = b->rank == a->rank;
            for (int32_t d = 0; ok && d < a->rank; d++) ok = d == ax || b->shape[d] == a->shape[d];
            if (!ok) return FAIL(MPSCY_SHAPE, "node %d (%s): Concatenate input %d differs off axis %d", i, n->name, j, ax);
            s[ax] += b->shape[ax];
        }
        break;
    }
    default:
        return FAIL(MPSCY_INVALID, "node %d (%s): unknown layer kind %d", i, n->name, n->kind);
    }

    if (n->kind != MPSCY_LAYER_INPUT && (n->rank != r || memcmp(n->shape, s, sizeof s) != 0))
        return FAIL(MPSCY_SHAPE, "node %d (%s): %s output shape given does not match the computed (rank %d, first dim %lld)",
                    i, n->name, kn, r, (long long)s[0]);
    for (int32_t d = 0; d < r; d++)
        if (s[d] <= 0 || s[d] > PLAN_MAX_DIM)
            return FAIL(MPSCY_SHAPE, "node %d (%s): dimension %d is %lld%s", i, n->name, d, (long long)s[d],
                        s[d] > 0 ? ", more than 2^48" : "");
    set_shape(&n->rank, n->shape, r, s);
    n->size = capped_count(r, s);
    if (n->size > PLAN_CAP)
        return FAIL(MPSCY_OOM, "node %d (%s): an output of more than 2^56 floats per sample", i, n->name);
    return MPSCY_OK;
}

int mpscy_plan_inputs(int32_t kind) {
    switch (kind) {
    case MPSCY_LAYER_INPUT: return 0;
    case MPSCY_LAYER_ADD: case MPSCY_LAYER_CONCAT: return -1;  /* variadic */
    default: return 1;
    }
}

mpscy_conv_geom mpscy_conv_geometry(const mpscy_plan *p, const mpscy_node *n) {
    const mpscy_node *a = &p->nodes[n->in[0]];
    const int32_t *q = n->ints;  /* out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups */
    mpscy_conv_geom g;
    if (n->kind == MPSCY_LAYER_CONVTRANSPOSE2D) {  /* the convolution from the output back to the input */
        g.c = n->shape[0]; g.h = n->shape[1]; g.w = n->shape[2];
        g.oc = a->shape[0]; g.oh = a->shape[1]; g.ow = a->shape[2];
    } else {
        g.c = a->shape[0]; g.h = a->shape[1]; g.w = a->shape[2];
        g.oc = n->shape[0]; g.oh = n->shape[1]; g.ow = n->shape[2];
    }
    g.ohw = g.oh * g.ow;
    g.kh = q[1]; g.kw = q[2]; g.sh = q[3]; g.sw = q[4]; g.ph = q[5]; g.pw = q[6];
    g.dh = q[7]; g.dw = q[8]; g.groups = q[9];
    g.ocg = g.oc / g.groups;
    g.k = g.c * g.kh * g.kw;
    g.kg = g.k / g.groups;
    return g;
}
