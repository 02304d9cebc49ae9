/* optim_math.h — the per-element update rules of every first-order optimizer, written once and
 * included by the CPU (C) and CUDA (.cu) backends so both apply exactly PyTorch's published
 * algorithms (torch.optim, single-tensor form, same order of float32 operations). Per-step
 * scalars (bias corrections, step sizes) are computed once per step on the host by
 * mpscy_optim_coef_make (plus mpscy_nadam_coef for NAdam) and passed in by value.
 * L-BFGS is not an element rule: see objc/cpu/lbfgs.c. */
#ifndef MPSCY_OPTIM_MATH_H
#define MPSCY_OPTIM_MATH_H

#include <math.h>
#include <stdint.h>
#include "../mpscy.h"

#if defined(__CUDACC__)
#define MPSCY_HD __host__ __device__ __forceinline__
#else
#define MPSCY_HD static inline
#endif

/* Every product of the rules, rounded on its own as written. In device code nvcc would otherwise
 * contract a product and a sum that takes it (in one expression or across statements) into one
 * fused multiply-add (one rounding), by its own choice in each inlined copy of a rule: two
 * kernels, or two batches of one kernel, could give other bits for the same element. __fmul_rn
 * is never contracted. The host compilers see a plain product, and the cpu backend is built
 * with -ffp-contract=off (setup.py): its avx512f clone of the update loop (cpu.h's CPU_SIMD)
 * would otherwise contract, so its bits depended on the host's vector ISA. So both devices
 * take bit-identical steps from the same gradients (tested on the H200). */
#if defined(__CUDA_ARCH__)
#define MPSCY_MUL(a, b) __fmul_rn((a), (b))
#else
#define MPSCY_MUL(a, b) ((a) * (b))
#endif

/* Per-step coefficients shared by all elements of the slab. */
typedef struct mpscy_optim_coef {
    float lr, momentum, weight_decay;
    float beta2, eps;
    float step_size;          /* Adam: lr / (1 - beta1^t) */
    float bc2_sqrt;           /* Adam: sqrt(1 - beta2^t) */
    float decay;              /* decoupled weight decay: 1 - lr * weight_decay */
    int32_t first;            /* SGD: 1 while no momentum buffer exists (mpscy_optim_coef_make) */
    int32_t flags;            /* MPSCY_OPTIM_* */
    float alpha;              /* RMSprop smoothing constant */
    float rho;                /* Adadelta */
    float clr;                /* Adagrad: lr / (1 + (t - 1) * lr_decay) */
    float bc2;                /* NAdam: 1 - beta2^t */
    float nadam_g, nadam_m;   /* NAdam: coefficients of g / denom and m / denom (negative) */
    /* 1 - beta1, 1 - beta2, 1 - alpha, 1 - rho, 1 - dampening, each taken in double and then
     * rounded, as torch passes them (1.0f - beta2 from beta2 already rounded is 1.3e-5 off at
     * 0.999, 1e-4 at 0.9999, and Adam's square average drifts by as much); beta1 and dampening
     * enter the rules only so */
    float omb1, omb2, omalpha, omrho, omdamp;
} mpscy_optim_coef;

/* NAdam's momentum schedule: updates *mu_product (state, 1 before the first step) for step t
 * and fills the two addcdiv coefficients, as torch.optim.NAdam does in double precision. */
static inline void mpscy_nadam_coef(mpscy_optim_coef *c, const mpscy_optim_desc *o, const mpscy_step_args *a,
                                    int64_t t, double *mu_product) {
    double mu = a->beta1 * (1.0 - 0.5 * pow(0.96, (double)t * o->momentum_decay));
    double mu_next = a->beta1 * (1.0 - 0.5 * pow(0.96, (double)(t + 1) * o->momentum_decay));
    double prod = *mu_product * mu;
    c->nadam_g = (float)(-a->lr * (1.0 - mu) / (1.0 - prod));
    c->nadam_m = (float)(-a->lr * mu_next / (1.0 - prod * mu_next));
    *mu_product = prod;
}

/* Does the kind keep a running scalar in the state's slot 1 (scalars[1]) that a step advances
 * (mpscy_optim_coef_make)? NAdam's mu_product; SGD's momentum_started. */
static inline int mpscy_optim_has_running(const mpscy_optim_desc *o) {
    return o->kind == MPSCY_OPTIM_NADAM || o->kind == MPSCY_OPTIM_SGD;
}

/* Step t's coefficients (t: the step number being applied, 1 on the first update). *running is
 * the kind's running scalar (mpscy_optim_has_running: the state's scalars[1]), set to its value
 * after step t; the caller commits it only when the step is applied (on the cpu, which applies
 * every step it computes, it may point at the state itself). SGD, as torch.optim.SGD, makes its
 * momentum buffer (a copy of the gradient) at the first step whose momentum is not 0, not at
 * step 1, so momentum switched on later, with dampening, starts as torch's does:
 * momentum_started (0 or 1) says whether the buffer exists (torch's momentum_buffer is not None),
 * and the test is the element rule's own, in float (mpscy_sgd_elem). */
static inline mpscy_optim_coef mpscy_optim_coef_make(const mpscy_optim_desc *o, const mpscy_step_args *a,
                                                     int64_t t, double *running) {
    mpscy_optim_coef c;
    c.lr = (float)a->lr;
    c.momentum = (float)a->momentum;
    c.weight_decay = (float)a->weight_decay;
    c.beta2 = (float)a->beta2;
    c.eps = (float)o->eps;
    double bc1 = 1.0 - pow(a->beta1, (double)t), bc2 = 1.0 - pow(a->beta2, (double)t);
    c.step_size = (float)(a->lr / bc1);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.bc2 = (float)bc2;
    c.decay = (float)(1.0 - a->lr * a->weight_decay);
    c.first = o->kind == MPSCY_OPTIM_SGD && *running == 0.0;
    c.flags = o->flags;
    c.alpha = (float)o->alpha;
    c.rho = (float)o->rho;
    c.clr = (float)(a->lr / (1.0 + (double)(t - 1) * o->lr_decay));
    c.omb1 = (float)(1.0 - a->beta1);
    c.omb2 = (float)(1.0 - a->beta2);
    c.omalpha = (float)(1.0 - o->alpha);
    c.omrho = (float)(1.0 - o->rho);
    c.omdamp = (float)(1.0 - o->dampening);
    c.nadam_g = c.nadam_m = 0.0f;
    if (o->kind == MPSCY_OPTIM_NADAM) mpscy_nadam_coef(&c, o, a, t, running);
    if (o->kind == MPSCY_OPTIM_SGD && c.momentum != 0.0f) *running = 1.0;
    return c;
}

/* SGD: momentum (first step copies the gradient), dampening, nesterov, weight decay, maximize. */
MPSCY_HD void mpscy_sgd_elem(float *p, float *buf, float g, const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    if (c->weight_decay != 0.0f) g = g + MPSCY_MUL(c->weight_decay, *p);
    if (c->momentum != 0.0f) {
        float b = c->first ? g : MPSCY_MUL(c->momentum, *buf) + MPSCY_MUL(c->omdamp, g);
        *buf = b;
        g = (c->flags & MPSCY_OPTIM_NESTEROV) ? g + MPSCY_MUL(c->momentum, b) : b;
    }
    *p = *p - MPSCY_MUL(c->lr, g);
}

/* Adam and AdamW (decoupled decay when `decoupled`), amsgrad, maximize. */
MPSCY_HD void mpscy_adam_elem(float *p, float *m, float *v, float *vmax, float g,
                              const mpscy_optim_coef *c, int decoupled) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    float x = *p;
    if (decoupled) x = MPSCY_MUL(x, c->decay);
    else if (c->weight_decay != 0.0f) g = g + MPSCY_MUL(c->weight_decay, x);
    float mm = *m + MPSCY_MUL(c->omb1, g - *m);
    float vv = MPSCY_MUL(c->beta2, *v) + MPSCY_MUL(MPSCY_MUL(c->omb2, g), g);
    *m = mm;
    *v = vv;
    if (c->flags & MPSCY_OPTIM_AMSGRAD) {
        vv = vmax[0] > vv ? vmax[0] : vv;
        vmax[0] = vv;
    }
    float denom = sqrtf(vv) / c->bc2_sqrt + c->eps;
    *p = x - MPSCY_MUL(c->step_size, mm / denom);
}

/* RMSprop: square average with smoothing alpha, centered variant (grad_avg), momentum buffer
 * (used while the step's momentum > 0), weight decay, maximize. */
MPSCY_HD void mpscy_rmsprop_elem(float *p, float *sq, float *buf, float *gavg, float g,
                                 const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    if (c->weight_decay != 0.0f) g = g + MPSCY_MUL(c->weight_decay, *p);
    float s = MPSCY_MUL(c->alpha, *sq) + MPSCY_MUL(MPSCY_MUL(c->omalpha, g), g);
    *sq = s;
    float avg;
    if (c->flags & MPSCY_OPTIM_CENTERED) {
        float ga = *gavg + MPSCY_MUL(c->omalpha, g - *gavg);
        *gavg = ga;
        avg = sqrtf(s - MPSCY_MUL(ga, ga));
    } else {
        avg = sqrtf(s);
    }
    avg = avg + c->eps;
    if (c->momentum > 0.0f) {
        float b = MPSCY_MUL(c->momentum, *buf) + g / avg;
        *buf = b;
        *p = *p - MPSCY_MUL(c->lr, b);
    } else {
        *p = *p - MPSCY_MUL(c->lr, g / avg);
    }
}

/* Adagrad: accumulated squares (state starts at initial_accumulator_value), decayed lr, eps. */
MPSCY_HD void mpscy_adagrad_elem(float *p, float *sum, float g, const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    if (c->weight_decay != 0.0f) g = g + MPSCY_MUL(c->weight_decay, *p);
    float s = *sum + MPSCY_MUL(g, g);
    *sum = s;
    *p = *p - MPSCY_MUL(c->clr, g / (sqrtf(s) + c->eps));
}

/* Adadelta: square average and accumulated delta with rho, eps inside both square roots. */
MPSCY_HD void mpscy_adadelta_elem(float *p, float *sq, float *acc, float g, const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    if (c->weight_decay != 0.0f) g = g + MPSCY_MUL(c->weight_decay, *p);
    float s = MPSCY_MUL(c->rho, *sq) + MPSCY_MUL(MPSCY_MUL(c->omrho, g), g);
    *sq = s;
    float std = sqrtf(s + c->eps);
    float delta = MPSCY_MUL(sqrtf(*acc + c->eps) / std, g);
    *acc = MPSCY_MUL(c->rho, *acc) + MPSCY_MUL(MPSCY_MUL(c->omrho, delta), delta);
    *p = *p - MPSCY_MUL(c->lr, delta);
}

/* NAdam: Adam moments with the momentum-decay schedule (coefficients from mpscy_nadam_coef),
 * L2 or decoupled weight decay, maximize. */
MPSCY_HD void mpscy_nadam_elem(float *p, float *m, float *v, float g, const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    float x = *p;
    if (c->weight_decay != 0.0f) {
        if (c->flags & MPSCY_OPTIM_DECOUPLED_WD) x = MPSCY_MUL(x, c->decay);
        else g = g + MPSCY_MUL(c->weight_decay, x);
    }
    float mm = *m + MPSCY_MUL(c->omb1, g - *m);
    float vv = MPSCY_MUL(c->beta2, *v) + MPSCY_MUL(MPSCY_MUL(c->omb2, g), g);
    *m = mm;
    *v = vv;
    float denom = sqrtf(vv / c->bc2) + c->eps;
    x = x + MPSCY_MUL(c->nadam_g, g / denom);
    *p = x + MPSCY_MUL(c->nadam_m, mm / denom);
}

#endif /* MPSCY_OPTIM_MATH_H */
