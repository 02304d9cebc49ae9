/* activation.c — element-wise activations on the CPU (ReLU, LeakyReLU, ELU, Sigmoid, Tanh,
 * Swish/SiLU, GELU exact and tanh), Softmax over one axis, and Flatten, with the derivatives
 * PyTorch uses. Each reads its input and/or output; none saves anything else. */
#include "cpu.h"

#include <math.h>
#include <string.h>

#define SQRT_2_OVER_PI 0.7978845608028654
#define GELU_C 0.044715

static void act_forward(int kind, float *restrict y, const float *restrict x, int64_t n, double r0) {
    // y (n), x (n)
    switch (kind) {
    case MPSCY_LAYER_RELU:
        for (int64_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    case MPSCY_LAYER_LEAKYRELU: {
        float s = (float)r0;
        for (int64_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : x[i] * s;
        break;
    }
    case MPSCY_LAYER_ELU: {
        float al = (float)r0;
        for (int64_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : al * expm1f(x[i]);
        break;
    }
    case MPSCY_LAYER_SIGMOID:
        for (int64_t i = 0; i < n; i++) y[i] = 1.0f / (1.0f + expf(-x[i]));
        break;
    case MPSCY_LAYER_TANH:
        for (int64_t i = 0; i < n; i++) y[i] = tanhf(x[i]);
        break;
    case MPSCY_LAYER_SWISH:
        for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
        break;
    }
}

/* d where v > 0, else 0; both operands are loaded, so the select vectorizes */
static inline float select_pos(float v, float d) { return v > 0.0f ? d : 0.0f; }

/* d/dx of x sigmoid(x), times d */
static inline float swish_grad(float x, float d) {
    float s = 1.0f / (1.0f + expf(-x));
    return d * s * (1.0f + x * (1.0f - s));
}

/* dx[i] = d (overwrite) or dx[i] += d (accumulate), as two loops so both vectorize */
#define EACH(expr) \
    do { \
        if (accum) \
            for (int64_t i = 0; i < n; i++) dx[i] += (expr); \
        else \
            for (int64_t i = 0; i < n; i++) dx[i] = (expr); \
    } while (0)

static void act_backward(int kind, float *restrict dx, const float *restrict dy, const float *restrict x,
                         const float *restrict y, int64_t n, double r0, int accum) {
    // dx (n), dy (n), x (n) input, y (n) output; every operand is read unconditionally so the
    // selects vectorize
    float r = (float)r0;
    switch (kind) {
    case MPSCY_LAYER_RELU: EACH(select_pos(y[i], dy[i])); break;
    case MPSCY_LAYER_LEAKYRELU: EACH(dy[i] * (x[i] > 0.0f ? 1.0f : r)); break;
    case MPSCY_LAYER_ELU: EACH(dy[i] * (x[i] > 0.0f ? 1.0f : y[i] + r)); break;
    case MPSCY_LAYER_SIGMOID: EACH(dy[i] * y[i] * (1.0f - y[i])); break;
    case MPSCY_LAYER_TANH: EACH(dy[i] * (1.0f - y[i] * y[i])); break;
    case MPSCY_LAYER_SWISH: EACH(swish_grad(x[i], dy[i])); break;
    }
}
#undef EACH

static void gelu_forward(float *y, const float *x, int64_t n, int approx_tanh) {
    // y (n), x (n); erf form, or the tanh approximation
    for (int64_t i = 0; i < n; i++) {
        double v = x[i];
        y[i] = approx_tanh ? (float)(0.5 * v * (1.0 + tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v))))
                           : (float)(0.5 * v * (1.0 + erf(v * 0.7071067811865476)));
    }
}

static void gelu_backward(float *dx, const float *dy, const float *x, int64_t n, int approx_tanh, int accum) {
    for (int64_t i = 0; i < n; i++) {
        double v = x[i], d;
        if (approx_tanh) {
            double u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v), t = tanh(u);
            d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
        } else {
            d = 0.5 * (1.0 + erf(v * 0.7071067811865476)) + v * exp(-0.5 * v * v) * 0.3989422804014327;
        }
        float r = (float)(dy[i] * d);
        dx[i] = accum ? dx[i] + r : r;
    }
}

/* Softmax over `axis` of a per-sample shape, as (outer, len, inner) blocks. */
static void axis_split(const mpscy_node *n, int64_t b, int64_t *outer, int64_t *len, int64_t *inner) {
    int32_t ax = n->ints[0];
    *outer = b;
    *len = n->shape[ax];
    *inner = 1;
    for (int32_t d = 0; d < ax; d++) *outer *= n->shape[d];
    for (int32_t d = ax + 1; d < n->rank; d++) *inner *= n->shape[d];
}

static void softmax_forward(float *y, const float *x, int64_t outer, int64_t len, int64_t inner) {
    for (int64_t o = 0; o < outer; o++)
        for (int64_t k = 0; k < inner; k++) {
            const float *xr = x + o * len * inner + k;
            float *yr = y + o * len * inner + k;
            float m = xr[0];
            for (int64_t i = 1; i < len; i++) m = xr[i * inner] > m ? xr[i * inner] : m;
            double s = 0;
            for (int64_t i = 0; i < len; i++) s += (yr[i * inner] = expf(xr[i * inner] - m));
            float inv = (float)(1.0 / s);
            for (int64_t i = 0; i < len; i++) yr[i * inner] *= inv;
        }
}

static void softmax_backward(float *dx, const float *dy, const float *y, int64_t outer, int64_t len,
                             int64_t inner, int accum) {
    for (int64_t o = 0; o < outer; o++)
        for (int64_t k = 0; k < inner; k++) {
            int64_t base = o * len * inner + k;
            double dot = 0;
            for (int64_t i = 0; i < len; i++) dot += (double)dy[base + i * inner] * y[base + i * inner];
            for (int64_t i = 0; i < len; i++) {
                int64_t j = base + i * inner;
                float r = y[j] * (float)(dy[j] - dot);
                dx[j] = accum ? dx[j] + r : r;
            }
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

#define PARALLEL_MIN 32768   /* elements below which threads cost more than they save */

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
        else act_forward(n->kind, j->out + lo, j->x + lo, m, n->reals[0]);
    } else if (n->kind == MPSCY_LAYER_GELU) {
        gelu_backward(j->out + lo, j->dy + lo, j->x + lo, m, n->ints[0], n->accum[0]);
    } else {
        act_backward(n->kind, j->out + lo, j->dy + lo, j->x + lo, j->y + lo, m, n->reals[0], n->accum[0]);
    }
}

static void act_run(cpu_graph *g, act_job *j, int64_t b) {
    if (j->n->kind == MPSCY_LAYER_SOFTMAX) axis_split(j->n, b, &j->outer, &j->len, &j->inner);
    if (j->count >= PARALLEL_MIN) cpu_parallel(g->pool, act_task, j);
    else act_task(j, 0, 1);
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
