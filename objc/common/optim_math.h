/* optim_math.h — the per-element update rules of every optimizer, written once and included by
 * the CPU (C) and CUDA (.cu) backends so both apply exactly PyTorch's published algorithms
 * (torch.optim, single-tensor form). Per-step scalars (bias corrections, step sizes) are
 * computed once per step on the host by mpscy_optim_coef and passed in by value. */
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

/* Per-step coefficients shared by all elements of the slab. */
typedef struct mpscy_optim_coef {
    float lr, momentum, dampening, weight_decay;
    float beta1, beta2, eps;
    float step_size;          /* Adam: lr / (1 - beta1^t) */
    float bc2_sqrt;           /* Adam: sqrt(1 - beta2^t) */
    float decay;              /* AdamW: 1 - lr * weight_decay */
    int32_t first;            /* 1 on the first applied step (t == 1) */
    int32_t flags;            /* MPSCY_OPTIM_* */
} mpscy_optim_coef;

/* t is the step number being applied (1 on the first update). */
static inline mpscy_optim_coef mpscy_optim_coef_make(const mpscy_optim_desc *o, const mpscy_step_args *a,
                                                     int64_t t) {
    mpscy_optim_coef c;
    c.lr = (float)a->lr;
    c.momentum = (float)a->momentum;
    c.dampening = (float)o->dampening;
    c.weight_decay = (float)a->weight_decay;
    c.beta1 = (float)a->beta1;
    c.beta2 = (float)a->beta2;
    c.eps = (float)o->eps;
    double bc1 = 1.0 - pow(a->beta1, (double)t), bc2 = 1.0 - pow(a->beta2, (double)t);
    c.step_size = (float)(a->lr / bc1);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.decay = (float)(1.0 - a->lr * a->weight_decay);
    c.first = t == 1;
    c.flags = o->flags;
    return c;
}

/* SGD: momentum (first step copies the gradient), dampening, nesterov, weight decay, maximize. */
MPSCY_HD void mpscy_sgd_elem(float *p, float *buf, float g, const mpscy_optim_coef *c) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    if (c->weight_decay != 0.0f) g = g + c->weight_decay * *p;
    if (c->momentum != 0.0f) {
        float b = c->first ? g : c->momentum * *buf + (1.0f - c->dampening) * g;
        *buf = b;
        g = (c->flags & MPSCY_OPTIM_NESTEROV) ? g + c->momentum * b : b;
    }
    *p = *p - c->lr * g;
}

/* Adam and AdamW (decoupled decay when `decoupled`), amsgrad, maximize. */
MPSCY_HD void mpscy_adam_elem(float *p, float *m, float *v, float *vmax, float g,
                              const mpscy_optim_coef *c, int decoupled) {
    if (c->flags & MPSCY_OPTIM_MAXIMIZE) g = -g;
    float x = *p;
    if (decoupled) x = x * c->decay;
    else if (c->weight_decay != 0.0f) g = g + c->weight_decay * x;
    float mm = *m + (1.0f - c->beta1) * (g - *m);
    float vv = c->beta2 * *v + (1.0f - c->beta2) * g * g;
    *m = mm;
    *v = vv;
    if (c->flags & MPSCY_OPTIM_AMSGRAD) {
        vv = vmax[0] > vv ? vmax[0] : vv;
        vmax[0] = vv;
    }
    float denom = sqrtf(vv) / c->bc2_sqrt + c->eps;
    *p = x - c->step_size * (mm / denom);
}

#endif /* MPSCY_OPTIM_MATH_H */
