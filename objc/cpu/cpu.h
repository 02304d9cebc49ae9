/* cpu.h — internals of the CPU backend: the graph object with its slabs, the per-kind layer
 * table, and the kernels each family file provides. Kernels take raw pointers (outputs first,
 * then inputs, then sizes), never allocate, and carry a shape comment on every tensor.
 * Nothing here is part of the ABI; only cpu_backend (device.c) is exported. */
#ifndef MPSCY_CPU_H
#define MPSCY_CPU_H

#include "../backend.h"
#include "../common/plan.h"
#include "../common/pool.h"

#define CPU "cpu"

/* Hot element-wise loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
 * time (GCC/Clang function multi-versioning), so a portable build still uses wide vectors. */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CPU_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef CPU_SIMD
#define CPU_SIMD
#endif
#define CPU_ALIGN 64

typedef struct cpu_device {
    struct mpscy_device_ base;
    int32_t threads;
} cpu_device;

/* parallel.c: worker threads of one graph (common/pool.h); cpu_parallel runs fn(ctx, t, nt) for
 * t in 0..nt-1 (each t once, on whichever thread claims it), returns when all are done, and
 * returns nt. A NULL pool, a nested call or a forked child runs fn(ctx, 0, 1). */
typedef mpscy_pool cpu_pool;
typedef mpscy_task cpu_task;
int cpu_pool_create(mpscy_device dev, int32_t threads, cpu_pool **out);  /* BLAS set single-threaded */
static inline void cpu_pool_destroy(cpu_pool *p) { mpscy_pool_destroy(p); }
static inline int32_t cpu_parallel(cpu_pool *p, cpu_task fn, void *ctx) { return mpscy_parallel(p, fn, ctx); }
/* gemm.c: one single-threaded row-major product, c (m, n) = alpha op(a) op(b) + beta c, as
 * cblas_sgemm. With own set (the caller's judgment that the product is small enough), alpha 1
 * and beta 0 or 1, it runs in gemm.c's AVX-512 kernels where they run (each element's k summed
 * in fixed blocks of 256, each block one chain of fused multiply-adds in order; op(b) = B^T as
 * 16 lanes summed in a fixed tree, or with own's CPU_GEMM_PACKED as the first form over packed
 * panels of B^T); otherwise in BLAS. cpu_fma_gemm_path: 1 when those kernels
 * run (AVX-512 with FMA, $MPSCY_CPU_GEMM not 0), else 0. */
enum { CPU_GEMM_OWN = 1,     /* own: gemm.c's kernels may run */
       CPU_GEMM_PACKED = 2 }; /* with it, A B^T in panels of B^T (gemm512_ntp), for products of many rows */
void cpu_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
               const float *b, int64_t ldb, float beta, float *c, int64_t ldc, int own);
int cpu_fma_gemm_path(void);
/* [lo, hi): part t of nt of the range [0, n) */
static inline void cpu_split(int64_t n, int32_t t, int32_t nt, int64_t *lo, int64_t *hi) { mpscy_split(n, t, nt, lo, hi); }
/* elements below which a pass over the pool costs more than it saves */
#define CPU_PARALLEL_MIN 32768
/* fn over the pool when its pass touches at least CPU_PARALLEL_MIN values and splits into more
 * than one part, else fn(ctx, 0, 1) on this thread */
static inline void cpu_parallel_over(cpu_pool *p, cpu_task fn, void *ctx, int64_t values, int64_t parts) {
    if (values >= CPU_PARALLEL_MIN && parts > 1) cpu_parallel(p, fn, ctx);
    else fn(ctx, 0, 1);
}

/* Sums in double over CPU_LANES lanes (one AVX-512 vector): element k of a run goes to lane
 * k % CPU_LANES, so consecutive additions do not wait on each other, and the lanes are combined
 * in one fixed order, so a sum does not depend on how the work was split over threads. */
#define CPU_LANES 8
static inline void cpu_lanes_sum(double *restrict acc, const float *restrict x, int64_t n) {
    double a[CPU_LANES];
    int64_t i = 0;
    for (int k = 0; k < CPU_LANES; k++) a[k] = acc[k];
    for (; i + CPU_LANES <= n; i += CPU_LANES)
        for (int k = 0; k < CPU_LANES; k++) a[k] += x[i + k];
    for (; i < n; i++) a[i % CPU_LANES] += x[i];
    for (int k = 0; k < CPU_LANES; k++) acc[k] = a[k];
}
/* acc += (x - m)^2 */
static inline void cpu_lanes_sq(double *restrict acc, const float *restrict x, int64_t n, double m) {
    double a[CPU_LANES];
    int64_t i = 0;
    for (int k = 0; k < CPU_LANES; k++) a[k] = acc[k];
    for (; i + CPU_LANES <= n; i += CPU_LANES)
        for (int k = 0; k < CPU_LANES; k++) {
            double d = x[i + k] - m;
            a[k] += d * d;
        }
    for (; i < n; i++) {
        double d = x[i] - m;
        a[i % CPU_LANES] += d * d;
    }
    for (int k = 0; k < CPU_LANES; k++) acc[k] = a[k];
}
/* the lanes' sum, pairwise (written for CPU_LANES == 8) */
static inline double cpu_lanes_total(const double *acc) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Row-major sgemm split over the pool: c (m, n) = alpha op(a) op(b) + beta c. form 0: each part
 * in gemm.c's kernels or BLAS by its size; CPU_GEMM_PACKED (a b^T, ta 0, tb 1): every part in
 * gemm.c's packed panels (gemm512_ntp) with CPU_GEMM_OWN too, in BLAS without, whatever a part's
 * size (a Dense forward's form in a graph of many rows, dense.c). */
void cpu_gemm(cpu_pool *p, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc, int form);

typedef struct cpu_graph {
    struct mpscy_graph_ base;
    mpscy_plan plan;
    cpu_pool *pool;       /* worker threads (plan.threads - 1 of them), NULL when single-threaded */
    /* slabs, one allocation per role */
    float *params;        /* (n_params + n_buffers): trainable, frozen, running stats */
    float *grads;         /* (n_train): a frozen layer's gradients are not computed */
    float *optim;         /* (optim_floats): the optimizer's slots (and L-BFGS scratch) */
    double scalars[MPSCY_MAX_SCALARS]; /* optimizer scalars; scalars[0] holds the step count */
    float *act;           /* node outputs at the built batch */
    float *dact;          /* needed d(outputs) at the built batch */
    float *save;          /* values saved for backward */
    float *ws;            /* shared workspace (the largest any kernel needs) */
    int64_t ws_floats;
    void *io;             /* shared staging: inputs, target, output */
    size_t io_bytes;
    float **y, **dy;      /* per node: output and d(output) pointers into the slabs */
    struct mpscy_buffer_ *io_bufs; /* n_inputs + 2 borrowed buffer handles */
    size_t tables_bytes;
} cpu_graph;

/* Counted, 64-byte aligned, zeroed allocations: every byte the backend holds goes through here. */
void *cpu_alloc(mpscy_device dev, size_t bytes);
void cpu_free(mpscy_device dev, void *ptr, size_t bytes);

/* table entries implemented by buffer.c, graph.c and step.c */
MPSCY_BACKEND_ENTRIES(cpu_)

/* Pointers to node n's tensor `slot` (0 weight / running_mean, 1 bias / running_var). */
float *cpu_tensor(cpu_graph *g, const mpscy_node *n, int32_t role, int32_t slot);
float *cpu_tensor_grad(cpu_graph *g, const mpscy_node *n, int32_t slot);  /* NULL: none, or frozen */

/* One entry per layer kind. forward runs in train mode when `train`; backward writes the
 * node's parameter gradients and, for each input j whose grad is needed, d(input j),
 * overwriting it or adding to it as n->accum[j] says. workspace returns floats needed. */
typedef struct cpu_layer_ops {
    void (*forward)(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
    void (*backward)(cpu_graph *g, const mpscy_node *n, int64_t b);
    int64_t (*workspace)(const mpscy_plan *p, const mpscy_node *n);
    /* after a finite train step: commit deferred state (BatchNorm running statistics) */
    void (*commit)(cpu_graph *g, const mpscy_node *n, int64_t b);
} cpu_layer_ops;

extern const cpu_layer_ops cpu_layers[MPSCY_LAYER_KIND_COUNT];

/* family entry points, listed in layers.c */
void cpu_dense_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_dense_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_activation_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_activation_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_flatten_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_flatten_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_conv_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_conv_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
int64_t cpu_conv_workspace(const mpscy_plan *p, const mpscy_node *n);  /* Conv2D's and ConvTranspose2D's */
void cpu_convt_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_convt_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
int64_t cpu_layernorm_workspace(const mpscy_plan *p, const mpscy_node *n);
/* The ReLU node computed inside conv node i (its only consumer), or -1: that ReLU node is a no-op. */
int32_t cpu_conv_fused_relu(const mpscy_plan *p, int32_t i);
void cpu_pool_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_pool_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
int64_t cpu_pool_workspace(const mpscy_plan *p, const mpscy_node *n);  /* bilinear Upsample2D's tables */
void cpu_batchnorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_batchnorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_batchnorm_commit(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_layernorm_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_layernorm_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_dropout_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_dropout_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_add_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_add_backward(cpu_graph *g, const mpscy_node *n, int64_t b);
void cpu_concat_forward(cpu_graph *g, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a);
void cpu_concat_backward(cpu_graph *g, const mpscy_node *n, int64_t b);

/* loss.c: mean loss over b rows; writes dy (b, out) when dy != NULL; *correct as the plan's
 * accuracy kind says (-1 for none). Labels were range-checked by the dispatcher. */
double cpu_loss(const mpscy_plan *p, float *dy, const float *y, const void *target, int64_t b,
                int64_t *correct);

/* optim.c: global L2 norm of the gradient slab (double accumulation; not finite exactly
 * when some gradient is not finite), clipping, and the update over the flat slab. */
double cpu_grad_norm(cpu_pool *pool, const float *grads, int64_t n);
void cpu_clip(float *grads, int64_t n, double norm, const mpscy_optim_desc *o);
void cpu_optim_update(cpu_graph *g, const mpscy_step_args *a);
int cpu_optim_supported(int32_t kind);

/* step.c: train-mode forward, loss and backward of the staged batch; fills r->loss, correct,
 * grad_norm and finite (1 when the loss and every gradient are finite). */
void cpu_forward_backward(cpu_graph *g, const mpscy_step_args *a, mpscy_step_result *r);
/* lbfgs.c: one MPSCY_MODE_LBFGS call (see mpscy.h). */
int cpu_lbfgs_step(cpu_graph *g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);

/* bias helpers shared by Dense and Conv2D */
void cpu_add_bias_rows(float *y, const float *bias, int64_t rows, int64_t cols);
void cpu_sum_rows(float *db, const float *dy, int64_t rows, int64_t cols);

#endif /* MPSCY_CPU_H */
