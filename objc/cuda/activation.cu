/* activation.cu — element-wise activations on CUDA (ReLU, LeakyReLU, ELU, Sigmoid, Tanh,
 * Swish/SiLU, GELU exact and tanh, ReLU6, Hardsigmoid, Hardswish, Softplus, Mish), Softmax over one axis, Flatten, and the bias(+ReLU) kernels
 * Dense falls back on. Same formulas and derivatives as cpu/activation.c (GELU and the softmax
 * sums in double, as there). A ReLU fused into its Dense and an aliased Flatten launch nothing. */
#include "cuda.h"
#include "../common/activation_math.h"


static unsigned grid_for(int64_t n) { return cu_blocks(n, CU_THREADS, 8192); }

__global__ void activation_forward(float *y, const float *x, int64_t n, int kind, float r0, float r1, int approx) {
    // y (n), x (n)
    cu_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = kind == MPSCY_LAYER_GELU ? mpscy_gelu(x[i], approx) : mpscy_act(kind, x[i], r0, r1);
}

__global__ void activation_backward(float *dx, const float *dy, const float *x, const float *y, int64_t n,
                                    int kind, float r0, float r1, int approx, int accum) {
    // dx (n), dy (n), x (n) input, y (n) output
    cu_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float d = kind == MPSCY_LAYER_GELU ? (float)(dy[i] * mpscy_gelu_grad(x[i], approx))
                                           : mpscy_act_grad(kind, dy[i], x[i], y[i], r0, r1);
        dx[i] = accum ? dx[i] + d : d;
    }
}

/* Softmax over the middle axis of (outer, len, inner) blocks: one thread per (outer, inner). */
__global__ void softmax_forward(float *y, const float *x, int64_t outer, int64_t len, int64_t inner) {
    // y, x (outer, len, inner)
    cu_pdl_enter();
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= outer * inner) return;
    int64_t base = (r / inner) * len * inner + r % inner;
    mpscy_softmax_row(y + base, x + base, len, inner);
}

__global__ void softmax_backward(float *dx, const float *dy, const float *y, int64_t outer, int64_t len,
                                 int64_t inner, int accum) {
    // dx, dy, y (outer, len, inner)
    cu_pdl_enter();
    int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (r >= outer * inner) return;
    int64_t base = (r / inner) * len * inner + r % inner;
    mpscy_softmax_row_grad(dx + base, dy + base, y + base, len, inner, accum);
}

__global__ void copy_forward(float *dx, const float *dy, int64_t n, int accum) {
    // dx (n), dy (n)
    cu_pdl_enter();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dx[i] = accum ? dx[i] + dy[i] : dy[i];
}

__global__ void bias_act_forward(float *y, const float *bias, int64_t rows, int64_t cols, int relu) {
    // y (rows, cols) in place, bias (cols) or NULL
    cu_pdl_enter();
    int64_t n = rows * cols;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = y[i] + (bias ? bias[i % cols] : 0.0f);
        y[i] = relu && mpscy_relu_zeroes(v) ? 0.0f : v;
    }
}

/* Column sums of dy (masked by ymask > 0 when given, the masked values written to dz): blocks
 * of 32 columns x 8 row lanes over a chunk of rows; with several chunks, each stores its partial
 * sums and the last chunk of a column tile adds them in a fixed order. */
__global__ void bias_act_backward(float *dz, float *db, const float *dy, const float *ymask, int64_t rows,
                                  int64_t cols, int64_t rchunk, float *part, unsigned int *count) {
    // dz (rows, cols) or NULL, db (cols) or NULL, dy (rows, cols), ymask (rows, cols) or NULL
    cu_pdl_enter();
    __shared__ float lanes[8][33];
    __shared__ bool last;
    int64_t c = blockIdx.x * 32 + threadIdx.x;
    int64_t r0 = blockIdx.y * rchunk, r1 = min(rows, r0 + rchunk);
    float s = 0.0f;
    if (c < cols)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
            float v = dy[r * cols + c];
            if (ymask) {
                v = mpscy_relu_pass(ymask[r * cols + c], v);
                dz[r * cols + c] = v;
            }
            s += v;
        }
    if (!db) return;
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    float t = 0.0f;
    if (threadIdx.y == 0)
        for (int k = 0; k < 8; k++) t += lanes[k][threadIdx.x];
    if (gridDim.y == 1) {
        if (threadIdx.y == 0 && c < cols) db[c] = t;
        return;
    }
    if (threadIdx.y == 0 && c < cols) part[blockIdx.y * cols + c] = t;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(&count[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last || threadIdx.y != 0) return;
    if (c < cols) {
        const volatile float *vp = part;
        float v = 0.0f;
        for (unsigned k = 0; k < gridDim.y; k++) v += vp[k * cols + c];
        db[c] = v;
    }
    if (threadIdx.x == 0) count[blockIdx.x] = 0;
}

/* Row chunks of bias_act_backward: enough blocks to keep the machine busy. */
static int64_t colsum_chunks(int sms, int64_t rows, int64_t cols) {
    int64_t tiles = (cols + 31) / 32, r = (4 * sms + tiles - 1) / tiles, most = (rows + 63) / 64;
    if (r > most) r = most;
    return r < 1 ? 1 : r;
}

void cu_colsum_need(int sms, int64_t rows, int64_t cols, int64_t *floats, int64_t *counters) {
    int64_t r = colsum_chunks(sms, rows, cols);
    *floats = r > 1 ? r * cols : 0;
    *counters = r > 1 ? (cols + 31) / 32 : 0;
}

int cu_bias_act_forward(cu_graph *g, cudaStream_t s, float *y, const float *bias, int64_t rows, int64_t cols,
                        int relu, char *err, size_t en) {
    CU_TRY(cu_launch(g, bias_act_forward, grid_for(rows * cols), CU_THREADS, s, y, bias, rows, cols, relu),
           "bias_act_forward");
    return CU_LAUNCHED("bias_act_forward");
}

int cu_bias_act_backward(cu_graph *g, cudaStream_t s, float *dz, float *db, const float *dy, const float *ymask,
                         int64_t rows, int64_t cols, char *err, size_t en) {
    int64_t tiles = (cols + 31) / 32, r = colsum_chunks(g->dev->sms, rows, cols);
    float *part = NULL;
    unsigned int *count = NULL;
    if (db && r > 1 && (r * cols > g->gws_floats - g->gws_used || tiles > g->gcount_n - g->gcount_used))
        r = 1;  /* not planned for (a batch larger than built cannot happen): one chunk, no partials */
    if (db && r > 1) {
        part = g->gws + g->gws_used;
        g->gws_used += r * cols;
        count = g->gcount + g->gcount_used;
        g->gcount_used += tiles;
    }
    int64_t rchunk = (rows + r - 1) / r;
    CU_TRY(cu_launch(g, bias_act_backward, dim3((unsigned)tiles, (unsigned)r), dim3(32, 8), s, dz, db, dy, ymask, rows,
                     cols, rchunk, part, count),
           "bias_act_backward");
    return CU_LAUNCHED("bias_act_backward");
}

int cu_activation_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    int64_t i = cu_node_index(g, n), count = b * n->size;
    if (g->fuse[i] & CU_SKIP) return MPSCY_OK;  /* a ReLU its Dense already applied */
    float *y = g->y[i];
    const float *x = g->y[n->in[0]];
    if (n->kind == MPSCY_LAYER_SOFTMAX) {
        int64_t outer, len, inner;
        mpscy_axis_split(n, b, &outer, &len, &inner);
        CU_TRY(cu_launch(g, softmax_forward, cu_blocks(outer * inner, 128, 1 << 30), 128, g->stream, y, x, outer, len, inner),
               "softmax_forward");
        return CU_LAUNCHED("softmax_forward");
    }
    CU_TRY(cu_launch(g, activation_forward, grid_for(count), CU_THREADS, g->stream, y, x, count, (int)n->kind,
                     (float)n->reals[0], (float)n->reals[1], (int)n->ints[0]),
           "activation_forward");
    return CU_LAUNCHED("activation_forward");
}

int cu_activation_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t i = cu_node_index(g, n), count = b * n->size;
    if (g->fuse[i] & CU_SKIP) return MPSCY_OK;  /* its Dense's backward applies the mask */
    float *dx = g->dy[n->in[0]];
    if (!dx) return MPSCY_OK;
    const float *dy = g->dy[i], *x = g->y[n->in[0]], *y = g->y[i];
    if (n->kind == MPSCY_LAYER_SOFTMAX) {
        int64_t outer, len, inner;
        mpscy_axis_split(n, b, &outer, &len, &inner);
        CU_TRY(cu_launch(g, softmax_backward, cu_blocks(outer * inner, 128, 1 << 30), 128, g->stream, dx, dy, y, outer, len,
                         inner, (int)n->accum[0]),
               "softmax_backward");
        return CU_LAUNCHED("softmax_backward");
    }
    CU_TRY(cu_launch(g, activation_backward, grid_for(count), CU_THREADS, g->stream, dx, dy, x, y, count, (int)n->kind,
                     (float)n->reals[0], (float)n->reals[1], (int)n->ints[0], (int)n->accum[0]),
           "activation_backward");
    return CU_LAUNCHED("activation_backward");
}

int cu_flatten_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)g; (void)n; (void)b; (void)train; (void)err; (void)en;
    return MPSCY_OK;  /* its output pointer is its input's (graph.cu) */
}

int cu_flatten_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    float *dx = g->dy[n->in[0]];
    const float *dy = g->dy[cu_node_index(g, n)];
    if (!dx || dx == dy) return MPSCY_OK;  /* aliased when the Flatten is its input's only consumer */
    CU_TRY(cu_launch(g, copy_forward, grid_for(b * n->size), CU_THREADS, g->stream, dx, dy, b * n->size, (int)n->accum[0]),
           "flatten_backward");
    return CU_LAUNCHED("flatten_backward");
}
