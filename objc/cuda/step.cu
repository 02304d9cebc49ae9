/* step.cu — a CUDA step is one graph launch and one synchronization. At build, each kind of
 * step (train, eval, gradients, predict) is recorded at the built batch into a CUDA graph:
 * staging copy, forward, loss, backward, norm, clip, update, commit. Per-step values travel in
 * the pinned params block the graph copies first, so schedules never re-capture. A partial
 * batch runs the same kernels launched directly over exactly its rows. Whether an update is
 * applied is decided on the device (the optimizer reads a flag), and the result comes back
 * through pinned memory the kernels write. */
#include "cuda.h"

#include <math.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CU, __VA_ARGS__)

int cu_fork(cu_graph *g, char *err, size_t en) {
    CU_TRY(cudaEventRecord(g->fork, g->stream), "fork event");
    CU_TRY(cudaStreamWaitEvent(g->side, g->fork, 0), "side stream wait");
    g->forked = 1;
    return MPSCY_OK;
}

int cu_join(cu_graph *g, char *err, size_t en) {
    if (!g->forked) return MPSCY_OK;
    g->forked = 0;
    CU_TRY(cudaEventRecord(g->join, g->side), "join event");
    CU_TRY(cudaStreamWaitEvent(g->stream, g->join, 0), "main stream wait");
    return MPSCY_OK;
}

/* Everything one step does, enqueued on g->stream (inside a capture). */
static int enqueue(cu_graph *g, int kind, int64_t b, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    cudaStream_t s = g->stream;
    int st;
    /* params block, target and the first input's rows in one copy; other inputs after */
    size_t first = p->n_inputs > 0 ? g->off_input[0] : g->off_target;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_INPUT) {
            size_t rows = (size_t)b * p->nodes[i].size * sizeof(float), o = g->off_input[p->nodes[i].input_index];
            if (p->nodes[i].input_index == 0) first = o + rows;
            else CU_TRY(cudaMemcpyAsync(g->stage_d + o, g->stage_h + o, rows, cudaMemcpyHostToDevice, s), "input copy");
        }
    if (kind == CU_KIND_TRAIN && g->fu) return cu_fused_step(g, b, first, err, en);  /* copies the staging itself */
    CU_TRY(cudaMemcpyAsync(g->stage_d, g->stage_h, first, cudaMemcpyHostToDevice, s), "staging copy");

    int train = kind == CU_KIND_TRAIN || kind == CU_KIND_GRAD;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT) continue;
        if ((st = cu_layers[node->kind].forward(g, node, b, train, err, en)) != MPSCY_OK) return st;
    }
    if (kind == CU_KIND_PREDICT) {
        CU_TRY(cudaMemcpyAsync(g->out_h, g->y[p->output], (size_t)b * p->out_size * sizeof(float),
                               cudaMemcpyDeviceToHost, s), "output copy");
        return MPSCY_OK;
    }
    if ((st = cu_loss(g, train ? g->dy[p->output] : NULL, b, !train, err, en)) != MPSCY_OK) return st;
    if (!train) return MPSCY_OK;

    g->forked = 0;
    for (int32_t i = p->n_nodes - 1; i >= 0; i--) {
        const mpscy_node *node = &p->nodes[i];
        if (!node->grad || node->kind == MPSCY_LAYER_INPUT) continue;
        if ((st = cu_layers[node->kind].backward(g, node, b, err, en)) != MPSCY_OK) return st;
    }
    if ((st = cu_join(g, err, en)) != MPSCY_OK) return st;
    if ((st = cu_norm_and_update(g, kind == CU_KIND_TRAIN, err, en)) != MPSCY_OK) return st;
    if (kind == CU_KIND_GRAD) return MPSCY_OK;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (cu_layers[p->nodes[i].kind].commit &&
            (st = cu_layers[p->nodes[i].kind].commit(g, &p->nodes[i], b, 0, err, en)) != MPSCY_OK)
            return st;
    return MPSCY_OK;
}

void cu_cache_clear(cu_graph *g) {
    for (int k = 0; k < CU_KINDS; k++)
        if (g->exec[k]) {
            cudaGraphExecDestroy(g->exec[k]);
            mpscy_count_free(&g->base.dev->stats, 0);
            g->exec[k] = NULL;
        }
}

/* Records the step of `kind` at the built batch into a CUDA graph (at build: a capture counts
 * as one allocation in the device's stats, and no step ever captures). */
int cu_capture(cu_graph *g, int kind, char *err, size_t en) {
    g->gws_used = g->gcount_used = 0;
    memset(g->dz_ready, 0, (size_t)g->plan.n_nodes);
    CU_TRY(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    int st = enqueue(g, kind, g->plan.batch, err, en);
    if (st != MPSCY_OK && g->forked) cu_join(g, NULL, 0);
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(g->stream, &graph);
    if (st == MPSCY_OK && e != cudaSuccess)
        st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "capturing the step: %s", cudaGetErrorString(e));
    cudaGraphExec_t exec = NULL;
    if (st == MPSCY_OK) {
        e = cudaGraphInstantiate(&exec, graph, 0);
        if (e != cudaSuccess) st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "instantiating the step graph: %s", cudaGetErrorString(e));
    }
    if (st == MPSCY_OK) {
        e = cudaGraphUpload(exec, g->stream);
        if (e != cudaSuccess) st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "uploading the step graph: %s", cudaGetErrorString(e));
    }
    if (graph) cudaGraphDestroy(graph);
    if (st != MPSCY_OK) {
        if (exec) cudaGraphExecDestroy(exec);
        cudaGetLastError();
        return st;
    }
    mpscy_count_alloc(&g->base.dev->stats, 0);
    g->exec[kind] = exec;
    return MPSCY_OK;
}

/* A full batch is one launch of its graph; a partial batch (b < built) runs the same kernels
 * launched one by one over exactly its rows, which allocates nothing (a new capture would). */
static int launch(cu_graph *g, int kind, int64_t b, char *err, size_t en) {
    if (b == g->plan.batch) {
        CU_TRY(cudaGraphLaunch(g->exec[kind], g->stream), "graph launch");
    } else {
        g->gws_used = g->gcount_used = 0;
        memset(g->dz_ready, 0, (size_t)g->plan.n_nodes);
        int st = enqueue(g, kind, b, err, en);
        if (st != MPSCY_OK && g->forked) cu_join(g, NULL, 0);
        if (st != MPSCY_OK) {
            cudaStreamSynchronize(g->stream);
            return st;
        }
    }
    CU_TRY(cudaStreamSynchronize(g->stream), "step");
    return MPSCY_OK;
}

/* What the kernels wrote into pinned memory for the evaluation just synchronized (whether an
 * update was applied is the caller's to read: an L-BFGS call has its own). */
static void read_result(const cu_graph *g, mpscy_step_result *r) {
    const cu_result *res = g->result;
    r->loss = res->loss;
    r->correct = res->correct;
    r->grad_norm = res->grad_norm;
    r->finite = res->finite;
}

int cu_forward_backward(cu_graph *g, int64_t b, mpscy_step_result *r, char *err, size_t n) {
    int st = launch(g, CU_KIND_GRAD, b, err, n);
    if (st == MPSCY_OK) read_result(g, r);
    return st;
}

int cu_graph_step(mpscy_graph gh, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    cu_graph *g = (cu_graph *)gh;
    int64_t b = a->batch;  /* rows, mode and labels checked by the dispatcher */
    memset(r, 0, sizeof *r);
    if (a->mode == MPSCY_MODE_LBFGS) return cu_lbfgs_step(g, a, r, err, n);
    int kind = a->mode == MPSCY_MODE_TRAIN ? CU_KIND_TRAIN : a->mode == MPSCY_MODE_GRAD ? CU_KIND_GRAD : CU_KIND_EVAL;
    int64_t t = (int64_t)g->scalars[0] + 1;
    cu_optim_params(g, a, t, g->params_h);
    int st = launch(g, kind, b, err, n);
    if (st != MPSCY_OK) return st;

    read_result(g, r);
    r->applied = g->result->applied;
    if (kind == CU_KIND_EVAL) return MPSCY_OK;
    if (!r->finite)
        return FAIL(MPSCY_NONFINITE, "loss %g, gradient norm %g: not finite, update skipped", r->loss, r->grad_norm);
    if (r->applied) cu_optim_applied(g, t);
    return MPSCY_OK;
}

int cu_graph_predict(mpscy_graph gh, const mpscy_step_args *a, char *err, size_t n) {
    return launch((cu_graph *)gh, CU_KIND_PREDICT, a->batch, err, n);  /* rows checked by the dispatcher */
}
