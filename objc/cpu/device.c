/* device.c — the CPU device: counted aligned host allocations, device info, and the backend
 * table that wires this folder's functions to the ABI. Worker threads belong to each
 * graph (parallel.c), and BLAS runs single-threaded inside them; this file starts none. */
#include "cpu.h"
#include "blas.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *cpu_alloc(mpscy_device dev, size_t bytes) {
    void *p = NULL;
    size_t rounded = (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN;
    if (rounded == 0) rounded = CPU_ALIGN;
    if (posix_memalign(&p, CPU_ALIGN, rounded) != 0) return NULL;
    memset(p, 0, rounded);
    mpscy_count_alloc(&dev->stats, bytes);
    return p;
}

void cpu_free(mpscy_device dev, void *ptr, size_t bytes) {
    if (!ptr) return;
    free(ptr);
    mpscy_count_free(&dev->stats, bytes);
}

static int cpu_device_create(const mpscy_backend *vt, mpscy_device *out, char *err, size_t n) {
    cpu_device *d = calloc(1, sizeof *d);
    if (!d) return MPSCY_FAIL(err, n, MPSCY_OOM, CPU, "device object of %zu bytes", sizeof *d);
    d->base.vt = vt;
    mpscy_count_alloc(&d->base.stats, sizeof *d);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    d->threads = cores < 1 ? 1 : cores > MPSCY_MAX_THREADS ? MPSCY_MAX_THREADS : (int32_t)cores;  /* one per core */
    *out = &d->base;
    return MPSCY_OK;
}

static void cpu_device_destroy(mpscy_device dev) { free(dev); }

static int cpu_device_info(mpscy_device dev, mpscy_device_info *out, char *err, size_t n) {
    (void)err; (void)n;
    const cpu_device *d = (const cpu_device *)dev;
    snprintf(out->backend, sizeof out->backend, "cpu");
#if defined(__APPLE__)
    snprintf(out->name, sizeof out->name, "CPU (Accelerate BLAS)");
#else
    snprintf(out->name, sizeof out->name, "CPU (OpenBLAS, %s kernels%s)", mpscy_blas_corename(),
             cpu_fma_gemm_path() ? "; small products in mpscy's AVX-512 kernels" : "");
#endif
    out->unified_memory = 1;
    out->threads = d->threads;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    out->memory_bytes = pages > 0 && page > 0 ? (int64_t)pages * page : 0;
    return MPSCY_OK;
}

const mpscy_backend mpscy_cpu_backend = {
    .name = "cpu",
    .device_create = cpu_device_create,
    .device_destroy = cpu_device_destroy,
    .device_info = cpu_device_info,
    .buffer_create = cpu_buffer_create,
    .buffer_destroy = cpu_buffer_destroy,
    .buffer_read = cpu_buffer_read,
    .buffer_write = cpu_buffer_write,
    .graph_build = cpu_graph_build,
    .graph_destroy = cpu_graph_destroy,
    .graph_io = cpu_graph_io,
    .tensor_read = cpu_tensor_read,
    .tensor_write = cpu_tensor_write,
    .graph_step = cpu_graph_step,
    .graph_predict = cpu_graph_predict,
};
