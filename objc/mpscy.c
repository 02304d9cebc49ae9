/* mpscy.c — the ABI entry points. Each one checks its handle, counts the call on the device,
 * and forwards to the backend table the handle carries; none calls another entry point.
 * Also the one error formatter every backend uses. No kernel or allocation policy lives here. */
#include "backend.h"
#include "common/plan.h"

#include <math.h>
#include <string.h>

#define COMPONENT "mpscy"
#define FAIL(status, ...) MPSCY_FAIL(err, errlen, (status), COMPONENT, __VA_ARGS__)

int mpscy_fail_at(char *err, size_t n, int status, const char *component, const char *func,
                  const char *file, int line, const char *fmt, ...) {
    if (!err || n == 0) return status;
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    int k = snprintf(err, n, "[%s::%s] ", component, func);
    if (k < 0 || (size_t)k >= n) return status;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(err + k, n - (size_t)k, fmt, ap);
    va_end(ap);
    if (m < 0 || (size_t)(k + m) >= n) return status;
    snprintf(err + k + m, n - (size_t)(k + m), " (%s:%d)", base, line);
    return status;
}

int32_t mpscy_abi_version(void) { return MPSCY_ABI_VERSION; }

static const mpscy_backend *const backends[] = {
    &mpscy_cpu_backend,
#ifdef MPSCY_HAVE_CUDA
    &mpscy_cuda_backend,
#endif
#ifdef MPSCY_HAVE_METAL
    &mpscy_metal_backend,
#endif
};

int mpscy_device_create(const char *backend, mpscy_device *out, char *err, size_t errlen) {
    if (!out) return FAIL(MPSCY_INVALID, "out is NULL");
    *out = NULL;
    if (!backend) return FAIL(MPSCY_INVALID, "backend name is NULL");
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++)
        if (strcmp(backends[i]->name, backend) == 0)
            return backends[i]->device_create(backends[i], out, err, errlen);
    if (strcmp(backend, "cuda") == 0)
        return mpscy_null_device_create(backend, "built without nvcc or with MPSCY_CUDA=0", err, errlen);
    if (strcmp(backend, "metal") == 0)
        return mpscy_null_device_create(backend, "it is built on macOS 13 or newer only", err, errlen);
    return FAIL(MPSCY_INVALID, "unknown backend '%s' (known: cpu, cuda, metal)", backend);
}

void mpscy_device_destroy(mpscy_device dev) {
    if (dev) dev->vt->device_destroy(dev);
}

int mpscy_device_info_get(mpscy_device dev, mpscy_device_info *out, char *err, size_t errlen) {
    if (!dev || !out) return FAIL(MPSCY_INVALID, "device or out is NULL");
    dev->stats.calls++;
    memset(out, 0, sizeof *out);
    out->stage_min_bytes = dev->vt->stage_min_bytes;
    return dev->vt->device_info(dev, out, err, errlen);
}

int mpscy_device_synchronize(mpscy_device dev, char *err, size_t errlen) {
    if (!dev) return FAIL(MPSCY_INVALID, "device is NULL");
    dev->stats.calls++;
    return dev->vt->device_synchronize ? dev->vt->device_synchronize(dev, err, errlen) : MPSCY_OK;
}

int mpscy_device_stats(mpscy_device dev, mpscy_stats *out, char *err, size_t errlen) {
    if (!dev || !out) return FAIL(MPSCY_INVALID, "device or out is NULL");
    *out = dev->stats;
    return MPSCY_OK;
}

int mpscy_buffer_create(mpscy_device dev, size_t bytes, int32_t storage, mpscy_buffer *out,
                        char *err, size_t errlen) {
    if (!dev || !out) return FAIL(MPSCY_INVALID, "device or out is NULL");
    *out = NULL;
    dev->stats.calls++;
    if (bytes == 0) return FAIL(MPSCY_INVALID, "a buffer needs at least one byte");
    if (storage != MPSCY_STORAGE_SHARED && storage != MPSCY_STORAGE_PRIVATE)
        return FAIL(MPSCY_INVALID, "unknown storage mode %d", storage);
    return dev->vt->buffer_create(dev, bytes, storage, out, err, errlen);
}

void mpscy_buffer_destroy(mpscy_buffer buf) {
    if (!buf || buf->borrowed) return;
    buf->dev->stats.calls++;
    buf->vt->buffer_destroy(buf);
}

int mpscy_buffer_host_pointer(mpscy_buffer buf, void **out, size_t *bytes, char *err, size_t errlen) {
    if (!buf || !out) return FAIL(MPSCY_INVALID, "buffer or out is NULL");
    buf->dev->stats.calls++;
    if (!buf->host) return FAIL(MPSCY_INVALID, "a private buffer has no host pointer");
    *out = buf->host;
    if (bytes) *bytes = buf->bytes;
    return MPSCY_OK;
}

int mpscy_buffer_read(mpscy_buffer buf, size_t offset, void *dst, size_t bytes, char *err, size_t errlen) {
    if (!buf || (!dst && bytes)) return FAIL(MPSCY_INVALID, "buffer or destination is NULL");
    buf->dev->stats.calls++;
    if (offset > buf->bytes || bytes > buf->bytes - offset)
        return FAIL(MPSCY_SHAPE, "read of %zu bytes at %zu exceeds the buffer's %zu", bytes, offset, buf->bytes);
    return buf->vt->buffer_read(buf, offset, dst, bytes, err, errlen);
}

int mpscy_buffer_write(mpscy_buffer buf, size_t offset, const void *src, size_t bytes, char *err, size_t errlen) {
    if (!buf || (!src && bytes)) return FAIL(MPSCY_INVALID, "buffer or source is NULL");
    buf->dev->stats.calls++;
    if (offset > buf->bytes || bytes > buf->bytes - offset)
        return FAIL(MPSCY_SHAPE, "write of %zu bytes at %zu exceeds the buffer's %zu", bytes, offset, buf->bytes);
    return buf->vt->buffer_write(buf, offset, src, bytes, err, errlen);
}

int mpscy_graph_build(mpscy_device dev, const mpscy_graph_desc *desc, mpscy_graph *out, char *err, size_t errlen) {
    if (!dev || !desc || !out) return FAIL(MPSCY_INVALID, "device, descriptor or out is NULL");
    *out = NULL;
    dev->stats.calls++;
    return dev->vt->graph_build(dev, desc, out, err, errlen);
}

void mpscy_graph_destroy(mpscy_graph g) {
    if (!g) return;
    g->dev->stats.calls++;
    g->vt->graph_destroy(g);
}

int mpscy_graph_io(mpscy_graph g, int32_t kind, int32_t index, mpscy_buffer *out, char *err, size_t errlen) {
    if (!g || !out) return FAIL(MPSCY_INVALID, "graph or out is NULL");
    g->dev->stats.calls++;
    return g->vt->graph_io(g, kind, index, out, err, errlen);
}

int mpscy_graph_tensor_count(mpscy_graph g, int32_t *out, char *err, size_t errlen) {
    if (!g || !out) return FAIL(MPSCY_INVALID, "graph or out is NULL");
    g->dev->stats.calls++;
    *out = g->plan->n_tensors;
    return MPSCY_OK;
}

int mpscy_graph_tensor_info(mpscy_graph g, int32_t index, mpscy_tensor_info *out, char *err, size_t errlen) {
    if (!g || !out) return FAIL(MPSCY_INVALID, "graph or out is NULL");
    g->dev->stats.calls++;
    int st;
    const mpscy_tensor *t = mpscy_plan_tensor(g->plan, index, 0, 0, COMPONENT, err, errlen, &st);
    if (t) *out = t->info;
    return st;
}

int mpscy_graph_tensor_read(mpscy_graph g, int32_t index, void *dst, size_t bytes, char *err, size_t errlen) {
    if (!g || (!dst && bytes)) return FAIL(MPSCY_INVALID, "graph or destination is NULL");
    g->dev->stats.calls++;
    int st;
    const mpscy_tensor *t = mpscy_plan_tensor(g->plan, index, bytes, 1, COMPONENT, err, errlen, &st);
    if (!t) return st;
    if (t->info.dtype == MPSCY_I64) {  /* scalars live on the host for every backend */
        int64_t v = (int64_t)g->scalars[t->info.offset];
        memcpy(dst, &v, sizeof v);
        return MPSCY_OK;
    }
    if (t->info.dtype == MPSCY_F64) {
        memcpy(dst, &g->scalars[t->info.offset], sizeof(double));
        return MPSCY_OK;
    }
    return bytes ? g->vt->tensor_read(g, t, dst, bytes, err, errlen) : MPSCY_OK;
}

int mpscy_graph_tensor_write(mpscy_graph g, int32_t index, const void *src, size_t bytes, char *err, size_t errlen) {
    if (!g || (!src && bytes)) return FAIL(MPSCY_INVALID, "graph or source is NULL");
    g->dev->stats.calls++;
    int st;
    const mpscy_tensor *t = mpscy_plan_tensor(g->plan, index, bytes, 1, COMPONENT, err, errlen, &st);
    if (!t) return st;
    if (t->info.role == MPSCY_ROLE_GRAD)
        return FAIL(MPSCY_INVALID, "tensor '%s' is a gradient and read-only", t->info.name);
    if (t->info.dtype == MPSCY_I64) {
        int64_t v;
        memcpy(&v, src, sizeof v);
        /* kept as a double: beyond 2^53 it would be rounded (and 2^63 - 1 read back as -2^63) */
        if (v < 0 || v > ((int64_t)1 << 53))
            return FAIL(MPSCY_INVALID, "optimizer step count %lld is outside 0..2^53", (long long)v);
        g->scalars[t->info.offset] = (double)v;
        return MPSCY_OK;
    }
    if (t->info.dtype == MPSCY_F64) {
        memcpy(&g->scalars[t->info.offset], src, sizeof(double));
        return MPSCY_OK;
    }
    return bytes ? g->vt->tensor_write(g, t, src, bytes, err, errlen) : MPSCY_OK;
}

/* What every backend's step needs checked first, checked once here: the rows against the built
 * batch, the mode against the optimizer, an L-BFGS call's state and arguments, and integer
 * labels (already staged) against the classes. Nothing is modified before a step passes. */
static int check_rows(mpscy_graph g, const mpscy_step_args *a, char *err, size_t errlen) {
    if (a->batch < 1 || a->batch > g->plan->batch)
        return FAIL(MPSCY_SHAPE, "batch of %d rows outside 1..%d (the built batch size)", a->batch, g->plan->batch);
    return MPSCY_OK;
}

static int check_step(mpscy_graph g, const mpscy_step_args *a, char *err, size_t errlen) {
    const mpscy_plan *p = g->plan;
    int st = check_rows(g, a, err, errlen);
    if (st != MPSCY_OK) return st;
    if (a->mode != MPSCY_MODE_TRAIN && a->mode != MPSCY_MODE_EVAL && a->mode != MPSCY_MODE_GRAD &&
        a->mode != MPSCY_MODE_LBFGS)
        return FAIL(MPSCY_INVALID, "unknown step mode %d", a->mode);
    int lbfgs = p->optim.kind == MPSCY_OPTIM_LBFGS;
    if (lbfgs && a->mode == MPSCY_MODE_TRAIN)
        return FAIL(MPSCY_INVALID, "an LBFGS step is a sequence of MPSCY_MODE_LBFGS calls, not one TRAIN call");
    if (!lbfgs && a->mode == MPSCY_MODE_LBFGS)
        return FAIL(MPSCY_INVALID, "MPSCY_MODE_LBFGS needs a graph built with the LBFGS optimizer");
    if (a->mode == MPSCY_MODE_LBFGS) {  /* its history ring position (settable state) and its arguments */
        const mpscy_lbfgs_layout *L = &p->lbfgs;
        double start = g->scalars[MPSCY_LBFGS_S_START], len = g->scalars[MPSCY_LBFGS_S_LEN];
        if (!(start >= 0 && start < (double)L->cap && start == floor(start)) ||
            !(len >= 0 && len <= p->optim.history_size && len == floor(len)))
            return FAIL(MPSCY_INVALID, "LBFGS state hist_start %g / hist_len %g outside [0, %lld) / [0, %d]",
                        start, len, (long long)L->cap, p->optim.history_size);
        if (a->lbfgs_reg < 0 || a->lbfgs_reg >= MPSCY_LBFGS_REGISTERS || a->lbfgs_flat_reg < 0 ||
            a->lbfgs_flat_reg >= MPSCY_LBFGS_REGISTERS)
            return FAIL(MPSCY_INVALID, "LBFGS gradient registers %d and %d must be in 0..%d", a->lbfgs_reg,
                        a->lbfgs_flat_reg, MPSCY_LBFGS_REGISTERS - 1);
        if (!isfinite(a->lbfgs_t) || !isfinite(a->lbfgs_t_prev))
            return FAIL(MPSCY_INVALID, "LBFGS step lengths %g and %g must be finite", a->lbfgs_t_prev, a->lbfgs_t);
    }
    if (p->target != MPSCY_TARGET_INDEX) return MPSCY_OK;
    mpscy_buffer tb;
    if ((st = g->vt->graph_io(g, MPSCY_IO_TARGET, 0, &tb, err, errlen)) != MPSCY_OK) return st;
    const int32_t *labels = (const int32_t *)tb->host;  /* (batch, positions) int32, in shared staging */
    for (int64_t i = 0; labels && i < a->batch * p->positions; i++)
        if ((labels[i] < 0 || labels[i] >= p->classes) && !(p->loss.ignore && labels[i] == p->loss.ignore_index))
            return FAIL(MPSCY_INVALID, "label %d at row %lld (position %lld) outside [0, %lld)", labels[i],
                        (long long)(i / p->positions), (long long)(i % p->positions), (long long)p->classes);
    return MPSCY_OK;
}

/* x_src only where the backend stages it, for a one-input graph, in TRAIN or EVAL mode or predict */
static int check_x_src(mpscy_graph g, const mpscy_step_args *a, int predict, char *err, size_t errlen) {
    if (!a->x_src) return MPSCY_OK;
    if (g->vt->stage_min_bytes <= 0) return FAIL(MPSCY_UNSUPPORTED, "the %s backend does not stage x_src itself", g->vt->name);
    if (g->plan->n_inputs != 1) return FAIL(MPSCY_INVALID, "x_src given for a graph of %d inputs", (int)g->plan->n_inputs);
    if (!predict && a->mode != MPSCY_MODE_TRAIN && a->mode != MPSCY_MODE_EVAL)
        return FAIL(MPSCY_INVALID, "x_src given in mode %d (train, eval and predict stage it)", (int)a->mode);
    return MPSCY_OK;
}

int mpscy_graph_step(mpscy_graph g, const mpscy_step_args *args, mpscy_step_result *out, char *err, size_t errlen) {
    if (!g || !args || !out) return FAIL(MPSCY_INVALID, "graph, args or out is NULL");
    memset(out, 0, sizeof *out);
    g->dev->stats.calls++;
    g->dev->stats.steps++;
    int st = check_step(g, args, err, errlen);
    if (st == MPSCY_OK) st = check_x_src(g, args, 0, err, errlen);
    return st != MPSCY_OK ? st : g->vt->graph_step(g, args, out, err, errlen);
}

int mpscy_graph_grad_norm(mpscy_graph g, double *out, char *err, size_t errlen) {
    if (!g || !out) return FAIL(MPSCY_INVALID, "graph or out is NULL");
    g->dev->stats.calls++;
    if (!g->vt->graph_grad_norm) return FAIL(MPSCY_INVALID, "no training step's gradient norm is pending");
    return g->vt->graph_grad_norm(g, out, err, errlen);
}

int mpscy_graph_predict(mpscy_graph g, const mpscy_step_args *args, char *err, size_t errlen) {
    if (!g || !args) return FAIL(MPSCY_INVALID, "graph or args is NULL");
    g->dev->stats.calls++;
    g->dev->stats.predicts++;
    int st = check_rows(g, args, err, errlen);
    if (st == MPSCY_OK) st = check_x_src(g, args, 1, err, errlen);
    return st != MPSCY_OK ? st : g->vt->graph_predict(g, args, err, errlen);
}
