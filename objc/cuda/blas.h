/* blas.h — cuBLASLt for the CUDA backend, loaded with dlopen when a device is created (never
 * linked), so that importing mpscy cannot fail on a machine without cuBLAS: device="cuda" then
 * raises a DeviceError naming the library. Also the one GEMM helper every layer uses: row-major
 * tensors described as column-major cuBLASLt layouts, with an optional epilogue (bias, ReLU,
 * bias gradient) and TF32 when the graph asks for it. */
#ifndef MPSCY_CUDA_BLAS_H
#define MPSCY_CUDA_BLAS_H

#include "cuda.h"
#include <cublasLt.h>

/* The entry points mpscy uses, resolved once per process. */
typedef struct cu_lt_api {
    decltype(&cublasLtCreate) create;
    decltype(&cublasLtDestroy) destroy;
    decltype(&cublasLtMatmul) matmul;
    decltype(&cublasLtMatmulDescInit_internal) desc_init;
    decltype(&cublasLtMatmulDescSetAttribute) desc_set;
    decltype(&cublasLtMatrixLayoutInit_internal) layout_init;
    decltype(&cublasLtMatrixLayoutSetAttribute) layout_set;
    decltype(&cublasLtMatmulPreferenceInit_internal) pref_init;
    decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
    decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
    decltype(&cublasLtGetVersion) version;
    decltype(&cublasLtGetStatusString) status_string;
} cu_lt_api;

typedef struct cu_lt {
    const cu_lt_api *api;
    cublasLtHandle_t handle;
} cu_lt;

/* Loads the library (once) and creates a handle; MPSCY_DEVICE with the loader's message. */
int cu_lt_open(cu_lt *lt, char *err, size_t en);
void cu_lt_close(cu_lt *lt);

/* D (m x n, column-major, ldd) = op(A) op(B) [+ beta D], each operand column-major as stored.
 * Epilogues: CUBLASLT_EPILOGUE_DEFAULT, _BIAS / _RELU_BIAS (bias of m), _RELU, _BGRADB
 * (bias = column sums of op(B), of n). Returns MPSCY_UNSUPPORTED when no algorithm exists for
 * the epilogue, so the caller can fall back to its own kernel. */
typedef struct cu_gemm {
    int transa, transb;        /* 1: transposed */
    int64_t m, n, k;
    const float *a; int64_t lda;
    const float *b; int64_t ldb;
    float *d; int64_t ldd;
    float beta;                /* 0 or 1 (accumulate) */
    int epilogue;              /* cublasLtEpilogue_t */
    float *bias;               /* bias (forward) or bias gradient (BGRADB) */
    int32_t batch;             /* > 1: a strided batch of products */
    int64_t sa, sb, sd;        /* element strides between the products of a batch */
} cu_gemm;

int cu_gemm_run(cu_graph *g, const cu_gemm *q, int side, char *err, size_t en);

#endif /* MPSCY_CUDA_BLAS_H */
