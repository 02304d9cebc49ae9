/* plan.c — validates a graph descriptor and plans it, for every backend alike: the nodes in
 * order (each by plan_node.c's per-kind rules: shapes, options, tensors), the loss, optimizer
 * state slots, which gradients backward needs and whether each one is written or accumulated,
 * and the float offsets of every slab. It allocates only the plan's own two tables; it runs no
 * kernel. */
#include "plan_caps.h"
#include "../backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, errlen, (status), component, __VA_ARGS__)

int64_t mpscy_shape_count(int32_t rank, const int64_t *shape) {
    int64_t c = 1;
    for (int32_t i = 0; i < rank; i++) c *= shape[i];
    return c;
}

static int plan_loss(mpscy_plan *p, const char *component, char *err, size_t errlen) {
    const mpscy_node *o = &p->nodes[p->output];
    int32_t k = p->loss.kind;
    int sparse = k == MPSCY_LOSS_SPARSE_CE;
    if (k < MPSCY_LOSS_SPARSE_CE || k > MPSCY_LOSS_HUBER)
        return FAIL(MPSCY_INVALID, "unknown loss kind %d", k);
    if (sparse != (p->target == MPSCY_TARGET_INDEX))
        return FAIL(MPSCY_INVALID, "loss kind %d needs %s targets", k, sparse ? "integer label" : "float32");
    const int logits_ce = sparse || k == MPSCY_LOSS_CE;  /* over (C,) or (C, d1, ...): torch's (n, C, d1, ...) */
    if (k == MPSCY_LOSS_CATEGORICAL_CE && o->rank != 1)
        return FAIL(MPSCY_SHAPE, "categorical cross-entropy needs a (classes,) output per sample, got rank %d", o->rank);
    if (logits_ce && o->rank < 1)
        return FAIL(MPSCY_SHAPE, "cross-entropy needs a (classes, ...) output per sample, got rank %d", o->rank);
    if (!(p->loss.label_smoothing >= 0.0 && p->loss.label_smoothing <= 1.0))
        return FAIL(MPSCY_INVALID, "label_smoothing %g outside [0, 1]", p->loss.label_smoothing);
    if (p->loss.ignore && !sparse)
        return FAIL(MPSCY_INVALID, "ignore_index applies to integer labels (sparse cross-entropy), not loss kind %d", k);
    if (k == MPSCY_LOSS_HUBER && !(p->loss.delta > 0.0))
        return FAIL(MPSCY_INVALID, "huber delta %g must be > 0", p->loss.delta);
    if (p->loss.accuracy < MPSCY_ACCURACY_NONE || p->loss.accuracy > MPSCY_ACCURACY_THRESHOLD)
        return FAIL(MPSCY_INVALID, "unknown accuracy kind %d", p->loss.accuracy);
    if (p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD && sparse)  /* it compares float targets with 0.5 */
        return FAIL(MPSCY_INVALID, "threshold accuracy needs float32 targets, not integer labels");
    if (p->loss.accuracy == MPSCY_ACCURACY_ARGMAX && o->rank != 1 && !logits_ce)
        return FAIL(MPSCY_SHAPE, "argmax accuracy needs a (classes,) output, got rank %d", o->rank);
    p->out_size = o->size;
    p->classes = logits_ce ? o->shape[0] : o->size;
    p->positions = o->size / p->classes;
    p->target_size = sparse ? p->positions : o->size;
    const float *w = p->loss.class_weight, *pw = p->loss.pos_weight;
    p->loss.class_weight = NULL;  /* the caller's arrays are read here only: the plan keeps its copies */
    p->loss.pos_weight = NULL;
    if (pw) {
        if (k != MPSCY_LOSS_BCE_LOGITS)
            return FAIL(MPSCY_INVALID, "pos_weight applies to bce_with_logits, not loss kind %d", k);
        const int64_t last = o->rank > 0 ? o->shape[o->rank - 1] : 1;
        for (int64_t i = 0; i < last; i++)
            if (!(pw[i] >= 0.0f && pw[i] < INFINITY))
                return FAIL(MPSCY_INVALID, "pos_weight %lld is %g: each must be finite and >= 0", (long long)i,
                            (double)pw[i]);
        p->pos_weight = malloc((size_t)o->size * sizeof(float));
        if (!p->pos_weight) return FAIL(MPSCY_OOM, "pos_weight of %lld elements", (long long)o->size);
        for (int64_t i = 0; i < o->size; i++) p->pos_weight[i] = pw[i % last];
        p->loss.pos_weight = p->pos_weight;
    }
    if (w) {
        if (!sparse && k != MPSCY_LOSS_CE)
            return FAIL(MPSCY_INVALID, "class weights apply to the cross-entropies on logits, not loss kind %d", k);
        for (int64_t i = 0; i < p->classes; i++)
            if (!(w[i] >= 0.0f && w[i] < INFINITY))
                return FAIL(MPSCY_INVALID, "class weight %lld is %g: each must be finite and >= 0", (long long)i,
                            (double)w[i]);
        p->class_weight = malloc((size_t)p->classes * sizeof(float));
        if (!p->class_weight) return FAIL(MPSCY_OOM, "class weights of %lld classes", (long long)p->classes);
        memcpy(p->class_weight, w, (size_t)p->classes * sizeof(float));
        p->loss.class_weight = p->class_weight;
    }
    return MPSCY_OK;
}

static int64_t align16(int64_t floats) { return (floats + 15) / 16 * 16; }

/* Lays out L-BFGS's slots and scratch after validating its options. */
static int plan_lbfgs(mpscy_plan *p, const char *component, char *err, size_t errlen) {
    const mpscy_optim_desc *o = &p->optim;
    mpscy_lbfgs_layout *L = &p->lbfgs;
    int64_t n = align16(p->n_train), at = 0;
    if (o->history_size < 1 || o->max_iter < 1)
        return FAIL(MPSCY_INVALID, "LBFGS history_size %d and max_iter %d must be >= 1", o->history_size, o->max_iter);
    if (o->line_search != 0 && o->line_search != 1)
        return FAIL(MPSCY_INVALID, "LBFGS line_search %d must be 0 (none) or 1 (strong Wolfe)", o->line_search);
    if (!(o->tolerance_grad >= 0.0) || !(o->tolerance_change >= 0.0))
        return FAIL(MPSCY_INVALID, "LBFGS tolerance_grad %g and tolerance_change %g must be >= 0",
                    o->tolerance_grad, o->tolerance_change);
    if (o->clip_grad_norm > 0 || o->clip_grad_value > 0)
        return FAIL(MPSCY_INVALID, "gradient clipping does not apply to LBFGS (its line search needs the true gradient)");
    L->cap = (int64_t)o->history_size + o->max_iter;
    if ((double)L->cap * (double)n * 2.0 > 1e18)
        return FAIL(MPSCY_OOM, "LBFGS history of %lld rows of %lld floats is too large", (long long)L->cap, (long long)n);
#define SLOT(name, rank, rows, field, floats) do { \
        int32_t k_ = p->n_vec_slots++; \
        snprintf(p->vec_slots[k_], MPSCY_NAME_LEN, "%s", name); \
        p->vec_rank[k_] = rank; \
        p->vec_shape[k_][0] = rows; \
        p->vec_shape[k_][1] = rank == 2 ? p->n_train : 0; \
        p->vec_offset[k_] = L->field = at; \
        at += align16(floats); \
    } while (0)
    SLOT("d", 1, p->n_train, d, n);
    SLOT("prev_flat_grad", 1, p->n_train, prev_flat_grad, n);
    SLOT("old_dirs", 2, L->cap, old_dirs, L->cap * p->n_train);
    SLOT("old_stps", 2, L->cap, old_stps, L->cap * p->n_train);
    SLOT("ro", 1, L->cap, ro, L->cap);
#undef SLOT
    /* scratch: not state, never named */
    L->base = at; at += n;
    L->x0 = at; at += n;
    L->d0 = at; at += n;
    L->prev0 = at; at += n;
    L->buf0 = at; at += align16(p->n_buffers);
    for (int32_t r = 0; r < MPSCY_LBFGS_REGISTERS; r++) { L->reg[r] = at; at += n; }
    L->al = at; at += align16(2 * L->cap);
    p->optim_floats = at;
    return MPSCY_OK;
}

static int plan_optim(mpscy_plan *p, const char *component, char *err, size_t errlen) {
    const mpscy_optim_desc *o = &p->optim;
    int32_t f = o->flags;
#define VEC(s) snprintf(p->vec_slots[p->n_vec_slots++], MPSCY_NAME_LEN, "%s", s)
#define SCALAR(s) snprintf(p->scalar_slots[p->n_scalar_slots++], MPSCY_NAME_LEN, "%s", s)
    p->n_vec_slots = 0;
    p->n_scalar_slots = 0;
    SCALAR("step");
    switch (o->kind) {
    case MPSCY_OPTIM_SGD:
        if ((f & MPSCY_OPTIM_NESTEROV) && (o->momentum <= 0.0 || o->dampening != 0.0))
            return FAIL(MPSCY_INVALID, "SGD nesterov needs momentum > 0 and dampening 0");
        VEC("momentum_buffer"); SCALAR("momentum_started");  /* mpscy_optim_coef_make (optim_math.h) */
        break;
    case MPSCY_OPTIM_ADAM: case MPSCY_OPTIM_ADAMW:
        VEC("exp_avg"); VEC("exp_avg_sq");
        if (f & MPSCY_OPTIM_AMSGRAD) VEC("max_exp_avg_sq");
        break;
    case MPSCY_OPTIM_RMSPROP:
        if (!(o->alpha >= 0.0)) return FAIL(MPSCY_INVALID, "RMSprop alpha %g must be >= 0", o->alpha);
        VEC("square_avg"); VEC("momentum_buffer");
        if (f & MPSCY_OPTIM_CENTERED) VEC("grad_avg");
        break;
    case MPSCY_OPTIM_ADAGRAD:
        if (!(o->lr_decay >= 0.0) || !(o->initial_accumulator_value >= 0.0))
            return FAIL(MPSCY_INVALID, "Adagrad lr_decay %g and initial_accumulator_value %g must be >= 0",
                        o->lr_decay, o->initial_accumulator_value);
        VEC("sum");
        break;
    case MPSCY_OPTIM_ADADELTA:
        if (!(o->rho >= 0.0 && o->rho <= 1.0)) return FAIL(MPSCY_INVALID, "Adadelta rho %g outside [0, 1]", o->rho);
        VEC("square_avg"); VEC("acc_delta");
        break;
    case MPSCY_OPTIM_NADAM:
        if (!(o->momentum_decay >= 0.0))
            return FAIL(MPSCY_INVALID, "NAdam momentum_decay %g must be >= 0", o->momentum_decay);
        VEC("exp_avg"); VEC("exp_avg_sq"); SCALAR("mu_product");
        break;
    case MPSCY_OPTIM_LBFGS: {
        SCALAR("H_diag"); SCALAR("hist_start"); SCALAR("hist_len");
        int st = plan_lbfgs(p, component, err, errlen);
        if (st != MPSCY_OK) return st;
        break;
    }
    default:
        return FAIL(MPSCY_INVALID, "unknown optimizer kind %d", o->kind);
    }
#undef VEC
#undef SCALAR
    if (o->kind != MPSCY_OPTIM_LBFGS) {
        for (int32_t s = 0; s < p->n_vec_slots; s++) {
            p->vec_rank[s] = 1;
            p->vec_shape[s][0] = p->n_train;
            p->vec_offset[s] = (int64_t)s * p->n_train;
        }
        p->optim_floats = (int64_t)p->n_vec_slots * p->n_train;
    }
    if (!(o->lr >= 0.0) || !(o->weight_decay >= 0.0) || !(o->momentum >= 0.0) || !(o->eps >= 0.0))
        return FAIL(MPSCY_INVALID, "optimizer lr %g, momentum %g, weight_decay %g and eps %g must be >= 0",
                    o->lr, o->momentum, o->weight_decay, o->eps);
    if (!(o->beta1 >= 0.0 && o->beta1 < 1.0) || !(o->beta2 >= 0.0 && o->beta2 < 1.0))
        return FAIL(MPSCY_INVALID, "betas (%g, %g) must be in [0, 1)", o->beta1, o->beta2);
    return MPSCY_OK;
}

static void plan_gradients(mpscy_plan *p) {
    int32_t n = p->n_nodes;
    /* live: contributes to the output (checked by the caller); grad: d(output) is needed. */
    for (int32_t i = 0; i < n; i++) {
        mpscy_node *node = &p->nodes[i];
        int has_params = 0;  /* trained ones: a frozen layer needs d(output) only for its inputs */
        for (int32_t t = 0; t < node->n_tensors; t++)
            has_params |= mpscy_tensor_trained(p, &p->tensors[node->tensor0 + t]);
        node->grad = node->kind == MPSCY_LAYER_INPUT ? p->input_grad : 0;
        if (node->kind != MPSCY_LAYER_INPUT) {
            node->grad = has_params;
            for (int32_t j = 0; j < node->n_in; j++) node->grad |= p->nodes[node->in[j]].grad;
        }
    }
    /* Backward visits nodes from last to first; the first writer of a grad overwrites it. */
    for (int32_t i = n - 1; i >= 0; i--) {
        mpscy_node *node = &p->nodes[i];
        for (int32_t j = 0; j < node->n_in; j++) {
            mpscy_node *src = &p->nodes[node->in[j]];
            node->accum[j] = 0;
            if (!node->grad || !src->grad) continue;
            node->accum[j] = src->written;
            src->written = 1;
        }
    }
}

int mpscy_plan_build(mpscy_plan *p, const mpscy_graph_desc *d, const char *component,
                     char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    if (!d || !d->layers || d->n_layers < 2)
        return FAIL(MPSCY_INVALID, "a graph needs at least an input and one layer");
    if (d->batch < 1) return FAIL(MPSCY_INVALID, "batch size %d must be >= 1", d->batch);
    if (d->output < 0 || d->output >= d->n_layers)
        return FAIL(MPSCY_INVALID, "output node %d outside 0..%d", d->output, d->n_layers - 1);
    if (d->target != MPSCY_TARGET_INDEX && d->target != MPSCY_TARGET_DENSE)
        return FAIL(MPSCY_INVALID, "unknown target kind %d", d->target);
    if (d->precision != MPSCY_PRECISION_FP32 && d->precision != MPSCY_PRECISION_TF32)
        return FAIL(MPSCY_INVALID, "unknown precision %d", d->precision);
    if (d->threads < 0 || d->threads > MPSCY_MAX_THREADS)
        return FAIL(MPSCY_INVALID, "threads %d outside 0..%d (0: the device's default)", d->threads, MPSCY_MAX_THREADS);

    p->n_nodes = d->n_layers;
    p->output = d->output;
    p->batch = d->batch;
    p->target = d->target;
    p->precision = d->precision;
    p->threads = d->threads;
    p->input_grad = d->input_grad != 0;
    p->loss = d->loss;
    p->optim = d->optim;
    int32_t max_tensors = 8 * d->n_layers + MPSCY_MAX_OPTIM_SLOTS + 4;
    p->nodes = calloc((size_t)d->n_layers, sizeof *p->nodes);
    p->tensors = calloc((size_t)max_tensors, sizeof *p->tensors);
    if (!p->nodes || !p->tensors) {
        mpscy_plan_free(p);
        return FAIL(MPSCY_OOM, "plan tables for %d layers", d->n_layers);
    }

    int st = MPSCY_OK;
    for (int32_t i = 0; i < d->n_layers && st == MPSCY_OK; i++) {
        const mpscy_layer_desc *L = &d->layers[i];
        mpscy_node *n = &p->nodes[i];
        n->kind = L->kind;
        n->flags = L->flags;
        n->n_in = L->n_inputs;
        n->rank = L->rank;
        memcpy(n->shape, L->shape, sizeof n->shape);
        memcpy(n->ints, L->ints, sizeof n->ints);
        memcpy(n->reals, L->reals, sizeof n->reals);
        memcpy(n->name, L->name, MPSCY_NAME_LEN);
        n->name[MPSCY_NAME_LEN - 1] = 0;
        if (strlen(n->name) > 40) {
            st = FAIL(MPSCY_INVALID, "node %d: name '%.20s...' is longer than 40 characters", i, n->name);
            break;
        }
        n->input_index = -1;
        n->dout = -1;
        int want = mpscy_plan_inputs(L->kind);
        if (L->rank < 0 || L->rank > MPSCY_MAX_RANK) {
            st = FAIL(MPSCY_SHAPE, "node %d (%s): rank %d outside 0..%d", i, n->name, L->rank, MPSCY_MAX_RANK);
        } else if (L->n_inputs < 0 || L->n_inputs > MPSCY_MAX_INPUTS || (want >= 0 && L->n_inputs != want)) {
            st = FAIL(MPSCY_INVALID, "node %d (%s): %s takes %d input(s), got %d", i, n->name,
                      mpscy_plan_kind_name(L->kind), want, L->n_inputs);
        } else {
            for (int32_t j = 0; j < L->n_inputs && st == MPSCY_OK; j++) {
                n->in[j] = L->inputs[j];
                if (L->inputs[j] < 0 || L->inputs[j] >= i)
                    st = FAIL(MPSCY_INVALID, "node %d (%s): input %d refers to node %d, not an earlier node",
                              i, n->name, j, L->inputs[j]);
            }
        }
        if (st == MPSCY_OK && L->kind == MPSCY_LAYER_INPUT) n->input_index = p->n_inputs++;
        if (st == MPSCY_OK) st = mpscy_plan_node(p, i, component, err, errlen);
    }
    if (st == MPSCY_OK && p->nodes[p->output].kind == MPSCY_LAYER_INPUT)
        st = FAIL(MPSCY_INVALID, "the output node %d is an input", p->output);

    /* Every node must feed the output: backward would otherwise read gradients nobody wrote. */
    if (st == MPSCY_OK) {
        p->nodes[p->output].live = 1;
        p->nodes[p->output].consumers += 1;
        for (int32_t i = p->n_nodes - 1; i >= 0; i--)
            if (p->nodes[i].live)
                for (int32_t j = 0; j < p->nodes[i].n_in; j++) {
                    p->nodes[p->nodes[i].in[j]].live = 1;
                    p->nodes[p->nodes[i].in[j]].consumers += 1;
                }
        for (int32_t i = 0; i < p->n_nodes && st == MPSCY_OK; i++)
            if (!p->nodes[i].live)
                st = FAIL(MPSCY_INVALID, "node %d (%s) does not contribute to the output", i, p->nodes[i].name);
    }
    p->n_params = cap_add(p->n_train, p->n_frozen);
    if (st == MPSCY_OK) st = plan_loss(p, component, err, errlen);
    if (st == MPSCY_OK) st = plan_optim(p, component, err, errlen);
    if (st != MPSCY_OK) {
        mpscy_plan_free(p);
        return st;
    }

    plan_gradients(p);
    /* Slab offsets: outputs, then needed gradients, then saved values; buffers after params. Each
     * output and gradient starts on 64 bytes (a whole number of 16 floats before it), so that
     * kernels' vector loads and stores (cuda's float4 Concatenate) find every tensor aligned and
     * no two tensors share a cache line. */
    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *n = &p->nodes[i];
        const int64_t floats = cap_mul(p->batch, n->size), room = floats < PLAN_CAP ? align16(floats) : floats;
        n->out = p->act_floats;
        p->act_floats = cap_add(p->act_floats, room);
        if (n->grad) {
            n->dout = p->grad_floats;
            p->grad_floats = cap_add(p->grad_floats, room);
        }
        n->save = p->save_floats;
        p->save_floats = cap_add(p->save_floats, n->save_size);
    }
    const int huge_params = cap_add(p->n_params, p->n_buffers) > PLAN_CAP;
    if (huge_params || p->act_floats > PLAN_CAP || p->grad_floats > PLAN_CAP || p->save_floats > PLAN_CAP) {
        mpscy_plan_free(p);
        return FAIL(MPSCY_OOM, "the model needs more than 2^56 floats of %s at batch %d",
                    huge_params ? "parameters" : "activations", d->batch);
    }
    for (int32_t t = 0; t < p->n_tensors; t++) {
        mpscy_tensor *pt = &p->tensors[t];
        if (pt->info.role == MPSCY_ROLE_BUFFER) pt->info.offset += p->n_params;
        else if (pt->info.role == MPSCY_ROLE_PARAM && !mpscy_tensor_trained(p, pt)) pt->info.offset += p->n_train;
    }
    /* Gradients of the trained parameters, readable after a TRAIN or GRAD step. */
    int32_t n_named = p->n_tensors;
    for (int32_t t = 0; t < n_named; t++) {
        if (!mpscy_tensor_trained(p, &p->tensors[t])) continue;
        mpscy_tensor *g = &p->tensors[p->n_tensors++];
        *g = p->tensors[t];
        char base[MPSCY_NAME_LEN];
        memcpy(base, p->tensors[t].info.name, MPSCY_NAME_LEN);
        snprintf(g->info.name, MPSCY_NAME_LEN, "%.56s.grad", base);
        g->info.role = MPSCY_ROLE_GRAD;
    }
    /* Optimizer state: flat slots over the trainable slab, then scalars. */
    for (int32_t s = 0; s < p->n_vec_slots; s++) {
        mpscy_tensor *t = &p->tensors[p->n_tensors++];
        memset(t, 0, sizeof *t);
        snprintf(t->info.name, MPSCY_NAME_LEN, "%s", p->vec_slots[s]);
        t->info.role = MPSCY_ROLE_OPTIM;
        t->info.dtype = MPSCY_F32;
        t->info.rank = p->vec_rank[s];
        t->info.shape[0] = p->vec_shape[s][0];
        t->info.shape[1] = p->vec_shape[s][1];
        t->info.count = mpscy_shape_count(t->info.rank, t->info.shape);
        t->info.offset = p->vec_offset[s];
        t->node = -1;
        t->slot = s;
    }
    for (int32_t s = 0; s < p->n_scalar_slots; s++) {
        mpscy_tensor *t = &p->tensors[p->n_tensors++];
        memset(t, 0, sizeof *t);
        snprintf(t->info.name, MPSCY_NAME_LEN, "%s", p->scalar_slots[s]);
        t->info.role = MPSCY_ROLE_OPTIM;
        t->info.dtype = s == 0 ? MPSCY_I64 : MPSCY_F64;
        t->info.rank = 0;
        t->info.count = 1;
        t->info.offset = s;
        t->node = -1;
        t->slot = p->n_vec_slots + s;
    }
    return MPSCY_OK;
}

void mpscy_plan_free(mpscy_plan *p) {
    free(p->nodes);
    free(p->tensors);
    free(p->class_weight);
    free(p->pos_weight);
    p->nodes = NULL;
    p->tensors = NULL;
    p->class_weight = p->pos_weight = NULL;
    p->loss.class_weight = p->loss.pos_weight = NULL;
}

size_t mpscy_plan_bytes(const mpscy_plan *p) {
    return (size_t)p->n_nodes * sizeof(mpscy_node) +
           (size_t)(8 * p->n_nodes + MPSCY_MAX_OPTIM_SLOTS + 4) * sizeof(mpscy_tensor) +
           ((p->class_weight ? (size_t)p->classes : 0) + (p->pos_weight ? (size_t)p->out_size : 0)) * sizeof(float);
}

const mpscy_tensor *mpscy_plan_tensor(const mpscy_plan *p, int32_t index, size_t bytes, int check_bytes,
                                      const char *component, char *err, size_t errlen, int *st) {
    if (index < 0 || index >= p->n_tensors) {
        *st = FAIL(MPSCY_INVALID, "tensor index %d outside 0..%d", index, p->n_tensors - 1);
        return NULL;
    }
    const mpscy_tensor *t = &p->tensors[index];
    size_t want = (size_t)t->info.count * (t->info.dtype == MPSCY_F32 ? 4 : 8);
    if (check_bytes && bytes != want) {
        *st = FAIL(MPSCY_SHAPE, "tensor '%s' holds %zu bytes, not %zu", t->info.name, want, bytes);
        return NULL;
    }
    *st = MPSCY_OK;
    return t;
}

int mpscy_plan_io_slot(const mpscy_plan *p, int32_t kind, int32_t index, int32_t *slot,
                       const char *component, char *err, size_t errlen) {
    int32_t ni = p->n_inputs;
    if (kind == MPSCY_IO_INPUT && index >= 0 && index < ni) *slot = index;
    else if (kind == MPSCY_IO_TARGET && index == 0) *slot = ni;
    else if (kind == MPSCY_IO_OUTPUT && index == 0) *slot = ni + 1;
    else if (kind == MPSCY_IO_INPUT_GRAD && index >= 0 && index < ni && p->input_grad) *slot = ni + 2 + index;
    else if (kind == MPSCY_IO_INPUT_GRAD)
        return FAIL(MPSCY_INVALID, "input gradients need a graph built with input_grad = 1 (index %d of %d inputs)", index, ni);
    else return FAIL(MPSCY_INVALID, "no io buffer of kind %d and index %d (graph has %d inputs)", kind, index, ni);
    return MPSCY_OK;
}

int32_t mpscy_node_tensor(const mpscy_plan *p, const mpscy_node *n, int32_t role, int32_t slot) {
    for (int32_t t = n->tensor0; t < n->tensor0 + n->n_tensors; t++)
        if (p->tensors[t].info.role == role && p->tensors[t].slot == slot) return t;
    return -1;
}
