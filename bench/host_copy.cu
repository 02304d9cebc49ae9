// host_copy.cu — how fast this host writes a 3.2 MB batch (the MLP 784-1024x3-10 at batch 1024)
// into pinned memory: plain AVX-512 stores or streaming stores, on 1, 2, 4, 8 threads (thread
// start included), and glibc memcpy. What _staging.h's thread count and store kind rest on.
//     nvcc -O2 -o /tmp/host_copy bench/host_copy.cu -lpthread && /tmp/host_copy
#include <cuda_runtime.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now() { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
__attribute__((target("avx512f"))) static void nt_copy(float *d, const float *s, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(d + i, _mm512_loadu_ps(s + i));
    for (; i < n; i++) d[i] = s[i];
    _mm_sfence();
}
__attribute__((target("avx512f"))) static void plain_copy(float *d, const float *s, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_loadu_ps(s + i));
    for (; i < n; i++) d[i] = s[i];
}
struct job { float *d; const float *s; size_t n; int nt; };
static void *run(void *p) { job *j = (job *)p; if (j->nt) nt_copy(j->d, j->s, j->n); else plain_copy(j->d, j->s, j->n); return NULL; }
int main() {
    size_t n = 1024 * 784;
    float *src = (float *)aligned_alloc(64, n * 4), *dst, *pag = (float *)aligned_alloc(64, n * 4);
    for (size_t i = 0; i < n; i++) src[i] = (float)i;
    cudaHostAlloc((void **)&dst, n * 4, cudaHostAllocMapped);
    for (int nt = 0; nt < 2; nt++)
        for (int T = 1; T <= 8; T *= 2) {
            double best = 1e9;
            for (int rep = 0; rep < 30; rep++) {
                pthread_t th[8]; job jb[8];
                double t0 = now();
                for (int t = 0; t < T; t++) {
                    size_t a = n * t / T, b = n * (t + 1) / T;
                    jb[t] = {dst + a, src + a, b - a, nt};
                    if (t) pthread_create(&th[t], NULL, run, &jb[t]);
                }
                run(&jb[0]);
                for (int t = 1; t < T; t++) pthread_join(th[t], NULL);
                double dt = now() - t0;
                best = dt < best ? dt : best;
            }
            printf("%s threads %d: best %.1f us (incl. thread start)\n", nt ? "NT stores" : "plain", T, best);
        }
    double best = 1e9;
    for (int rep = 0; rep < 30; rep++) { double t0 = now(); memcpy(dst, src, n * 4); double dt = now() - t0; best = dt < best ? dt : best; }
    printf("memcpy pinned: %.1f us\n", best);
    best = 1e9;
    for (int rep = 0; rep < 30; rep++) { double t0 = now(); memcpy(pag, src, n * 4); double dt = now() - t0; best = dt < best ? dt : best; }
    printf("memcpy pageable (warm): %.1f us\n", best);
    return 0;
}
