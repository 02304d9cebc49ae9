/* step.c — one CPU training step and one predict batch, each a single pass over the planned
 * graph: forward, loss (with its gradient), backward, norm and finiteness check, clipping,
 * optimizer update, commit of deferred layer state. It allocates nothing; a non-finite loss
 * or gradient returns before any parameter, buffer or optimizer state is touched. */
#include "cpu.h"

#include <math.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CPU, __VA_ARGS__)

static int check_args(const cpu_graph *g, const mpscy_step_args *a, char *err, size_t n) {
    if (a->batch < 1 || a->batch > g->plan.batch)
        return FAIL(MPSCY_SHAPE, "batch of %d rows outside 1..%d (the built batch size)", a->batch, g->plan.batch);
    if (a->mode != MPSCY_MODE_TRAIN && a->mode != MPSCY_MODE_EVAL && a->mode != MPSCY_MODE_GRAD &&
        a->mode != MPSCY_MODE_LBFGS)
        return FAIL(MPSCY_INVALID, "unknown step mode %d", a->mode);
    int lbfgs = g->plan.optim.kind == MPSCY_OPTIM_LBFGS;
    if (lbfgs && a->mode == MPSCY_MODE_TRAIN)
        return FAIL(MPSCY_INVALID, "an LBFGS step is a sequence of MPSCY_MODE_LBFGS calls, not one TRAIN call");
    if (!lbfgs && a->mode == MPSCY_MODE_LBFGS)
        return FAIL(MPSCY_INVALID, "MPSCY_MODE_LBFGS needs a graph built with the LBFGS optimizer");
    return MPSCY_OK;
}

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
    r->grad_norm = cpu_grad_norm(g->pool, g->grads, p->n_params);
    r->finite = isfinite(r->loss) && isfinite(r->grad_norm);
}

int cpu_graph_step(mpscy_graph gh, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    cpu_graph *g = (cpu_graph *)gh;
    const mpscy_plan *p = &g->plan;
    int st = check_args(g, a, err, n);
    if (st != MPSCY_OK) return st;
    int64_t b = a->batch;
    const void *target = g->io_bufs[p->n_inputs].host;
    if (p->target == MPSCY_TARGET_INDEX) {
        int64_t bad = cpu_check_labels(target, b, p->out_size);
        if (bad >= 0)
            return FAIL(MPSCY_INVALID, "label %d at row %lld outside [0, %lld)", ((const int32_t *)target)[bad],
                        (long long)bad, (long long)p->out_size);
    }
    memset(r, 0, sizeof *r);
    if (a->mode == MPSCY_MODE_LBFGS) return cpu_lbfgs_step(g, a, r, err, n);
    if (a->mode == MPSCY_MODE_EVAL) {
        forward(g, b, 0, a);
        r->loss = cpu_loss(p, NULL, g->y[p->output], target, b, &r->correct);
        r->finite = isfinite(r->loss);
        return MPSCY_OK;
    }

    cpu_forward_backward(g, a, r);
    if (!r->finite)
        return FAIL(MPSCY_NONFINITE, "loss %g, gradient norm %g: not finite, update skipped", r->loss, r->grad_norm);
    if (a->mode == MPSCY_MODE_GRAD) return MPSCY_OK;

    cpu_clip(g->grads, p->n_params, r->grad_norm, &p->optim);
    cpu_optim_update(g, a);
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (cpu_layers[p->nodes[i].kind].commit) cpu_layers[p->nodes[i].kind].commit(g, &p->nodes[i], b);
    r->applied = 1;
    return MPSCY_OK;
}

int cpu_graph_predict(mpscy_graph gh, const mpscy_step_args *a, char *err, size_t n) {
    cpu_graph *g = (cpu_graph *)gh;
    const mpscy_plan *p = &g->plan;
    if (a->batch < 1 || a->batch > p->batch)
        return FAIL(MPSCY_SHAPE, "batch of %d rows outside 1..%d (the built batch size)", a->batch, p->batch);
    forward(g, a->batch, 0, a);
    memcpy(g->io_bufs[p->n_inputs + 1].host, g->y[p->output], (size_t)a->batch * p->out_size * sizeof(float));
    return MPSCY_OK;
}
