/* conv_direct.cu — Conv2D forward as one direct kernel, for groups == 1 and C*KH*KW <= 32 (a
 * network's first convolutions, where im2col + a product cost several times the work): a thread
 * gathers its output pixel's taps into registers and takes fp32 FMA dot products with the
 * weights staged in shared memory, writing y (NCHW) with the bias and the fused ReLU. It builds
 * no columns (conv.cu builds them for a training step's weight gradient, on the side stream).
 * Index arithmetic is in 32 bits: larger convolutions run over sub-batches (cu_conv_split). */
#include <algorithm>

#include "cuda.h"

typedef mpscy_conv_geom conv_geom;

#define DIRECT_TAPS 32  /* C*KH*KW at most: a thread's taps live in registers */
#define DIRECT_OC 64    /* output channels per block: its slice of W in shared memory */
/* beside the pull (cu_conv_direct), at most 16. Measured on the H200 (README CNN, interleaved
 * A/B, two calls): the step 279.4 / 280.7 us with 16 channels against 282.7 / 284.6 with 32 (8:
 * 282.2 / 284.7). Not explained by this kernel: in its blocks' own clocks (globaltimer, three
 * steps each) its last block ends 8.8 us after the pull's last part with 16 (3 blocks of 16 a
 * multiprocessor resident, 116 of the 512 starting only as others end) against 5.0 with 32 */
#define DIRECT_BESIDE_OC 16

/* oc < 65536: the grid's y (chunks of 8 channels or more) stays within its limit */
int cu_conv_direct_fits(const mpscy_conv_geom *g) { return g->groups == 1 && g->kg <= DIRECT_TAPS && g->oc < 65536; }

/* a shared float4 through asm: plain loads of the unrolled tap loop are all hoisted ahead of its
 * FMAs (4 KT registers, 180 at KT = 32); these stay in order, so only a few are in flight */
static __device__ __forceinline__ float4 lds4(const float4 *p) {
    float4 r;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
                 : "r"((unsigned)__cvta_generic_to_shared(p)));
    return r;
}

/* y[s, o, pix] = relu(sum_t W[o, t] x_t(s, pix) + bias[o]), the taps t = (c, ki, kj) summed in
 * order 0 .. kg-1 by fmaf, then the bias, then the ReLU: the same bits on every run. KT: kg
 * rounded up to 4 (taps past kg read 0 and add exactly 0). Block (x, y) takes output channels
 * [y chunk, (y + 1) chunk) of 256 pixels; a thread gathers its pixel's taps once, then runs four
 * channels at a time (four independent FMA chains) from W^T staged as float4 rows (broadcast
 * reads), each channel's store coalesced across the warp. */
template <int KT>
__global__ void __launch_bounds__(CU_THREADS) conv_direct_kernel(float *__restrict__ y, const float *x,
                                                                 const float *__restrict__ w,
                                                                 const float *__restrict__ bias, conv_geom g,
                                                                 int64_t b, int chunk, int relu, cu_pull_parts pull) {
    __shared__ float4 wt[KT][DIRECT_OC / 4];  /* wt[t][q] = W[o0 + 4q + (0..3), t], 0 past the block's channels */
    __shared__ float bs[DIRECT_OC];
    __shared__ int4 taps[KT];                  /* (offset in a sample, row shift, column shift, -) */
    /* beside the pull: W and the tables staged at once, x read once this block's parts are in */
    if (pull.seq) cu_pdl_trigger();
    else cu_pdl_enter();
    const int kg = (int)g.kg, khw = (int)(g.kh * g.kw), H = (int)g.h, W = (int)g.w, OC = (int)g.oc;
    const int o0 = (int)blockIdx.y * chunk, nc = min(chunk, OC - o0);
    for (int t = threadIdx.x; t < KT; t += blockDim.x) {
        const int c = t / khw, r = t - c * khw, ki = r / (int)g.kw, kj = r - ki * (int)g.kw;
        const int dy = ki * (int)g.dh, dx = kj * (int)g.dw;
        /* a tap past kg shifts far above the image: never in range */
        taps[t] = t < kg ? make_int4(c * H * W + dy * W + dx, dy, dx, 0) : make_int4(0, -(1 << 30), 0, 0);
    }
    float *wts = reinterpret_cast<float *>(wt);
    for (int e = threadIdx.x; e < KT * DIRECT_OC; e += blockDim.x) {
        const int t = e / DIRECT_OC, o = e - t * DIRECT_OC;
        wts[e] = t < kg && o < nc ? __ldg(&w[(size_t)(o0 + o) * kg + t]) : 0.0f;
    }
    for (int o = threadIdx.x; o < DIRECT_OC; o += blockDim.x) bs[o] = bias && o < nc ? __ldg(&bias[o0 + o]) : 0.0f;
    __syncthreads();

    const unsigned nb = (unsigned)(b * g.ohw), OHW = (unsigned)g.ohw, OW = (unsigned)g.ow,
                   chw = (unsigned)(g.c * g.h * g.w);
    if (pull.seq) {
        /* the floats of the samples of this block's pixels (the pull flags every part, empty
         * parts and stalled pieces' too) */
        const unsigned j0 = blockIdx.x * blockDim.x, j1 = min(j0 + blockDim.x, nb) - 1;
        cu_pull_wait(pull, (int64_t)(j0 / OHW) * chw, ((int64_t)(j1 / OHW) + 1) * chw - 1);
    }
    const int quads = (nc + 3) / 4;
    /* one pixel per thread: a grid-stride loop would keep the tap table in registers */
    const unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < nb) {
        const unsigned s = j / OHW, pix = j - s * OHW, oh = pix / OW, ow = pix - oh * OW;
        const int ih0 = (int)oh * (int)g.sh - (int)g.ph, iw0 = (int)ow * (int)g.sw - (int)g.pw;
        const int base = (int)(s * chw) + ih0 * W + iw0;  /* tap t at base + taps[t].x when in range */
        float v[KT];
#pragma unroll
        for (int t = 0; t < KT; t++) {
            /* out of range: the sample's first float loaded and dropped, so the loads issue
             * unconditionally, together (never a float of another sample: beside the pull, a
             * line of a sample not yet copied must not be cached) */
            const int4 tp = taps[t];
            const bool in = (unsigned)(ih0 + tp.y) < (unsigned)H && (unsigned)(iw0 + tp.z) < (unsigned)W;
            const float xv = x[in ? base + tp.x : (int)(s * chw)];
            v[t] = in ? xv : 0.0f;
        }
        float *yp = y + ((size_t)s * OC + o0) * OHW + pix;
        for (int q = 0; q < quads; q++) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int t = 0; t < KT; t++) {
                const float4 wq = lds4(&wt[t][q]);
                acc[0] = fmaf(v[t], wq.x, acc[0]);
                acc[1] = fmaf(v[t], wq.y, acc[1]);
                acc[2] = fmaf(v[t], wq.z, acc[2]);
                acc[3] = fmaf(v[t], wq.w, acc[3]);
            }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int o = 4 * q + k;
                if (o >= nc) break;
                const float r = acc[k] + bs[o];
                yp[(size_t)o * OHW] = relu && mpscy_relu_zeroes(r) ? 0.0f : r;
            }
        }
    }
    /* beside the pull: complete only after it, so whatever follows this kernel follows the pull */
    if (pull.seq) cu_pdl_wait();
}

/* whether the first layer is a convolution of input 0 that runs as this file's kernel
 * (cu_conv_forward takes it whenever it fits), so a deferred step's pull flags its parts for it
 * (step.cu) and it starts beside the pull; not with $MPSCY_CUDA_PULL_CONV=0 */
int cu_conv_direct_beside(const cu_graph *gr) {
    const mpscy_plan *p = &gr->plan;
    if (!gr->pull_conv) return 0;
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *n = &p->nodes[i];
        if (n->kind == MPSCY_LAYER_INPUT) continue;
        const mpscy_node *src = &p->nodes[n->in[0]];
        if (n->kind != MPSCY_LAYER_CONV2D || src->kind != MPSCY_LAYER_INPUT || src->input_index != 0) return 0;
        const conv_geom cg = mpscy_conv_geometry(p, n);
        return cu_conv_direct_fits(&cg) && !cu_conv_split(gr, n);
    }
    return 0;
}

int cu_conv_direct(cu_graph *gr, const mpscy_conv_geom *g, float *y, const float *x, const float *w,
                   const float *bias, int64_t b, int relu, char *err, size_t en) {
    typedef void (*direct_fn)(float *, const float *, const float *, const float *, conv_geom, int64_t, int, int,
                              cu_pull_parts);
    static const direct_fn kinds[DIRECT_TAPS / 4] = {
        conv_direct_kernel<4>,  conv_direct_kernel<8>,  conv_direct_kernel<12>, conv_direct_kernel<16>,
        conv_direct_kernel<20>, conv_direct_kernel<24>, conv_direct_kernel<28>, conv_direct_kernel<32>};
    const unsigned px = cu_blocks(b * g->ohw, CU_THREADS, 1 << 30);
    /* channels per block, a multiple of 4: halved (down to 8) while the grid is under one block per
     * multiprocessor; each chunk gathers its pixels' taps again (from cache). Measured on the H200
     * for the README CNN's first layer (256 pixel blocks, 32 channels): split until two blocks per
     * multiprocessor (2 x 16 channels, two waves of blocks whose time is mostly the latency of
     * staging W and gathering taps) 13.5 us; one wave of 256 blocks of all 32 channels 10.7 us */
    const bool beside = gr->pull_next;  /* this is the first layer, on input 0 (cu_conv_direct_beside) */
    int64_t chunk = std::min<int64_t>((g->oc + 3) & ~(int64_t)3, beside ? DIRECT_BESIDE_OC : DIRECT_OC);
    while (chunk > 8 && px * ((g->oc + chunk - 1) / chunk) < (int64_t)gr->dev->sms)
        chunk = (chunk / 2 + 3) & ~(int64_t)3;
    const int64_t chunks = (g->oc + chunk - 1) / chunk;
    /* the first kernel after the pull, on its rows (step.cu): launched as its programmatic
     * dependent, so its blocks start once the pull's have, each waiting only for the parts that
     * hold its samples. Without dependent launch on the device the pull is complete first and the
     * waits pass at once. Measured on the H200 (README CNN, A/B against MPSCY_CUDA_PULL_CONV=0,
     * four calls): 286.1 / 283.1 / 280.2 / 280.3 us against 291.8 / 286.3 / 286.1 / 287.2; without
     * the kernel's final wait for the pull 283.4 against 280.3, so it stays. */
    cu_pull_parts pull = {};
    if (beside) {
        pull.seq = gr->scratch->part_seq;
        pull.P = gr->params_d;
        pull.piece = cu_stage_piece(b * gr->in0_size);  /* as the pull's (step.cu) */
    }
    CU_TRY(cu_launch_pdl(gr->pdl || (beside && gr->dev->pdl), gr->carveout, kinds[(g->kg + 3) / 4 - 1],
                         dim3(px, (unsigned)chunks), CU_THREADS, 0, gr->stream, y, x, w, bias, *g, b, (int)chunk,
                         relu, pull),
           "conv_direct");
    return CU_LAUNCHED("conv_direct");
}
