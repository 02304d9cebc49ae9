/* dense.c — the fully connected layer on the CPU through BLAS, each product split over the
 * worker pool: y = x W^T + b with W stored (out, in) as in PyTorch, inputs of higher rank read
 * row-major as (b, in). Backward gives dW = dy^T x, db = column sums of dy (neither for a frozen
 * layer), and dx = dy W (written or accumulated). */
#include "cpu.h"

#include <stdint.h>
#include <stdlib.h>

void cpu_add_bias_rows(float *y, const float *bias, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * cols;  // (cols)
        for (int64_t c = 0; c < cols; c++) yr[c] += bias[c];
    }
}

void cpu_sum_rows(float *db, const float *dy, int64_t rows, int64_t cols) {
    for (int64_t c = 0; c < cols; c++) db[c] = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *dr = dy + r * cols;  // (cols)
        for (int64_t c = 0; c < cols; c++) db[c] += dr[c];
    }
}

/* the rows from which a graph packs: $MPSCY_CPU_NT_PACK (read once; 0 never), 64 by default */
static int64_t pack_rows(void) {
    static volatile int64_t rows = -1;  /* a race writes the same value */
    if (rows < 0) {
        const char *e = getenv("MPSCY_CPU_NT_PACK");
        rows = e ? atoll(e) : 64;
        if (rows <= 0) rows = INT64_MAX;
    }
    return rows;
}

/* The form of a Dense forward's x W^T, decided per graph, not per call or per thread's part, so
 * a row's output has the same bits in a full batch and a partial one, on any thread count: from
 * pack_rows() rows, packed panels of W^T (gemm.c's gemm512_ntp) where the graph's whole
 * product is at most 2^27 multiply-adds, OpenBLAS past it (a 1024-wide layer at 1024 rows: its
 * predict 21.1-21.3 ms against 25.4-25.7 in the panels; at 100M multiply-adds the panels were
 * as fast or faster: 0.88-0.91 ms against 0.98-1.04 for 784 -> 1000 at 128 rows); 0 (the
 * per-part rule of cpu_gemm) for fewer rows */
#define DENSE_PACK_MOST ((int64_t)1 << 27)
static int dense_form(const cpu_graph *g, int64_t in, int64_t out) {
    if (g->plan.batch < pack_rows()) return 0;
    return CPU_GEMM_PACKED | (g->plan.batch * in * out <= DENSE_PACK_MOST ? CPU_GEMM_OWN : 0);
}

static void dense_forward(cpu_pool *pool, float *y, const float *x, const float *w, const float *bias,
                          int64_t b, int64_t in, int64_t out, int form) {
    // y (b, out), x (b, in), w (out, in), bias (out) or NULL
    cpu_gemm(pool, 0, 1, b, out, in, 1.0f, x, in, w, in, 0.0f, y, out, form);
    if (bias) cpu_add_bias_rows(y, bias, b, out);
}

static void dense_backward(cpu_pool *pool, float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, int64_t b, int64_t in, int64_t out, int accum) {
    // dx (b, in) or NULL, dw (out, in) or NULL (frozen), db (out) or NULL, dy (b, out), x (b, in), w (out, in)
    if (dw) cpu_gemm(pool, 1, 0, out, in, b, 1.0f, dy, out, x, in, 0.0f, dw, in, 0);
    if (db) cpu_sum_rows(db, dy, b, out);
    if (dx) cpu_gemm(pool, 0, 0, b, in, out, 1.0f, dy, out, w, in, accum ? 1.0f : 0.0f, dx, in, 0);
}

void cpu_dense_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    dense_forward(g->pool, g->y[n - g->plan.nodes], g->y[n->in[0]], cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                  cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1), b, src->size, n->size, dense_form(g, src->size, n->size));
}

void cpu_dense_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    dense_backward(g->pool, g->dy[n->in[0]], cpu_tensor_grad(g, n, 0), cpu_tensor_grad(g, n, 1),
                   g->dy[n - g->plan.nodes], g->y[n->in[0]], cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                   b, src->size, n->size, n->accum[0]);
}
