/* dropout.cu — inverted dropout on CUDA. In train mode element e of node i is kept when the shared
 * Philox generator (common/rng.h) says so for (seed, step counter, i, e), read from the step's
 * params block, so the masks are the cpu's exactly and every replay draws a new one; kept values
 * are scaled by 1 / (1 - rate) and the multiplier is saved for backward. Eval mode copies. */
#include "cuda.h"
#include "../common/rng.h"

__global__ void dropout_forward(float *y, float *mask, const float *x, int64_t count, float rate,
                                const cu_params *P, uint32_t node, int train) {
    // y (count), mask (count) multipliers 0 or 1 / (1 - rate), x (count)
    cu_pdl_enter();
    uint64_t seed = P->seed, counter = P->counter;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x) {
        if (!train) {
            y[e] = x[e];
            continue;
        }
        float m = mpscy_dropout_multiplier(seed, counter, node, (uint64_t)e, rate);
        mask[e] = m;
        y[e] = x[e] * m;
    }
}

__global__ void dropout_backward(float *dx, const float *dy, const float *mask, int64_t count, int accum) {
    // dx (count), dy (count), mask (count)
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
        dx[e] = accum ? dx[e] + dy[e] * mask[e] : dy[e] * mask[e];
}

int cu_dropout_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    int64_t i = cu_node_index(g, n), count = b * n->size;
    CU_TRY(cu_launch(g, dropout_forward, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, g->stream, g->y[i],
                     g->save + n->save, (const float *)g->y[n->in[0]], count, (float)n->reals[0],
                     (const cu_params *)g->params_d, (uint32_t)i, train),
           "dropout_forward");
    return CU_LAUNCHED("dropout_forward");
}

int cu_dropout_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    float *dx = g->dy[n->in[0]];
    /* a Dense reading this Dropout already wrote the dz below it, multiplied and masked (dense.cu) */
    if (!dx || g->dz_ready[cu_node_index(g, n)]) return MPSCY_OK;
    int64_t count = b * n->size;
    CU_TRY(cu_launch(g, dropout_backward, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, g->stream, dx,
                     (const float *)g->dy[cu_node_index(g, n)], (const float *)(g->save + n->save), count, (int)n->accum[0]),
           "dropout_backward");
    return CU_LAUNCHED("dropout_backward");
}
