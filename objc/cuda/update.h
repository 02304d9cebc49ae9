/* update.h — the end of every CUDA training step, shared by optim.cu's norm/update kernels and
 * mlp.cu's whole-step kernel: the decision (finite and TRAIN: applied; the clip coefficient) and
 * the optimizer's pass over the flat slab with the element rules of common/optim_math.h.
 * Header-only device code; include from .cu files only. */
#ifndef MPSCY_CUDA_UPDATE_H
#define MPSCY_CUDA_UPDATE_H

#include "cuda.h"
#include "reduce.h"

#include <math.h>

/* R->done = P->rseq as a release store at system scope: whoever sees done sees this thread's
 * writes before it (and what it saw before), without __threadfence_system()'s sequentially
 * consistent fence, which the host waited on: A/B on the H200, the MLP b32 37.4-39.2 us against
 * 38.6-40.1 with that fence (four pairs), the CNN and the wide MLP the same within noise */
static __device__ __forceinline__ void release_result(cu_result *R, uint32_t rseq) {
    cu_store_release_sys(&R->done, rseq);
}

/* The decision of a step from the total of squares: written by one thread, after the loss (whose
 * mean and correct count it copies from S into R with the rest of the result). With the result
 * final, P->rseq goes to R->done (release_result), for a training step that returns before its
 * update ends (step.cu). late: mlp.cu's early decision has released the result already; the
 * norm goes to its ring slot, marked by its own release store. */
static __device__ void decide(cu_scratch *S, cu_result *R, const cu_params *P, double total, double clip_norm,
                              int update, bool late = false) {
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
    if (late) {
        R->norm_ring[P->nslot] = norm;
        cu_store_release_sys(&R->norm_seq[P->nslot], P->rseq);
    } else if (P->rseq) {  /* a training step that returns early (step.cu) */
        release_result(R, P->rseq);
    }
}

/* 1 when this step's deferred input held a NaN or Inf (step.cu's pull kernel marked it): the
 * step then applies no update, whatever its loss */
static __device__ __forceinline__ int input_bad(const cu_scratch *S, const cu_params *P) {
    return P->seq != 0 && S->bad_seq == P->seq;
}

/* Each thread's elements i, i + stride, ... added in that order, then the block's sum. batched:
 * 4 elements' loads at a time before their terms are added (the same terms in the same order:
 * the same bits), not a load an addition. */
static __device__ __forceinline__ double sum_squares(const float *grads, int64_t n, int batched) {
    double s = 0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (batched) {
        for (; i + 3 * stride < n; i += 4 * stride) {
            float g[4];
#pragma unroll
            for (int j = 0; j < 4; j++) g[j] = grads[i + j * stride];
#pragma unroll
            for (int j = 0; j < 4; j++) s += (double)g[j] * g[j];
        }
    }
    for (; i < n; i += stride) s += (double)grads[i] * grads[i];
    return block_sum(s);
}

struct update_args {
    float *w, *grads, *s0, *s1, *s2;   // (n) each: parameters, gradients, optimizer slots (or NULL)
    int64_t n;
    int kind, decoupled, clip_norm;
    float clip_value;
    int batched;  // update_slab_batched<4> (`MPSCY_CUDA_UPD_BATCHED`, default 1), or 0: an element an iteration
    int prefetch; // norm_final_kernel loads the first batch before the norm's sum (`MPSCY_CUDA_NORM_PREFETCH`)
    int skip_block0; // block 0 takes no share of update_slab's element loop (the one-kernel MLP's grid form: mlp.cu; update_slab_batched ignores it)
};

/* A gradient element clipped: by the norm's coefficient cs, then to +-clip_value. */
static __device__ __forceinline__ float clip_elem(const update_args &u, float g, float cs) {
    if (u.clip_norm) g = __fmul_rn(g, cs);  /* rounded on its own, as the rules' products (optim_math.h) */
    if (u.clip_value > 0.0f) g = g > u.clip_value ? u.clip_value : (g < -u.clip_value ? -u.clip_value : g);
    return g;
}

/* The kind's element rule on one element (p, slots s0..s2), g already clipped. In the batches
 * they are registers, s2 too: the rules read s2 only under the flag that gives the slab its
 * third slot (amsgrad, centered), and a pointer that may be NULL would put it in memory. */
static __device__ __forceinline__ void update_elem(const update_args &u, const mpscy_optim_coef &c, float g, float *p,
                                                  float *s0, float *s1, float *s2) {
    switch (u.kind) {
    case MPSCY_OPTIM_SGD: mpscy_sgd_elem(p, s0, g, &c); break;
    case MPSCY_OPTIM_ADAM:
    case MPSCY_OPTIM_ADAMW: mpscy_adam_elem(p, s0, s1, s2, g, &c, u.decoupled); break;
    case MPSCY_OPTIM_RMSPROP: mpscy_rmsprop_elem(p, s0, s1, s2, g, &c); break;
    case MPSCY_OPTIM_ADAGRAD: mpscy_adagrad_elem(p, s0, g, &c); break;
    case MPSCY_OPTIM_ADADELTA: mpscy_adadelta_elem(p, s0, s1, g, &c); break;
    case MPSCY_OPTIM_NADAM: mpscy_nadam_elem(p, s0, s1, g, &c); break;
    }
}

/* One batch of the update: U elements of a thread (i, i + stride, ...), every operand loaded
 * (upd_load) before any element is stored (upd_apply), so a thread waits on one round of loads a
 * batch, where the loop of one element an iteration waits on one an element (its loads cannot
 * pass the stores before them: the slab's arrays may alias as far as the compiler knows). */
template <int U>
struct upd_batch {
    float g[U], w[U], a0[U], a1[U], a2[U];
};

template <int U>
static __device__ __forceinline__ void upd_load(const update_args &u, int64_t i, int64_t stride, upd_batch<U> &b) {
#pragma unroll
    for (int j = 0; j < U; j++) {
        const int64_t k = i + j * stride;
        if (k < u.n) {
            b.g[j] = u.grads[k];
            b.w[j] = u.w[k];
            if (u.s0) b.a0[j] = u.s0[k];
            if (u.s1) b.a1[j] = u.s1[k];
            if (u.s2) b.a2[j] = u.s2[k];
        }
    }
}

template <int U>
static __device__ __forceinline__ void upd_apply(const update_args &u, const mpscy_optim_coef &c, float cs, int64_t i,
                                                 int64_t stride, upd_batch<U> &b) {
    const int clipped = u.clip_norm || u.clip_value > 0.0f;
#pragma unroll
    for (int j = 0; j < U; j++) {
        const int64_t k = i + j * stride;
        if (k >= u.n) break;
        const float gj = clip_elem(u, b.g[j], cs);
        if (clipped) u.grads[k] = gj;
        update_elem(u, c, gj, &b.w[j], &b.a0[j], &b.a1[j], &b.a2[j]);
        u.w[k] = b.w[j];
        if (u.s0) u.s0[k] = b.a0[j];
        if (u.s1) u.s1[k] = b.a1[j];
        if (u.s2) u.s2[k] = b.a2[j];
    }
}

/* The update as batches of U elements a thread (upd_batch); the same element rule on the same
 * values as the loop of an element an iteration: the same bits. Slots the kind does not write
 * are stored back as loaded. first: the thread's first batch, already loaded when `loaded`
 * (norm_final_kernel loads it before it adds the norm's partials). */
template <int U>
static __device__ __forceinline__ void update_slab_batched(const update_args &u, const mpscy_optim_coef &c, float cs,
                                                           upd_batch<U> &first, bool loaded) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (loaded && i < u.n) {
        upd_apply<U>(u, c, cs, i, stride, first);
        i += U * stride;
    }
    for (; i < u.n; i += U * stride) {
        upd_batch<U> b;
        upd_load<U>(u, i, stride, b);
        upd_apply<U>(u, c, cs, i, stride, b);
    }
}

/* One pass over the slab: clip (norm coefficient, then value; the clipped gradient is stored
 * back, as on the cpu), then the kind's element rule. BATCHES: in batches of 4 elements a thread
 * unless u.batched is 0, the loop of one element an iteration (kept for A/B and the same-bits
 * test). The update kernels of optim.cu take the batches (A/B on the H200: the
 * wide MLP's step 641.6 and 637.1 us against 653.0 and 647.9, the CNN's norm_update 15.5 us
 * against 16.4 in ncu); the one-kernel MLP step keeps the loop (1.6 elements a thread: 38.6 and
 * 39.2 us with batches of 2 against 38.1 and 38.4, and four spill at its 128 registers). */
template <bool BATCHES>
static __device__ __forceinline__ void update_slab(const update_args &u, const cu_params *P, float cs,
                                                   upd_batch<4> &first, bool loaded) {
    const mpscy_optim_coef c = P->coef;
    if (BATCHES && u.batched) {
        update_slab_batched<4>(u, c, cs, first, loaded);
        return;
    }
    const int clipped = u.clip_norm || u.clip_value > 0.0f;
    const int skip = u.skip_block0 && gridDim.x > 1;  /* the other blocks' threads, in the same order */
    if (skip && blockIdx.x == 0) return;
    const int64_t stride = (int64_t)(gridDim.x - skip) * blockDim.x;
    for (int64_t i = (blockIdx.x - skip) * (int64_t)blockDim.x + threadIdx.x; i < u.n; i += stride) {
        const float g = clip_elem(u, u.grads[i], cs);
        if (clipped) u.grads[i] = g;
        update_elem(u, c, g, &u.w[i], &u.s0[i], &u.s1[i], u.s2 ? &u.s2[i] : NULL);
    }
}

template <bool BATCHES>
static __device__ __forceinline__ void update_slab(const update_args &u, const cu_params *P, float cs) {
    upd_batch<4> none;
    update_slab<BATCHES>(u, P, cs, none, false);
}

/* The end of a step in a kernel whose every block holds the same total of squares t (summed
 * in one fixed order) and the same loss: block 0 records the decision, and every block, when
 * the step is applied, clips and updates its share of the slab (update_slab<BATCHES>; first:
 * the thread's first batch, loaded already when `loaded`). */
template <bool BATCHES>
static __device__ __forceinline__ void decide_and_update(const update_args &u, cu_scratch *S, cu_result *R,
                                                         const cu_params *P, double t, double loss, double clip_norm,
                                                         int update, upd_batch<4> &first, bool loaded,
                                                         bool late = false) {
    const double norm = sqrt(t);
    const double coef = clip_norm > 0 ? clip_norm / (norm + 1e-6) : 1.0;
    if (blockIdx.x == 0 && threadIdx.x == 0) decide(S, R, P, t, clip_norm, update, late);
    if (update && isfinite(loss) && isfinite(norm))
        update_slab<BATCHES>(u, P, coef < 1.0 ? (float)coef : 1.0f, first, loaded);
}

template <bool BATCHES>
static __device__ __forceinline__ void decide_and_update(const update_args &u, cu_scratch *S, cu_result *R,
                                                         const cu_params *P, double t, double loss, double clip_norm,
                                                         int update, bool late = false) {
    upd_batch<4> none;
    decide_and_update<BATCHES>(u, S, R, P, t, loss, clip_norm, update, none, false, late);
}

#endif /* MPSCY_CUDA_UPDATE_H */
