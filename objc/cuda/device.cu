/* device.cu — the CUDA device: counted allocations (host, device, pinned), device info, launch
 * error formatting, and the backend table that wires this folder's functions to the ABI.
 * A machine without a GPU, a driver or cuBLASLt gets MPSCY_DEVICE from device_create with the
 * reason; nothing here runs at import time. */
#include "cuda.h"
#include "blas.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *cu_host_alloc(mpscy_device dev, size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (p) mpscy_count_alloc(&dev->stats, bytes);
    return p;
}

void cu_host_free(mpscy_device dev, void *p, size_t bytes) {
    if (!p) return;
    free(p);
    mpscy_count_free(&dev->stats, bytes);
}

int cu_dev_alloc(mpscy_device dev, void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) bytes = 4;
    cu_linger_yield(((cu_device *)dev)->ordinal, NULL);  /* the memset waits for the whole GPU */
    if (cudaMalloc(p, bytes) != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return MPSCY_OOM;
    }
    if (cudaMemset(*p, 0, bytes) != cudaSuccess || cu_legacy_done() != cudaSuccess) {
        cudaFree(*p);
        cudaGetLastError();  /* not left for the next launch's check to blame on its kernel */
        *p = NULL;
        return MPSCY_DEVICE;
    }
    mpscy_count_alloc(&dev->stats, bytes);
    return MPSCY_OK;
}

/* A refused free: cleared from the runtime's last error, and told on stderr when
 * $MPSCY_CUDA_FREE_LOG is set (a debugging knob: nothing else reports it, the caller being a
 * destructor). */
static void free_refused(const char *what, void *p, size_t bytes, cudaError_t e) {
    cudaGetLastError();
    if (getenv("MPSCY_CUDA_FREE_LOG"))
        fprintf(stderr, "mpscy: %s(%p) of %zu bytes refused: %s\n", what, p, bytes, cudaGetErrorString(e));
}

/* A buffer counts as freed only once the runtime took it back: a failed free stays in
 * bytes_in_use, where tests/test_alloc.py sees it. */
void cu_dev_free(mpscy_device dev, void *p, size_t bytes) {
    if (!p) return;
    cu_linger_yield(((cu_device *)dev)->ordinal, NULL);  /* cudaFree waits for the whole GPU */
    const cudaError_t e = cudaFree(p);
    if (e != cudaSuccess) {
        free_refused("cudaFree", p, bytes, e);
        return;
    }
    mpscy_count_free(&dev->stats, bytes ? bytes : 4);
}

int cu_pinned_alloc(mpscy_device dev, void **p, size_t bytes) {
    *p = NULL;
    if (bytes == 0) bytes = 4;
    if (cudaHostAlloc(p, bytes, cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        *p = NULL;
        return MPSCY_OOM;
    }
    memset(*p, 0, bytes);
    mpscy_count_alloc(&dev->stats, bytes);
    return MPSCY_OK;
}

void cu_pinned_free(mpscy_device dev, void *p, size_t bytes) {
    if (!p) return;
    const cudaError_t e = cudaFreeHost(p);
    if (e != cudaSuccess) {
        free_refused("cudaFreeHost", p, bytes, e);
        return;
    }
    mpscy_count_free(&dev->stats, bytes ? bytes : 4);
}

cudaError_t cu_smem_optin(const void *kernel, int bytes) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;  /* the read and the raise as one */
    cudaFuncAttributes fa;
    pthread_mutex_lock(&mu);
    cudaError_t e = cudaFuncGetAttributes(&fa, kernel);  /* the kernel's opt-in so far */
    if (e == cudaSuccess && fa.maxDynamicSharedSizeBytes < bytes)
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    pthread_mutex_unlock(&mu);
    return e;
}

int cu_check_launch(char *err, size_t en, const char *what, const char *func, int line) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return MPSCY_OK;
    return mpscy_fail_at(err, en, MPSCY_DEVICE, CU, func, __FILE__, line, "launching %s: %s", what,
                         cudaGetErrorString(e));
}

static int cu_device_create(const mpscy_backend *vt, mpscy_device *out, char *err, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count < 1) {
        cudaGetLastError();
        return MPSCY_FAIL(err, n, MPSCY_DEVICE, CU, "backend 'cuda' has no device here: %s",
                          e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports 0 devices");
    }
    cu_device *d = (cu_device *)calloc(1, sizeof *d);
    cu_lt *lt = (cu_lt *)calloc(1, sizeof *lt);
    if (!d || !lt) {
        free(d);
        free(lt);
        return MPSCY_FAIL(err, n, MPSCY_OOM, CU, "device object of %zu bytes", sizeof *d);
    }
    d->base.vt = vt;
    mpscy_count_alloc(&d->base.stats, sizeof *d + sizeof *lt);
    d->ordinal = 0;
    e = cudaSetDevice(d->ordinal);
    if (e == cudaSuccess) e = cudaGetDeviceProperties(&d->prop, d->ordinal);
    if (e == cudaSuccess) e = cudaFree(0);  /* create the context now, not inside a capture */
    if (e != cudaSuccess) {
        cudaGetLastError();
        free(d);
        free(lt);
        return MPSCY_FAIL(err, n, MPSCY_DEVICE, CU, "backend 'cuda', device %d: %s", 0, cudaGetErrorString(e));
    }
    d->sms = d->prop.multiProcessorCount;
    int st = cu_lt_open(lt, err, n);
    if (st != MPSCY_OK) {
        free(d);
        free(lt);
        return st;
    }
    d->lt = lt;
    const char *coop = getenv("MPSCY_CUDA_COOP");  /* a debugging knob: 0 turns cooperative kernels off */
    d->coop = coop && coop[0] == '0' ? 0 : cu_coop_probe(d);
    d->pdl = cu_pdl_probe(d);  /* which graphs use it: graph.cu ($MPSCY_CUDA_PDL) */
    *out = &d->base;
    return MPSCY_OK;
}

static void cu_device_destroy(mpscy_device dev) {
    cu_device *d = (cu_device *)dev;
    cu_settle(dev, NULL, 0);
    cu_lt_close(d->lt);
    free(d->lt);
    free(d);
}

static int cu_device_info(mpscy_device dev, mpscy_device_info *out, char *err, size_t n) {
    (void)err; (void)n;
    const cu_device *d = (const cu_device *)dev;
    snprintf(out->backend, sizeof out->backend, "cuda");
    snprintf(out->name, sizeof out->name, "%.80s (sm_%d%d, cuBLASLt %zu%s%s)", d->prop.name, d->prop.major,
             d->prop.minor, d->lt->api->version(), d->coop ? ", cooperative" : "", d->pdl ? ", PDL" : "");
    out->unified_memory = d->prop.integrated ? 1 : 0;
    out->threads = d->sms;
    out->memory_bytes = (int64_t)d->prop.totalGlobalMem;
    return MPSCY_OK;
}

/* Every entry runs with the backend's GPU (CUDA device 0, the first visible one) current on the
 * calling thread, and leaves the thread's current device as it found it: a PyTorch user's
 * torch.cuda.set_device(1) stays theirs (creating an engine moved it to 0), and an entry called
 * on a thread whose current device is another still reaches this backend's streams and graphs.
 * One cudaGetDevice a call where the device is already 0. */
struct cu_on {
    int prev = 0;
    bool moved = false;
    cu_on() {  /* a failed query or switch is cleared, not left for the next launch check to report */
        if (cudaGetDevice(&prev) != cudaSuccess) {
            cudaGetLastError();
        } else if (prev != 0) {
            moved = cudaSetDevice(0) == cudaSuccess;
            if (!moved) cudaGetLastError();
        }
    }
    ~cu_on() {
        if (moved && cudaSetDevice(prev) != cudaSuccess) cudaGetLastError();
    }
    cu_on(const cu_on &) = delete;
    cu_on &operator=(const cu_on &) = delete;
};

template <auto F>
struct on_device;
template <typename R, typename... A, R (*F)(A...)>
struct on_device<F> {
    static R call(A... args) {
        cu_on on;
        return F(args...);
    }
};

extern "C" const mpscy_backend mpscy_cuda_backend = {
    "cuda",
    on_device<cu_device_create>::call,
    on_device<cu_device_destroy>::call,
    on_device<cu_device_info>::call,
    on_device<cu_buffer_create>::call,
    on_device<cu_buffer_destroy>::call,
    on_device<cu_buffer_read>::call,
    on_device<cu_buffer_write>::call,
    on_device<cu_graph_build>::call,
    on_device<cu_graph_destroy>::call,
    on_device<cu_graph_io>::call,
    on_device<cu_tensor_read>::call,
    on_device<cu_tensor_write>::call,
    on_device<cu_graph_step>::call,
    on_device<cu_graph_predict>::call,
    CU_DEFER_MIN,  /* stage_min_bytes: step.cu's deferred staging */
    on_device<cu_settle>::call,  /* device_synchronize: a training step's update still running (step.cu) */
    on_device<cu_graph_grad_norm>::call,  /* graph_grad_norm: mlp.cu's early decision (step.cu) */
};
