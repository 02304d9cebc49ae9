// free_probe.cu — does compute-sanitizer's leak check see cudaFree and cudaFreeHost issued in
// the order cu_graph_destroy (objc/cuda/graph.cu) used until the thirty-first session: a captured
// graph (two streams, events, a mapped pinned buffer) instantiated, uploaded and launched, then
// its exec, streams and events destroyed, then the frees ("after"); or the frees first ("before",
// the order of the coop probe in optim.cu, whose frees memcheck did see). Static cudart, as
// _native.so links it. Three rounds; each prints cudaMemGetInfo's free MiB, and any call that
// failed. bench/gpu_sanitize.sh runs both under memcheck's leak check:
//     nvcc -O2 -arch=sm_90 -cudart static bench/free_probe.cu -o /tmp/free_probe
//     compute-sanitizer --leak-check full /tmp/free_probe after   (then: before)
#include <cstdio>
#include <cstring>
#include <cuda_runtime.h>
__global__ void k(float *p, const float *h) { p[threadIdx.x] += h[threadIdx.x]; }
#define C(x) do { cudaError_t e_ = (x); if (e_) printf("%s -> %s\n", #x, cudaGetErrorString(e_)); } while (0)
int main(int argc, char **argv) {
    const bool after = argc < 2 || strcmp(argv[1], "before") != 0;
    for (int round = 0; round < 3; round++) {
        float *d = nullptr, *h = nullptr;
        cudaStream_t s, side; cudaEvent_t fork, join; cudaGraph_t gr; cudaGraphExec_t ex;
        C(cudaMalloc(&d, 1 << 20)); C(cudaMemset(d, 0, 1 << 20)); C(cudaStreamSynchronize(cudaStreamLegacy));
        C(cudaHostAlloc((void **)&h, 4096, cudaHostAllocMapped));
        C(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); C(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
        C(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming)); C(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
        C(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        k<<<1, 32, 0, s>>>(d, h); C(cudaEventRecord(fork, s)); C(cudaStreamWaitEvent(side, fork, 0));
        k<<<1, 32, 0, side>>>(d + 64, h); C(cudaEventRecord(join, side)); C(cudaStreamWaitEvent(s, join, 0));
        C(cudaStreamEndCapture(s, &gr)); C(cudaGraphInstantiate(&ex, gr, 0)); C(cudaGraphUpload(ex, s)); C(cudaGraphDestroy(gr));
        for (int i = 0; i < 3; i++) C(cudaGraphLaunch(ex, s));
        C(cudaStreamSynchronize(s));
        if (!after) { C(cudaFree(d)); C(cudaFreeHost(h)); }
        C(cudaGraphExecDestroy(ex));
        C(cudaStreamDestroy(s)); C(cudaStreamDestroy(side)); C(cudaEventDestroy(fork)); C(cudaEventDestroy(join));
        if (after) { C(cudaFree(d)); C(cudaFreeHost(h)); }
        size_t fr, tot; C(cudaMemGetInfo(&fr, &tot)); printf("round %d (%s): free %zu MiB, d=%p\n", round, after ? "after" : "before", fr >> 20, (void *)d);
    }
    return 0;
}
