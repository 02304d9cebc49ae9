/* dropout.c — inverted dropout on the CPU. In train mode element e of node i is kept when the
 * shared Philox generator (common/rng.h) says so for (seed, step counter, i, e), so the CPU,
 * CUDA and Metal backends draw the same mask; kept values are scaled by 1 / (1 - rate) and the
 * multiplier is saved for backward. Eval mode is the identity and saves nothing. */
#include "cpu.h"
#include "../common/rng.h"

#include <string.h>

static void dropout_forward(float *y, float *mask, const float *x, int64_t count, float rate,
                            uint64_t seed, uint64_t counter, uint32_t node) {
    // y (count), mask (count) multipliers 0 or 1 / (1 - rate), x (count)
    for (int64_t e = 0; e < count; e++) {
        float m = mpscy_dropout_multiplier(seed, counter, node, (uint64_t)e, rate);
        mask[e] = m;
        y[e] = x[e] * m;
    }
}

static void dropout_backward(float *dx, const float *dy, const float *mask, int64_t count, int accum) {
    // dx (count), dy (count), mask (count)
    for (int64_t e = 0; e < count; e++) dx[e] = accum ? dx[e] + dy[e] * mask[e] : dy[e] * mask[e];
}

void cpu_dropout_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    int64_t i = n - g->plan.nodes, count = b * n->size;
    if (train)
        dropout_forward(g->y[i], g->save + n->save, g->y[n->in[0]], count, (float)n->reals[0], a->seed,
                        a->counter, (uint32_t)i);
    else
        memcpy(g->y[i], g->y[n->in[0]], (size_t)count * sizeof(float));
}

void cpu_dropout_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    float *dx = g->dy[n->in[0]];
    if (dx) dropout_backward(dx, g->dy[n - g->plan.nodes], g->save + n->save, b * n->size, n->accum[0]);
}
