/* blas.cu — loading cuBLASLt at run time and the GEMM helper of blas.h. The library is looked
 * for, in order: $MPSCY_CUBLASLT (a path), a copy already loaded, NVIDIA's wheel (beside this
 * package or in the running Python's site-packages), the system soname, the build-time directory.
 * Descriptors live on the stack (the *Init forms): a GEMM enqueue allocates nothing. */
#include "blas.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef MPSCY_CUBLASLT_SONAME
#define MPSCY_CUBLASLT_SONAME "libcublasLt.so"
#endif
#ifndef MPSCY_CUBLASLT_DIR
#define MPSCY_CUBLASLT_DIR ""
#endif
#ifndef MPSCY_CUBLAS_WHEEL_DIR
#define MPSCY_CUBLAS_WHEEL_DIR "cu13"
#endif

static cu_lt_api lt_api;
static int lt_loaded;                 /* 1 ok, -1 failed */
static char lt_why[640];
static pthread_once_t lt_once = PTHREAD_ONCE_INIT;

static void *try_open(const char *path) {
    if (!path || !*path) return NULL;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) snprintf(lt_why, sizeof lt_why, "%s", dlerror());
    return h;
}

/* NVIDIA's wheel directory beside a Python installation: <prefix>/lib/python3.N/site-packages. */
static void *try_wheel_of(const char *prefix) {
    char path[1024];
    for (int minor = 30; minor >= 8 && prefix; minor--) {
        snprintf(path, sizeof path, "%s/lib/python3.%d/site-packages/nvidia/%s/lib/%s", prefix, minor,
                 MPSCY_CUBLAS_WHEEL_DIR, MPSCY_CUBLASLT_SONAME);
        if (access(path, R_OK) == 0) return try_open(path);
    }
    return NULL;
}

/* The order matters when PyTorch or JAX share the process: a library with this soname that is
 * already loaded is taken as is, then the copy those frameworks load (NVIDIA's wheel), and only
 * then the system's, so that a framework imported later binds to the same file, never to an
 * older copy of the same soname. */
static void load_once(void) {
    char path[1024];
    void *h = try_open(getenv("MPSCY_CUBLASLT"));
    if (!h) h = dlopen(MPSCY_CUBLASLT_SONAME, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    Dl_info info;
    if (!h && dladdr((void *)&load_once, &info) && info.dli_fname) {
        const char *slash = strrchr(info.dli_fname, '/');
        int len = slash ? (int)(slash - info.dli_fname) : 0;
        snprintf(path, sizeof path, "%.*s/../nvidia/%s/lib/%s", len, info.dli_fname, MPSCY_CUBLAS_WHEEL_DIR,
                 MPSCY_CUBLASLT_SONAME);
        if (access(path, R_OK) == 0) h = try_open(path);
    }
    if (!h) h = try_wheel_of(getenv("VIRTUAL_ENV"));
    if (!h) {
        /* the running interpreter's prefix: /proc/self/exe is <prefix>/bin/python3.x */
        ssize_t k = readlink("/proc/self/exe", path, sizeof path - 1);
        if (k > 0) {
            path[k] = 0;
            for (int up = 0; up < 2; up++) {
                char *slash = strrchr(path, '/');
                if (slash) *slash = 0;
            }
            h = try_wheel_of(path);
        }
    }
    if (!h) h = try_open(MPSCY_CUBLASLT_SONAME);
    if (!h && MPSCY_CUBLASLT_DIR[0]) {
        snprintf(path, sizeof path, "%s/%s", MPSCY_CUBLASLT_DIR, MPSCY_CUBLASLT_SONAME);
        h = try_open(path);
    }
    if (!h) {
        char why[640];
        snprintf(why, sizeof why, "%s", lt_why);
        snprintf(lt_why, sizeof lt_why, "backend 'cuda' cannot load %s (install CUDA's cuBLAS or `pip install "
                 "nvidia-cublas`, or set MPSCY_CUBLASLT to its path): %.300s", MPSCY_CUBLASLT_SONAME, why);
        lt_loaded = -1;
        return;
    }
#define SYM(field, name)                                                                 \
    do {                                                                                 \
        *(void **)&lt_api.field = dlsym(h, name);                                        \
        if (!lt_api.field) {                                                             \
            snprintf(lt_why, sizeof lt_why, "%s lacks %s", MPSCY_CUBLASLT_SONAME, name); \
            lt_loaded = -1;                                                              \
            return;                                                                      \
        }                                                                                \
    } while (0)
    SYM(create, "cublasLtCreate");
    SYM(destroy, "cublasLtDestroy");
    SYM(matmul, "cublasLtMatmul");
    SYM(desc_init, "cublasLtMatmulDescInit_internal");
    SYM(desc_set, "cublasLtMatmulDescSetAttribute");
    SYM(layout_init, "cublasLtMatrixLayoutInit_internal");
    SYM(layout_set, "cublasLtMatrixLayoutSetAttribute");
    SYM(pref_init, "cublasLtMatmulPreferenceInit_internal");
    SYM(pref_set, "cublasLtMatmulPreferenceSetAttribute");
    SYM(heuristic, "cublasLtMatmulAlgoGetHeuristic");
    SYM(version, "cublasLtGetVersion");
    SYM(status_string, "cublasLtGetStatusString");
#undef SYM
    lt_loaded = 1;
}

int cu_lt_open(cu_lt *lt, char *err, size_t en) {
    pthread_once(&lt_once, load_once);
    if (lt_loaded != 1) return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "%s", lt_why);
    lt->api = &lt_api;
    cublasStatus_t s = lt_api.create(&lt->handle);
    if (s != CUBLAS_STATUS_SUCCESS)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "cublasLtCreate: %s", lt_api.status_string(s));
    return MPSCY_OK;
}

void cu_lt_close(cu_lt *lt) {
    if (lt && lt->api && lt->handle) lt->api->destroy(lt->handle);
}

/* Largest power of two (<= 256) dividing the address: what the heuristic may assume. */
static uint32_t align_of(const void *p) {
    uintptr_t v = (uintptr_t)p;
    uint32_t a = 4;
    while (a < 256 && (v & (2 * a - 1)) == 0) a *= 2;
    return a;
}

#define LT_TRY(call, what)                                                                     \
    do {                                                                                       \
        cublasStatus_t s_ = (call);                                                            \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                       \
            return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "%s: %s", (what), api->status_string(s_)); \
    } while (0)

int cu_gemm_run(cu_graph *g, const cu_gemm *q, int side, char *err, size_t en) {
    const cu_lt_api *api = g->dev->lt->api;
    cublasLtHandle_t h = g->dev->lt->handle;
    cublasComputeType_t compute = g->plan.precision == MPSCY_PRECISION_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                            : CUBLAS_COMPUTE_32F;
    cublasLtMatmulDescOpaque_t op;
    cublasLtMatrixLayoutOpaque_t la, lb, ld;
    cublasLtMatmulPreferenceOpaque_t pref;
    LT_TRY(api->desc_init(&op, sizeof op, compute, CUDA_R_32F), "matmul descriptor");
    cublasOperation_t ta = q->transa ? CUBLAS_OP_T : CUBLAS_OP_N, tb = q->transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_TRY(api->desc_set(&op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "transa");
    LT_TRY(api->desc_set(&op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "transb");
    cublasLtEpilogue_t epi = (cublasLtEpilogue_t)q->epilogue;
    LT_TRY(api->desc_set(&op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "epilogue");
    if (q->bias) LT_TRY(api->desc_set(&op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &q->bias, sizeof q->bias), "bias");
    /* stored shapes: op(A) is m x k, op(B) is k x n */
    uint64_t ar = q->transa ? q->k : q->m, ac = q->transa ? q->m : q->k;
    uint64_t br = q->transb ? q->n : q->k, bc = q->transb ? q->k : q->n;
    LT_TRY(api->layout_init(&la, sizeof la, CUDA_R_32F, ar, ac, q->lda), "layout A");
    LT_TRY(api->layout_init(&lb, sizeof lb, CUDA_R_32F, br, bc, q->ldb), "layout B");
    LT_TRY(api->layout_init(&ld, sizeof ld, CUDA_R_32F, q->m, q->n, q->ldd), "layout D");
    if (q->batch > 1) {
        int32_t count = q->batch;
        cublasLtMatrixLayoutOpaque_t *lays[3] = {&la, &lb, &ld};
        int64_t strides[3] = {q->sa, q->sb, q->sd};
        for (int k = 0; k < 3; k++) {
            LT_TRY(api->layout_set(lays[k], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count), "batch count");
            LT_TRY(api->layout_set(lays[k], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[k], sizeof strides[k]),
                   "batch stride");
        }
    }
    LT_TRY(api->pref_init(&pref, sizeof pref), "preference");
    uint64_t ws = g->lt_ws_bytes;
    LT_TRY(api->pref_set(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "workspace");
    uint32_t al[4] = {align_of(q->a), align_of(q->b), align_of(q->d), align_of(q->d)};
    LT_TRY(api->pref_set(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], 4), "alignment");
    LT_TRY(api->pref_set(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], 4), "alignment");
    LT_TRY(api->pref_set(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], 4), "alignment");
    LT_TRY(api->pref_set(&pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3], 4), "alignment");
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t hs = api->heuristic(h, &op, &la, &lb, &ld, &ld, &pref, 1, &res, &found);
    if (hs != CUBLAS_STATUS_SUCCESS || found < 1) {
        if (q->epilogue != CUBLASLT_EPILOGUE_DEFAULT || q->batch > 1)
            return MPSCY_UNSUPPORTED;  /* the caller falls back to another way, silently */
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "no cuBLASLt algorithm for a %lld x %lld x %lld GEMM: %s",
                          (long long)q->m, (long long)q->n, (long long)q->k,
                          hs != CUBLAS_STATUS_SUCCESS ? api->status_string(hs) : "none found");
    }
    const float alpha = 1.0f, beta = q->beta;
    cudaStream_t s = side ? g->side : g->stream;
    LT_TRY(api->matmul(h, &op, &alpha, q->a, &la, q->b, &lb, &beta, q->d, &ld, q->d, &ld, &res.algo,
                       g->lt_ws[side ? 1 : 0], g->lt_ws_bytes, s),
           "cublasLtMatmul");
    return MPSCY_OK;
}
