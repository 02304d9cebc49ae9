/* lbfgs.h — the shared vector half of L-BFGS for backends whose slabs the host can read and
 * write (cpu, metal). A backend fills an mpscy_lbfgs_host with its slab pointers and two
 * callbacks and hands each MPSCY_MODE_LBFGS call to mpscy_lbfgs_call. */
#ifndef MPSCY_LBFGS_H
#define MPSCY_LBFGS_H

#include "plan.h"

typedef struct mpscy_lbfgs_host {
    const mpscy_plan *plan;
    float *params;     /* (n_params) trainable parameters */
    float *buffers;    /* (n_buffers) running statistics, may be NULL when there are none */
    float *grads;      /* (n_params) gradients written by forward_backward */
    float *optim;      /* (optim_floats) the L-BFGS slots of plan->lbfgs */
    double *scalars;   /* the optimizer scalars (MPSCY_LBFGS_S_*) */
    /* forward, loss and backward at params into grads; fills loss, correct, grad_norm, finite */
    int (*forward_backward)(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);
    /* keeps the running statistics of the last (finite) evaluation */
    void (*commit)(void *ctx, const mpscy_step_args *a);
    void *ctx;
    const char *component;  /* "cpu", "metal": the error prefix */
} mpscy_lbfgs_host;

int mpscy_lbfgs_call(const mpscy_lbfgs_host *h, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);

#endif /* MPSCY_LBFGS_H */
