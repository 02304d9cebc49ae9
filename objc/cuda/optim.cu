/* optim.cu — everything after backward on CUDA: the global gradient norm in double (finite
 * exactly when every gradient is), which also decides the step — finite and TRAIN: applied —
 * and the clip coefficient; then the optimizer over the flat slab that clips, reads the decision
 * and applies the shared element rules of common/optim_math.h. By default the norm is early:
 * each layer's squares are summed on a stream of their own as soon as its backward is done,
 * beside the backward of the layers below, and the step's last kernel adds those partials and
 * the last layer's squares in every block (no grid-wide barrier), decides and updates
 * (norm_final_kernel; the README CNN on the H200: 11-12 us against the cooperative kernel's
 * 15-16). $MPSCY_CUDA_NORM_EARLY=0: the whole slab's norm at the end, in one cooperative kernel
 * (or two, with the decision in the last block). Per-step coefficients come from the params
 * block (host-computed). */
#include "cuda.h"
#include "reduce.h"
#include "update.h"

#include <cooperative_groups.h>
namespace cg = cooperative_groups;

#include <math.h>

__global__ void fill_kernel(float *p, int64_t n, float v) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = v;
}

/* The launch's status (cudaGetLastError, which it also clears). */
cudaError_t cu_fill(cudaStream_t s, float *p, int64_t n, float v) {
    if (n > 0) fill_kernel<<<cu_blocks(n, CU_THREADS, 4096), CU_THREADS, 0, s>>>(p, n, v);
    return cudaGetLastError();
}

/* Two-kernel form: the norm with a last-block finish, then the update reading the decision. */
__global__ void grad_norm_kernel(cu_scratch *S, cu_result *R, const cu_params *P, const float *grads, int64_t n,
                                 double clip_norm, int update, int batched) {
    cu_pdl_enter();
    double s = sum_squares(grads, n, batched);
    if (threadIdx.x == 0) S->norm_part[blockIdx.x] = s;
    if (!last_block(&S->norm_count)) return;
    const volatile double *np = S->norm_part;
    double t = 0;
    for (unsigned k = threadIdx.x; k < gridDim.x; k += blockDim.x) t += np[k];
    t = block_sum(t);
    if (threadIdx.x == 0) {
        decide(S, R, P, t, clip_norm, update && !input_bad(S, P));
        S->norm_count = 0;
    }
}

__global__ void optim_update_kernel(update_args u, const cu_scratch *S, const cu_params *P) {
    cu_pdl_enter();
    if (!S->applied) return;
    update_slab<true>(u, P, S->clip_scale);
}

/* One cooperative kernel: squares, a grid-wide barrier, every block adds the partials in the
 * same order (so all agree on the decision), then the update. */
__global__ void norm_update_kernel(update_args u, cu_scratch *S, cu_result *R, const cu_params *P, double clip_norm,
                                   int update) {
    __shared__ double total;
    double s = sum_squares(u.grads, u.n, u.batched);
    if (threadIdx.x == 0) S->norm_part[blockIdx.x] = s;
    cg::this_grid().sync();
    const volatile double *np = S->norm_part;
    double t = 0;
    for (unsigned k = threadIdx.x; k < gridDim.x; k += blockDim.x) t += np[k];
    t = block_sum(t);
    if (threadIdx.x == 0) total = t;
    __syncthreads();
    decide_and_update<true>(u, S, R, P, total, S->loss, clip_norm, update && !input_bad(S, P));
}

/* The early norm. A layer's squares: each block's sum of its threads' elements i, i + stride, ...
 * in order (sum_squares) into parts[blockIdx.x], on the norm's own stream once the layer's
 * gradients are done (cu_norm_part), beside the backward of the layers below. */
__global__ void norm_part_kernel(double *parts, const float *grads, int64_t n, int batched) {
    cu_pdl_enter();
    const double s = sum_squares(grads, n, batched);
    if (threadIdx.x == 0) parts[blockIdx.x] = s;
}

/* The step's end after the early norm: every block adds the `parts` partials (thread t: t, t +
 * blockDim.x, ...) and the squares of the late runs (the last layer's gradients, done just
 * before: thread t their elements t, t + blockDim.x, ...), then the block's sum: the same total,
 * in the same order, in every block, with no grid-wide barrier. Then decide and update as the
 * cooperative kernel does. */
__global__ void norm_final_kernel(update_args u, cu_scratch *S, cu_result *R, const cu_params *P, double clip_norm,
                                  int update, int parts, cu_norm_late late) {
    cu_pdl_enter();
    __shared__ double total;
    /* the update's first batch is loaded before the partials are added, so its loads overlap
     * the sum (the elements are this thread's alone: no other block writes them first) */
    upd_batch<4> first;
    const bool pre = update && u.batched && u.prefetch;
    if (pre) upd_load<4>(u, blockIdx.x * (int64_t)blockDim.x + threadIdx.x, (int64_t)gridDim.x * blockDim.x, first);
    double s = 0;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) s += S->norm_part[k];
#pragma unroll
    for (int r = 0; r < CU_NORM_LATE_RUNS; r++)  /* unrolled: the runs stay in the parameter space */
        if (r < late.runs) {
            const float *g = u.grads + late.off[r];
            for (int64_t i = threadIdx.x; i < late.n[r]; i += blockDim.x) s += (double)g[i] * g[i];
        }
    s = block_sum(s);
    if (threadIdx.x == 0) total = s;
    __syncthreads();
    decide_and_update<true>(u, S, R, P, total, S->loss, clip_norm, update && !input_bad(S, P), first, pre);
}

__global__ void coop_probe_kernel(int *flag) {
    cg::this_grid().sync();
    if (blockIdx.x == 0 && threadIdx.x == 0) *flag = 1;
}

/* Captures what `enqueue` launches on a fresh stream into a graph, runs it and reads flag[word]
 * back (two ints, zeroed first): whether the whole round worked and the word reads 1. The
 * probes below are run once a device. */
static int probe_in_graph(const cu_device *d, cudaError_t (*enqueue)(const cu_device *, cudaStream_t, int *), int word) {
    cudaStream_t s = NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int *flag = NULL, ok = 0, host = 0;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess &&
        cudaMalloc(&flag, 2 * sizeof(int)) == cudaSuccess && cudaMemset(flag, 0, 2 * sizeof(int)) == cudaSuccess &&
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
        cudaError_t le = enqueue(d, s, flag);
        cudaError_t ee = cudaStreamEndCapture(s, &graph);
        if (le == cudaSuccess && ee == cudaSuccess && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess &&
            cudaGraphLaunch(exec, s) == cudaSuccess && cudaStreamSynchronize(s) == cudaSuccess &&
            cudaMemcpy(&host, flag + word, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess)
            ok = host == 1;
    }
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (flag) cudaFree(flag);
    if (s) cudaStreamDestroy(s);
    cudaGetLastError();
    return ok;
}

static cudaError_t coop_probe_enqueue(const cu_device *d, cudaStream_t s, int *flag) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
    cfg.gridDim = dim3(2 * d->sms);
    cfg.blockDim = dim3(CU_THREADS);
    cfg.stream = s;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, coop_probe_kernel, flag);
}

/* Whether a cooperative kernel can be captured into a graph and run here (checked once). */
int cu_coop_probe(cu_device *d) {
    int attr = 0;
    if (cudaDeviceGetAttribute(&attr, cudaDevAttrCooperativeLaunch, d->ordinal) != cudaSuccess || !attr) {
        cudaGetLastError();
        return 0;
    }
    return probe_in_graph(d, coop_probe_enqueue, 0);
}

__global__ void pdl_probe_first(int *flag) {
    cu_pdl_enter();
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        for (volatile int k = 0; k < 20000; k++) {}  /* long enough that an early dependent would see 0 */
        *flag = 1;
    }
}

__global__ void pdl_probe_second(const int *flag, int *out) {
    cu_pdl_enter();
    if (blockIdx.x == 0 && threadIdx.x == 0) *out = *(volatile const int *)flag;
}

static cudaError_t pdl_probe_enqueue(const cu_device *, cudaStream_t s, int *flag) {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute at;
    at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at.val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(32);
    cfg.stream = s;
    cfg.attrs = &at;
    cfg.numAttrs = 1;
    cudaError_t e = cudaLaunchKernelEx(&cfg, pdl_probe_first, flag);
    return e != cudaSuccess ? e : cudaLaunchKernelEx(&cfg, pdl_probe_second, (const int *)flag, flag + 1);
}

/* Whether kernels launched with programmatic dependent launch can be captured into a graph,
 * run, and still see everything the previous kernel wrote (checked once). */
int cu_pdl_probe(cu_device *d) { return d->prop.major >= 9 && probe_in_graph(d, pdl_probe_enqueue, 1); }

int cu_optim_supported(int32_t kind) {
    return kind >= MPSCY_OPTIM_SGD && kind <= MPSCY_OPTIM_LBFGS;
}

/* Step t's coefficients, computed on the host exactly as the cpu does; the running scalar
 * (NAdam's mu_product, SGD's momentum_started) is kept aside and committed only when the device
 * applied the step. */
void cu_optim_params(cu_graph *g, const mpscy_step_args *a, int64_t t, cu_params *out) {
    g->mu_next = g->scalars[1];
    out->coef = mpscy_optim_coef_make(&g->plan.optim, a, t, &g->mu_next);
}

void cu_optim_applied(cu_graph *g, int64_t t) {
    g->scalars[0] = (double)t;
    if (mpscy_optim_has_running(&g->plan.optim)) g->scalars[1] = g->mu_next;
}

/* The update's grid (the cooperative kernel's and the early norm's final one): enough threads
 * for the update to keep memory busy, never more than fit at once, nor than the partials' room. */
static unsigned slab_blocks(const cu_graph *g, const void *kernel, int64_t n) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, CU_THREADS, 0) != cudaSuccess || per_sm < 1) {
        cudaGetLastError();
        per_sm = 1;
    }
    const int64_t most = (int64_t)(per_sm < 8 ? per_sm : 8) * g->dev->sms;
    return cu_blocks(n, CU_THREADS * 4, most < CU_MAX_PARTS ? most : CU_MAX_PARTS);
}

/* The early norm's partials: an early layer's tensor a block per 4096 floats, at most 64 blocks
 * (they run beside the backward); a late one (after the backward, on the main stream) a block
 * per 2048 floats, at most two a multiprocessor. */
static unsigned norm_part_blocks(const cu_graph *g, int64_t count, int late) {
    return late ? cu_blocks(count, CU_THREADS * 8, 2 * (int64_t)g->dev->sms) : cu_blocks(count, CU_THREADS * 16, 64);
}

#define NORM_LATE_MAX 8192  /* floats the final kernel squares itself in every block, at most */

/* Whether a training step enqueues node i's backward (step.cu: the output Dense with the loss
 * when g->head, then every node down with a gradient but the input) and node i holds trained
 * parameters (a frozen layer's gradients are written past n_train, and nothing reads them). */
static bool backward_params(const cu_graph *g, int32_t i) {
    const mpscy_plan *p = &g->plan;
    const mpscy_node *n = &p->nodes[i];
    const int32_t t = mpscy_node_tensor(p, n, MPSCY_ROLE_PARAM, 0);
    return ((g->head && i == p->output) || (n->grad && n->kind != MPSCY_LAYER_INPUT)) && t >= 0 &&
           mpscy_tensor_trained(p, &p->tensors[t]);
}

/* Whether node i's squares are summed early, after its backward (cu_norm_part): all such nodes
 * but the one whose backward is enqueued last. */
static bool norm_early_node(const cu_graph *g, int32_t i) {
    return g->norm_on && i != g->norm_last && backward_params(g, i);
}

/* Whether the parameter tensor pt's squares are left for the step's end (cu_norm_plan): those no
 * early node takes. */
static bool norm_late_tensor(const cu_graph *g, const mpscy_tensor *pt) {
    return mpscy_tensor_trained(&g->plan, pt) && !norm_early_node(g, pt->node);
}

/* Tensor ti's squares as norm_part_kernel's partials on stream s, after those enqueued so far. */
static int norm_part_launch(cu_graph *g, cudaStream_t s, const mpscy_tensor_info *ti, int late, char *err, size_t en) {
    const unsigned blocks = norm_part_blocks(g, ti->count, late);
    CU_TRY(cu_launch(g, norm_part_kernel, blocks, CU_THREADS, s, g->scratch->norm_part + g->norm_parts,
                     (const float *)g->grads + ti->offset, ti->count, g->upd_batched),
           "norm_part");
    g->norm_parts += (int)blocks;
    return CU_LAUNCHED("norm_part");
}

/* Plans the early norm once, at build: on when $MPSCY_CUDA_NORM_EARLY left g->norm_on set and
 * every tensor's partials fit the scratch; the node whose backward is enqueued last keeps its
 * squares for the step's end. Those of the tensors no early node takes (the last node's, and any
 * a node without backward holds) the final kernel adds itself as runs of the slab, or, past
 * NORM_LATE_MAX floats or CU_NORM_LATE_RUNS runs, they go as partials on the main stream first;
 * always as partials when the gradients are clipped, since the update stores them back clipped,
 * and a block that updates would then change what a block still adding its squares reads. */
void cu_norm_plan(cu_graph *g) {
    const mpscy_plan *p = &g->plan;
    g->norm_last = -1;
    int64_t parts = 0;
    for (int32_t t = 0; t < p->n_tensors; t++)
        if (mpscy_tensor_trained(p, &p->tensors[t])) {
            const unsigned e = norm_part_blocks(g, p->tensors[t].info.count, 0),
                           l = norm_part_blocks(g, p->tensors[t].info.count, 1);
            parts += e > l ? e : l;
        }
    if (parts > CU_MAX_PARTS) g->norm_on = 0;
    /* the backward's order (step.cu): the output Dense with the loss (head), then the nodes down */
    for (int32_t i = 0; i < p->n_nodes && g->norm_last < 0; i++)
        if (backward_params(g, i) && !(g->head && i == p->output)) g->norm_last = i;
    if (g->norm_last < 0 && g->head) g->norm_last = p->output;
    cu_norm_late late = {};
    int64_t floats = 0;
    bool fits = !(p->optim.clip_grad_norm > 0) && !(p->optim.clip_grad_value > 0);
    for (int32_t t = 0; t < p->n_tensors; t++) {
        const mpscy_tensor *pt = &p->tensors[t];
        if (!norm_late_tensor(g, pt)) continue;
        floats += pt->info.count;
        if (late.runs > 0 && late.off[late.runs - 1] + late.n[late.runs - 1] == pt->info.offset) {
            late.n[late.runs - 1] += pt->info.count;
        } else if (late.runs < CU_NORM_LATE_RUNS) {
            late.off[late.runs] = pt->info.offset;
            late.n[late.runs++] = pt->info.count;
        } else {
            fits = false;
        }
    }
    g->norm_late_parts = !fits || floats > NORM_LATE_MAX;
    if (g->norm_late_parts) late.runs = 0;
    g->norm_late = late;
}

/* After node i's backward is enqueued: its tensors' squares on the norm's stream, after
 * everything the main and the forked side streams hold so far (its gradients' writers among
 * them, wherever the layer put them). */
int cu_norm_part(cu_graph *g, int32_t i, char *err, size_t en) {
    if (!norm_early_node(g, i)) return MPSCY_OK;
    const mpscy_node *n = &g->plan.nodes[i];
    cudaStream_t s = g->stream;
    if (g->nrm) {
        s = g->nrm;
        const cudaStream_t from[3] = {g->stream, g->side, g->alt};
        const int st = cu_wait_streams(g, s, from, 1 | (g->forked & 3) << 1, err, en);
        if (st != MPSCY_OK) return st;
        g->forked |= 4;
    }
    int st = MPSCY_OK;
    for (int32_t t = n->tensor0; t < n->tensor0 + n->n_tensors && st == MPSCY_OK; t++)
        if (mpscy_tensor_trained(&g->plan, &g->plan.tensors[t]))
            st = norm_part_launch(g, s, &g->plan.tensors[t].info, 0, err, en);
    return st;
}

/* The step's end after the early norm (the late squares as cu_norm_plan decided), one kernel. */
static int norm_final(cu_graph *g, const update_args &u, int update, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    for (int32_t t = 0; t < p->n_tensors && g->norm_late_parts; t++) {
        const mpscy_tensor *pt = &p->tensors[t];
        if (!norm_late_tensor(g, pt)) continue;
        const int st = norm_part_launch(g, g->stream, &pt->info, 1, err, en);
        if (st != MPSCY_OK) return st;
    }
    CU_TRY(cu_launch(g, norm_final_kernel, slab_blocks(g, (const void *)norm_final_kernel, update ? p->n_train : 1),
                     CU_THREADS, g->stream, u, g->scratch, g->result, (const cu_params *)g->params_d,
                     p->optim.clip_grad_norm, update, g->norm_parts, g->norm_late),
           "norm_final");
    return CU_LAUNCHED("norm_final");
}

int cu_norm_and_update(cu_graph *g, int update, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    int64_t n = p->n_train;
    float *slot[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3 && k < p->n_vec_slots && p->optim.kind != MPSCY_OPTIM_LBFGS; k++)
        slot[k] = g->optim + p->vec_offset[k];
    update_args u = {g->params, g->grads, slot[0], slot[1], slot[2], n, p->optim.kind,
                     p->optim.kind == MPSCY_OPTIM_ADAMW || (p->optim.flags & MPSCY_OPTIM_DECOUPLED_WD) != 0,
                     p->optim.clip_grad_norm > 0, p->optim.clip_grad_value > 0 ? (float)p->optim.clip_grad_value : 0.0f,
                     g->upd_batched};
    u.prefetch = g->upd_prefetch;
    double clip = p->optim.clip_grad_norm;
    if (g->norm_on) return norm_final(g, u, update, err, en);
    if (g->dev->coop) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeCooperative;
        attr.val.cooperative = 1;
        cfg.gridDim = dim3(slab_blocks(g, (const void *)norm_update_kernel, n));
        cfg.blockDim = dim3(CU_THREADS);
        cfg.stream = g->stream;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        CU_TRY(cudaLaunchKernelEx(&cfg, norm_update_kernel, u, g->scratch, g->result, (const cu_params *)g->params_d,
                                  clip, update),
               "norm_update (cooperative)");
        return CU_LAUNCHED("norm_update");
    }
    CU_TRY(cu_launch(g, grad_norm_kernel,
                     cu_blocks(n, CU_THREADS * 8, CU_MAX_PARTS < 2 * g->dev->sms ? CU_MAX_PARTS : 2 * g->dev->sms),
                     CU_THREADS, g->stream, g->scratch, g->result, (const cu_params *)g->params_d,
                     (const float *)g->grads, n, clip, update, u.batched),
           "grad_norm");
    int st = CU_LAUNCHED("grad_norm");
    if (st != MPSCY_OK || !update) return st;
    CU_TRY(cu_launch(g, optim_update_kernel, cu_blocks(n, CU_THREADS * 4, 8 * g->dev->sms), CU_THREADS, g->stream, u,
                     (const cu_scratch *)g->scratch, (const cu_params *)g->params_d),
           "optim_update");
    return CU_LAUNCHED("optim_update");
}
