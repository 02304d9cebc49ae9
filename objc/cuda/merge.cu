/* merge.cu — the layers that join branches, on CUDA: Add (element-wise sum of equal shapes) and
 * Concatenate (along one per-sample axis), each one kernel over all its inputs. Backward hands
 * each input its share of the output gradient, writing or accumulating as the plan says. */
#include "cuda.h"

#include <type_traits>

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

/* Concatenate's kernels take I, the index type (int32_t where every index of the views fits, with a
 * grid's stride past the last: 32-bit divisions), and V, the floats a thread moves at once (4
 * where every input's run along the inner axes is a whole number of aligned float4s). A U-Net's
 * concat_backward over (16, 64, 64, 64) took 46 us a call with 64-bit divisions a float on an
 * H100. Counts and offsets along the inner axes are in units of V. */
template <int V>
using cat_vec = typename std::conditional<V == 4, float4, float>::type;

static __device__ __forceinline__ float cat_add(float a, float b) { return a + b; }
static __device__ __forceinline__ float4 cat_add(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

/* the input holding axis position p, and p within it */
template <typename I>
static __device__ int concat_input(const merge_args &a, I *p) {
    int j = 0;
    while (j + 1 < a.n_in && *p >= (I)a.off[j + 1]) j++;
    *p -= (I)a.off[j];
    return j;
}

template <typename I, int V>
__global__ void concat_forward(float *y, merge_args a) {
    // y (outer, width, inner), a.x[j] (outer, w_j, inner)
    cu_pdl_enter();
    using F = cat_vec<V>;
    const I inner = (I)(a.inner / V), width = (I)a.width, count = (I)a.outer * width * inner;
    for (I e = blockIdx.x * (I)blockDim.x + threadIdx.x; e < count; e += (I)gridDim.x * blockDim.x) {
        I k = e % inner, q = e / inner, p = q % width, o = q / width;
        int j = concat_input(a, &p);
        I wj = (I)(a.off[j + 1] - a.off[j]);
        ((F *)y)[e] = ((const F *)a.x[j])[(o * wj + p) * inner + k];
    }
}

/* one input at a time (the host loops), so an input concatenated twice never races */
template <typename I, int V>
__global__ void concat_backward(float *dx, const float *dy, I outer, I width, I inner, I off, I wj, int accum) {
    // dx (outer, wj, inner), dy (outer, width, inner)
    cu_pdl_enter();
    using F = cat_vec<V>;
    const I count = outer * wj * inner;
    for (I t = blockIdx.x * (I)blockDim.x + threadIdx.x; t < count; t += (I)gridDim.x * blockDim.x) {
        I k = t % inner, q = t / inner, p = q % wj, o = q / wj;
        F v = ((const F *)dy)[(o * width + off + p) * inner + k];
        ((F *)dx)[t] = accum ? cat_add(((F *)dx)[t], v) : v;
    }
}

/* V for the views (outer, width, inner) of y and of each input: 4 where inner is a multiple of 4
 * and every tensor starts on 16 bytes */
static int cat_width(const merge_args &a, const float *y) {
    bool ok = a.inner % 4 == 0 && cu_aligned16(y);
    for (int j = 0; j < a.n_in && ok; j++) ok = cu_aligned16(a.x[j]) && (!a.dx[j] || cu_aligned16(a.dx[j]));
    return ok ? 4 : 1;
}

static bool cat_i32(const merge_args &a) { return cu_fits_i32(a.outer * a.width * a.inner); }

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
    {
        const int v = cat_width(a, y);
        const bool i32 = cat_i32(a);
        auto kernel = v == 4 ? (i32 ? concat_forward<int32_t, 4> : concat_forward<int64_t, 4>)
                             : (i32 ? concat_forward<int32_t, 1> : concat_forward<int64_t, 1>);
        CU_TRY(cu_launch(g, kernel, cu_blocks(count / v, CU_THREADS, 8192), CU_THREADS, g->stream, y, a), "concat_forward");
    }
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
        const int64_t v = cat_width(a, dy), in = a.inner / v;
        const unsigned blocks = cu_blocks(a.outer * wj * in, CU_THREADS, 8192);
        if (cat_i32(a))
            CU_TRY(cu_launch(g, v == 4 ? concat_backward<int32_t, 4> : concat_backward<int32_t, 1>, blocks, CU_THREADS,
                             g->stream, a.dx[j], dy, (int32_t)a.outer, (int32_t)a.width, (int32_t)in, (int32_t)a.off[j],
                             (int32_t)wj, a.accum[j]),
                   "concat_backward");
        else
            CU_TRY(cu_launch(g, v == 4 ? concat_backward<int64_t, 4> : concat_backward<int64_t, 1>, blocks, CU_THREADS,
                             g->stream, a.dx[j], dy, a.outer, a.width, in, a.off[j], wj, a.accum[j]),
                   "concat_backward");
        int st = CU_LAUNCHED("concat_backward");
        if (st != MPSCY_OK) return st;
    }
    return MPSCY_OK;
}
