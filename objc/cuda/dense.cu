/* dense.cu — the fully connected layer through cuBLASLt: y = x W^T + b with W stored (out, in)
 * as in PyTorch, inputs of higher rank read row-major as (b, in). The bias (and a following
 * ReLU, when it is the only consumer) ride in the GEMM epilogue; where no epilogue algorithm
 * exists (e.g. a bias not 16-byte aligned) a small kernel does it. Backward: dW = dz^T x on
 * the side stream (with the bias gradient as a BGRADB epilogue or a column-sum kernel), and
 * dx = dz W on the main stream, written or accumulated. */
#include "cuda.h"
#include "blas.h"

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

/* Row-major (rows, cols) tensors are column-major (cols x rows) with ld = cols. */
int cu_dense_forward(cu_graph *g, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    int64_t in = src->size, out = n->size;
    float *y = g->y[cu_node_index(g, n)];                  // (b, out)
    const float *x = g->y[n->in[0]];                       // (b, in)
    const float *w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0); // (out, in)
    float *bias = cu_tensor(g, n, MPSCY_ROLE_PARAM, 1);    // (out) or NULL
    int relu = (g->fuse[cu_node_index(g, n)] & CU_FUSE_RELU) != 0;
    cu_gemm q = {1, 0, out, b, in, w, in, x, in, y, out, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    if (bias && aligned16(bias)) {
        q.epilogue = relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
        q.bias = bias;
    } else if (relu && !bias) {
        q.epilogue = CUBLASLT_EPILOGUE_RELU;
    }
    int st = cu_gemm_run(g, &q, 0, err, en);
    if (st == MPSCY_OK && q.epilogue != CUBLASLT_EPILOGUE_DEFAULT) return MPSCY_OK;
    if (st == MPSCY_UNSUPPORTED) {
        q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        q.bias = NULL;
        st = cu_gemm_run(g, &q, 0, err, en);
    }
    if (st != MPSCY_OK) return st;
    if (!bias && !relu) return MPSCY_OK;
    return cu_bias_act_forward(g->stream, y, bias, b, out, relu, err, en);
}

int cu_dense_backward(cu_graph *g, const mpscy_node *n, int64_t b, char *err, size_t en) {
    int64_t i = cu_node_index(g, n);
    const mpscy_node *src = &g->plan.nodes[n->in[0]];
    int64_t in = src->size, out = n->size;
    const float *x = g->y[n->in[0]];                       // (b, in)
    const float *w = cu_tensor(g, n, MPSCY_ROLE_PARAM, 0); // (out, in)
    float *dw = cu_tensor_grad(g, n, 0);                   // (out, in)
    float *db = cu_tensor_grad(g, n, 1);                   // (out) or NULL
    float *dz = g->dy[i];                                  // (b, out): d(pre-activation)
    float *dx = g->dy[n->in[0]];                           // (b, in) or NULL
    int st;
    int relu = (g->fuse[i] & CU_FUSE_RELU) != 0;
    if (relu) {
        /* the fused ReLU's backward: dz = dy_relu * (y_relu > 0), and db in the same pass */
        int32_t j = -1;
        for (int32_t k = (int32_t)i + 1; k < g->plan.n_nodes && j < 0; k++)
            if (g->plan.nodes[k].kind == MPSCY_LAYER_RELU && g->plan.nodes[k].in[0] == i) j = k;
        if ((st = cu_bias_act_backward(g->stream, dz, db, g->dy[j], g->y[j], b, out, err, en)) != MPSCY_OK)
            return st;
    }
    if ((st = cu_fork(g, err, en)) != MPSCY_OK) return st;
    /* dW (in x out, col-major) = x (in x b) * dz^T (b x out); BGRADB sums dz over the batch */
    cu_gemm q = {0, 1, in, out, b, x, in, dz, out, dw, in, 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    int db_done = !db || relu, dw_done = 0;
    if (!db_done && aligned16(db)) {
        q.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        q.bias = db;
        st = cu_gemm_run(g, &q, 1, err, en);
        if (st == MPSCY_OK) db_done = dw_done = 1;
        else if (st != MPSCY_UNSUPPORTED) return st;
        q.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        q.bias = NULL;
    }
    if (!dw_done && (st = cu_gemm_run(g, &q, 1, err, en)) != MPSCY_OK) return st;
    if (!db_done && (st = cu_bias_act_backward(g->side, NULL, db, dz, NULL, b, out, err, en)) != MPSCY_OK)
        return st;
    if (!dx) return MPSCY_OK;
    /* dx (in x b) = W (in x out) * dz (out x b) */
    cu_gemm d = {0, 0, in, b, out, w, in, dz, out, dx, in, n->accum[0] ? 1.0f : 0.0f, CUBLASLT_EPILOGUE_DEFAULT, NULL};
    return cu_gemm_run(g, &d, 0, err, en);
}
