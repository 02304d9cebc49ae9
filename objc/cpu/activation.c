/* activation.c — element-wise activations on the CPU (ReLU, LeakyReLU, ELU, Sigmoid, Tanh,
 * Swish/SiLU, GELU exact and tanh), Softmax over one axis, and Flatten, with the derivatives
 * PyTorch uses. Each reads its input and/or output; none saves anything else. */
#include "cpu.h"

#include <math.h>
#include <string.h>

#define SQRT_2_OVER_PI 0.7978845608028654
#define GELU_C 0.044715

static void act_forward(int kind, float *y, const float *x, int64_t n, double r0) {
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

static void act_backward(int kind, float *dx, const float *dy, const float *x, const float *y,
                         int64_t n, double r0, int accum) {
    // dx (n), dy (n), x (n) input, y (n) output
    for (int64_t i = 0; i < n; i++) {
        float d;
        switch (kind) {
        case MPSCY_LAYER_RELU: d = y[i] > 0.0f ? dy[i] : 0.0f; break;
        case MPSCY_LAYER_LEAKYRELU: d = x[i] > 0.0f ? dy[i] : dy[i] * (float)r0; break;
        case MPSCY_LAYER_ELU: d = x[i] > 0.0f ? dy[i] : dy[i] * (y[i] + (float)r0); break;
        case MPSCY_LAYER_SIGMOID: d = dy[i] * y[i] * (1.0f - y[i]); break;
        case MPSCY_LAYER_TANH: d = dy[i] * (1.0f - y[i] * y[i]); break;
        case MPSCY_LAYER_SWISH: {
            float s = 1.0f / (1.0f + expf(-x[i]));
            d = dy[i] * s * (1.0f + x[i] * (1.0f - s));
            break;
        }
        default: d = 0.0f;
        }
        dx[i] = accum ? dx[i] + d : d;
    }
}

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

void cpu_activation_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t i = n - g->plan.nodes, count = b * n->size;
    float *y = g->y[i];
    const float *x = g->y[n->in[0]];
    if (n->kind == MPSCY_LAYER_GELU) gelu_forward(y, x, count, n->ints[0]);
    else if (n->kind == MPSCY_LAYER_SOFTMAX) {
        int64_t outer, len, inner;
        axis_split(n, b, &outer, &len, &inner);
        softmax_forward(y, x, outer, len, inner);
    } else act_forward(n->kind, y, x, count, n->reals[0]);
}

void cpu_activation_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t i = n - g->plan.nodes, count = b * n->size;
    float *dx = g->dy[n->in[0]];
    if (!dx) return;
    const float *dy = g->dy[i], *x = g->y[n->in[0]], *y = g->y[i];
    if (n->kind == MPSCY_LAYER_GELU) gelu_backward(dx, dy, x, count, n->ints[0], n->accum[0]);
    else if (n->kind == MPSCY_LAYER_SOFTMAX) {
        int64_t outer, len, inner;
        axis_split(n, b, &outer, &len, &inner);
        softmax_backward(dx, dy, y, outer, len, inner, n->accum[0]);
    } else act_backward(n->kind, dx, dy, x, y, count, n->reals[0], n->accum[0]);
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
