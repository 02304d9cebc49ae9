/* dense.c — the fully connected layer on the CPU through BLAS: y = x W^T + b with W stored
 * (out, in) as in PyTorch, inputs of higher rank read row-major as (b, in). Backward gives
 * dW = dy^T x, db = column sums of dy, and dx = dy W (written or accumulated). */
#include "cpu.h"
#include "blas.h"

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

static void dense_forward(float *y, const float *x, const float *w, const float *bias,
                          int64_t b, int64_t in, int64_t out) {
    // y (b, out), x (b, in), w (out, in), bias (out) or NULL
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)b, (blasint)out, (blasint)in,
                1.0f, x, (blasint)in, w, (blasint)in, 0.0f, y, (blasint)out);
    if (bias) cpu_add_bias_rows(y, bias, b, out);
}

static void dense_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, int64_t b, int64_t in, int64_t out, int accum) {
    // dx (b, in) or NULL, dw (out, in), db (out) or NULL, dy (b, out), x (b, in), w (out, in)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)out, (blasint)in, (blasint)b,
                1.0f, dy, (blasint)out, x, (blasint)in, 0.0f, dw, (blasint)in);
    if (db) cpu_sum_rows(db, dy, b, out);
    if (dx)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)b, (blasint)in, (blasint)out,
                    1.0f, dy, (blasint)out, w, (blasint)in, accum ? 1.0f : 0.0f, dx, (blasint)in);
}

void cpu_dense_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    dense_forward(g->y[n - g->plan.nodes], g->y[n->in[0]], cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                  cpu_tensor(g, n, MPSCY_ROLE_PARAM, 1), b, src->size, n->size);
}

void cpu_dense_backward(cpu_graph *g, const mpscy_node *n, int64_t b) {
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    dense_backward(g->dy[n->in[0]], cpu_tensor_grad(g, n, 0), cpu_tensor_grad(g, n, 1),
                   g->dy[n - g->plan.nodes], g->y[n->in[0]], cpu_tensor(g, n, MPSCY_ROLE_PARAM, 0),
                   b, src->size, n->size, n->accum[0]);
}
