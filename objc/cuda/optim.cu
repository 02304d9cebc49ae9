/* optim.cu — everything after backward on CUDA: the global gradient norm in double (finite
 * exactly when every gradient is), which also decides the step — finite and TRAIN: applied —
 * and the clip coefficient, all in the norm kernel's last block; then the optimizer as one
 * kernel over the flat slab that clips, reads the decision and applies the shared element rules
 * of common/optim_math.h. Per-step coefficients come from the params block (host-computed). */
#include "cuda.h"
#include "reduce.h"

#include <math.h>

__global__ void fill_kernel(float *p, int64_t n, float v) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        p[i] = v;
}

void cu_fill(cudaStream_t s, float *p, int64_t n, float v) {
    if (n > 0) fill_kernel<<<cu_blocks(n, CU_THREADS, 4096), CU_THREADS, 0, s>>>(p, n, v);
}

__global__ void grad_norm_kernel(cu_scratch *S, cu_result *R, const float *grads, int64_t n, double clip_norm,
                                 int update) {
    // grads (n)
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)grads[i] * grads[i];
    s = block_sum(s);
    if (threadIdx.x == 0) S->norm_part[blockIdx.x] = s;
    if (!last_block(&S->norm_count)) return;
    const volatile double *np = S->norm_part;
    double t = 0;
    for (unsigned k = threadIdx.x; k < gridDim.x; k += blockDim.x) t += np[k];
    t = block_sum(t);
    if (threadIdx.x == 0) {
        double norm = sqrt(t), loss = S->loss;
        int finite = isfinite(loss) && isfinite(norm);
        /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
        double coef = clip_norm > 0 ? clip_norm / (norm + 1e-6) : 1.0;
        S->clip_scale = coef < 1.0 ? (float)coef : 1.0f;
        S->applied = finite && update;
        R->grad_norm = norm;
        R->finite = finite;
        R->applied = finite && update;
        S->norm_count = 0;
    }
}

int cu_grad_norm(cu_graph *g, int update, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    unsigned blocks = cu_blocks(p->n_params, CU_THREADS * 8, 2 * g->dev->sms);
    grad_norm_kernel<<<blocks, CU_THREADS, 0, g->stream>>>(g->scratch, g->result, g->grads, p->n_params,
                                                           p->optim.clip_grad_norm, update);
    return CU_LAUNCHED("grad_norm");
}

/* One pass over the slab: clip (norm coefficient, then value; the clipped gradient is stored
 * back, as on the cpu), then the element rule. Nothing is touched unless applied. */
template <int KIND>
__global__ void optim_update_kernel(float *w, float *grads, float *s0, float *s1, float *s2, int64_t n,
                                    const cu_scratch *S, const cu_params *P, int clip_norm, float clip_value) {
    // w, grads (n); s0, s1, s2 (n) optimizer slots
    if (!S->applied) return;
    const mpscy_optim_coef c = P->coef;
    const float cs = S->clip_scale;
    const int clipped = clip_norm || clip_value > 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float g = grads[i];
        if (clip_norm) g *= cs;
        if (clip_value > 0.0f) g = g > clip_value ? clip_value : (g < -clip_value ? -clip_value : g);
        if (clipped) grads[i] = g;
        if (KIND == MPSCY_OPTIM_SGD) {
            mpscy_sgd_elem(&w[i], &s0[i], g, &c);
        } else {
            mpscy_adam_elem(&w[i], &s0[i], &s1[i], (c.flags & MPSCY_OPTIM_AMSGRAD) ? &s2[i] : NULL, g, &c,
                            KIND == MPSCY_OPTIM_ADAMW);
        }
    }
}

int cu_optim_supported(int32_t kind) {
    return kind == MPSCY_OPTIM_SGD || kind == MPSCY_OPTIM_ADAM || kind == MPSCY_OPTIM_ADAMW;
}

void cu_optim_params(cu_graph *g, const mpscy_step_args *a, int64_t t, cu_params *out) {
    out->coef = mpscy_optim_coef_make(&g->plan.optim, a, t);
    out->seed = a->seed;
    out->counter = a->counter;
}

int cu_optim_update(cu_graph *g, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    int64_t n = p->n_params;
    float *s0 = g->optim, *s1 = g->optim + n, *s2 = g->optim + 2 * n;
    int clip_norm = p->optim.clip_grad_norm > 0;
    float clip_value = p->optim.clip_grad_value > 0 ? (float)p->optim.clip_grad_value : 0.0f;
    unsigned blocks = cu_blocks(n, CU_THREADS * 4, 8 * g->dev->sms);
    switch (p->optim.kind) {
    case MPSCY_OPTIM_SGD:
        optim_update_kernel<MPSCY_OPTIM_SGD><<<blocks, CU_THREADS, 0, g->stream>>>(
            g->params, g->grads, s0, s1, s2, n, g->scratch, g->params_d, clip_norm, clip_value);
        break;
    case MPSCY_OPTIM_ADAM:
        optim_update_kernel<MPSCY_OPTIM_ADAM><<<blocks, CU_THREADS, 0, g->stream>>>(
            g->params, g->grads, s0, s1, s2, n, g->scratch, g->params_d, clip_norm, clip_value);
        break;
    case MPSCY_OPTIM_ADAMW:
        optim_update_kernel<MPSCY_OPTIM_ADAMW><<<blocks, CU_THREADS, 0, g->stream>>>(
            g->params, g->grads, s0, s1, s2, n, g->scratch, g->params_d, clip_norm, clip_value);
        break;
    default:
        return MPSCY_FAIL(err, en, MPSCY_UNSUPPORTED, CU, "optimizer kind %d", p->optim.kind);
    }
    return CU_LAUNCHED("optim_update");
}
