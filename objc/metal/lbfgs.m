/* lbfgs.m — Metal's side of torch.optim.LBFGS: the vector half is objc/common/lbfgs.c, run on
 * the host over the shared parameter, gradient and optimizer slabs (unified memory: no copy);
 * each evaluation is one train executable run with the update off, and keeping its running
 * statistics is a flip of the ping-pong parity. */
#import "metal.h"
#include "../common/lbfgs.h"

#include <math.h>

static int forward_backward(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    metal_graph *g = ctx;
    const mpscy_plan *p = &g->plan;
    double mu_next = 0.0;
    int st = metal_run_train(g, a, 0, 1, (int64_t)g->scalars[0] + 1, &mu_next, err, n);
    if (st != MPSCY_OK) return st;
    r->loss = g->stats[METAL_S_LOSS];
    r->correct = p->loss.accuracy == MPSCY_ACCURACY_NONE ? -1 : (int64_t)g->stats[METAL_S_CORRECT];
    r->grad_norm = g->stats[METAL_S_NORM];
    r->finite = isfinite(r->loss) && g->stats[METAL_S_FINITE] > 0.5f;
    return MPSCY_OK;
}

/* the executable wrote the new running statistics into the other slab: make it current */
static void commit(void *ctx, const mpscy_step_args *a) {
    (void)a;
    ((metal_graph *)ctx)->parity ^= 1;
}

int metal_lbfgs_step(metal_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    MetalGraphState *st = metal_state(g);
    id<MTLBuffer> buffers = g->parity ? st.buffers1 : st.buffers0;  /* the current running statistics */
    mpscy_lbfgs_host h = {&g->plan, st.params0.contents, buffers ? buffers.contents : NULL, st.grads.contents,
                          st.optim0.contents, g->scalars, forward_backward, commit, g, METAL_C};
    return mpscy_lbfgs_call(&h, a, r, err, n);
}
