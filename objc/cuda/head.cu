/* head.cu — the model's last Dense under softmax cross-entropy, forward and backward in two
 * kernels: for a small layer head_forward computes the logits y = x W^T + b, the loss, its
 * gradient dz and the correct count (as loss.cu defines them), 8 rows a block; head_backward then
 * dx = dz W (times a Dropout's multipliers and masked by the ReLU below, as dense.cu's own
 * product writes the lower Dense's dz), dW = dz^T x and db, and adds the loss partials in order.
 * A training step otherwise runs four kernels in a chain here, each of a few microseconds over
 * fewer than 100k multiply-adds: the Dense's product, the loss, the dx product and (on the side
 * stream) the dW product. One block for all of it was measured first (H200, the README CNN):
 * 32 us, issue-bound on one multiprocessor (113k warp instructions at 0.7 a cycle), against the
 * chain's ~17. cu_head_fits decides, once at build (graph.cu). */
#include "cuda.h"
#include "reduce.h"
#include "ce.h"
#include "../common/rng.h"

#include <math.h>

#define HEAD_THREADS 256
#define HEAD_ROWS 8                /* rows a forward block takes: a warp a row for the loss */
#define HEAD_COLS 32               /* columns of dW a gradient block takes */
#define HEAD_SHARED_FLOATS 12160   /* either kernel's dynamic shared floats (under 48 KB with its static bytes) */
#define HEAD_LOADS 8               /* words a thread stages a round */

struct head_args {
    const float *x, *w, *bias;     /* x (b, in), W (c, in), bias (c) or NULL */
    float *y, *dz;                 /* logits (b, c); their gradient (b, c) */
    float *dw, *db;                /* dW (c, in), db (c) or NULL */
    float *dx;                     /* (b, in), or NULL */
    const float *mask, *scale;     /* dx: zeroed where mask <= 0, times scale first; or NULL */
    const void *target;            /* int32 labels (b) or float (b, c) */
    const float *drop_x;           /* a Dropout's input (b, in) that head_forward applies it to, writing x */
    float *drop_mask;              /* and its multipliers (b, in), as dropout.cu's forward; or NULL */
    const cu_params *P;            /* the step's Dropout key and counter */
    float drop_rate;
    uint32_t drop_node;
    int b, c, in, dx_rows, dx_blocks;
    double eps;
    int index_target, accuracy, accum;
};

/* first maximum among lanes < c (one value per lane), in argmax_before's order (the cpu's argmax) */
static __device__ __forceinline__ int lane_argmax(float v, int lane, int c) {
    return warp_first_max(lane < c ? v : -INFINITY, lane < c ? lane : -1);
}

/* Copies n 32-bit words from up to three sources laid end to end (a: na words, b: nb words, c:
 * the rest) into shared memory at dst: a's and b's words as rows of `row` words padded to `ld`,
 * c's after them unpadded. HEAD_LOADS loads of a thread are in flight before the first store
 * (indices clamped, so every load is unconditional): a load waited for in a loop costs ~0.5 us. */
static __device__ __forceinline__ void head_stage(uint32_t *dst, const float *a, int na, const float *b, int nb,
                                                  const float *c, int n, int row, int ld) {
    const int T = blockDim.x, pad = (na + nb) / row * ld;
    for (int i0 = 0; i0 < n; i0 += HEAD_LOADS * T) {
        uint32_t v[HEAD_LOADS];
#pragma unroll
        for (int u = 0; u < HEAD_LOADS; u++) {
            const int i = min(i0 + u * T + (int)threadIdx.x, n - 1);
            const float *src = i < na ? a + i : i < na + nb ? b + (i - na) : c + (i - na - nb);
            v[u] = __ldg(reinterpret_cast<const uint32_t *>(src));
        }
#pragma unroll
        for (int u = 0; u < HEAD_LOADS; u++) {
            const int i = i0 + u * T + (int)threadIdx.x;
            if (i >= n) break;
            dst[i < na + nb ? i / row * ld + i % row : pad + i - na - nb] = v[u];
        }
    }
}

/* The forward and the loss: block q takes rows [8q, 8q + 8): logits (a thread an output, four
 * partial sums) into y, then a warp a row, lane j holding logit j, the loss and dz by ce.h's
 * ce_row (as loss.cu); the block's loss and correct count into cu_scratch's partials. */
__global__ void __launch_bounds__(HEAD_THREADS) head_forward(cu_scratch *S, head_args a) {
    extern __shared__ float sm[];
    __shared__ double wloss[HEAD_THREADS / 32];
    __shared__ long long wcorrect[HEAD_THREADS / 32];
    cu_pdl_enter();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c = a.c, in = a.in, ld = in + 1, r0 = blockIdx.x * HEAD_ROWS, rows = min(HEAD_ROWS, a.b - r0);
    float *xs = sm, *ws, *bs, *lg = sm + (HEAD_ROWS + c) * ld + 32;  /* lg past the largest x, W and bias */
    /* x's rows and W (both padded), then the bias */
    const int nb = a.bias ? c : 0;
    head_stage(reinterpret_cast<uint32_t *>(sm), (a.drop_x ? a.drop_x : a.x) + (int64_t)r0 * in, rows * in, a.w,
               c * in, a.bias, rows * in + c * in + nb, in, ld);
    ws = sm + rows * ld;  /* W's rows land right after x's (fewer than 8 in the last block) */
    bs = ws + c * ld;
    __syncthreads();
    if (a.drop_x) {
        /* the Dropout below, as dropout.cu's forward (rng.h's multipliers); x and the
         * multipliers stored for the backward */
        const uint64_t seed = a.P->seed, counter = a.P->counter;
        float *x = const_cast<float *>(a.x);
        for (int i = tid; i < rows * in; i += blockDim.x) {
            const int r = i / in, k = i - r * in;
            const int64_t e = (int64_t)r0 * in + i;
            const float m = mpscy_dropout_multiplier(seed, counter, a.drop_node, (uint64_t)e, a.drop_rate);
            const float v = xs[r * ld + k] * m;
            xs[r * ld + k] = v;
            a.drop_mask[e] = m;
            x[e] = v;
        }
        __syncthreads();
    }
    for (int o = tid; o < rows * c; o += blockDim.x) {
        const int r = o / c, j = o - r * c;
        const float *xr = xs + r * ld, *wj = ws + j * ld;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        int k = 0;
        for (; k + 4 <= in; k += 4) {
            s0 = fmaf(xr[k], wj[k], s0);
            s1 = fmaf(xr[k + 1], wj[k + 1], s1);
            s2 = fmaf(xr[k + 2], wj[k + 2], s2);
            s3 = fmaf(xr[k + 3], wj[k + 3], s3);
        }
        for (; k < in; k++) s0 = fmaf(xr[k], wj[k], s0);
        float v = (s0 + s1) + (s2 + s3);
        if (a.bias) v += bs[j];
        lg[o] = v;
        a.y[(int64_t)r0 * c + o] = v;
    }
    __syncthreads();
    const int32_t *labels = a.index_target ? (const int32_t *)a.target : NULL;
    const float *t = a.index_target ? NULL : (const float *)a.target;
    double row = 0.0;
    long long correct = 0;
    if (warp < rows) {
        const int r = r0 + warp, label = labels ? labels[r] : -1;
        const float *tr = t ? t + (int64_t)r * c : NULL;
        row = warp_sum(ce_row<CE_ONE>(lg + warp * c, c, lane, label, tr, nullptr, a.eps, 1.0 / (double)a.b,
                                    a.dz + (int64_t)r * c));
        if (a.accuracy == MPSCY_ACCURACY_ARGMAX) {
            const bool on = lane < c;
            const int want = labels ? label : lane_argmax(tr && on ? tr[lane] : 0.0f, lane, c);
            correct = lane_argmax(on ? lg[warp * c + lane] : -INFINITY, lane, c) == want;
        }
    }
    if (lane == 0) {
        wloss[warp] = row;
        wcorrect[warp] = correct;
    }
    __syncthreads();
    if (tid == 0) {
        double sum = 0;
        long long cor = 0;
        for (int k = 0; k < HEAD_ROWS; k++) {  /* a fixed order: the same bits every run */
            sum += wloss[k];
            cor += wcorrect[k];
        }
        S->loss_part[blockIdx.x] = sum;
        S->correct_part[blockIdx.x] = cor;
    }
}

/* The backward: blocks [0, dx_blocks) take dx_rows rows of dx = dz W each (with the epilogue of
 * the layer below); the others HEAD_COLS columns of dW = dz^T x each (four partial sums over the
 * rows); block 0 also adds the forward blocks' loss partials in order and the bias gradient. */
__global__ void __launch_bounds__(HEAD_THREADS) head_backward(cu_scratch *S, head_args a) {
    extern __shared__ float sm[];
    cu_pdl_enter();
    const int tid = threadIdx.x, T = blockDim.x, b = a.b, c = a.c, in = a.in;
    float *dzs = sm, *rest = sm + b * c;
    const bool dx_block = (int)blockIdx.x < a.dx_blocks;
    if (dx_block) {
        /* rows [r0, r0 + rows) of dx: dz's rows and W */
        const int r0 = blockIdx.x * a.dx_rows, rows = min(a.dx_rows, b - r0), n = rows * in;
        head_stage(reinterpret_cast<uint32_t *>(sm), a.dz + (int64_t)r0 * c, rows * c, a.w, c * in, a.w,
                   rows * c + c * in, 1, 1);
        const float *ws = sm + rows * c;
        __syncthreads();
        for (int i0 = 0; i0 < n; i0 += 4 * T) {
            float f[4], mk[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int64_t at = (int64_t)r0 * in + min(i0 + q * T + tid, n - 1);
                f[q] = a.scale ? __ldg(&a.scale[at]) : 1.0f;
                mk[q] = a.mask ? __ldg(&a.mask[at]) : 1.0f;
            }
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int i = i0 + q * T + tid;
                if (i >= n) break;
                const int r = i / in, k = i - r * in;
                const float *dr = sm + r * c;
                float s0 = 0.0f, s1 = 0.0f;
                int j = 0;
                for (; j + 2 <= c; j += 2) {
                    s0 = fmaf(dr[j], ws[j * in + k], s0);
                    s1 = fmaf(dr[j + 1], ws[(j + 1) * in + k], s1);
                }
                if (j < c) s0 = fmaf(dr[j], ws[j * in + k], s0);
                float v = (s0 + s1) * f[q];
                if (mpscy_relu_zeroes(mk[q])) v = 0.0f;
                const int64_t at = (int64_t)r0 * in + i;
                if (a.accum) v += a.dx[at];
                a.dx[at] = v;
            }
        }
        return;
    }
    /* columns [k0, k0 + cols) of dW: all of dz, and x's columns (rows padded to HEAD_COLS + 1) */
    const int k0 = ((int)blockIdx.x - a.dx_blocks) * HEAD_COLS, cols = min(HEAD_COLS, in - k0), ld = HEAD_COLS + 1;
    head_stage(reinterpret_cast<uint32_t *>(sm), a.dz, b * c, a.dz, 0, a.dz, b * c, 1, 1);
    for (int i0 = 0; i0 < b * cols; i0 += HEAD_LOADS * T) {
        float v[HEAD_LOADS];
#pragma unroll
        for (int u = 0; u < HEAD_LOADS; u++) {
            const int i = min(i0 + u * T + tid, b * cols - 1), r = i / cols;
            v[u] = __ldg(&a.x[(int64_t)r * in + k0 + (i - r * cols)]);
        }
#pragma unroll
        for (int u = 0; u < HEAD_LOADS; u++) {
            const int i = i0 + u * T + tid, r = i / cols;
            if (i >= b * cols) break;
            rest[r * ld + (i - r * cols)] = v[u];
        }
    }
    __syncthreads();
    if (a.dw)
        for (int o = tid; o < c * cols; o += T) {
            const int j = o / cols, k = o - j * cols;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            int r = 0;
            for (; r + 4 <= b; r += 4) {
                s0 = fmaf(dzs[r * c + j], rest[r * ld + k], s0);
                s1 = fmaf(dzs[(r + 1) * c + j], rest[(r + 1) * ld + k], s1);
                s2 = fmaf(dzs[(r + 2) * c + j], rest[(r + 2) * ld + k], s2);
                s3 = fmaf(dzs[(r + 3) * c + j], rest[(r + 3) * ld + k], s3);
            }
            for (; r < b; r++) s0 = fmaf(dzs[r * c + j], rest[r * ld + k], s0);
            a.dw[(int64_t)j * in + k0 + k] = (s0 + s1) + (s2 + s3);
        }
    if ((int)blockIdx.x != a.dx_blocks) return;
    /* the first dW block: the bias gradient, and the loss over the forward blocks in order */
    if (a.db && tid < c) {
        float s = 0.0f;
        for (int r = 0; r < b; r++) s += dzs[r * c + tid];
        a.db[tid] = s;
    }
    if (tid == 0) {
        const int parts = (b + HEAD_ROWS - 1) / HEAD_ROWS;
        double sum = 0;
        long long cor = 0;
        for (int k = 0; k < parts; k++) {
            sum += S->loss_part[k];
            cor += S->correct_part[k];
        }
        S->loss = sum / (double)b;
        S->correct = a.accuracy == MPSCY_ACCURACY_NONE ? -1 : cor;
    }
}

/* each kernel's shared floats at b rows (head_forward: x's rows and W padded, the bias, the
 * logits; head_backward: dz and the larger of a dx block's W and a dW block's x columns) */
static int64_t head_forward_floats(int64_t c, int64_t in) { return (HEAD_ROWS + c) * (in + 1) + 32 + HEAD_ROWS * c; }
static int64_t head_backward_floats(int64_t b, int64_t c, int64_t in, int64_t dx_rows) {
    const int64_t dx = dx_rows * c + c * in, dw = b * (HEAD_COLS + 1);
    return b * c + (dx > dw ? dx : dw);
}
static int64_t head_dx_rows(int64_t in) { return in >= 4 * HEAD_THREADS ? 1 : 4 * HEAD_THREADS / in; }

/* 1 when training steps may run the output Dense and the loss as head_forward and head_backward:
 * an output Dense of at most 32 units under (sparse) cross-entropy on logits without class
 * weights, fp32, whose kernels' tiles at the built batch fit a block's shared memory (about
 * 48 KB). Needs the fusions planned (g->fuse). */
int cu_head_fits(const cu_graph *g) {
    const mpscy_plan *p = &g->plan;
    const mpscy_node *n = &p->nodes[p->output];
    if (n->kind != MPSCY_LAYER_DENSE || !n->grad || n->consumers != 1 || (g->fuse[p->output] & CU_FUSE_RELU))
        return 0;
    if ((p->loss.kind != MPSCY_LOSS_SPARSE_CE && p->loss.kind != MPSCY_LOSS_CE) || p->class_weight || p->loss.ignore)
        return 0;
    if (p->precision != MPSCY_PRECISION_FP32 || p->loss.accuracy == MPSCY_ACCURACY_THRESHOLD) return 0;
    const int64_t b = p->batch, c = n->size, in = p->nodes[n->in[0]].size;
    return c >= 1 && c <= 32 && b >= 1 && (b + HEAD_ROWS - 1) / HEAD_ROWS <= CU_MAX_PARTS &&
           head_forward_floats(c, in) <= HEAD_SHARED_FLOATS &&
           head_backward_floats(b, c, in, head_dx_rows(in)) <= HEAD_SHARED_FLOATS;
}

int32_t cu_head_dropout(const cu_graph *g) {
    const mpscy_plan *p = &g->plan;
    const int32_t j = p->nodes[p->output].in[0];
    const mpscy_node *d = &p->nodes[j];
    return d->kind == MPSCY_LAYER_DROPOUT && d->consumers == 1 && j != p->output ? j : -1;
}

int cu_head(cu_graph *g, int64_t b, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    const mpscy_node *n = &p->nodes[p->output];
    head_args a;
    a.x = g->y[n->in[0]];
    a.w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0);
    a.bias = cu_tensor(g, n, MPSCY_ROLE_PARAM, 1);
    a.y = g->y[p->output];
    a.dz = g->dy[p->output];
    a.dw = cu_tensor_grad(g, n, 0);
    a.db = cu_tensor_grad(g, n, 1);
    a.dx = NULL;
    a.mask = a.scale = NULL;
    a.accum = n->accum[0];
    if (g->dy[n->in[0]]) {
        cu_dx_target t;
        cu_dense_dx_target(g, n, &t);
        a.dx = t.dx;
        a.mask = t.mask;
        a.scale = t.scale;
    }
    a.target = g->stage_d + g->off_target;
    a.drop_x = NULL;
    a.drop_mask = NULL;
    a.P = (const cu_params *)g->params_d;
    a.drop_rate = 0.0f;
    a.drop_node = 0;
    if (g->head_drop >= 0) {
        const mpscy_node *d = &p->nodes[g->head_drop];
        a.drop_x = g->y[d->in[0]];
        a.drop_mask = g->save + d->save;
        a.drop_rate = (float)d->reals[0];
        a.drop_node = (uint32_t)g->head_drop;
    }
    a.index_target = p->target == MPSCY_TARGET_INDEX;
    a.b = (int)b;
    a.c = (int)n->size;
    a.in = (int)p->nodes[n->in[0]].size;
    a.dx_rows = (int)head_dx_rows(a.in);
    a.dx_blocks = a.dx ? (int)((b + a.dx_rows - 1) / a.dx_rows) : 0;
    a.eps = p->loss.label_smoothing;
    a.accuracy = p->loss.accuracy;
    const unsigned fwd = (unsigned)((b + HEAD_ROWS - 1) / HEAD_ROWS), dw = (unsigned)((a.in + HEAD_COLS - 1) / HEAD_COLS);
    CU_TRY(cu_launch_shm(g, head_forward, dim3(fwd), dim3(HEAD_THREADS),
                         (size_t)head_forward_floats(a.c, a.in) * sizeof(float), g->stream, g->scratch, a),
           "head_forward");
    int st = CU_LAUNCHED("head_forward");
    if (st != MPSCY_OK) return st;
    CU_TRY(cu_launch_shm(g, head_backward, dim3((unsigned)a.dx_blocks + dw), dim3(HEAD_THREADS),
                         (size_t)head_backward_floats(b, a.c, a.in, a.dx_rows) * sizeof(float), g->stream, g->scratch, a),
           "head_backward");
    return CU_LAUNCHED("head_backward");
}
