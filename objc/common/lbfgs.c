/* lbfgs.c — one MPSCY_MODE_LBFGS call: mpscy_lbfgs_run runs the bits of args->lbfgs_ops in
 * mpscy.h's order (rollback, begin, finalize, direction, move, evaluate) through a backend's
 * parts, for every backend. Below it, the vector half of torch.optim.LBFGS for the backends
 * whose parameter, gradient and optimizer slabs are host-visible (cpu; metal's unified memory),
 * over the flat slab. The scalar control flow (iteration count, strong-Wolfe bracketing and
 * zoom, stopping tests) is the caller's (src/mpscy/optim). Evaluations are the backend's,
 * through two callbacks. Dot products accumulate in double; the vectors stay float32 like
 * torch's. Nothing allocates. */
#include "lbfgs.h"
#include "../backend.h"

#include <math.h>
#include <string.h>

int mpscy_lbfgs_run(const mpscy_lbfgs_parts *parts, void *ctx, const mpscy_plan *p, double *scalars,
                    const char *component, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    int32_t ops = a->lbfgs_ops;
    int st;  /* state and arguments checked by the dispatcher */
    r->finite = 1;
    if ((ops & MPSCY_LBFGS_ROLLBACK) && (st = parts->restore(ctx, err, n)) != MPSCY_OK) return st;
    if ((ops & MPSCY_LBFGS_BEGIN) && (st = parts->save(ctx, err, n)) != MPSCY_OK) return st;
    if (ops & MPSCY_LBFGS_FINALIZE) {
        if ((st = parts->step_to(ctx, a->lbfgs_t_prev, err, n)) != MPSCY_OK) return st;
        r->applied = 1;
    }
    if (ops & MPSCY_LBFGS_DIRECTION) {
        if ((st = parts->direction(ctx, a, r, err, n)) != MPSCY_OK) return st;
        if (r->lbfgs_gtd > -p->optim.tolerance_change) {
            r->lbfgs_stopped = 1;
            return parts->finish ? parts->finish(ctx, err, n) : MPSCY_OK;
        }
        if ((st = parts->set_base(ctx, err, n)) != MPSCY_OK) return st;
    }
    if (ops & MPSCY_LBFGS_MOVE) {
        if ((st = parts->step_to(ctx, a->lbfgs_t, err, n)) != MPSCY_OK) return st;
        if (ops & MPSCY_LBFGS_COUNT) scalars[MPSCY_LBFGS_S_STEP] += 1;
        r->applied = 1;
    }
    if (ops & MPSCY_LBFGS_EVAL) {
        st = parts->evaluate(ctx, a, r, err, n);
        if (st != MPSCY_OK || !r->finite) {
            /* the call's move undone at once; a failed evaluation keeps its own message */
            int rs = parts->restore(ctx, st != MPSCY_OK ? NULL : err, n);
            r->applied = 0;
            if (st != MPSCY_OK) return st;
            if (rs != MPSCY_OK) return rs;
            return MPSCY_FAIL(err, n, MPSCY_NONFINITE, component,
                              "loss %g, gradient norm %g: not finite; the LBFGS step was undone",
                              mpscy_shown(r->loss), mpscy_shown(r->grad_norm));
        }
    }
    return parts->finish ? parts->finish(ctx, err, n) : MPSCY_OK;
}

/* ------------------------------------------------------------ the host's parts (cpu, metal) */


static double dot(const float *a, const float *b, int64_t n) {  /* (n), (n) */
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += (double)a[i] * b[i];
        s1 += (double)a[i + 1] * b[i + 1];
        s2 += (double)a[i + 2] * b[i + 2];
        s3 += (double)a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += (double)a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static double abs_max(const float *a, int64_t n) {  /* (n) */
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = fabsf(a[i]);
        m = v > m ? v : m;
    }
    return m;
}

static double abs_sum(const float *a, int64_t n) {  /* (n) */
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += fabsf(a[i]);
    return s;
}

/* y = a + t * b, torch's a.add(b, alpha=t) in float32. */
static void add_scaled(float *y, const float *a, float t, const float *b, int64_t n) {  /* (n) each */
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + t * b[i];
}

static int save(void *ctx, char *err, size_t n) {
    const mpscy_lbfgs_host *h = ctx;
    (void)err; (void)n;
    const mpscy_plan *p = h->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    size_t bytes = (size_t)p->n_train * sizeof(float);
    if (bytes) {
        memcpy(h->optim + L->x0, h->params, bytes);
        memcpy(h->optim + L->d0, h->optim + L->d, bytes);
        memcpy(h->optim + L->prev0, h->optim + L->prev_flat_grad, bytes);
    }
    if (p->n_buffers) memcpy(h->optim + L->buf0, h->buffers, (size_t)p->n_buffers * sizeof(float));
    memcpy(h->scalars + MPSCY_LBFGS_S_SAVED, h->scalars, MPSCY_LBFGS_S_SAVED * sizeof(double));
    return MPSCY_OK;
}

/* History rows alive when the step began were never overwritten (the ring has max_iter spare
 * rows), so resetting hist_start/hist_len restores the history too. */
static int restore(void *ctx, char *err, size_t n) {
    const mpscy_lbfgs_host *h = ctx;
    (void)err; (void)n;
    const mpscy_plan *p = h->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    size_t bytes = (size_t)p->n_train * sizeof(float);
    if (bytes) {
        memcpy(h->params, h->optim + L->x0, bytes);
        memcpy(h->optim + L->d, h->optim + L->d0, bytes);
        memcpy(h->optim + L->prev_flat_grad, h->optim + L->prev0, bytes);
    }
    if (p->n_buffers) memcpy(h->buffers, h->optim + L->buf0, (size_t)p->n_buffers * sizeof(float));
    memcpy(h->scalars, h->scalars + MPSCY_LBFGS_S_SAVED, MPSCY_LBFGS_S_SAVED * sizeof(double));
    return MPSCY_OK;
}

/* torch.optim.LBFGS's direction: the first iteration goes down the gradient; later ones store
 * (y, s) when y.s > 1e-10 (dropping the oldest past history_size) and apply the two-loop
 * recursion with the initial Hessian scale H_diag = y.s / y.y. Then prev_flat_grad = g. */
static int direction(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t en) {
    const mpscy_lbfgs_host *h = ctx;
    (void)err; (void)en;
    const mpscy_plan *p = h->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    int64_t n = p->n_train, ld = n, cap = L->cap;
    const float *gr = h->optim + L->reg[a->lbfgs_flat_reg];  /* (n) */
    float *d = h->optim + L->d;                               /* (n) */
    float *pg = h->optim + L->prev_flat_grad;                 /* (n) */
    float *dirs = h->optim + L->old_dirs, *stps = h->optim + L->old_stps;  /* (cap, ld) */
    float *ro = h->optim + L->ro;                             /* (cap) */
    double *al = (double *)(void *)(h->optim + L->al);                /* (cap) */
    double *S = h->scalars;

    if (a->lbfgs_ops & MPSCY_LBFGS_FIRST) {
        for (int64_t i = 0; i < n; i++) d[i] = -gr[i];
        S[MPSCY_LBFGS_S_START] = 0;
        S[MPSCY_LBFGS_S_LEN] = 0;
        S[MPSCY_LBFGS_S_H_DIAG] = 1;
    } else {
        int64_t start = (int64_t)S[MPSCY_LBFGS_S_START], len = (int64_t)S[MPSCY_LBFGS_S_LEN];
        int64_t row = (start + len) % cap;   /* the next free row: never one alive at BEGIN */
        float *y = dirs + row * ld, *s = stps + row * ld;
        float t = (float)a->lbfgs_t_prev;
        for (int64_t i = 0; i < n; i++) {
            y[i] = gr[i] - pg[i];
            s[i] = d[i] * t;
        }
        double ys = dot(y, s, n);
        if (ys > 1e-10) {
            if (len == p->optim.history_size) start = (start + 1) % cap;
            else len += 1;
            ro[row] = (float)(1.0 / ys);
            S[MPSCY_LBFGS_S_H_DIAG] = ys / dot(y, y, n);
            S[MPSCY_LBFGS_S_START] = (double)start;
            S[MPSCY_LBFGS_S_LEN] = (double)len;
        }
        /* q = -g, newest to oldest; then r = H_diag q, oldest to newest; d = r */
        for (int64_t i = 0; i < n; i++) d[i] = -gr[i];
        for (int64_t k = len - 1; k >= 0; k--) {
            int64_t rk = (start + k) % cap;
            al[k] = dot(stps + rk * ld, d, n) * ro[rk];
            float c = (float)-al[k];
            const float *yk = dirs + rk * ld;
            for (int64_t i = 0; i < n; i++) d[i] += c * yk[i];
        }
        float h = (float)S[MPSCY_LBFGS_S_H_DIAG];
        for (int64_t i = 0; i < n; i++) d[i] *= h;
        for (int64_t k = 0; k < len; k++) {
            int64_t rk = (start + k) % cap;
            double be = dot(dirs + rk * ld, d, n) * ro[rk];
            float c = (float)(al[k] - be);
            const float *sk = stps + rk * ld;
            for (int64_t i = 0; i < n; i++) d[i] += c * sk[i];
        }
    }
    memcpy(pg, gr, (size_t)n * sizeof(float));
    r->lbfgs_gtd = dot(gr, d, n);
    r->lbfgs_d_max = abs_max(d, n);
    return MPSCY_OK;
}

/* Forward, loss and backward at the current parameters (the backend's), plus the optional L2
 * term weight_decay/2 |params|^2 in the objective; running statistics are kept only when all is
 * finite; the gradient lands in register lbfgs_reg. */
static int evaluate(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    const mpscy_lbfgs_host *h = ctx;
    const mpscy_plan *p = h->plan;
    const mpscy_lbfgs_layout *L = &p->lbfgs;
    int64_t np = p->n_train;
    int st = h->forward_backward(h->ctx, a, r, err, n);
    if (st != MPSCY_OK || !r->finite) return st;
    float *w = h->params, *gr = h->grads;  /* (np) each */
    if (a->weight_decay != 0.0) {
        float wd = (float)a->weight_decay;
        r->loss += 0.5 * a->weight_decay * dot(w, w, np);
        for (int64_t i = 0; i < np; i++) gr[i] += wd * w[i];
        r->grad_norm = sqrt(dot(gr, gr, np));
        r->finite = isfinite(r->loss) && isfinite(r->grad_norm);
        if (!r->finite) return MPSCY_OK;
    }
    h->commit(h->ctx, a);
    float *reg = h->optim + L->reg[a->lbfgs_reg];
    if (np) memcpy(reg, gr, (size_t)np * sizeof(float));
    r->lbfgs_gtd_new = dot(reg, h->optim + L->d, np);
    r->lbfgs_g_max = abs_max(reg, np);
    r->lbfgs_g_sum = abs_sum(reg, np);
    return MPSCY_OK;
}

static int set_base(void *ctx, char *err, size_t n) {
    const mpscy_lbfgs_host *h = ctx;
    (void)err; (void)n;
    if (h->plan->n_train) memcpy(h->optim + h->plan->lbfgs.base, h->params, (size_t)h->plan->n_train * sizeof(float));
    return MPSCY_OK;
}

static int step_to(void *ctx, double t, char *err, size_t n) {
    const mpscy_lbfgs_host *h = ctx;
    const mpscy_lbfgs_layout *L = &h->plan->lbfgs;
    (void)err; (void)n;
    add_scaled(h->params, h->optim + L->base, (float)t, h->optim + L->d, h->plan->n_train);
    return MPSCY_OK;
}

int mpscy_lbfgs_call(const mpscy_lbfgs_host *h, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    static const mpscy_lbfgs_parts parts = {restore, save, set_base, step_to, direction, evaluate, NULL};
    return mpscy_lbfgs_run(&parts, (void *)h, h->plan, h->scalars, h->component, a, r, err, n);
}
