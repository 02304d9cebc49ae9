/* merge.c — the layers that join branches, on the CPU: Add (element-wise sum of equal shapes)
 * and Concatenate (along one per-sample axis). Backward hands each input its share of the
 * output gradient, writing or accumulating as the plan says. Neither saves anything. */
#include "cpu.h"

#include <string.h>

void cpu_add_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t count = b * n->size;
    float *y = g->y[n - g->plan.nodes];  // (b, size)
    const float *x0 = g->y[n->in[0]], *x1 = g->y[n->in[1]];
    for (int64_t k = 0; k < count; k++) y[k] = x0[k] + x1[k];
    for (int32_t j = 2; j < n->n_in; j++) {
        const float *xj = g->y[n->in[j]];
        for (int64_t k = 0; k < count; k++) y[k] += xj[k];
    }
}

void cpu_add_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t count = b * n->size;
    const float *dy = g->dy[n - g->plan.nodes];
    for (int32_t j = 0; j < n->n_in; j++) {
        float *dx = g->dy[n->in[j]];
        if (!dx) continue;
        if (n->accum[j])
            for (int64_t k = 0; k < count; k++) dx[k] += dy[k];
        else
            memcpy(dx, dy, (size_t)count * sizeof(float));
    }
}

/* (outer, inner) of a concatenation on `axis`: outer = b * dims before it, inner = dims after */
static void concat_split(const mpscy_node *n, int64_t b, int64_t *outer, int64_t *inner) {
    int32_t ax = n->ints[0];
    *outer = b;
    *inner = 1;
    for (int32_t d = 0; d < ax; d++) *outer *= n->shape[d];
    for (int32_t d = ax + 1; d < n->rank; d++) *inner *= n->shape[d];
}

void cpu_concat_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int64_t outer, inner, width = n->shape[n->ints[0]];
    concat_split(n, b, &outer, &inner);
    float *y = g->y[n - g->plan.nodes];  // (outer, width, inner)
    int64_t off = 0;
    for (int32_t j = 0; j < n->n_in; j++) {
        int64_t wj = g->plan.nodes[n->in[j]].shape[n->ints[0]];
        const float *x = g->y[n->in[j]];  // (outer, wj, inner)
        for (int64_t o = 0; o < outer; o++)
            memcpy(y + (o * width + off) * inner, x + o * wj * inner, (size_t)(wj * inner) * sizeof(float));
        off += wj;
    }
}

void cpu_concat_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    int64_t outer, inner, width = n->shape[n->ints[0]];
    concat_split(n, b, &outer, &inner);
    const float *dy = g->dy[n - g->plan.nodes];  // (outer, width, inner)
    int64_t off = 0;
    for (int32_t j = 0; j < n->n_in; j++) {
        int64_t wj = g->plan.nodes[n->in[j]].shape[n->ints[0]], len = wj * inner;
        float *dx = g->dy[n->in[j]];  // (outer, wj, inner) or NULL
        for (int64_t o = 0; dx && o < outer; o++) {
            const float *s = dy + (o * width + off) * inner;
            float *d = dx + o * len;
            if (n->accum[j])
                for (int64_t k = 0; k < len; k++) d[k] += s[k];
            else
                memcpy(d, s, (size_t)len * sizeof(float));
        }
        off += wj;
    }
}
