/* merge.cu — the layers that join branches, on CUDA: Add (element-wise sum of equal shapes) and
 * Concatenate (along one per-sample axis), each one kernel over all its inputs. Backward hands
 * each input its share of the output gradient, writing or accumulating as the plan says. */
#include "cuda.h"

struct merge_args {
    const float *x[MPSCY_MAX_INPUTS];   // inputs (forward)
    float *dx[MPSCY_MAX_INPUTS];        // input gradients (backward), NULL when not needed
    int64_t off[MPSCY_MAX_INPUTS + 1];  // Concatenate: first position of each input on the axis
    int accum[MPSCY_MAX_INPUTS];
    int n_in;
    int64_t outer, width, inner;        // Concatenate: (outer, width, inner) view of the output
};

__global__ void add_forward(float *y, merge_args a, int64_t count) {
    // y (count), a.x[j] (count)
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x) {
        float v = a.x[0][e] + a.x[1][e];
        for (int j = 2; j < a.n_in; j++) v += a.x[j][e];
        y[e] = v;
    }
}

__global__ void add_backward(const float *dy, merge_args a, int64_t count) {
    // dy (count), a.dx[j] (count) or NULL
    cu_pdl_enter();
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x)
        for (int j = 0; j < a.n_in; j++)
            if (a.dx[j]) a.dx[j][e] = a.accum[j] ? a.dx[j][e] + dy[e] : dy[e];
}

/* the input holding axis position p, and p within it */
static __device__ int concat_input(const merge_args &a, int64_t *p) {
    int j = 0;
    while (j + 1 < a.n_in && *p >= a.off[j + 1]) j++;
    *p -= a.off[j];
    return j;
}

__global__ void concat_forward(float *y, merge_args a) {
    // y (outer, width, inner), a.x[j] (outer, w_j, inner)
    cu_pdl_enter();
    int64_t count = a.outer * a.width * a.inner;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < count; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t k = e % a.inner, p = (e / a.inner) % a.width, o = e / (a.inner * a.width);
        int j = concat_input(a, &p);
        int64_t wj = a.off[j + 1] - a.off[j];
        y[e] = a.x[j][(o * wj + p) * a.inner + k];
    }
}

/* one input at a time (the host loops), so an input concatenated twice never races */
__global__ void concat_backward(float *dx, const float *dy, int64_t outer, int64_t width, int64_t inner, int64_t off,
                                int64_t wj, int accum) {
    // dx (outer, wj, inner), dy (outer, width, inner)
    cu_pdl_enter();
    int64_t count = outer * wj * inner;
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < count; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t k = t % inner, p = (t / inner) % wj, o = t / (inner * wj);
        float v = dy[(o * width + off + p) * inner + k];
        dx[t] = accum ? dx[t] + v : v;
    }
}

static merge_args args_of(cu_graph *g, const mpscy_node *n, int64_t b) {
    merge_args a = {};
    a.n_in = n->n_in;
    for (int32_t j = 0; j < n->n_in; j++) {
        a.x[j] = g->y[n->in[j]];
        a.dx[j] = g->dy[n->in[j]];
        a.accum[j] = n->accum[j];
    }
    if (n->kind == MPSCY_LAYER_CONCAT) {
        int32_t ax = n->ints[0];
        a.outer = b;
        a.inner = 1;
        for (int32_t d = 0; d < ax; d++) a.outer *= n->shape[d];
        for (int32_t d = ax + 1; d < n->rank; d++) a.inner *= n->shape[d];
        a.width = n->shape[ax];
        for (int32_t j = 0; j < n->n_in; j++) a.off[j + 1] = a.off[j] + g->plan.nodes[n->in[j]].shape[ax];
    }
    return a;
}

int cu_merge_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    merge_args a = args_of(g, n, b);
    int64_t count = b * n->size;
    float *y = g->y[cu_node_index(g, n)];
    if (n->kind == MPSCY_LAYER_ADD)
        CU_TRY(cu_launch(g, add_forward, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, g->stream, y, a, count), "add_forward");
    else
        CU_TRY(cu_launch(g, concat_forward, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, g->stream, y, a), "concat_forward");
    return CU_LAUNCHED("merge_forward");
}

int cu_merge_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    merge_args a = args_of(g, n, b);
    int64_t count = b * n->size;
    const float *dy = g->dy[cu_node_index(g, n)];
    if (n->kind == MPSCY_LAYER_ADD) {
        CU_TRY(cu_launch(g, add_backward, cu_blocks(count, CU_THREADS, 8192), CU_THREADS, g->stream, dy, a, count), "add_backward");
        return CU_LAUNCHED("add_backward");
    }
    for (int32_t j = 0; j < n->n_in; j++) {
        if (!a.dx[j]) continue;
        int64_t wj = a.off[j + 1] - a.off[j];
        CU_TRY(cu_launch(g, concat_backward, cu_blocks(a.outer * wj * a.inner, CU_THREADS, 8192), CU_THREADS, g->stream,
                         a.dx[j], dy, a.outer, a.width, a.inner, a.off[j], wj, a.accum[j]),
               "concat_backward");
        int st = CU_LAUNCHED("concat_backward");
        if (st != MPSCY_OK) return st;
    }
    return MPSCY_OK;
}
