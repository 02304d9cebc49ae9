/* update.h — the end of every CUDA training step, shared by optim.cu's norm/update kernels and
 * mlp.cu's whole-step kernel: the decision (finite and TRAIN: applied; the clip coefficient) and
 * the optimizer's pass over the flat slab with the element rules of common/optim_math.h.
 * Header-only device code; include from .cu files only. */
#ifndef MPSCY_CUDA_UPDATE_H
#define MPSCY_CUDA_UPDATE_H

#include "cuda.h"
#include "reduce.h"

#include <math.h>

/* The decision of a step from the total of squares: written by one thread, after the loss (whose
 * mean and correct count it copies from S into R with the rest of the result). With the result
 * final, P->rseq goes to R->done (a release store at system scope: the host that sees it sees
 * the rest), for a training step that returns before its update ends (step.cu). */
static __device__ void decide(cu_scratch *S, cu_result *R, const cu_params *P, double total, double clip_norm,
                              int update) {
    double norm = sqrt(total), loss = S->loss;
    int finite = isfinite(loss) && isfinite(norm);
    /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
    double coef = clip_norm > 0 ? clip_norm / (norm + 1e-6) : 1.0;
    S->clip_scale = coef < 1.0 ? (float)coef : 1.0f;
    S->applied = finite && update;
    R->loss = loss;
    R->correct = S->correct;
    R->grad_norm = norm;
    R->finite = finite;
    R->applied = finite && update;
    if (P->rseq) {  /* a training step that returns early (step.cu) */
        /* a release store at system scope: whoever sees done sees this thread's writes above
         * (and what it saw before), without __threadfence_system()'s sequentially consistent
         * fence, which the host waited on: A/B on the H200, the MLP b32 37.4-39.2 us against
         * 38.6-40.1 with that fence (four pairs), the CNN and the wide MLP the same within noise */
        asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(&R->done), "r"(P->rseq) : "memory");
    }
}

/* 1 when this step's deferred input held a NaN or Inf (step.cu's pull kernel marked it): the
 * step then applies no update, whatever its loss */
static __device__ __forceinline__ int input_bad(const cu_scratch *S, const cu_params *P) {
    return P->seq != 0 && S->bad_seq == P->seq;
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
 * back, as on the cpu), then the kind's element rule. */
static __device__ void update_slab(const update_args &u, const cu_params *P, float cs) {
    const mpscy_optim_coef c = P->coef;
    const int clipped = u.clip_norm || u.clip_value > 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < u.n; i += (int64_t)gridDim.x * blockDim.x) {
        float g = u.grads[i];
        if (u.clip_norm) g *= cs;
        if (u.clip_value > 0.0f) g = g > u.clip_value ? u.clip_value : (g < -u.clip_value ? -u.clip_value : g);
        if (clipped) u.grads[i] = g;
        switch (u.kind) {
        case MPSCY_OPTIM_SGD: mpscy_sgd_elem(&u.w[i], &u.s0[i], g, &c); break;
        case MPSCY_OPTIM_ADAM:
        case MPSCY_OPTIM_ADAMW:
            mpscy_adam_elem(&u.w[i], &u.s0[i], &u.s1[i], u.s2 ? &u.s2[i] : NULL, g, &c, u.decoupled);
            break;
        case MPSCY_OPTIM_RMSPROP: mpscy_rmsprop_elem(&u.w[i], &u.s0[i], &u.s1[i], u.s2 ? &u.s2[i] : NULL, g, &c); break;
        case MPSCY_OPTIM_ADAGRAD: mpscy_adagrad_elem(&u.w[i], &u.s0[i], g, &c); break;
        case MPSCY_OPTIM_ADADELTA: mpscy_adadelta_elem(&u.w[i], &u.s0[i], &u.s1[i], g, &c); break;
        case MPSCY_OPTIM_NADAM: mpscy_nadam_elem(&u.w[i], &u.s0[i], &u.s1[i], g, &c); break;
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
    if (blockIdx.x == 0 && threadIdx.x == 0) decide(S, R, P, t, clip_norm, update);
    if (update && isfinite(loss) && isfinite(norm)) update_slab(u, P, coef < 1.0 ? (float)coef : 1.0f);
}

#endif /* MPSCY_CUDA_UPDATE_H */
