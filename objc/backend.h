/* backend.h — what a backend implements, and the object heads the dispatcher (mpscy.c) reads.
 * Internal to the native library: never included by Python-facing code or tests.
 * A backend is one const table of function pointers; its handles embed these heads first.
 * Helpers here format error lines and count allocations the same way in every backend. */
#ifndef MPSCY_BACKEND_H
#define MPSCY_BACKEND_H

#include "mpscy.h"
#include <stdarg.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mpscy_backend mpscy_backend;

struct mpscy_device_ {
    const mpscy_backend *vt;
    mpscy_stats stats;
};

struct mpscy_buffer_ {
    const mpscy_backend *vt;
    mpscy_device dev;
    size_t bytes;
    int32_t storage;      /* mpscy_storage */
    int32_t borrowed;     /* 1 when owned by a graph: mpscy_buffer_destroy ignores it */
    void *host;           /* host-visible pointer of a shared buffer, else NULL */
};

struct mpscy_plan;
struct mpscy_tensor;

struct mpscy_graph_ {
    const mpscy_backend *vt;
    mpscy_device dev;
    const struct mpscy_plan *plan;  /* the shared plan: tensor names and shapes live there */
    double *scalars;                /* the optimizer's host scalars (step count, mu_product, ...) */
};

/* The table each backend fills. Every entry is required (device_synchronize and graph_grad_norm
 * excepted); an entry may answer MPSCY_UNSUPPORTED. Error buffers are the caller's and may be NULL. */
struct mpscy_backend {
    const char *name;
    int (*device_create)(const mpscy_backend *vt, mpscy_device *out, char *err, size_t n);
    void (*device_destroy)(mpscy_device dev);
    int (*device_info)(mpscy_device dev, mpscy_device_info *out, char *err, size_t n);
    int (*buffer_create)(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out,
                         char *err, size_t n);
    void (*buffer_destroy)(mpscy_buffer buf);
    int (*buffer_read)(mpscy_buffer buf, size_t off, void *dst, size_t bytes, char *err, size_t n);
    int (*buffer_write)(mpscy_buffer buf, size_t off, const void *src, size_t bytes,
                        char *err, size_t n);
    int (*graph_build)(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out,
                       char *err, size_t n);
    void (*graph_destroy)(mpscy_graph g);
    int (*graph_io)(mpscy_graph g, int32_t kind, int32_t index, mpscy_buffer *out,
                    char *err, size_t n);
    /* float32 tensors only, already found and size-checked by the dispatcher (scalars and the
     * read-only gradients are handled there) */
    int (*tensor_read)(mpscy_graph g, const struct mpscy_tensor *t, void *dst, size_t bytes, char *err, size_t n);
    int (*tensor_write)(mpscy_graph g, const struct mpscy_tensor *t, const void *src, size_t bytes,
                        char *err, size_t n);
    int (*graph_step)(mpscy_graph g, const mpscy_step_args *a, mpscy_step_result *r,
                      char *err, size_t n);
    int (*graph_predict)(mpscy_graph g, const mpscy_step_args *a, char *err, size_t n);
    int64_t stage_min_bytes;  /* > 0: graph_step and graph_predict honor mpscy_step_args.x_src, given
                               * for inputs of this many bytes or more (0 by default: never) */
    /* waits for work a call left running (cuda: a training step's update); NULL, the one entry
     * that may be: every call of the backend returns with its work done */
    int (*device_synchronize)(mpscy_device dev, char *err, size_t n);
    /* mpscy_graph_grad_norm; NULL where graph_step never leaves a norm pending */
    int (*graph_grad_norm)(mpscy_graph g, double *out, char *err, size_t n);
};

/* The table entries a backend implements beside its device ones, declared under its prefix
 * (cpu_, cu_, metal_): MPSCY_BACKEND_ENTRIES(cpu_) in cpu.h. */
#define MPSCY_BACKEND_ENTRIES(P)                                                                                   \
    int P##buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out, char *err, size_t n); \
    void P##buffer_destroy(mpscy_buffer buf);                                                                      \
    int P##buffer_read(mpscy_buffer buf, size_t off, void *dst, size_t bytes, char *err, size_t n);                \
    int P##buffer_write(mpscy_buffer buf, size_t off, const void *src, size_t bytes, char *err, size_t n);         \
    int P##graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out, char *err, size_t n);    \
    void P##graph_destroy(mpscy_graph g);                                                                          \
    int P##graph_io(mpscy_graph g, int32_t kind, int32_t index, mpscy_buffer *out, char *err, size_t n);          \
    int P##tensor_read(mpscy_graph g, const struct mpscy_tensor *t, void *dst, size_t bytes, char *err, size_t n); \
    int P##tensor_write(mpscy_graph g, const struct mpscy_tensor *t, const void *src, size_t bytes, char *err,     \
                        size_t n);                                                                                 \
    int P##graph_step(mpscy_graph g, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n);         \
    int P##graph_predict(mpscy_graph g, const mpscy_step_args *a, char *err, size_t n);

/* Backends linked into this build (cpu always; cuda and metal when built). */
extern const mpscy_backend mpscy_cpu_backend;
#ifdef MPSCY_HAVE_CUDA
extern const mpscy_backend mpscy_cuda_backend;
#endif
#ifdef MPSCY_HAVE_METAL
extern const mpscy_backend mpscy_metal_backend;
#endif
/* Stand-in for a backend that was not built: every call explains that. */
int mpscy_null_device_create(const char *backend, const char *why, char *err, size_t n);

/* Formats "[component::function] message (file:line)" into err and returns status. */
int mpscy_fail_at(char *err, size_t n, int status, const char *component, const char *func,
                  const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 8, 9)))
#endif
    ;
#define MPSCY_FAIL(err, n, status, component, ...) \
    mpscy_fail_at((err), (n), (status), (component), __func__, __FILE__, __LINE__, __VA_ARGS__)
/* v for a message: a NaN without its sign (printf writes a negative one "-nan") */
static inline double mpscy_shown(double v) { return v != v ? __builtin_fabs(v) : v; }

/* A TRAIN or GRAD step whose loss or gradient is not finite (r: its mpscy_step_result); only a
 * TRAIN step had an update to skip. */
#define MPSCY_FAIL_NONFINITE(err, n, component, mode, r)                                              \
    MPSCY_FAIL((err), (n), MPSCY_NONFINITE, (component), "loss %g, gradient norm %g: not finite%s",    \
               mpscy_shown((r)->loss), mpscy_shown((r)->grad_norm), (mode) == MPSCY_MODE_TRAIN ? ", update skipped" : "")

/* Allocation accounting shared by all backends: call after each successful alloc / free. */
static inline void mpscy_count_alloc(mpscy_stats *s, size_t bytes) {
    s->allocations += 1;
    s->bytes_in_use += (int64_t)bytes;
    if (s->bytes_in_use > s->peak_bytes) s->peak_bytes = s->bytes_in_use;
}
static inline void mpscy_count_free(mpscy_stats *s, size_t bytes) {
    s->frees += 1;
    s->bytes_in_use -= (int64_t)bytes;
}

#ifdef __cplusplus
}
#endif
#endif /* MPSCY_BACKEND_H */
