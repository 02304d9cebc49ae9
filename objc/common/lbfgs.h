/* lbfgs.h — one MPSCY_MODE_LBFGS call, shared by the backends. mpscy_lbfgs_run is the order of a
 * call's parts (mpscy.h's lbfgs_ops) and its undo rule, written once; the parts are a backend's.
 * Backends whose slabs the host can read and write (cpu, metal) take the host's parts too: they
 * fill an mpscy_lbfgs_host with their slab pointers and two callbacks and hand each call to
 * mpscy_lbfgs_call. cuda's parts run on its stream (cuda/lbfgs.cu). */
#ifndef MPSCY_LBFGS_H
#define MPSCY_LBFGS_H

#include "plan.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The parts of one call, each returning an MPSCY status with its message in err (which is NULL
 * when the call already fails with a message of its own). */
typedef struct mpscy_lbfgs_parts {
    int (*restore)(void *ctx, char *err, size_t n);  /* the state BEGIN saved, back */
    int (*save)(void *ctx, char *err, size_t n);     /* BEGIN: what an undo restores */
    int (*set_base)(void *ctx, char *err, size_t n); /* base = params */
    int (*step_to)(void *ctx, double t, char *err, size_t n);  /* params = base + t * d */
    /* d from the gradient in register a->lbfgs_flat_reg and the history, then prev_flat_grad;
     * fills r->lbfgs_gtd and r->lbfgs_d_max */
    int (*direction)(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);
    /* forward, loss and backward at params (plus the L2 term), the gradient into register
     * a->lbfgs_reg; fills loss, correct, grad_norm, finite and the lbfgs_*_new results */
    int (*evaluate)(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);
    int (*finish)(void *ctx, char *err, size_t n);   /* NULL, or: wait for the call's work */
} mpscy_lbfgs_parts;

/* Runs the bits of a->lbfgs_ops in mpscy.h's order (rollback, begin, finalize, direction, move,
 * evaluate); a failed or non-finite evaluation restores what BEGIN saved before returning. */
int mpscy_lbfgs_run(const mpscy_lbfgs_parts *parts, void *ctx, const mpscy_plan *plan, double *scalars,
                    const char *component, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);

typedef struct mpscy_lbfgs_host {
    const mpscy_plan *plan;
    float *params;     /* (n_params) parameters, the n_train trainable ones first */
    float *buffers;    /* (n_buffers) running statistics, may be NULL when there are none */
    float *grads;      /* (n_train) gradients written by forward_backward (more on cuda and metal) */
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

#ifdef __cplusplus
}
#endif

#endif /* MPSCY_LBFGS_H */
