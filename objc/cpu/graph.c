/* graph.c — building a CPU graph: the shared plan, then one allocation per slab (parameters,
 * gradients, optimizer state, activations, activation gradients, saved values, workspace,
 * io staging) and the pointer tables into them. Also io handles and named-tensor access.
 * Nothing here runs per step; step.c does. */
#include "cpu.h"

#include <string.h>
#include <unistd.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CPU, __VA_ARGS__)

static size_t round_up(size_t bytes) { return (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN; }

float *cpu_tensor(cpu_graph *g, const mpscy_node *node, int32_t role, int32_t slot) {
    int32_t t = mpscy_node_tensor(&g->plan, node, role, slot);
    return t < 0 ? NULL : g->params + g->plan.tensors[t].info.offset;
}

float *cpu_tensor_grad(cpu_graph *g, const mpscy_node *node, int32_t slot) {
    int32_t t = mpscy_node_tensor(&g->plan, node, MPSCY_ROLE_PARAM, slot);
    if (t < 0 || !mpscy_tensor_trained(&g->plan, &g->plan.tensors[t])) return NULL;
    return g->grads + g->plan.tensors[t].info.offset;
}

static size_t slab_bytes(int64_t floats) { return (size_t)(floats > 0 ? floats : 1) * sizeof(float); }

void cpu_graph_destroy(mpscy_graph gh) {
    cpu_graph *g = (cpu_graph *)gh;
    mpscy_device dev = gh->dev;
    const mpscy_plan *p = &g->plan;
    cpu_pool_destroy(g->pool);
    cpu_free(dev, g->params, slab_bytes(p->n_params + p->n_buffers));
    cpu_free(dev, g->grads, slab_bytes(p->n_train));
    cpu_free(dev, g->optim, slab_bytes(p->optim_floats));
    cpu_free(dev, g->act, slab_bytes(p->act_floats));
    cpu_free(dev, g->dact, slab_bytes(p->grad_floats));
    cpu_free(dev, g->save, slab_bytes(p->save_floats));
    cpu_free(dev, g->ws, slab_bytes(g->ws_floats));
    cpu_free(dev, g->io, g->io_bytes);
    cpu_free(dev, g->y, g->tables_bytes);
    if (g->plan.nodes) {
        mpscy_count_free(&dev->stats, (size_t)p->n_nodes * sizeof(mpscy_node));
        mpscy_count_free(&dev->stats, mpscy_plan_bytes(p) - (size_t)p->n_nodes * sizeof(mpscy_node));
    }
    mpscy_plan_free(&g->plan);
    cpu_free(dev, g, sizeof *g);
}

int cpu_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out, char *err, size_t n) {
    cpu_graph *g = cpu_alloc(dev, sizeof *g);
    if (!g) return FAIL(MPSCY_OOM, "graph object");
    g->base.vt = dev->vt;
    g->base.dev = dev;
    g->base.plan = &g->plan;
    g->base.scalars = g->scalars;
    int st = mpscy_plan_build(&g->plan, desc, CPU, err, n);
    if (st != MPSCY_OK) {
        cpu_free(dev, g, sizeof *g);
        return st;
    }
    mpscy_plan *p = &g->plan;
    mpscy_count_alloc(&dev->stats, (size_t)p->n_nodes * sizeof(mpscy_node));
    mpscy_count_alloc(&dev->stats, mpscy_plan_bytes(p) - (size_t)p->n_nodes * sizeof(mpscy_node));

    /* a refusal's message is formatted before the graph (and its plan, which it names) is freed */
    if (!cpu_optim_supported(p->optim.kind)) {
        const int st = FAIL(MPSCY_UNSUPPORTED, "optimizer kind %d is not implemented on cpu", p->optim.kind);
        cpu_graph_destroy(&g->base);
        return st;
    }
    if (p->threads <= 0) p->threads = ((cpu_device *)dev)->threads;  /* workspaces are per thread */
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const cpu_layer_ops *ops = &cpu_layers[p->nodes[i].kind];
        if (p->nodes[i].kind != MPSCY_LAYER_INPUT && !ops->forward) {
            const int st = FAIL(MPSCY_UNSUPPORTED, "node %d (%s): layer kind %d is not implemented on cpu",
                                i, p->nodes[i].name, p->nodes[i].kind);
            cpu_graph_destroy(&g->base);
            return st;
        }
        int64_t w = ops->workspace ? ops->workspace(p, &p->nodes[i]) : 0;
        if (w > g->ws_floats) g->ws_floats = w;
    }

    /* io slab: each input, the target, the output, each 64-byte aligned */
    size_t in_bytes = 0;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_INPUT) in_bytes += round_up((size_t)p->batch * p->nodes[i].size * sizeof(float));
    size_t target_bytes = round_up((size_t)p->batch * p->target_size * 4);
    size_t output_bytes = round_up((size_t)p->batch * p->out_size * sizeof(float));
    g->io_bytes = in_bytes + target_bytes + output_bytes;
    g->tables_bytes = 2 * (size_t)p->n_nodes * sizeof(float *) +
                      (size_t)(2 * p->n_inputs + 2) * sizeof(struct mpscy_buffer_);

    /* Zeroed slabs are touched as they are made: more than the machine holds would not fail
     * here but get the process killed, so such a graph is refused first. */
    const double need = (double)slab_bytes(p->n_params + p->n_buffers) + (double)slab_bytes(p->n_train) +
                        (double)slab_bytes(p->optim_floats) + (double)slab_bytes(p->act_floats) +
                        (double)slab_bytes(p->grad_floats) + (double)slab_bytes(p->save_floats) +
                        (double)slab_bytes(g->ws_floats) + (double)g->io_bytes;
    const double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > have) {
        const int st = FAIL(MPSCY_OOM, "the graph needs %.1f GB at batch %d, more than this machine's %.1f GB of "
                            "memory", need / 1e9, p->batch, have / 1e9);
        cpu_graph_destroy(&g->base);
        return st;
    }
    g->params = cpu_alloc(dev, slab_bytes(p->n_params + p->n_buffers));
    g->grads = cpu_alloc(dev, slab_bytes(p->n_train));
    g->optim = cpu_alloc(dev, slab_bytes(p->optim_floats));
    g->act = cpu_alloc(dev, slab_bytes(p->act_floats));
    g->dact = cpu_alloc(dev, slab_bytes(p->grad_floats));
    g->save = cpu_alloc(dev, slab_bytes(p->save_floats));
    g->ws = cpu_alloc(dev, slab_bytes(g->ws_floats));
    g->io = cpu_alloc(dev, g->io_bytes);
    g->y = cpu_alloc(dev, g->tables_bytes);
    if (!g->params || !g->grads || !g->optim || !g->act || !g->dact || !g->save || !g->ws || !g->io || !g->y) {
        cpu_graph_destroy(&g->base);
        return FAIL(MPSCY_OOM, "graph slabs of %.0f bytes", need);
    }
    if (cpu_pool_create(dev, p->threads, &g->pool) != MPSCY_OK) {
        const int st = FAIL(MPSCY_OOM, "worker pool of %d threads", p->threads);
        cpu_graph_destroy(&g->base);
        return st;
    }
    g->dy = g->y + p->n_nodes;
    g->io_bufs = (struct mpscy_buffer_ *)(g->dy + p->n_nodes);

    char *io = g->io;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT) {
            /* an input node's output is its staging buffer: no copy per step */
            struct mpscy_buffer_ *b = &g->io_bufs[node->input_index];
            b->bytes = (size_t)p->batch * node->size * sizeof(float);
            b->host = io;
            g->y[i] = (float *)io;
            io += round_up(b->bytes);
        } else {
            g->y[i] = g->act + node->out;
        }
        g->dy[i] = node->grad ? g->dact + node->dout : NULL;
    }
    struct mpscy_buffer_ *tb = &g->io_bufs[p->n_inputs], *ob = &g->io_bufs[p->n_inputs + 1];
    tb->bytes = (size_t)p->batch * p->target_size * 4;
    tb->host = io;
    io += target_bytes;
    ob->bytes = (size_t)p->batch * p->out_size * sizeof(float);
    ob->host = io;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT && node->grad) {
            struct mpscy_buffer_ *b = &g->io_bufs[p->n_inputs + 2 + node->input_index];
            b->bytes = (size_t)p->batch * node->size * sizeof(float);
            b->host = g->dy[i];
        }
    }
    for (int32_t k = 0; k < 2 * p->n_inputs + 2; k++) {
        g->io_bufs[k].vt = dev->vt;
        g->io_bufs[k].dev = dev;
        g->io_bufs[k].storage = MPSCY_STORAGE_SHARED;
        g->io_bufs[k].borrowed = 1;
    }
    /* running variances start at 1, as in PyTorch; parameters are written by the caller */
    for (int32_t t = 0; t < p->n_tensors; t++)
        if (p->tensors[t].info.role == MPSCY_ROLE_BUFFER && p->tensors[t].slot == 1)
            for (int64_t k = 0; k < p->tensors[t].info.count; k++) g->params[p->tensors[t].info.offset + k] = 1.0f;
    if (p->optim.kind == MPSCY_OPTIM_NADAM) g->scalars[1] = 1.0;  /* mu_product */
    if (p->optim.kind == MPSCY_OPTIM_ADAGRAD)
        for (int64_t k = 0; k < p->n_train; k++) g->optim[k] = (float)p->optim.initial_accumulator_value;
    *out = &g->base;
    return MPSCY_OK;
}

int cpu_graph_io(mpscy_graph gh, int32_t kind, int32_t index, mpscy_buffer *out, char *err, size_t n) {
    cpu_graph *g = (cpu_graph *)gh;
    int32_t slot;
    int st = mpscy_plan_io_slot(&g->plan, kind, index, &slot, CPU, err, n);
    if (st == MPSCY_OK) *out = &g->io_bufs[slot];
    return st;
}

/* Where float tensor t's bytes live on the host. */
static float *tensor_ptr(cpu_graph *g, const mpscy_tensor *t) {
    if (t->info.role == MPSCY_ROLE_GRAD) return g->grads + t->info.offset;
    if (t->info.role == MPSCY_ROLE_OPTIM) return g->optim + t->info.offset;
    return g->params + t->info.offset;
}

int cpu_tensor_read(mpscy_graph gh, const mpscy_tensor *t, void *dst, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy(dst, tensor_ptr((cpu_graph *)gh, t), bytes);
    return MPSCY_OK;
}

int cpu_tensor_write(mpscy_graph gh, const mpscy_tensor *t, const void *src, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy(tensor_ptr((cpu_graph *)gh, t), src, bytes);
    return MPSCY_OK;
}
