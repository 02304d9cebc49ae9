/* optim.c — everything after backward on the CPU: the global gradient norm (also the
 * finiteness test), clipping by norm or value, and every first-order optimizer as one loop
 * over the flat parameter slab using the shared element rules of common/optim_math.h.
 * L-BFGS, which is not an element rule, lives in lbfgs.c. */
#include "cpu.h"
#include "../common/optim_math.h"

#include <math.h>

double cpu_grad_norm(const float *grads, int64_t n) {
    /* Double accumulation cannot overflow for finite float32 inputs, so the result is finite
     * exactly when every gradient is. Four partial sums let the compiler vectorize. */
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)grads[i] * grads[i];
        s1 += (double)grads[i + 1] * grads[i + 1];
        s2 += (double)grads[i + 2] * grads[i + 2];
        s3 += (double)grads[i + 3] * grads[i + 3];
    }
    for (; i < n; i++) s0 += (double)grads[i] * grads[i];
    return sqrt((s0 + s1) + (s2 + s3));
}

void cpu_clip(float *grads, int64_t n, double norm, const mpscy_optim_desc *o) {
    if (o->clip_grad_norm > 0) {
        /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
        double coef = o->clip_grad_norm / (norm + 1e-6);
        if (coef < 1.0) {
            float c = (float)coef;
            for (int64_t i = 0; i < n; i++) grads[i] *= c;
        }
    }
    if (o->clip_grad_value > 0) {
        float v = (float)o->clip_grad_value;
        for (int64_t i = 0; i < n; i++) grads[i] = grads[i] > v ? v : (grads[i] < -v ? -v : grads[i]);
    }
}

int cpu_optim_supported(int32_t kind) {
    return kind >= MPSCY_OPTIM_SGD && kind <= MPSCY_OPTIM_LBFGS;
}

/* One pass of the kind's element rule over the flat slab; t counts applied steps from 1. */
void cpu_optim_update(cpu_graph *g, const mpscy_step_args *a) {
    const mpscy_plan *p = &g->plan;
    int64_t n = p->n_params, t = (int64_t)g->scalars[0] + 1;
    mpscy_optim_coef c = mpscy_optim_coef_make(&p->optim, a, t);
    /* the kind's slots, in plan order; absent slots stay NULL */
    float *w = g->params, *gr = g->grads, *s0 = g->optim + p->vec_offset[0];
    float *s1 = p->n_vec_slots > 1 ? g->optim + p->vec_offset[1] : NULL;
    float *s2 = p->n_vec_slots > 2 ? g->optim + p->vec_offset[2] : NULL;
    switch (p->optim.kind) {
    case MPSCY_OPTIM_SGD:
        for (int64_t i = 0; i < n; i++) mpscy_sgd_elem(&w[i], &s0[i], gr[i], &c);
        break;
    case MPSCY_OPTIM_ADAM:
    case MPSCY_OPTIM_ADAMW: {
        int decoupled = p->optim.kind == MPSCY_OPTIM_ADAMW || (c.flags & MPSCY_OPTIM_DECOUPLED_WD);
        if (c.flags & MPSCY_OPTIM_AMSGRAD)
            for (int64_t i = 0; i < n; i++) mpscy_adam_elem(&w[i], &s0[i], &s1[i], &s2[i], gr[i], &c, decoupled);
        else
            for (int64_t i = 0; i < n; i++) mpscy_adam_elem(&w[i], &s0[i], &s1[i], NULL, gr[i], &c, decoupled);
        break;
    }
    case MPSCY_OPTIM_RMSPROP:  /* square_avg, momentum_buffer[, grad_avg] */
        if (s2)
            for (int64_t i = 0; i < n; i++) mpscy_rmsprop_elem(&w[i], &s0[i], &s1[i], &s2[i], gr[i], &c);
        else
            for (int64_t i = 0; i < n; i++) mpscy_rmsprop_elem(&w[i], &s0[i], &s1[i], NULL, gr[i], &c);
        break;
    case MPSCY_OPTIM_ADAGRAD:  /* sum */
        for (int64_t i = 0; i < n; i++) mpscy_adagrad_elem(&w[i], &s0[i], gr[i], &c);
        break;
    case MPSCY_OPTIM_ADADELTA:  /* square_avg, acc_delta */
        for (int64_t i = 0; i < n; i++) mpscy_adadelta_elem(&w[i], &s0[i], &s1[i], gr[i], &c);
        break;
    case MPSCY_OPTIM_NADAM:  /* exp_avg, exp_avg_sq; scalars[1] = mu_product */
        mpscy_nadam_coef(&c, &p->optim, a, t, &g->scalars[1]);
        for (int64_t i = 0; i < n; i++) mpscy_nadam_elem(&w[i], &s0[i], &s1[i], gr[i], &c);
        break;
    default:
        return;  /* LBFGS never comes here: it runs through MPSCY_MODE_LBFGS (lbfgs.c) */
    }
    g->scalars[0] = (double)t;
}
