/* graph.cu — building a CUDA graph object: the shared plan, one cudaMalloc per slab (parameters,
 * gradients, optimizer state, activations, their gradients, saved values, workspaces), pinned
 * staging for io, streams and events, the fusions decided once (Dense+ReLU in one GEMM,
 * Flatten as an alias), io handles and named-tensor access. Capturing and running steps is
 * step.cu's; nothing here runs per step. */
#include "cuda.h"
#include "blas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CU, __VA_ARGS__)

static size_t round_up(size_t bytes) { return (bytes + CU_ALIGN - 1) / CU_ALIGN * CU_ALIGN; }
static size_t slab_bytes(int64_t floats) { return (size_t)(floats > 0 ? floats : 1) * sizeof(float); }

cudaError_t cu_fill(cudaStream_t s, float *p, int64_t n, float v);  /* optim.cu */

float *cu_tensor(cu_graph *g, const mpscy_node *node, int32_t role, int32_t slot) {
    int32_t t = mpscy_node_tensor(&g->plan, node, role, slot);
    return t < 0 ? NULL : g->params + g->plan.tensors[t].info.offset;
}

float *cu_tensor_grad(cu_graph *g, const mpscy_node *node, int32_t slot) {
    int32_t t = mpscy_node_tensor(&g->plan, node, MPSCY_ROLE_PARAM, slot);
    return t < 0 ? NULL : g->grads + g->plan.tensors[t].info.offset;
}

void cu_graph_destroy(mpscy_graph gh) {
    cu_graph *g = (cu_graph *)gh;
    mpscy_device dev = gh->dev;
    const mpscy_plan *p = &g->plan;
    if (((cu_device *)dev)->pending == g) ((cu_device *)dev)->pending = NULL;
    cu_linger_stop(g);  /* and no other graph can stop it after this */
    if (g->stream) cudaStreamSynchronize(g->stream);
    cu_fused_report(g);
    cu_cache_clear(g);
    cu_fused_free(g);
    cu_dev_free(dev, g->params, slab_bytes(p->n_params + p->n_buffers));
    cu_dev_free(dev, g->grads, slab_bytes(p->n_params));
    cu_dev_free(dev, g->optim, slab_bytes(p->optim_floats));
    cu_dev_free(dev, g->class_w, (size_t)p->classes * sizeof(float));
    cu_dev_free(dev, g->pos_w, (size_t)p->out_size * sizeof(float));
    cu_dev_free(dev, g->act, slab_bytes(p->act_floats));
    cu_dev_free(dev, g->dact, slab_bytes(p->grad_floats));
    cu_dev_free(dev, g->save, slab_bytes(p->save_floats));
    cu_dev_free(dev, g->ws, slab_bytes(g->ws_floats));
    cu_dev_free(dev, g->lt_ws[0], g->lt_ws_bytes);
    cu_dev_free(dev, g->lt_ws[1], g->lt_ws_bytes);
    cu_dev_free(dev, g->scratch, sizeof(cu_scratch));
    cu_dev_free(dev, g->gws, slab_bytes(g->gws_floats));
    cu_dev_free(dev, g->colbuf, slab_bytes(g->col_floats));
    cu_dev_free(dev, g->gcount, slab_bytes(g->gcount_n));
    cu_dev_free(dev, g->stage_d, g->stage_bytes);
    cu_pinned_free(dev, g->stage_h, g->stage_bytes);
    cu_pinned_free(dev, g->result, sizeof(cu_result));
    cu_pinned_free(dev, g->out_h, g->out_bytes);
    cu_pinned_free(dev, g->flags_h, CU_STAGE_MAX_PIECES * sizeof(uint32_t));
    /* the streams and events after the memory their work used (cudaFree waits for the device) */
    if (g->stream) cudaStreamDestroy(g->stream);
    if (g->side && g->side != g->stream) cudaStreamDestroy(g->side);
    if (g->alt) cudaStreamDestroy(g->alt);
    if (g->nrm) cudaStreamDestroy(g->nrm);
    if (g->fork) cudaEventDestroy(g->fork);
    if (g->join) cudaEventDestroy(g->join);
    if (g->wready) cudaEventDestroy(g->wready);
    if (g->colready) cudaEventDestroy(g->colready);
    cudaGetLastError();  /* what failed here is not the next launch's to report */
    mpscy_pool_destroy(g->stage_pool);
    cu_host_free(dev, g->y, g->tables_bytes);
    if (g->plan.nodes) mpscy_count_free(&dev->stats, mpscy_plan_bytes(p));
    mpscy_plan_free(&g->plan);
    cu_host_free(dev, g, sizeof *g);
}

/* The one consumer of node i, or -1 when it has several or is the graph output. */
static int32_t only_consumer(const mpscy_plan *p, int32_t i) {
    if (p->nodes[i].consumers != 1 || i == p->output) return -1;
    for (int32_t j = i + 1; j < p->n_nodes; j++)
        for (int32_t k = 0; k < p->nodes[j].n_in; k++)
            if (p->nodes[j].in[k] == i) return j;
    return -1;
}

/* The product (Dense or Conv2D) whose fused ReLU is node j, when that ReLU has one reader, which
 * adds nothing to it (the product's dz may then be written masked by that reader's dx product,
 * marking dz_ready), else -1. */
int32_t cu_relu_product(const cu_graph *g, int32_t j) {
    const mpscy_plan *p = &g->plan;
    const mpscy_node *r = &p->nodes[j];
    if (r->kind != MPSCY_LAYER_RELU || !(g->fuse[j] & CU_SKIP) || r->consumers != 1 || j == p->output || r->accum[0])
        return -1;
    const int32_t k = r->in[0];
    return (g->fuse[k] & CU_FUSE_RELU) && g->dy[k] ? k : -1;
}

int cu_knob_on(const char *name) {
    const char *v = getenv(name);
    return !(v && v[0] == '0');
}

int cu_knob_int(const char *name, int def) {
    const char *v = getenv(name);
    return v && v[0] ? atoi(v) : def;
}

/* Fusions and aliases: pointers only, so every kernel stays a plain reader/writer. */
static void plan_fusions(cu_graph *g) {
    mpscy_plan *p = &g->plan;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_DENSE || node->kind == MPSCY_LAYER_CONV2D) {
            int32_t j = only_consumer(p, i);
            if (j >= 0 && p->nodes[j].kind == MPSCY_LAYER_RELU) {
                g->fuse[i] |= CU_FUSE_RELU;
                g->fuse[j] |= CU_SKIP;
                g->y[j] = g->y[i];  /* the product's epilogue writes max(0, . + b) there */
            }
        } else if (node->kind == MPSCY_LAYER_FLATTEN) {
            g->fuse[i] |= CU_SKIP;
            g->y[i] = g->y[node->in[0]];  /* row-major: flattening is the same bytes */
        }
    }
    /* d(input) of a Flatten is its d(output) when the Flatten is the input's only consumer;
     * walked from the end so chains of aliases resolve to their final pointer */
    for (int32_t i = p->n_nodes - 1; i >= 0; i--) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind != MPSCY_LAYER_FLATTEN || !node->grad) continue;
        int32_t s = node->in[0];
        if (p->nodes[s].grad && p->nodes[s].consumers == 1 && s != p->output) g->dy[s] = g->dy[i];
    }
}

int cu_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out, char *err, size_t n) {
    if (int settled = cu_settle(dev, err, n)) return settled;
    cu_graph *g = (cu_graph *)cu_host_alloc(dev, sizeof *g);
    if (!g) return FAIL(MPSCY_OOM, "graph object");
    g->base.vt = dev->vt;
    g->base.dev = dev;
    g->base.plan = &g->plan;
    g->base.scalars = g->scalars;
    g->dev = (cu_device *)dev;
    int st = mpscy_plan_build(&g->plan, desc, CU, err, n);
    if (st != MPSCY_OK) {
        cu_host_free(dev, g, sizeof *g);
        return st;
    }
    mpscy_plan *p = &g->plan;
    mpscy_count_alloc(&dev->stats, mpscy_plan_bytes(p));

    /* a refusal's message is formatted before the graph (and its plan, which it names) is freed */
    if (!cu_optim_supported(p->optim.kind)) {
        const int st = FAIL(MPSCY_UNSUPPORTED, "optimizer kind %d is not implemented on cuda", p->optim.kind);
        cu_graph_destroy(&g->base);
        return st;
    }
    /* every convolution over sub-batches of at most this many samples: a testing knob (those
     * with a tensor of 2^31 - 1 or more elements at the built batch always are: cu_conv_split) */
    g->conv_split = cu_knob_int("MPSCY_CUDA_CONV_SPLIT", 0);
    if (g->conv_split < 0) g->conv_split = 0;
    g->conv_split_only = cu_knob_int("MPSCY_CUDA_CONV_SPLIT_ONLY", -1);
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const cu_layer_ops *ops = &cu_layers[p->nodes[i].kind];
        if (p->nodes[i].kind != MPSCY_LAYER_INPUT && !ops->forward) {
            const int st = FAIL(MPSCY_UNSUPPORTED, "node %d (%s): layer kind %d is not implemented on cuda",
                                i, p->nodes[i].name, p->nodes[i].kind);
            cu_graph_destroy(&g->base);
            return st;
        }
        int64_t w = ops->workspace ? ops->workspace(p, &p->nodes[i]) : 0;
        if (p->nodes[i].kind == MPSCY_LAYER_CONV2D) {
            const int64_t split = cu_conv_split(g, &p->nodes[i]);
            if (split < 0) {
                const int st = FAIL(MPSCY_UNSUPPORTED, "node %d (%s): a Conv2D whose input, output or im2col columns "
                                    "have 2^31 - 1 or more elements in one sample", i, p->nodes[i].name);
                cu_graph_destroy(&g->base);
                return st;
            }
            if (split > 0) w = cu_conv_split_workspace(g, &p->nodes[i]);
        }
        if (w > g->ws_floats) g->ws_floats = w;
    }

    /* staging layout: params block, target, inputs (each 256-byte aligned) */
    size_t off = round_up(sizeof(cu_params));
    g->off_target = off;
    off += round_up((size_t)p->batch * p->target_size * 4);
    for (int32_t i = 0, k = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_INPUT) {
            g->off_input[k++] = off;
            off += round_up((size_t)p->batch * p->nodes[i].size * sizeof(float));
        }
    g->stage_bytes = off;
    g->out_bytes = (size_t)p->batch * p->out_size * sizeof(float);
    g->lt_ws_bytes = (size_t)8 << 20;
    /* which products run as mpscy's own kernel (MPSCY_CUDA_GEMM=own|cublas forces one side: a
     * debugging and testing knob); their split-K partials, summed over every Dense product */
    const char *gm = getenv("MPSCY_CUDA_GEMM");
    g->gemm_mode = gm && !strcmp(gm, "own") ? 1 : gm && !strcmp(gm, "cublas") ? 0 : 2;
    /* 3x3 convolutions as implicit products (conv_implicit.cu) in the own fp32 path; 0 turns them
     * off: a knob for A/B timing and testing */
    g->implicit = cu_knob_on("MPSCY_CUDA_IMPLICIT");
    g->io_settle = cu_knob_int("MPSCY_CUDA_IO_SETTLE", 0) == 1;  /* cu_graph_io */
    /* Dense products of long K and small output (and their plain dx) as mma.cuh's 3xTF32
     * product (dense.cu); 0 turns them off: a knob for A/B timing and testing */
    g->dense_mma = cu_knob_on("MPSCY_CUDA_DENSE_MMA");
    /* the output Dense and a cross-entropy loss in two kernels in training steps (head.cu) where
     * cu_head_fits, decided below once the fusions are planned, with a Dropout below it applied
     * by head_forward; 1 keeps that Dropout's own kernel, 0 turns both off: knobs for A/B timing
     * and testing */
    g->head = cu_knob_int("MPSCY_CUDA_HEAD", 2);
    /* a training step returns once its result is final, its update still running (step.cu);
     * 0 waits for the whole step: a knob for A/B timing and testing */
    g->early = cu_knob_on("MPSCY_CUDA_EARLY");
    g->lg_report = getenv("MPSCY_CUDA_VERBOSE") != NULL;
    /* the weight gradient of a convolution without dx (on the model's input) on the main stream,
     * which has nothing else left to run in the backward, beside the side stream's chain of the
     * other weight gradients; "side" puts it at that chain's end: a knob for A/B timing */
    const char *idw = getenv("MPSCY_CUDA_INPUT_DW");
    g->input_dw_main = !(idw && !strcmp(idw, "side"));
    /* a direct convolution of the deferred input starts beside the pull, each block once its
     * samples are copied (conv_direct.cu); 0 waits for the whole pull: a knob for A/B timing and
     * testing */
    g->pull_conv = cu_knob_on("MPSCY_CUDA_PULL_CONV");
    /* Every launch asks for the largest shared-memory carveout (100%): a multiprocessor whose
     * L1/shared split suits one kernel can then take blocks of any other at once, where kernels
     * of different preferences (the products' 55 KB or more of shared memory beside small
     * elementwise ones, on two streams) would otherwise wait for it to drain and be
     * reconfigured. The README CNN on the H200: 276.8 us against 281.0 (A/B). $MPSCY_CUDA_CARVEOUT
     * (0-100) asks for another share, -1 for each kernel's own: a knob for A/B timing. */
    g->carveout = cu_knob_int("MPSCY_CUDA_CARVEOUT", 100);
    if (g->carveout > 100) g->carveout = 100;
    if (g->carveout < 0) g->carveout = -1;
    /* a Dense's dx as dense.cu's product (1), and a convolution's as one product (2), enqueued
     * before the weight gradient on the side stream (dependencies unchanged); 0 enqueues the
     * weight gradients first: a knob for A/B timing */
    g->dx_first = cu_knob_int("MPSCY_CUDA_DX_FIRST", 2);
    /* ordered sums of more than 64 partials by blocks of 32 warps (conv_dw.cu's cu_sum_parts);
     * $MPSCY_CUDA_SUM_WIDE=N: of more than N, 0 never: a knob for A/B timing */
    g->sum_wide = cu_knob_int("MPSCY_CUDA_SUM_WIDE", 64);
    /* a convolution's dx products write the dz of the convolution below with its ReLU's mask,
     * and an implicit dx reads that dz as it lies, its transpose left to the side stream
     * (conv.cu); 0 turns both off: a knob for A/B timing and testing */
    g->dz_direct = cu_knob_on("MPSCY_CUDA_DZ_DIRECT");
    /* the weight gradient of a convolution whose forward reads x (conv_direct, the implicit
     * product) reads x too, so the forward's side stream builds no columns (~54 MB written and
     * read back a step in the README CNN); 0 builds them: a knob for A/B timing and testing */
    g->dw_gather = cu_knob_on("MPSCY_CUDA_DW_GATHER");
    /* each layer's squares of the gradient norm summed on a stream of their own once its
     * gradients are done, the update's kernel adding the partials (optim.cu); 0: the norm's pass
     * over the whole slab at the step's end, a knob for A/B timing and testing */
    g->norm_on = cu_knob_on("MPSCY_CUDA_NORM_EARLY");  /* and the plan's fit: cu_norm_plan below */
    /* the update's batches (update.h); 0: an element an iteration, a knob for A/B timing and testing */
    g->upd_batched = cu_knob_int("MPSCY_CUDA_UPD_BATCHED", 1);
    /* the early norm's final kernel loads each thread's first batch of the update before it adds
     * the norm's partials, so those loads overlap the sum; 0: after, a knob for A/B timing and testing */
    g->upd_prefetch = cu_knob_on("MPSCY_CUDA_NORM_PREFETCH");
    /* the weight and bias gradients of a convolution without dx and with few taps (the model's
     * first) in one pass over dy and x, gr->dw_small blocks a multiprocessor (conv_dw.cu); 0 takes
     * the split product after dz's transpose: a knob for A/B timing and testing */
    g->dw_small = cu_knob_int("MPSCY_CUDA_DW_SMALL", 2);
    /* that pass by whole output rows where it fits (conv_dw_rows); 0 takes its tiles of positions: a
     * knob for A/B timing and testing */
    g->dw_rows = cu_knob_on("MPSCY_CUDA_DW_ROWS");
    if (g->dw_small < 0) g->dw_small = 0;
    if (g->dw_small > 8) g->dw_small = 8;
    int convs = 0;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_CONV2D) {
            int64_t f, c;
            convs++;
            cu_conv_gemm_need(g, node, &f, &c);
            g->gws_floats += f;
            g->gcount_n += c;
            continue;
        }
        if (node->kind != MPSCY_LAYER_DENSE) continue;
        int64_t B = p->batch, in = p->nodes[node->in[0]].size, out = node->size, f, c;
        int64_t shapes[3][4] = {{B, out, in, 0}, {B, in, out, 0}, {out, in, B, (node->flags & MPSCY_FLAG_BIAS) != 0}};
        for (int k = 0; k < 3; k++)
            if (cu_gemm_small_wanted(g, shapes[k][0], shapes[k][1], shapes[k][2])) {
                cu_gemm_small_need(g->dev->sms, shapes[k][0], shapes[k][1], shapes[k][2], (int)shapes[k][3], &f, &c);
                g->gws_floats += f;
                g->gcount_n += c;
            }
        if (node->flags & MPSCY_FLAG_BIAS) {  /* the bias gradient's column sums (activation.cu) */
            cu_colsum_need(g->dev->sms, B, out, &f, &c);
            g->gws_floats += f;
            g->gcount_n += c;
        }
    }
    /* programmatic dependent launch, where the device has it, for graphs without convolutions:
     * measured on the H200 (bench/cuda_notes.md), it makes a step of small kernels faster (the
     * MLP 784-128-64-10 as separate kernels 68.4 -> 65.1 us) and the README CNN's slower (303.7
     * -> 315.7 us); MPSCY_CUDA_PDL=1 turns it on for every graph, 0 off */
    const char *pk = getenv("MPSCY_CUDA_PDL");
    g->pdl = g->dev->pdl && (pk ? pk[0] == '1' : !convs);
    g->tables_bytes = 2 * (size_t)p->n_nodes * sizeof(float *) + (size_t)p->n_nodes * sizeof(int64_t) + 2 * (size_t)p->n_nodes +
                      (size_t)(2 * p->n_inputs + 2) * sizeof(cu_buffer) + 16;

    st = MPSCY_OK;
#define DEV(ptr, bytes) if (st == MPSCY_OK) st = cu_dev_alloc(dev, (void **)&(ptr), (bytes))
#define PIN(ptr, bytes) if (st == MPSCY_OK) st = cu_pinned_alloc(dev, (void **)&(ptr), (bytes))
    DEV(g->params, slab_bytes(p->n_params + p->n_buffers));
    DEV(g->grads, slab_bytes(p->n_params));
    DEV(g->optim, slab_bytes(p->optim_floats));
    if (p->class_weight) DEV(g->class_w, (size_t)p->classes * sizeof(float));
    if (p->pos_weight) DEV(g->pos_w, (size_t)p->out_size * sizeof(float));
    DEV(g->act, slab_bytes(p->act_floats));
    DEV(g->dact, slab_bytes(p->grad_floats));
    DEV(g->save, slab_bytes(p->save_floats));
    DEV(g->ws, slab_bytes(g->ws_floats));
    DEV(g->lt_ws[0], g->lt_ws_bytes);
    DEV(g->lt_ws[1], g->lt_ws_bytes);
    DEV(g->scratch, sizeof(cu_scratch));
    DEV(g->gws, slab_bytes(g->gws_floats));
    DEV(g->gcount, slab_bytes(g->gcount_n));
    DEV(g->stage_d, g->stage_bytes);
    PIN(g->stage_h, g->stage_bytes);
    PIN(g->result, sizeof(cu_result));
    PIN(g->out_h, g->out_bytes);
    /* deferred staging (step.cu); MPSCY_CUDA_DEFER=0 stages before the launch instead (a knob
     * for measuring what the overlap gains, and for tools that run a graph inside its launch
     * call, as ncu does; CUDA_LAUNCH_BLOCKING=1, which does too, turns it off by itself) */
    const char *dk = getenv("MPSCY_CUDA_DEFER"), *lb = getenv("CUDA_LAUNCH_BLOCKING");
    size_t in0_bytes = 0;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_INPUT && p->nodes[i].input_index == 0) {
            g->in0_size = p->nodes[i].size;
            in0_bytes = (size_t)p->batch * p->nodes[i].size * sizeof(float);
        }
    const int large = p->n_inputs == 1 && in0_bytes >= (size_t)CU_DEFER_MIN;  /* as the caller decides */
    g->defer = large && !(dk && strcmp(dk, "0") == 0) && !(lb && strcmp(lb, "1") == 0);
    if (g->defer) PIN(g->flags_h, CU_STAGE_MAX_PIECES * sizeof(uint32_t));
    g->stage_stream = cu_stage_stream();
    {   /* the deferred steps' numbers start again after 2^31 - 1 (step.cu's launch); a testing knob */
        const int period = cu_knob_int("MPSCY_CUDA_SEQ_PERIOD", 0x7fffffff);
        g->seq_period = period < 2 ? 2u : (uint32_t)period;
    }
    if (large && st == MPSCY_OK) {  /* its staging threads, as the Cython bridge would choose them */
        const int th = cu_stage_threads((int64_t)in0_bytes, g->defer);
        if (th > 1) st = mpscy_pool_create(&dev->stats, (int32_t)th, &g->stage_pool);
    }
#undef DEV
#undef PIN
    if (st == MPSCY_OK) {
        g->y = (float **)cu_host_alloc(dev, g->tables_bytes);
        if (!g->y) st = MPSCY_OOM;
    }
    /* MPSCY_CUDA_STREAMS=1, a knob for measuring what the second stream gains: its work runs on
     * the main stream, in the order it is enqueued */
    const char *ns = getenv("MPSCY_CUDA_STREAMS");
    const int one = ns && strcmp(ns, "1") == 0;
    /* a second side stream for every other convolution's weight gradient (conv.cu); $MPSCY_CUDA_SIDES=1
     * keeps them all on the one side stream: a knob for A/B timing and testing */
    const int alt = !one && cu_knob_int("MPSCY_CUDA_SIDES", 2) != 1;
    if (st == MPSCY_OK && (cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking) != cudaSuccess ||
                           (one ? (g->side = g->stream, cudaSuccess)
                                : cudaStreamCreateWithFlags(&g->side, cudaStreamNonBlocking)) != cudaSuccess ||
                           (alt && cudaStreamCreateWithFlags(&g->alt, cudaStreamNonBlocking) != cudaSuccess) ||
                           (!one && cudaStreamCreateWithFlags(&g->nrm, cudaStreamNonBlocking) != cudaSuccess) ||
                           cudaEventCreateWithFlags(&g->fork, cudaEventDisableTiming) != cudaSuccess ||
                           cudaEventCreateWithFlags(&g->join, cudaEventDisableTiming) != cudaSuccess ||
                           cudaEventCreateWithFlags(&g->wready, cudaEventDisableTiming) != cudaSuccess ||
                           cudaEventCreateWithFlags(&g->colready, cudaEventDisableTiming) != cudaSuccess))
        st = MPSCY_DEVICE;
    if (st != MPSCY_OK) {
        cudaGetLastError();
        size_t total = slab_bytes(p->n_params + p->n_buffers) * 2 + slab_bytes(p->act_floats) +
                       slab_bytes(p->grad_floats) + slab_bytes(g->ws_floats) + 2 * g->lt_ws_bytes + g->stage_bytes;
        cu_graph_destroy(&g->base);
        return FAIL(st, "graph memory of about %zu bytes (device and pinned)", total);
    }
    g->params_h = (cu_params *)g->stage_h;
    g->params_d = (cu_params *)g->stage_d;
    g->dy = g->y + p->n_nodes;
    g->col_off = (int64_t *)(g->dy + p->n_nodes);
    g->io_bufs = (cu_buffer *)(((uintptr_t)(g->col_off + p->n_nodes) + 15) & ~(uintptr_t)15);
    g->fuse = (uint8_t *)(g->io_bufs + 2 * p->n_inputs + 2);
    g->dz_ready = g->fuse + p->n_nodes;

    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT) {
            /* an input node's output is the device mirror of its staging rows */
            cu_buffer *b = &g->io_bufs[node->input_index];
            b->base.bytes = (size_t)p->batch * node->size * sizeof(float);
            b->base.host = g->stage_h + g->off_input[node->input_index];
            g->y[i] = (float *)(g->stage_d + g->off_input[node->input_index]);
        } else {
            g->y[i] = g->act + node->out;
        }
        g->dy[i] = node->grad ? g->dact + node->dout : NULL;
    }
    plan_fusions(g);
    const int head = g->head && cu_head_fits(g);  /* decided once: every capture and partial step reads it */
    g->head_drop = head && g->head >= 2 ? cu_head_dropout(g) : -1;
    g->head = head;
    cu_norm_plan(g);
    /* each convolution's slab, sized by what its kernels were decided to be (conv.cu) */
    int64_t at = 0;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_CONV2D) {
            g->col_off[i] = at;
            at += cu_conv_columns(g, &p->nodes[i]);
        }
    g->col_floats = at;
    if ((st = cu_dev_alloc(dev, (void **)&g->colbuf, slab_bytes(at))) != MPSCY_OK) {
        cu_graph_destroy(&g->base);
        return FAIL(st, "convolution buffers of %zu bytes", slab_bytes(at));
    }

    cu_buffer *tb = &g->io_bufs[p->n_inputs], *ob = &g->io_bufs[p->n_inputs + 1];
    tb->base.bytes = (size_t)p->batch * p->target_size * 4;
    tb->base.host = g->stage_h + g->off_target;
    ob->base.bytes = g->out_bytes;
    ob->base.host = g->out_h;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT && node->grad) {
            cu_buffer *b = &g->io_bufs[p->n_inputs + 2 + node->input_index];
            b->base.bytes = (size_t)p->batch * node->size * sizeof(float);
            b->base.host = NULL;
            b->base.storage = MPSCY_STORAGE_PRIVATE;
            b->dmem = g->dy[i];
        }
    }
    for (int32_t k = 0; k < 2 * p->n_inputs + 2; k++) {
        g->io_bufs[k].base.vt = dev->vt;
        g->io_bufs[k].base.dev = dev;
        if (k < p->n_inputs + 2) g->io_bufs[k].base.storage = MPSCY_STORAGE_SHARED;
        g->io_bufs[k].base.borrowed = 1;
    }
    /* running variances start at 1, as in PyTorch; parameters are written by the caller */
    cudaError_t e = cudaSuccess;
    for (int32_t t = 0; t < p->n_tensors && e == cudaSuccess; t++)
        if (p->tensors[t].info.role == MPSCY_ROLE_BUFFER && p->tensors[t].slot == 1)
            e = cu_fill(g->stream, g->params + p->tensors[t].info.offset, p->tensors[t].info.count, 1.0f);
    if (p->optim.kind == MPSCY_OPTIM_NADAM) g->scalars[1] = 1.0;  /* mu_product */
    if (g->class_w && e == cudaSuccess)
        e = cudaMemcpyAsync(g->class_w, p->class_weight, (size_t)p->classes * sizeof(float), cudaMemcpyHostToDevice,
                            g->stream);
    if (g->pos_w && e == cudaSuccess)
        e = cudaMemcpyAsync(g->pos_w, p->pos_weight, (size_t)p->out_size * sizeof(float), cudaMemcpyHostToDevice,
                            g->stream);
    if (p->optim.kind == MPSCY_OPTIM_ADAGRAD && e == cudaSuccess)
        e = cu_fill(g->stream, g->optim + p->vec_offset[0], p->n_train, (float)p->optim.initial_accumulator_value);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
    if (e != cudaSuccess) {
        cu_graph_destroy(&g->base);
        return FAIL(MPSCY_DEVICE, "initializing graph state: %s", cudaGetErrorString(e));
    }
    cu_fused_plan(g);
    for (int k = 0; k < CU_KINDS; k++) {
        if (k == CU_KIND_TRAIN && p->optim.kind == MPSCY_OPTIM_LBFGS) continue;
        st = cu_capture(g, k, err, n);
        if (st != MPSCY_OK && k == CU_KIND_TRAIN && g->fu) {  /* the fused form cannot run here */
            cu_fused_free(g);
            st = cu_capture(g, k, err, n);
        }
        if (st != MPSCY_OK) {
            cu_graph_destroy(&g->base);
            return st;
        }
    }
    if (getenv("MPSCY_CUDA_VERBOSE")) {
        char form[256];  /* the one-kernel form with its slices and linger: ~150 characters */
        int gathers = 0, small = 0, rows = 0, splits = 0;
        int64_t fewest = 0;  /* samples in the smallest sub-batches */
        for (int32_t i = 0; i < p->n_nodes; i++)
            if (p->nodes[i].kind == MPSCY_LAYER_CONV2D) {
                const int64_t s = cu_conv_split(g, &p->nodes[i]);
                if (s > 0) {
                    splits++;
                    fewest = fewest && fewest < s ? fewest : s;
                    continue;
                }
                const int form = cu_conv_dw_form(g, &p->nodes[i]);
                const mpscy_conv_geom cg = mpscy_conv_geometry(p, &p->nodes[i]);
                gathers += form == CU_DW_GATHER;
                small += form == CU_DW_SMALL;
                rows += form == CU_DW_SMALL &&
                        cu_conv_dw_rows_fits(g, &cg, mpscy_node_tensor(p, &p->nodes[i], MPSCY_ROLE_PARAM, 1) >= 0);
            }
        fprintf(stderr, "mpscy: cuda train step: %s%s\n", cu_fused_form(g, form, sizeof form),
                !g->fu && g->head ? (g->head_drop >= 0 ? ", the output Dense with the loss and the Dropout below it"
                                                        : ", the output Dense with the loss") : "");
        if (gathers)
            fprintf(stderr, "mpscy: cuda weight gradients read from x (no columns): %d convolution%s\n", gathers,
                    gathers > 1 ? "s" : "");
        if (small)
            fprintf(stderr, "mpscy: cuda weight and bias gradients in one pass over dz and x: %d convolution%s\n",
                    small, small > 1 ? "s" : "");
        if (rows)
            fprintf(stderr, "mpscy: cuda weight and bias gradients by output rows: %d convolution%s\n", rows,
                    rows > 1 ? "s" : "");
        if (splits)
            fprintf(stderr, "mpscy: cuda convolutions over sub-batches: %d, of %lld samples at the fewest\n", splits,
                    (long long)fewest);
    }
    *out = &g->base;
    return MPSCY_OK;
}

int cu_graph_io(mpscy_graph gh, int32_t kind, int32_t index, mpscy_buffer *out, char *err, size_t n) {
    cu_graph *g = (cu_graph *)gh;
    int32_t slot;
    /* the other buffers are then read and written directly. The inputs' and targets' staging is
     * pinned memory that a step's kernels read before its result is final, so a training step
     * that returned early has done with it: handing it out (the dispatcher's label check reads
     * it before every step) need not wait for that step's update, which would leave the next
     * step nothing to overlap with it ($MPSCY_CUDA_IO_SETTLE=1 waits: a knob for A/B timing) */
    const bool staging = (kind == MPSCY_IO_INPUT || kind == MPSCY_IO_TARGET) && !g->io_settle;
    int st = staging ? MPSCY_OK : cu_settle(gh->dev, err, n);
    if (st == MPSCY_OK) st = mpscy_plan_io_slot(&g->plan, kind, index, &slot, CU, err, n);
    if (st == MPSCY_OK) *out = &g->io_bufs[slot].base;
    return st;
}

/* Device address of a float tensor (parameters, buffers, gradients, optimizer slots). */
static float *tensor_dev(cu_graph *g, const mpscy_tensor *t) {
    if (t->info.role == MPSCY_ROLE_GRAD) return g->grads + t->info.offset;
    if (t->info.role == MPSCY_ROLE_OPTIM) return g->optim + t->info.offset;
    return g->params + t->info.offset;
}

int cu_tensor_read(mpscy_graph gh, const mpscy_tensor *t, void *dst, size_t bytes, char *err, size_t n) {
    int st = cu_settle(gh->dev, err, n);
    if (st != MPSCY_OK) return st;
    cudaError_t e = cudaMemcpy(dst, tensor_dev((cu_graph *)gh, t), bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return FAIL(MPSCY_DEVICE, "reading tensor '%s': %s", t->info.name, cudaGetErrorString(e));
    return MPSCY_OK;
}

int cu_tensor_write(mpscy_graph gh, const mpscy_tensor *t, const void *src, size_t bytes, char *err, size_t n) {
    int st = cu_settle(gh->dev, err, n);
    if (st != MPSCY_OK) return st;
    cudaError_t e = cudaMemcpy(tensor_dev((cu_graph *)gh, t), src, bytes, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cu_legacy_done();
    if (e != cudaSuccess) return FAIL(MPSCY_DEVICE, "writing tensor '%s': %s", t->info.name, cudaGetErrorString(e));
    return MPSCY_OK;
}
