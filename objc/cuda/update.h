/* update.h — the end of every CUDA training step, shared by optim.cu's norm/update kernels and
 * mlp.cu's whole-step kernel: the decision (finite and TRAIN: applied; the clip coefficient) and
 * the optimizer's pass over the flat slab with the element rules of common/optim_math.h.
 * Header-only device code; include from .cu files only. */
#ifndef MPSCY_CUDA_UPDATE_H
#define MPSCY_CUDA_UPDATE_H

#include "cuda.h"
#include "reduce.h"

#include <math.h>

/* The decision of a step from the total of squares: written by one thread. */
static __device__ void decide(cu_scratch *S, cu_result *R, double total, double clip_norm, int update) {
    double norm = sqrt(total), loss = S->loss;
    int finite = isfinite(loss) && isfinite(norm);
    /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
    double coef = clip_norm > 0 ? clip_norm / (norm + 1e-6) : 1.0;
    S->clip_scale = coef < 1.0 ? (float)coef : 1.0f;
    S->applied = finite && update;
    R->grad_norm = norm;
    R->finite = finite;
    R->applied = finite && update;
}

static __device__ __forceinline__ double sum_squares(const float *grads, int64_t n) {
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)grads[i] * grads[i];
    return block_sum(s);
}

struct update_args {
    float *w, *grads, *s0, *s1, *s2;   // (n) each: parameters, gradients, optimizer slots (or NULL)
    int64_t n;
    int kind, decoupled, clip_norm;
    float clip_value;
};

/* One pass over the slab: clip (norm coefficient, then value; the clipped gradient is stored
 * back, as on the cpu), then the kind's element rule. A thread takes UPDATE_ILP elements a
 * stride apart at a time and loads all of their state before it updates any: the element rules
 * work on registers, so the loads of the next elements need not wait for this one's stores. */
#define UPDATE_ILP 4
static __device__ void update_slab(const update_args &u, const cu_params *P, float cs) {
    const mpscy_optim_coef c = P->coef;
    const int clipped = u.clip_norm || u.clip_value > 0.0f;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i0 < u.n; i0 += UPDATE_ILP * stride) {
        float g[UPDATE_ILP], w[UPDATE_ILP], s0[UPDATE_ILP], s1[UPDATE_ILP], s2[UPDATE_ILP];
#pragma unroll
        for (int j = 0; j < UPDATE_ILP; j++) {
            const int64_t i = i0 + j * stride;
            if (i >= u.n) break;
            g[j] = u.grads[i];
            w[j] = u.w[i];
            s0[j] = u.s0 ? u.s0[i] : 0.0f;
            s1[j] = u.s1 ? u.s1[i] : 0.0f;
            s2[j] = u.s2 ? u.s2[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UPDATE_ILP; j++) {
            const int64_t i = i0 + j * stride;
            if (i >= u.n) break;
            float gj = g[j];
            if (u.clip_norm) gj *= cs;
            if (u.clip_value > 0.0f) gj = gj > u.clip_value ? u.clip_value : (gj < -u.clip_value ? -u.clip_value : gj);
            if (clipped) u.grads[i] = gj;
            float *v2 = u.s2 ? &s2[j] : NULL;  /* amsgrad's max, RMSprop's centred average: optional */
            switch (u.kind) {
            case MPSCY_OPTIM_SGD: mpscy_sgd_elem(&w[j], &s0[j], gj, &c); break;
            case MPSCY_OPTIM_ADAM:
            case MPSCY_OPTIM_ADAMW: mpscy_adam_elem(&w[j], &s0[j], &s1[j], v2, gj, &c, u.decoupled); break;
            case MPSCY_OPTIM_RMSPROP: mpscy_rmsprop_elem(&w[j], &s0[j], &s1[j], v2, gj, &c); break;
            case MPSCY_OPTIM_ADAGRAD: mpscy_adagrad_elem(&w[j], &s0[j], gj, &c); break;
            case MPSCY_OPTIM_ADADELTA: mpscy_adadelta_elem(&w[j], &s0[j], &s1[j], gj, &c); break;
            case MPSCY_OPTIM_NADAM: mpscy_nadam_elem(&w[j], &s0[j], &s1[j], gj, &c); break;
            }
            u.w[i] = w[j];
            if (u.s0) u.s0[i] = s0[j];
            if (u.s1) u.s1[i] = s1[j];
            if (u.s2) u.s2[i] = s2[j];
        }
    }
}

/* The end of a step in a kernel whose every block holds the same total of squares t (summed
 * in one fixed order) and the same loss: block 0 records the decision, and every block, when
 * the step is applied, clips and updates its share of the slab. */
static __device__ void decide_and_update(const update_args &u, cu_scratch *S, cu_result *R, const cu_params *P,
                                         double t, double loss, double clip_norm, int update) {
    const double norm = sqrt(t);
    const double coef = clip_norm > 0 ? clip_norm / (norm + 1e-6) : 1.0;
    if (blockIdx.x == 0 && threadIdx.x == 0) decide(S, R, t, clip_norm, update);
    if (update && isfinite(loss) && isfinite(norm)) update_slab(u, P, coef < 1.0 ? (float)coef : 1.0f);
}

#endif /* MPSCY_CUDA_UPDATE_H */
