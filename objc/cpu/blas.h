/* blas.h — one include for the BLAS the CPU backend links: scipy-openblas32 (its symbols carry
 * a scipy_ prefix; it is bundled into the package) everywhere but macOS, Accelerate there.
 * Code uses the plain cblas_* names below. */
#ifndef MPSCY_CPU_BLAS_H
#define MPSCY_CPU_BLAS_H

#if defined(__APPLE__)
#define ACCELERATE_NEW_LAPACK
#include <Accelerate/Accelerate.h>
typedef int blasint;
#define mpscy_blas_set_threads(n) ((void)(n))
#else
#include <cblas.h>
#define cblas_sgemm scipy_cblas_sgemm
#define cblas_sgemv scipy_cblas_sgemv
#define cblas_saxpy scipy_cblas_saxpy
#define cblas_sdot scipy_cblas_sdot
#define mpscy_blas_set_threads(n) scipy_openblas_set_num_threads(n)
/* the kernels OpenBLAS chose for this CPU (or OPENBLAS_CORETYPE named), e.g. "SkylakeX" */
#define mpscy_blas_corename() scipy_openblas_get_corename()
#endif

#endif /* MPSCY_CPU_BLAS_H */
