/* graph.m — building a Metal graph: the shared plan, then one shared-storage MTLBuffer per
 * slab (parameters, running statistics and optimizer slots twice each, for the ping-pong
 * between steps; gradients once), the io buffers, the per-step hyper and stats buffers and the
 * dropout masks, and the train executable for the built batch size. Also
 * io handles and named-tensor access. Nothing here runs per step; step.m does.
 *
 * Why two slabs per state role: an executable reads the current slab and writes the updated
 * one as a result; writing results into the buffer it is still reading would rely on an
 * ordering MPSGraph does not document, so results go to the other slab and the graph's
 * parity flips after an applied step. No copy is ever made on the CPU. */
#import "metal.h"

#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), METAL_C, __VA_ARGS__)

@implementation MetalGraphState
@end

/* A zeroed shared buffer owned by the graph (counted on the device), or nil. */
static id<MTLBuffer> owned_buffer(MetalGraphState *st, mpscy_device dev, int64_t floats) {
    id<MTLBuffer> buf = metal_new_buffer(dev, (size_t)(floats > 0 ? floats : 1) * sizeof(float),
                                         MPSCY_STORAGE_SHARED);
    if (!buf) return nil;
    memset(buf.contents, 0, buf.length);
    [st.owned addObject:buf];
    return buf;
}

void metal_graph_destroy(mpscy_graph gh) {
    metal_graph *g = (metal_graph *)gh;
    mpscy_device dev = gh->dev;
    const mpscy_plan *p = &g->plan;
    @autoreleasepool {
        if (g->state) {
            MetalGraphState *st = CFBridgingRelease(g->state);
            for (id<MTLBuffer> b in st.owned) metal_count_buffer_free(dev, b);
            g->state = NULL;
        }
    }
    metal_host_free(dev, g->io_bufs, g->io_heads_bytes);
    if (g->plan.nodes) {
        mpscy_count_free(&dev->stats, (size_t)p->n_nodes * sizeof(mpscy_node));
        mpscy_count_free(&dev->stats, mpscy_plan_bytes(p) - (size_t)p->n_nodes * sizeof(mpscy_node));
    }
    mpscy_plan_free(&g->plan);
    metal_host_free(dev, g, sizeof *g);
}

/* Every buffer of the graph; fills the state and the io heads, or returns MPSCY_OOM. */
static int allocate(metal_graph *g, mpscy_device dev, MetalGraphState *st, char *err, size_t n) {
    const mpscy_plan *p = &g->plan;
    int64_t np = p->n_params, nb = p->n_buffers, no = metal_optim_floats(p), B = p->batch;
    int lbfgs = metal_is_lbfgs(p);
    BOOL ok = YES;
#define NEED(prop, floats) do { st.prop = owned_buffer(st, dev, (floats)); ok = ok && st.prop; } while (0)
    if (np > 0) { NEED(params0, np); NEED(grads, np); }
    if (np > 0 && !lbfgs) NEED(params1, np);
    if (nb > 0) { NEED(buffers0, nb); NEED(buffers1, nb); }
    if (no > 0) NEED(optim0, no);
    if (no > 0 && !lbfgs) NEED(optim1, no);
    NEED(target, B * p->target_size);
    NEED(output, B * p->out_size);
    NEED(hyper, METAL_H_COUNT);
    NEED(stats, METAL_S_COUNT);
#undef NEED
    st.inputs = [NSMutableArray array];
    st.inputGrads = mt_slots((NSUInteger)p->n_inputs);
    st.masks = mt_slots((NSUInteger)p->n_nodes);
    for (int32_t i = 0; ok && i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT) {
            id<MTLBuffer> in = owned_buffer(st, dev, B * node->size);
            ok = in != nil;
            if (in) [st.inputs addObject:in];
            if (ok && node->grad) {
                id<MTLBuffer> gin = owned_buffer(st, dev, B * node->size);
                ok = gin != nil;
                mt_set(st.inputGrads, (NSUInteger)node->input_index, gin);
            }
        } else if (node->kind == MPSCY_LAYER_DROPOUT && node->reals[0] > 0.0) {
            id<MTLBuffer> mask = owned_buffer(st, dev, B * node->size);
            ok = mask != nil;
            mt_set(st.masks, (NSUInteger)i, mask);
        }
    }
    if (!ok)
        return FAIL(MPSCY_OOM, "a shared MTLBuffer for the graph could not be allocated (%lld parameters, "
                    "batch %lld; the device holds %llu bytes, recommended working set %llu)", (long long)np,
                    (long long)B, (unsigned long long)st.device.currentAllocatedSize,
                    (unsigned long long)st.device.recommendedMaxWorkingSetSize);

    /* io heads: inputs, target, output, then input gradients; all over shared buffers */
    int32_t ni = p->n_inputs;
    g->io_heads_bytes = (size_t)(2 * ni + 2) * sizeof(struct mpscy_buffer_);
    g->io_bufs = metal_host_alloc(dev, g->io_heads_bytes);
    if (!g->io_bufs) return FAIL(MPSCY_OOM, "io buffer heads of %zu bytes", g->io_heads_bytes);
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind != MPSCY_LAYER_INPUT) continue;
        size_t bytes = (size_t)B * (size_t)node->size * sizeof(float);
        g->io_bufs[node->input_index].bytes = bytes;
        g->io_bufs[node->input_index].host = st.inputs[(NSUInteger)node->input_index].contents;
        id<MTLBuffer> gin = mt_get(st.inputGrads, (NSUInteger)node->input_index);
        if (gin) {
            g->io_bufs[ni + 2 + node->input_index].bytes = bytes;
            g->io_bufs[ni + 2 + node->input_index].host = gin.contents;
        }
    }
    g->io_bufs[ni].bytes = (size_t)B * (size_t)p->target_size * 4;
    g->io_bufs[ni].host = st.target.contents;
    g->io_bufs[ni + 1].bytes = (size_t)B * (size_t)p->out_size * sizeof(float);
    g->io_bufs[ni + 1].host = st.output.contents;
    for (int32_t k = 0; k < 2 * ni + 2; k++) {
        g->io_bufs[k].vt = dev->vt;
        g->io_bufs[k].dev = dev;
        g->io_bufs[k].storage = MPSCY_STORAGE_SHARED;
        g->io_bufs[k].borrowed = 1;
    }
    g->hyper = st.hyper.contents;
    g->stats = st.stats.contents;
    return MPSCY_OK;
}

int metal_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out, char *err, size_t n) {
    metal_graph *g = metal_host_alloc(dev, sizeof *g);
    if (!g) return FAIL(MPSCY_OOM, "graph object");
    g->base.vt = dev->vt;
    g->base.dev = dev;
    g->base.plan = &g->plan;
    g->base.scalars = g->scalars;
    int st_code = mpscy_plan_build(&g->plan, desc, METAL_C, err, n);
    if (st_code != MPSCY_OK) {
        metal_host_free(dev, g, sizeof *g);
        return st_code;
    }
    mpscy_plan *p = &g->plan;
    mpscy_count_alloc(&dev->stats, (size_t)p->n_nodes * sizeof(mpscy_node));
    mpscy_count_alloc(&dev->stats, mpscy_plan_bytes(p) - (size_t)p->n_nodes * sizeof(mpscy_node));
    if (!metal_optim_supported(p->optim.kind)) {
        const int st = FAIL(MPSCY_UNSUPPORTED, "optimizer kind %d is not implemented on metal", p->optim.kind);
        metal_graph_destroy(&g->base);
        return st;
    }
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        /* conv.m runs a ConvTranspose2D as a convolution from its output back to its input, which maps
         * an output padded to or past the stride onto more rows than the input has */
        const int padded = node->kind == MPSCY_LAYER_CONVTRANSPOSE2D &&
                           (node->ints[10] >= node->ints[3] || node->ints[11] >= node->ints[4]);
        const char *why = node->kind != MPSCY_LAYER_INPUT && !metal_layers[node->kind].forward
                              ? "is not implemented on metal"
                              : padded ? "with output padding at or above the stride is not implemented on metal" : NULL;
        if (why) {
            int32_t kind = node->kind;
            char name[MPSCY_NAME_LEN];
            snprintf(name, sizeof name, "%s", node->name);
            metal_graph_destroy(&g->base);
            return FAIL(MPSCY_UNSUPPORTED, "node %d (%s): layer kind %d %s", i, name, kind, why);
        }
    }

    @autoreleasepool {
        MetalGraphState *st = [MetalGraphState new];
        st.device = metal_mtl_device(dev);
        st.queue = metal_queue(dev);
        st.owned = [NSMutableArray array];
        st.execs = [NSMutableDictionary dictionary];
        g->state = (void *)CFBridgingRetain(st);
        int rc = allocate(g, dev, st, err, n);
        if (rc == MPSCY_OK) {
            /* running variances start at 1, as in PyTorch; parameters are written by the caller */
            for (int32_t t = 0; t < p->n_tensors; t++) {
                const mpscy_tensor *T = &p->tensors[t];
                if (T->info.role != MPSCY_ROLE_BUFFER || T->slot != 1) continue;
                float *rv = (float *)st.buffers0.contents + (T->info.offset - p->n_params);
                for (int64_t k = 0; k < T->info.count; k++) rv[k] = 1.0f;
            }
            /* optimizer state starting values, as the CPU backend sets them */
            if (p->optim.kind == MPSCY_OPTIM_NADAM) g->scalars[1] = 1.0;   /* mu_product */
            if (p->optim.kind == MPSCY_OPTIM_ADAGRAD && p->n_train > 0) {
                float *sum = st.optim0.contents;
                for (int64_t k = 0; k < p->n_train; k++) sum[k] = (float)p->optim.initial_accumulator_value;
            }
            /* compile the train executable for the built batch now, so a graph MPSGraph
             * rejects fails at build; eval and predict compile on first use (builds stay fast) */
            MetalExec *x = nil;
            rc = metal_exec_get(g, METAL_TRAIN, p->batch, &x, err, n);
        }
        if (rc != MPSCY_OK) {
            metal_graph_destroy(&g->base);
            return rc;
        }
    }
    *out = &g->base;
    return MPSCY_OK;
}

int metal_graph_io(mpscy_graph gh, int32_t kind, int32_t index, mpscy_buffer *out, char *err, size_t n) {
    metal_graph *g = (metal_graph *)gh;
    int32_t slot;
    int st = mpscy_plan_io_slot(&g->plan, kind, index, &slot, METAL_C, err, n);
    if (st == MPSCY_OK) *out = &g->io_bufs[slot];
    return st;
}

/* Where float tensor t's current bytes are: the shared slabs of the current parity (steps are
 * synchronous, so no GPU work is in flight). */
static float *tensor_ptr(metal_graph *g, const mpscy_tensor *t) {
    MetalGraphState *st = metal_state(g);
    int cur = g->parity;
    switch (t->info.role) {
    case MPSCY_ROLE_GRAD: return (float *)st.grads.contents + t->info.offset;
    case MPSCY_ROLE_PARAM:
        return (float *)(cur && st.params1 ? st.params1 : st.params0).contents + t->info.offset;
    case MPSCY_ROLE_BUFFER:
        return (float *)(cur ? st.buffers1 : st.buffers0).contents + (t->info.offset - g->plan.n_params);
    default:
        return (float *)(cur && st.optim1 ? st.optim1 : st.optim0).contents + t->info.offset;
    }
}

int metal_tensor_read(mpscy_graph gh, const mpscy_tensor *t, void *dst, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy(dst, tensor_ptr((metal_graph *)gh, t), bytes);
    return MPSCY_OK;
}

int metal_tensor_write(mpscy_graph gh, const mpscy_tensor *t, const void *src, size_t bytes, char *err, size_t n) {
    (void)err; (void)n;
    memcpy(tensor_ptr((metal_graph *)gh, t), src, bytes);
    return MPSCY_OK;
}
