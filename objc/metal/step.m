/* step.m — one Metal training step and one predict batch, each a single command buffer: the
 * host writes the per-step scalars (learning rate, betas, bias corrections, the apply flag)
 * and the dropout masks into shared buffers, encodes the cached executable, commits and waits,
 * then reads loss, correct count, gradient norm and the finite flag from the shared stats
 * buffer. Same checks, results and messages as objc/cpu/step.c. It allocates no buffer; only
 * a batch size not seen before compiles (once) its executable. */
#import "metal.h"
#include "../common/optim_math.h"

#include <math.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), METAL_C, __VA_ARGS__)

/* Encodes x for the current parity into one command buffer, commits and waits. */
static int run(metal_graph *g, MetalExec *x, const char *what, char *err, size_t n) {
    MetalGraphState *st = metal_state(g);
    @try {
        MPSCommandBuffer *cb = [MPSCommandBuffer commandBufferFromCommandQueue:st.queue];
        if (!cb) return FAIL(MPSCY_DEVICE, "%s: could not create a command buffer", what);
        [x.exe encodeToCommandBuffer:cb inputsArray:x.feeds[(NSUInteger)g->parity]
                        resultsArray:x.results[(NSUInteger)g->parity] executionDescriptor:nil];
        [cb commit];
        [cb waitUntilCompleted];
        return metal_check_command_buffer(cb, cb.rootCommandBuffer, what, err, n);
    } @catch (NSException *e) {
        return FAIL(MPSCY_DEVICE, "%s: %s", what, metal_exception_text(e));
    }
}

int metal_run_train(metal_graph *g, const mpscy_step_args *a, int apply, int commit, int64_t t,
                    double *mu_next, char *err, size_t n) {
    @autoreleasepool {
        MetalExec *x = nil;
        int st = metal_exec_get(g, METAL_TRAIN, a->batch, &x, err, n);
        if (st != MPSCY_OK) return st;
        metal_optim_hyper(g->hyper, &g->plan.optim, a, t, apply, g->scalars[1], mu_next);
        g->hyper[METAL_H_COMMIT] = commit ? 1.0f : 0.0f;
        metal_dropout_masks(g, a, a->batch);
        return run(g, x, apply ? "train step" : "gradient step", err, n);
    }
}

int metal_graph_step(mpscy_graph gh, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    metal_graph *g = (metal_graph *)gh;
    const mpscy_plan *p = &g->plan;
    int st;
    int64_t b = a->batch;  /* rows, mode and labels checked by the dispatcher */
    if (a->mode == MPSCY_MODE_LBFGS) return metal_lbfgs_step(g, a, r, err, n);

    if (a->mode == MPSCY_MODE_EVAL) {
        @autoreleasepool {
            MetalExec *x = nil;
            st = metal_exec_get(g, METAL_EVAL, b, &x, err, n);
            if (st == MPSCY_OK) st = run(g, x, "eval step", err, n);
            if (st != MPSCY_OK) return st;
        }
        r->loss = g->stats[METAL_S_LOSS];
        r->correct = p->loss.accuracy == MPSCY_ACCURACY_NONE ? -1 : (int64_t)g->stats[METAL_S_CORRECT];
        r->finite = isfinite(r->loss);
        return MPSCY_OK;
    }

    int train = a->mode == MPSCY_MODE_TRAIN;
    int64_t t = (int64_t)g->scalars[0] + 1;
    double mu_next = g->scalars[1];
    st = metal_run_train(g, a, train, train, t, &mu_next, err, n);
    if (st != MPSCY_OK) return st;
    r->loss = g->stats[METAL_S_LOSS];
    r->correct = p->loss.accuracy == MPSCY_ACCURACY_NONE ? -1 : (int64_t)g->stats[METAL_S_CORRECT];
    r->grad_norm = g->stats[METAL_S_NORM];
    r->finite = isfinite(r->loss) && g->stats[METAL_S_FINITE] > 0.5f;
    if (!r->finite)
        return MPSCY_FAIL_NONFINITE(err, n, METAL_C, a->mode, r);
    if (!train) return MPSCY_OK;
    /* the executable wrote the updated state into the other slabs: they become current */
    g->parity ^= 1;
    g->scalars[0] = (double)t;
    if (mpscy_optim_has_running(&p->optim)) g->scalars[1] = mu_next;   /* mpscy_optim_coef_make */
    r->applied = 1;
    return MPSCY_OK;
}

int metal_graph_predict(mpscy_graph gh, const mpscy_step_args *a, char *err, size_t n) {
    metal_graph *g = (metal_graph *)gh;  /* rows checked by the dispatcher */
    @autoreleasepool {
        MetalExec *x = nil;
        int st = metal_exec_get(g, METAL_PREDICT, a->batch, &x, err, n);
        if (st != MPSCY_OK) return st;
        /* the output is a result bound to the shared output buffer: no copy follows */
        return run(g, x, "predict", err, n);
    }
}
