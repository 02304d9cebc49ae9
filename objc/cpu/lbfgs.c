/* lbfgs.c — the CPU's side of L-BFGS: its slabs and evaluation handed to the shared vector half
 * in common/lbfgs.c (which runs the direction, moves, save and undo over the flat slab). */
#include "cpu.h"
#include "../common/lbfgs.h"

static int forward_backward(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    (void)err; (void)n;
    cpu_forward_backward((cpu_graph *)ctx, a, r);
    return MPSCY_OK;
}

static void commit(void *ctx, const mpscy_step_args *a) {
    cpu_graph *g = ctx;
    for (int32_t i = 0; i < g->plan.n_nodes; i++)
        if (cpu_layers[g->plan.nodes[i].kind].commit) cpu_layers[g->plan.nodes[i].kind].commit(g, &g->plan.nodes[i], a->batch);
}

int cpu_lbfgs_step(cpu_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    mpscy_lbfgs_host h = {&g->plan, g->params, g->params + g->plan.n_params, g->grads, g->optim, g->scalars,
                          forward_backward, commit, g, CPU};
    return mpscy_lbfgs_call(&h, a, r, err, n);
}
