/* optim.c — everything after backward on the CPU: the global gradient norm (also the
 * finiteness test), clipping by norm or value, and every first-order optimizer as one loop
 * over the flat parameter slab using the shared element rules of common/optim_math.h.
 * L-BFGS, which is not an element rule, lives in lbfgs.c. */
#include "cpu.h"
#include "../common/optim_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

typedef struct norm_job {
    const float *grads;
    int64_t n;
    double partial[64];  /* one sum per thread, added in thread order: deterministic */
} norm_job;

CPU_SIMD static double sum_squares(const float *x, int64_t n) {
    /* Double accumulation cannot overflow for finite float32 inputs, so the result is finite
     * exactly when every gradient is. Eight partial sums let the compiler vectorize. */
    double s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s[k] += (double)x[i + k] * x[i + k];
    for (; i < n; i++) s[0] += (double)x[i] * x[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

static void norm_task(void *ctx, int32_t t, int32_t nt) {
    norm_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->n, t, nt, &lo, &hi);
    j->partial[t] = sum_squares(j->grads + lo, hi - lo);
}

double cpu_grad_norm(cpu_pool *pool, const float *grads, int64_t n) {
    norm_job j = {grads, n, {0}};
    int32_t nt = n >= 65536 ? cpu_parallel(pool, norm_task, &j) : (norm_task(&j, 0, 1), 1);
    double total = 0;
    for (int32_t t = 0; t < nt; t++) total += j.partial[t];
    return sqrt(total);
}

void cpu_clip(float *grads, int64_t n, double norm, const mpscy_optim_desc *o) {
    if (o->clip_grad_norm > 0) {
        /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1 */
        double coef = o->clip_grad_norm / (norm + 1e-6);
        if (coef < 1.0) {
            float c = (float)coef;
            for (int64_t i = 0; i < n; i++) grads[i] *= c;
        }
    }
    if (o->clip_grad_value > 0) {
        float v = (float)o->clip_grad_value;
        for (int64_t i = 0; i < n; i++) grads[i] = grads[i] > v ? v : (grads[i] < -v ? -v : grads[i]);
    }
}

int cpu_optim_supported(int32_t kind) {
    return kind >= MPSCY_OPTIM_SGD && kind <= MPSCY_OPTIM_LBFGS;
}

/* The update over [lo, hi) of the slab. Each loop body is an element rule of optim_math.h
 * called with a local copy of the coefficients whose flags are a compile-time constant, so the
 * compiler folds the option tests away and vectorizes the loop. */
typedef struct update_job {
    mpscy_optim_coef c;
    int32_t kind, decoupled, centered;
    float *w, *g, *s0, *s1, *s2;
    int64_t n;
} update_job;

#define LOOP(F, STMT)                                     \
    do {                                                  \
        mpscy_optim_coef c = j->c;                        \
        c.flags = (F);                                    \
        for (int64_t i = lo; i < hi; i++) STMT;           \
    } while (0)

enum { NES = MPSCY_OPTIM_NESTEROV, AMS = MPSCY_OPTIM_AMSGRAD, MAX = MPSCY_OPTIM_MAXIMIZE };

CPU_SIMD static void update_range_of(const update_job *j, int64_t lo, int64_t hi) {
    float *w = j->w, *g = j->g, *s0 = j->s0, *s1 = j->s1, *s2 = j->s2;
    int f = j->c.flags;
    switch (j->kind) {
    case MPSCY_OPTIM_SGD:
        switch (f & (NES | MAX)) {
        case 0: LOOP(0, mpscy_sgd_elem(&w[i], &s0[i], g[i], &c)); break;
        case NES: LOOP(NES, mpscy_sgd_elem(&w[i], &s0[i], g[i], &c)); break;
        case MAX: LOOP(MAX, mpscy_sgd_elem(&w[i], &s0[i], g[i], &c)); break;
        default: LOOP(NES | MAX, mpscy_sgd_elem(&w[i], &s0[i], g[i], &c)); break;
        }
        break;
    case MPSCY_OPTIM_ADAM:
        /* decoupled decay is a run-time choice; it costs one select per element */
        switch (f & (AMS | MAX)) {
        case 0: LOOP(0, mpscy_adam_elem(&w[i], &s0[i], &s1[i], NULL, g[i], &c, j->decoupled)); break;
        case AMS: LOOP(AMS, mpscy_adam_elem(&w[i], &s0[i], &s1[i], &s2[i], g[i], &c, j->decoupled)); break;
        case MAX: LOOP(MAX, mpscy_adam_elem(&w[i], &s0[i], &s1[i], NULL, g[i], &c, j->decoupled)); break;
        default: LOOP(AMS | MAX, mpscy_adam_elem(&w[i], &s0[i], &s1[i], &s2[i], g[i], &c, j->decoupled)); break;
        }
        break;
    case MPSCY_OPTIM_RMSPROP:  /* square_avg, momentum_buffer[, grad_avg] */
        if (j->centered) LOOP(f, mpscy_rmsprop_elem(&w[i], &s0[i], &s1[i], &s2[i], g[i], &c));
        else LOOP(f, mpscy_rmsprop_elem(&w[i], &s0[i], &s1[i], NULL, g[i], &c));
        break;
    case MPSCY_OPTIM_ADAGRAD:  /* sum */
        LOOP(f, mpscy_adagrad_elem(&w[i], &s0[i], g[i], &c));
        break;
    case MPSCY_OPTIM_ADADELTA:  /* square_avg, acc_delta */
        LOOP(f, mpscy_adadelta_elem(&w[i], &s0[i], &s1[i], g[i], &c));
        break;
    case MPSCY_OPTIM_NADAM:  /* exp_avg, exp_avg_sq */
        LOOP(f, mpscy_nadam_elem(&w[i], &s0[i], &s1[i], g[i], &c));
        break;
    default:
        break;
    }
}

/* Whether the update flushes subnormal floats to zero (x86's FTZ and DAZ, for its loop only):
 * a weight whose input is mostly 0 (an MNIST border pixel) stops getting gradients, and its
 * momentum or Adam averages decay through the subnormals, where each operation takes a
 * microcode assist; a user trial measured a batch-32 MLP step 255 -> 405 us after 3,000 steps of
 * MNIST-like data (12,028 subnormal values), flat at 165 with them flushed. The values flushed
 * are below 1.2e-38: the steps they would make are below 1e-30 times the learning rate. $MPSCY_CPU_FTZ=0
 * keeps them (read once), for the state bit for bit as torch's, which keeps them. */
static int ftz_on(void) {
    static volatile int on = -1;  /* a race writes the same value */
    if (on < 0) {
        const char *knob = getenv("MPSCY_CPU_FTZ");
        on = !(knob && strcmp(knob, "0") == 0);
    }
    return on;
}

static void update_range(const update_job *j, int64_t lo, int64_t hi) {
#if defined(__x86_64__) || defined(__i386__)
    if (ftz_on()) {
        const unsigned int saved = _mm_getcsr();
        _mm_setcsr(saved | 0x8040u);  /* FTZ (bit 15) and DAZ (bit 6) */
        update_range_of(j, lo, hi);
        _mm_setcsr(saved);
        return;
    }
#endif
    update_range_of(j, lo, hi);
}

static void update_task(void *ctx, int32_t t, int32_t nt) {
    const update_job *j = ctx;
    int64_t lo, hi;
    cpu_split(j->n / 16, t, nt, &lo, &hi);  /* 64-byte aligned parts */
    lo *= 16;
    hi = t == nt - 1 ? j->n : hi * 16;
    update_range(j, lo, hi);
}

/* One pass of the kind's element rule over the flat slab; t counts applied steps from 1. */
void cpu_optim_update(cpu_graph *g, const mpscy_step_args *a) {
    const mpscy_plan *p = &g->plan;
    int64_t n = p->n_train, t = (int64_t)g->scalars[0] + 1;
    if (p->optim.kind == MPSCY_OPTIM_LBFGS) return;  /* runs through MPSCY_MODE_LBFGS (lbfgs.c) */
    update_job j;
    j.c = mpscy_optim_coef_make(&p->optim, a, t, &g->scalars[1]);  /* called only for a step it applies */
    j.kind = p->optim.kind == MPSCY_OPTIM_ADAMW ? MPSCY_OPTIM_ADAM : p->optim.kind;
    j.decoupled = p->optim.kind == MPSCY_OPTIM_ADAMW || (j.c.flags & MPSCY_OPTIM_DECOUPLED_WD);
    j.centered = p->optim.kind == MPSCY_OPTIM_RMSPROP && p->n_vec_slots > 2;
    /* the kind's slots, in plan order; absent slots stay NULL */
    j.w = g->params;
    j.g = g->grads;
    j.s0 = g->optim + p->vec_offset[0];
    j.s1 = p->n_vec_slots > 1 ? g->optim + p->vec_offset[1] : NULL;
    j.s2 = p->n_vec_slots > 2 ? g->optim + p->vec_offset[2] : NULL;
    j.n = n;
    if (n >= 32768) cpu_parallel(g->pool, update_task, &j);
    else update_range(&j, 0, n);
    g->scalars[0] = (double)t;
}
