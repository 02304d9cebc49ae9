/* optim.cu — everything after backward on CUDA: the global gradient norm in double (finite
 * exactly when every gradient is), which also decides the step — finite and TRAIN: applied —
 * and the clip coefficient, all in the norm kernel's last block; then the optimizer as one
 * kernel over the flat slab that clips, reads the decision and applies the shared element rules
 * of common/optim_math.h. Per-step coefficients come from the params block (host-computed). */
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

void cu_fill(cudaStream_t s, float *p, int64_t n, float v) {
    if (n > 0) fill_kernel<<<cu_blocks(n, CU_THREADS, 4096), CU_THREADS, 0, s>>>(p, n, v);
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

__global__ void coop_probe_kernel(int *flag) {
    cg::this_grid().sync();
    if (blockIdx.x == 0 && threadIdx.x == 0) *flag = 1;
}

/* Whether a cooperative kernel can be captured into a graph and run here (checked once). */
int cu_coop_probe(cu_device *d) {
    int attr = 0;
    if (cudaDeviceGetAttribute(&attr, cudaDevAttrCooperativeLaunch, d->ordinal) != cudaSuccess || !attr) {
        cudaGetLastError();
        return 0;
    }
    cudaStream_t s = NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int *flag = NULL, ok = 0, host = 0;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess && cudaMalloc(&flag, sizeof(int)) == cudaSuccess &&
        cudaMemset(flag, 0, sizeof(int)) == cudaSuccess &&
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr1;
        attr1.id = cudaLaunchAttributeCooperative;
        attr1.val.cooperative = 1;
        cfg.gridDim = dim3(2 * d->sms);
        cfg.blockDim = dim3(CU_THREADS);
        cfg.stream = s;
        cfg.attrs = &attr1;
        cfg.numAttrs = 1;
        cudaError_t le = cudaLaunchKernelEx(&cfg, coop_probe_kernel, flag);
        cudaError_t ee = cudaStreamEndCapture(s, &graph);
        if (le == cudaSuccess && ee == cudaSuccess && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess &&
            cudaGraphLaunch(exec, s) == cudaSuccess && cudaStreamSynchronize(s) == cudaSuccess &&
            cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess)
            ok = host == 1;
    }
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (flag) cudaFree(flag);
    if (s) cudaStreamDestroy(s);
    cudaGetLastError();
    return ok;
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

/* Whether kernels launched with programmatic dependent launch can be captured into a graph,
 * run, and still see everything the previous kernel wrote (checked once). */
int cu_pdl_probe(cu_device *d) {
    if (d->prop.major < 9) return 0;
    cudaStream_t s = NULL;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    int *flag = NULL, ok = 0, host = 0;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess &&
        cudaMalloc(&flag, 2 * sizeof(int)) == cudaSuccess && cudaMemset(flag, 0, 2 * sizeof(int)) == cudaSuccess &&
        cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at;
        at.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at.val.programmaticStreamSerializationAllowed = 1;
        cfg.gridDim = dim3(1);
        cfg.blockDim = dim3(32);
        cfg.stream = s;
        cfg.attrs = &at;
        cfg.numAttrs = 1;
        cudaError_t e1 = cudaLaunchKernelEx(&cfg, pdl_probe_first, flag);
        cudaError_t e2 = cudaLaunchKernelEx(&cfg, pdl_probe_second, (const int *)flag, flag + 1);
        cudaError_t ee = cudaStreamEndCapture(s, &graph);
        if (e1 == cudaSuccess && e2 == cudaSuccess && ee == cudaSuccess &&
            cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess && cudaGraphLaunch(exec, s) == cudaSuccess &&
            cudaStreamSynchronize(s) == cudaSuccess &&
            cudaMemcpy(&host, flag + 1, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess)
            ok = host == 1;
    }
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (flag) cudaFree(flag);
    if (s) cudaStreamDestroy(s);
    cudaGetLastError();
    return ok;
}

int cu_optim_supported(int32_t kind) {
    return kind >= MPSCY_OPTIM_SGD && kind <= MPSCY_OPTIM_LBFGS;
}

/* Step t's coefficients, computed on the host exactly as the cpu does; NAdam's running
 * mu_product is kept aside and committed only when the device applied the step. */
void cu_optim_params(cu_graph *g, const mpscy_step_args *a, int64_t t, cu_params *out) {
    out->coef = mpscy_optim_coef_make(&g->plan.optim, a, t);
    if (g->plan.optim.kind == MPSCY_OPTIM_NADAM) {
        g->mu_next = g->scalars[1];
        mpscy_nadam_coef(&out->coef, &g->plan.optim, a, t, &g->mu_next);
    }
    out->seed = a->seed;
    out->counter = a->counter;
}

void cu_optim_applied(cu_graph *g, int64_t t) {
    g->scalars[0] = (double)t;
    if (g->plan.optim.kind == MPSCY_OPTIM_NADAM) g->scalars[1] = g->mu_next;
}

int cu_norm_and_update(cu_graph *g, int update, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    int64_t n = p->n_params;
    float *slot[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3 && k < p->n_vec_slots && p->optim.kind != MPSCY_OPTIM_LBFGS; k++)
        slot[k] = g->optim + p->vec_offset[k];
    update_args u = {g->params, g->grads, slot[0], slot[1], slot[2], n, p->optim.kind,
                     p->optim.kind == MPSCY_OPTIM_ADAMW || (p->optim.flags & MPSCY_OPTIM_DECOUPLED_WD) != 0,
                     p->optim.clip_grad_norm > 0, p->optim.clip_grad_value > 0 ? (float)p->optim.clip_grad_value : 0.0f,
                     cu_knob_int("MPSCY_CUDA_UPD_BATCHED", 1)};
    double clip = p->optim.clip_grad_norm;
    if (g->dev->coop) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeCooperative;
        attr.val.cooperative = 1;
        int per_sm = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, norm_update_kernel, CU_THREADS, 0) != cudaSuccess ||
            per_sm < 1)
            per_sm = 1;
        /* enough threads for the update to keep memory busy, never more than fit at once */
        int64_t most = (int64_t)(per_sm < 8 ? per_sm : 8) * g->dev->sms;
        cfg.gridDim = dim3(cu_blocks(n, CU_THREADS * 4, most < CU_MAX_PARTS ? most : CU_MAX_PARTS));
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
