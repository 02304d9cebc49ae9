/* activation.c — element-wise activations on the CPU (ReLU, LeakyReLU, ELU, Sigmoid, Tanh,
 * Swish/SiLU, GELU exact and tanh, ReLU6, Hardsigmoid, Hardswish, Softplus, Mish), Softmax over one axis, and Flatten, with the derivatives
 * PyTorch uses. Each reads its input and/or output; none saves anything else. */
#include "cpu.h"
#include "vmath.h"
#define MPSCY_EXPF vm_expf        /* the activations' float functions as loops that vectorize */
#define MPSCY_EXPM1F vm_expm1f
#define MPSCY_TANHF vm_tanhf
#define MPSCY_LOG1PF vm_log1pf_pos
#include "../common/activation_math.h"

#include <math.h>
#include <string.h>

/* dx[i] = d (overwrite) or dx[i] += d (accumulate), as two loops so both vectorize */
#define EACH(expr) \
    do { \
        if (accum) \
            for (int64_t i = 0; i < n; i++) dx[i] += (expr); \
        else \
            for (int64_t i = 0; i < n; i++) dx[i] = (expr); \
    } while (0)

/* One loop per kind, the kind a constant inside it, so each inlines to a vectorizable body. */
#define PER_KIND(LOOP)                                     \
    switch (kind) {                                        \
    case MPSCY_LAYER_RELU: LOOP(MPSCY_LAYER_RELU); break;  \
    case MPSCY_LAYER_LEAKYRELU: LOOP(MPSCY_LAYER_LEAKYRELU); break; \
    case MPSCY_LAYER_ELU: LOOP(MPSCY_LAYER_ELU); break;    \
    case MPSCY_LAYER_SIGMOID: LOOP(MPSCY_LAYER_SIGMOID); break; \
    case MPSCY_LAYER_TANH: LOOP(MPSCY_LAYER_TANH); break;  \
    case MPSCY_LAYER_SWISH: LOOP(MPSCY_LAYER_SWISH); break; \
    case MPSCY_LAYER_RELU6: LOOP(MPSCY_LAYER_RELU6); break; \
    case MPSCY_LAYER_HARDSIGMOID: LOOP(MPSCY_LAYER_HARDSIGMOID); break; \
    case MPSCY_LAYER_HARDSWISH: LOOP(MPSCY_LAYER_HARDSWISH); break; \
    case MPSCY_LAYER_SOFTPLUS: LOOP(MPSCY_LAYER_SOFTPLUS); break; \
    case MPSCY_LAYER_MISH: LOOP(MPSCY_LAYER_MISH); break; \
    }

CPU_SIMD static void act_forward(int kind, float *restrict y, const float *restrict x, int64_t n, double r0,
                                 double r1d) {
    // y (n), x (n)
    float r = (float)r0, r1 = (float)r1d;
#define FWD(K) for (int64_t i = 0; i < n; i++) y[i] = mpscy_act(K, x[i], r, r1)
    PER_KIND(FWD)
#undef FWD
}

CPU_SIMD static void act_backward(int kind, float *restrict dx, const float *restrict dy, const float *restrict x,
                                  const float *restrict y, int64_t n, double r0, double r1d, int accum) {
    // dx (n), dy (n), x (n) input, y (n) output
    float r = (float)r0, r1 = (float)r1d;
#define BWD(K) EACH(mpscy_act_grad(K, dy[i], x[i], y[i], r, r1))
    PER_KIND(BWD)
#undef BWD
}

/* GELU in float through vmath.h's loops (the cuda backend computes activation_math.h's in double) */
CPU_SIMD static void gelu_forward(float *restrict y, const float *restrict x, int64_t n, int approx_tanh) {
    // y (n), x (n)
    if (approx_tanh)
        for (int64_t i = 0; i < n; i++) y[i] = vm_gelu_tanh(x[i]);
    else
        for (int64_t i = 0; i < n; i++) y[i] = vm_gelu(x[i]);
}

CPU_SIMD static void gelu_backward(float *restrict dx, const float *restrict dy, const float *restrict x, int64_t n,
                                   int approx_tanh, int accum) {
    if (approx_tanh) EACH(dy[i] * vm_gelu_tanh_grad(x[i]));
    else EACH(dy[i] * vm_gelu_grad(x[i]));
}
#undef EACH
#undef PER_KIND

static void softmax_forward(float *y, const float *x, int64_t outer, int64_t len, int64_t inner) {
    for (int64_t o = 0; o < outer; o++)
        for (int64_t k = 0; k < inner; k++) mpscy_softmax_row(y + o * len * inner + k, x + o * len * inner + k, len, inner);
}

static void softmax_backward(float *dx, const float *dy, const float *y, int64_t outer, int64_t len,
                             int64_t inner, int accum) {
    for (int64_t o = 0; o < outer; o++)
        for (int64_t k = 0; k < inner; k++) {
            int64_t base = o * len * inner + k;
            mpscy_softmax_row_grad(dx + base, dy + base, y + base, len, inner, accum);
        }
}

/* One thread's share of an activation: a range of elements, or of softmax (outer) blocks. */
typedef struct act_job {
    const mpscy_node *n;
    float *out;              /* y (forward) or dx (backward) */
    const float *x, *y, *dy;
    int64_t count, outer, len, inner;
    int backward;
} act_job;

static void act_task(void *ctx, int32_t t, int32_t nt) {
    const act_job *j = ctx;
    const mpscy_node *n = j->n;
    int64_t lo, hi;
    if (n->kind == MPSCY_LAYER_SOFTMAX) {
        cpu_split(j->outer, t, nt, &lo, &hi);
        int64_t off = lo * j->len * j->inner;
        if (j->backward) softmax_backward(j->out + off, j->dy + off, j->y + off, hi - lo, j->len, j->inner, n->accum[0]);
        else softmax_forward(j->out + off, j->x + off, hi - lo, j->len, j->inner);
        return;
    }
    cpu_split((j->count + 15) / 16, t, nt, &lo, &hi);  /* 16-float aligned parts */
    lo *= 16;
    hi = hi * 16 < j->count ? hi * 16 : j->count;
    if (hi <= lo) return;
    int64_t m = hi - lo;
    if (!j->backward) {
        if (n->kind == MPSCY_LAYER_GELU) gelu_forward(j->out + lo, j->x + lo, m, n->ints[0]);
        else act_forward(n->kind, j->out + lo, j->x + lo, m, n->reals[0], n->reals[1]);
    } else if (n->kind == MPSCY_LAYER_GELU) {
        gelu_backward(j->out + lo, j->dy + lo, j->x + lo, m, n->ints[0], n->accum[0]);
    } else {
        act_backward(n->kind, j->out + lo, j->dy + lo, j->x + lo, j->y + lo, m, n->reals[0], n->reals[1], n->accum[0]);
    }
}

static void act_run(cpu_graph *g, act_job *j, int64_t b) {
    if (j->n->kind == MPSCY_LAYER_SOFTMAX) mpscy_axis_split(j->n, b, &j->outer, &j->len, &j->inner);
    cpu_parallel_over(g->pool, act_task, j, j->count, j->count);
}

/* A ReLU that its convolution computes (conv.c) has nothing left to do. */
static int fused(const cpu_graph *g, const mpscy_node *n) {
    return n->kind == MPSCY_LAYER_RELU && cpu_conv_fused_relu(&g->plan, n->in[0]) == (int32_t)(n - g->plan.nodes);
}

void cpu_activation_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    if (fused(g, n)) return;
    int64_t i = n - g->plan.nodes;
    act_job j = {n, g->y[i], g->y[n->in[0]], NULL, NULL, b * n->size, 0, 0, 0, 0};
    act_run(g, &j, b);
}

void cpu_activation_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t i = n - g->plan.nodes;
    if (!g->dy[n->in[0]] || fused(g, n)) return;
    act_job j = {n, g->dy[n->in[0]], g->y[n->in[0]], g->y[i], g->dy[i], b * n->size, 0, 0, 0, 1};
    act_run(g, &j, b);
}

void cpu_flatten_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    memcpy(g->y[n - g->plan.nodes], g->y[n->in[0]], (size_t)(b * n->size) * sizeof(float));
}

void cpu_flatten_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    float *dx = g->dy[n->in[0]];
    const float *dy = g->dy[n - g->plan.nodes];
    if (!dx) return;
    for (int64_t k = 0; k < b * n->size; k++) dx[k] = n->accum[0] ? dx[k] + dy[k] : dy[k];
}
