/* lbfgs.cu — the vector half of torch.optim.LBFGS on CUDA, as common/lbfgs.c defines it: the
 * parts of one MPSCY_MODE_LBFGS call (save, restore, moves, direction, evaluation) over the flat
 * slab, launched directly on the stream, which common/lbfgs.c's mpscy_lbfgs_run puts in
 * mpscy.h's order. Dot products reduce in double in a fixed order; the two-loop recursion keeps
 * its coefficients on the device, so a direction needs only two round trips (y.s for the
 * history decision, and the results). The caller (src/mpscy/optim/lbfgs.py) owns the scalar
 * control flow. */
#include "cuda.h"
#include "reduce.h"
#include "../common/lbfgs.h"

#include <math.h>
#include <string.h>

enum { RED_DOT = 0, RED_ABSMAX = 1, RED_ABSSUM = 2 };

/* out = reduce(a, b) * (mul ? *mul : 1), in double; deterministic (last block adds partials). */
__global__ void lbfgs_reduce(double *out, cu_scratch *S, const float *a, const float *b, const float *mul,
                             int64_t n, int op) {
    // a, b (n)
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if (op == RED_DOT) s += (double)a[i] * b[i];
        else if (op == RED_ABSSUM) s += fabsf(a[i]);
        else s = fmax(s, (double)fabsf(a[i]));
    }
    if (op == RED_ABSMAX) {
        for (int o = 16; o > 0; o >>= 1) s = fmax(s, __shfl_down_sync(0xffffffffu, s, o));
        __shared__ double w[32];
        __syncthreads();
        if ((threadIdx.x & 31) == 0) w[threadIdx.x >> 5] = s;
        __syncthreads();
        if (threadIdx.x == 0)
            for (int k = 1; k < (int)(blockDim.x >> 5); k++) s = fmax(s, w[k]);
    } else {
        s = block_sum(s);
    }
    if (threadIdx.x == 0) S->red_part[blockIdx.x] = s;
    if (!last_block(&S->red_count)) return;
    if (threadIdx.x == 0) {
        const volatile double *vp = S->red_part;
        double t = 0.0;
        for (unsigned k = 0; k < gridDim.x; k++) t = op == RED_ABSMAX ? fmax(t, vp[k]) : t + vp[k];
        *out = t * (mul ? (double)*mul : 1.0);
        S->red_count = 0;
    }
}

/* y = a + t * b (torch's a.add(b, alpha=t) in float32); a may be NULL for y = t * b. */
__global__ void lbfgs_axpy(float *y, const float *a, float t, const float *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = (a ? a[i] : 0.0f) + t * b[i];
}

/* d += c * x with c from the device: mode 0, c = -al; mode 1, c = al - S->coef[0]. */
__global__ void lbfgs_axpy_dev(float *d, const float *x, const double *al, const cu_scratch *S, int mode, int64_t n) {
    float c = mode == 0 ? (float)-*al : (float)(*al - S->coef[0]);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        d[i] += c * x[i];
}

/* y = g - prev and s = d * t: the newest curvature pair. */
__global__ void lbfgs_pair(float *y, float *s, const float *g, const float *prev, const float *d, float t, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        y[i] = g[i] - prev[i];
        s[i] = d[i] * t;
    }
}

__global__ void lbfgs_scale(float *d, float h, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        d[i] *= h;
}

__global__ void lbfgs_set(float *p, float v) { *p = v; }

static unsigned grid_n(const cu_graph *g, int64_t n) { return cu_blocks(n, CU_THREADS * 4, 8 * g->dev->sms); }

static int reduce(cu_graph *g, double *out, const float *a, const float *b, const float *mul, int64_t n, int op,
                  char *err, size_t en) {
    unsigned blocks = cu_blocks(n, CU_THREADS * 8, 2 * g->dev->sms < CU_MAX_PARTS ? 2 * g->dev->sms : CU_MAX_PARTS);
    lbfgs_reduce<<<blocks, CU_THREADS, 0, g->stream>>>(out, g->scratch, a, b, mul, n, op);
    return CU_LAUNCHED("lbfgs_reduce");
}

static int axpy(cu_graph *g, float *y, const float *a, float t, const float *b, int64_t n, char *err, size_t en) {
    lbfgs_axpy<<<grid_n(g, n), CU_THREADS, 0, g->stream>>>(y, a, t, b, n);
    return CU_LAUNCHED("lbfgs_axpy");
}

static int copy(cu_graph *g, void *dst, const void *src, size_t bytes, char *err, size_t en) {
    if (bytes) CU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g->stream), "L-BFGS copy");
    return MPSCY_OK;
}

static int sync(void *ctx, char *err, size_t en) {
    CU_TRY(cudaStreamSynchronize(((cu_graph *)ctx)->stream), "L-BFGS step");
    return MPSCY_OK;
}

/* BEGIN: what a non-finite evaluation later in the step restores. */
static int save(void *ctx, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    const mpscy_plan *p = &g->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    size_t bytes = (size_t)p->n_train * sizeof(float);
    int st;
    if ((st = copy(g, g->optim + L->x0, g->params, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->optim + L->d0, g->optim + L->d, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->optim + L->prev0, g->optim + L->prev_flat_grad, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->optim + L->buf0, g->params + p->n_params, (size_t)p->n_buffers * sizeof(float), err, en)) != MPSCY_OK)
        return st;
    memcpy(g->scalars + MPSCY_LBFGS_S_SAVED, g->scalars, MPSCY_LBFGS_S_SAVED * sizeof(double));
    return MPSCY_OK;
}

/* History rows alive at BEGIN are never overwritten during the step (the ring has max_iter
 * spare rows), so restoring hist_start/hist_len restores the history too. */
static int restore(void *ctx, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    const mpscy_plan *p = &g->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    size_t bytes = (size_t)p->n_train * sizeof(float);
    int st;
    if ((st = copy(g, g->params, g->optim + L->x0, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->optim + L->d, g->optim + L->d0, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->optim + L->prev_flat_grad, g->optim + L->prev0, bytes, err, en)) != MPSCY_OK ||
        (st = copy(g, g->params + p->n_params, g->optim + L->buf0, (size_t)p->n_buffers * sizeof(float), err, en)) != MPSCY_OK)
        return st;
    memcpy(g->scalars, g->scalars + MPSCY_LBFGS_S_SAVED, MPSCY_LBFGS_S_SAVED * sizeof(double));
    return sync(g, err, en);
}

/* torch.optim.LBFGS's direction (see cpu/lbfgs.c), then prev_flat_grad = g. */
static int direction(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    const mpscy_plan *p = &g->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    int64_t n = p->n_train, cap = L->cap;
    const float *gr = g->optim + L->reg[a->lbfgs_flat_reg];     /* (n) */
    float *d = g->optim + L->d, *pg = g->optim + L->prev_flat_grad;   /* (n) each */
    float *dirs = g->optim + L->old_dirs, *stps = g->optim + L->old_stps;  /* (cap, n) */
    float *ro = g->optim + L->ro;                               /* (cap) */
    double *al = (double *)(g->optim + L->al);                  /* (cap) */
    double *S = g->scalars, *red = g->result->red;
    int st;
    if (a->lbfgs_ops & MPSCY_LBFGS_FIRST) {
        if ((st = axpy(g, d, NULL, -1.0f, gr, n, err, en)) != MPSCY_OK) return st;
        S[MPSCY_LBFGS_S_START] = 0;
        S[MPSCY_LBFGS_S_LEN] = 0;
        S[MPSCY_LBFGS_S_H_DIAG] = 1;
    } else {
        int64_t start = (int64_t)S[MPSCY_LBFGS_S_START], len = (int64_t)S[MPSCY_LBFGS_S_LEN];
        int64_t row = (start + len) % cap;  /* the next free row: never one alive at BEGIN */
        float *y = dirs + row * n, *s = stps + row * n;
        lbfgs_pair<<<grid_n(g, n), CU_THREADS, 0, g->stream>>>(y, s, gr, pg, d, (float)a->lbfgs_t_prev, n);
        if ((st = CU_LAUNCHED("lbfgs_pair")) != MPSCY_OK ||
            (st = reduce(g, &red[0], y, s, NULL, n, RED_DOT, err, en)) != MPSCY_OK ||
            (st = reduce(g, &red[1], y, y, NULL, n, RED_DOT, err, en)) != MPSCY_OK || (st = sync(g, err, en)) != MPSCY_OK)
            return st;
        double ys = red[0];
        if (ys > 1e-10) {
            if (len == p->optim.history_size) start = (start + 1) % cap;
            else len += 1;
            lbfgs_set<<<1, 1, 0, g->stream>>>(ro + row, (float)(1.0 / ys));
            if ((st = CU_LAUNCHED("lbfgs_set")) != MPSCY_OK) return st;
            S[MPSCY_LBFGS_S_H_DIAG] = ys / red[1];
            S[MPSCY_LBFGS_S_START] = (double)start;
            S[MPSCY_LBFGS_S_LEN] = (double)len;
        }
        /* q = -g, newest to oldest; then r = H_diag q, oldest to newest; d = r */
        if ((st = axpy(g, d, NULL, -1.0f, gr, n, err, en)) != MPSCY_OK) return st;
        for (int64_t k = len - 1; k >= 0; k--) {
            int64_t rk = (start + k) % cap;
            if ((st = reduce(g, al + k, stps + rk * n, d, ro + rk, n, RED_DOT, err, en)) != MPSCY_OK) return st;
            lbfgs_axpy_dev<<<grid_n(g, n), CU_THREADS, 0, g->stream>>>(d, dirs + rk * n, al + k, g->scratch, 0, n);
            if ((st = CU_LAUNCHED("lbfgs_axpy_dev")) != MPSCY_OK) return st;
        }
        lbfgs_scale<<<grid_n(g, n), CU_THREADS, 0, g->stream>>>(d, (float)S[MPSCY_LBFGS_S_H_DIAG], n);
        if ((st = CU_LAUNCHED("lbfgs_scale")) != MPSCY_OK) return st;
        for (int64_t k = 0; k < len; k++) {
            int64_t rk = (start + k) % cap;
            if ((st = reduce(g, &g->scratch->coef[0], dirs + rk * n, d, ro + rk, n, RED_DOT, err, en)) != MPSCY_OK)
                return st;
            lbfgs_axpy_dev<<<grid_n(g, n), CU_THREADS, 0, g->stream>>>(d, stps + rk * n, al + k, g->scratch, 1, n);
            if ((st = CU_LAUNCHED("lbfgs_axpy_dev")) != MPSCY_OK) return st;
        }
    }
    if ((st = copy(g, pg, gr, (size_t)n * sizeof(float), err, en)) != MPSCY_OK ||
        (st = reduce(g, &red[2], gr, d, NULL, n, RED_DOT, err, en)) != MPSCY_OK ||
        (st = reduce(g, &red[3], d, NULL, NULL, n, RED_ABSMAX, err, en)) != MPSCY_OK || (st = sync(g, err, en)) != MPSCY_OK)
        return st;
    r->lbfgs_gtd = red[2];
    r->lbfgs_d_max = red[3];
    return MPSCY_OK;
}

/* Forward, loss and backward at the current parameters, with the optional L2 term
 * weight_decay/2 |params|^2 in the objective; the gradient lands in register lbfgs_reg. */
static int evaluate(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    const mpscy_plan *p = &g->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    int64_t n = p->n_train;
    double *red = g->result->red;
    int st = cu_forward_backward(g, a->batch, r, err, en);
    if (st != MPSCY_OK || !r->finite) return st;
    float *w = g->params, *gr = g->grads;  /* (n) each */
    if (a->weight_decay != 0.0) {
        if ((st = reduce(g, &red[0], w, w, NULL, n, RED_DOT, err, en)) != MPSCY_OK ||
            (st = axpy(g, gr, gr, (float)a->weight_decay, w, n, err, en)) != MPSCY_OK ||
            (st = reduce(g, &red[1], gr, gr, NULL, n, RED_DOT, err, en)) != MPSCY_OK || (st = sync(g, err, en)) != MPSCY_OK)
            return st;
        r->loss += 0.5 * a->weight_decay * red[0];
        r->grad_norm = sqrt(red[1]);
        r->finite = isfinite(r->loss) && isfinite(r->grad_norm);
        if (!r->finite) return MPSCY_OK;
    }
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (cu_layers[p->nodes[i].kind].commit &&
            (st = cu_layers[p->nodes[i].kind].commit(g, &p->nodes[i], a->batch, 1, err, en)) != MPSCY_OK)
            return st;
    float *reg = g->optim + L->reg[a->lbfgs_reg];
    if ((st = copy(g, reg, gr, (size_t)n * sizeof(float), err, en)) != MPSCY_OK ||
        (st = reduce(g, &red[2], reg, g->optim + L->d, NULL, n, RED_DOT, err, en)) != MPSCY_OK ||
        (st = reduce(g, &red[3], reg, NULL, NULL, n, RED_ABSMAX, err, en)) != MPSCY_OK ||
        (st = reduce(g, &red[4], reg, NULL, NULL, n, RED_ABSSUM, err, en)) != MPSCY_OK || (st = sync(g, err, en)) != MPSCY_OK)
        return st;
    r->lbfgs_gtd_new = red[2];
    r->lbfgs_g_max = red[3];
    r->lbfgs_g_sum = red[4];
    return MPSCY_OK;
}

static int set_base(void *ctx, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    return copy(g, g->optim + g->plan.lbfgs.base, g->params, (size_t)g->plan.n_train * sizeof(float), err, en);
}

static int step_to(void *ctx, double t, char *err, size_t en) {
    cu_graph *g = (cu_graph *)ctx;
    const mpscy_lbfgs_layout *L = &g->plan.lbfgs;
    return axpy(g, g->params, g->optim + L->base, (float)t, g->optim + L->d, g->plan.n_train, err, en);
}

int cu_lbfgs_step(cu_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    static const mpscy_lbfgs_parts parts = {restore, save, set_base, step_to, direction, evaluate, sync};
    return mpscy_lbfgs_run(&parts, g, &g->plan, g->scalars, CU, a, r, err, n);
}
