/* step.c — one CPU training step and one predict batch, each a single pass over the planned
 * graph: forward, loss (with its gradient), backward, norm and finiteness check, clipping,
 * optimizer update, commit of deferred layer state. It allocates nothing; a non-finite loss
 * or gradient returns before any parameter, buffer or optimizer state is touched. */
#include "cpu.h"

#include <math.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CPU, __VA_ARGS__)

static void forward(cpu_graph *g, int64_t b, int train, const mpscy_step_args *a) {
    const mpscy_plan *p = &g->plan;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind != MPSCY_LAYER_INPUT) cpu_layers[p->nodes[i].kind].forward(g, &p->nodes[i], b, train, a);
}

static void backward(cpu_graph *g, int64_t b) {
    const mpscy_plan *p = &g->plan;
    for (int32_t i = p->n_nodes - 1; i >= 0; i--)
        if (p->nodes[i].grad && p->nodes[i].kind != MPSCY_LAYER_INPUT)
            cpu_layers[p->nodes[i].kind].backward(g, &p->nodes[i], b);
}

void cpu_forward_backward(cpu_graph *g, const mpscy_step_args *a, mpscy_step_result *r) {
    const mpscy_plan *p = &g->plan;
    int64_t b = a->batch;
    forward(g, b, 1, a);
    r->loss = cpu_loss(p, g->dy[p->output], g->y[p->output], g->io_bufs[p->n_inputs].host, b, &r->correct);
    backward(g, b);
    r->grad_norm = cpu_grad_norm(g->pool, g->grads, p->n_train);
    r->finite = isfinite(r->loss) && isfinite(r->grad_norm);
}

int cpu_graph_step(mpscy_graph gh, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    cpu_graph *g = (cpu_graph *)gh;
    const mpscy_plan *p = &g->plan;
    int64_t b = a->batch;  /* rows, mode and labels checked by the dispatcher */
    const void *target = g->io_bufs[p->n_inputs].host;
    if (a->mode == MPSCY_MODE_LBFGS) return cpu_lbfgs_step(g, a, r, err, n);
    if (a->mode == MPSCY_MODE_EVAL) {
        forward(g, b, 0, a);
        r->loss = cpu_loss(p, NULL, g->y[p->output], target, b, &r->correct);
        r->finite = isfinite(r->loss);
        return MPSCY_OK;
    }

    cpu_forward_backward(g, a, r);
    if (!r->finite)
        return MPSCY_FAIL_NONFINITE(err, n, CPU, a->mode, r);
    if (a->mode == MPSCY_MODE_GRAD) return MPSCY_OK;

    cpu_clip(g->grads, p->n_train, r->grad_norm, &p->optim);
    cpu_optim_update(g, a);
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (cpu_layers[p->nodes[i].kind].commit) cpu_layers[p->nodes[i].kind].commit(g, &p->nodes[i], b);
    r->applied = 1;
    return MPSCY_OK;
}

int cpu_graph_predict(mpscy_graph gh, const mpscy_step_args *a, char *err, size_t n) {
    cpu_graph *g = (cpu_graph *)gh;
    const mpscy_plan *p = &g->plan;
    forward(g, a->batch, 0, a);  /* rows checked by the dispatcher */
    memcpy(g->io_bufs[p->n_inputs + 1].host, g->y[p->output], (size_t)a->batch * p->out_size * sizeof(float));
    return MPSCY_OK;
}
