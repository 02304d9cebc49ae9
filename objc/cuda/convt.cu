/* convt.cu — ConvTranspose2D on CUDA (torch.nn.ConvTranspose2d: NCHW, weight (C, OC / groups, KH,
 * KW)) as direct kernels, each output gathered in a fixed order (no atomics: the same result every
 * run): the forward a thread per output element, summing the taps whose input lands on it; the
 * input gradient a thread per input element, the convolution's forward over dy; the weight
 * gradient a block per weight element over the batch's positions; the bias gradient a block per
 * channel. The geometry g is mpscy_conv_geometry's for this kind, the convolution transposed, from
 * the node's output (g.c, g.h, g.w) back to its input (g.oc, g.oh, g.ow), with the node's weight
 * (g.oc, g.c / groups, kh, kw). No products on tensor cores or cuBLASLt: this first form is
 * correct and deterministic; its speed against PyTorch's is bench/cuda_convt.py's. */
#include "cuda.h"
#include "reduce.h"

typedef mpscy_conv_geom conv_geom;

/* y[s, o, u, v] = bias[o] + sum over (ki, kj) with u = i sh - ph + ki dh, v = j sw - pw + kj dw for
 * an input position (i, j), and over the group's input channels c, of x[s, c, i, j] W[c, o', ki, kj] */
__global__ void convt_forward(float *y, const float *x, const float *w, const float *bias, conv_geom g, int64_t b) {
    // y (b, g.c, g.h, g.w), x (b, g.oc, g.oh, g.ow)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, ohw = g.oh * g.ow;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < b * g.c * g.h * g.w;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = e % g.w, u = e / g.w % g.h, o = e / (g.w * g.h) % g.c, s = e / (g.w * g.h * g.c);
        const int64_t grp = o / cog, ol = o % cog;
        float acc = 0.0f;
        for (int64_t ki = 0; ki < g.kh; ki++) {
            const int64_t t = u + g.ph - ki * g.dh;
            if (t < 0 || t % g.sh) continue;
            const int64_t i = t / g.sh;
            if (i >= g.oh) continue;
            for (int64_t kj = 0; kj < g.kw; kj++) {
                const int64_t r = v + g.pw - kj * g.dw;
                if (r < 0 || r % g.sw) continue;
                const int64_t j = r / g.sw;
                if (j >= g.ow) continue;
                const float *xs = x + (s * g.oc + grp * g.ocg) * ohw + i * g.ow + j;
                const float *ws = w + (grp * g.ocg * cog + ol) * taps + ki * g.kw + kj;
                for (int64_t c = 0; c < g.ocg; c++) acc += xs[c * ohw] * ws[c * cog * taps];
            }
        }
        y[e] = bias ? acc + bias[o] : acc;
    }
}

/* dx[s, c, i, j] = sum over (ki, kj) and the group's output channels o of W[c, o', ki, kj]
 * dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw] (inside the output), added to dx when accumulating */
__global__ void convt_dgrad(float *dx, const float *dy, const float *w, conv_geom g, int64_t b, int accum) {
    // dx (b, g.oc, g.oh, g.ow), dy (b, g.c, g.h, g.w)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, hw = g.h * g.w;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < b * g.oc * g.oh * g.ow;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = e % g.ow, i = e / g.ow % g.oh, c = e / (g.ow * g.oh) % g.oc, s = e / (g.ow * g.oh * g.oc);
        const int64_t grp = c / g.ocg;
        float acc = 0.0f;
        for (int64_t ki = 0; ki < g.kh; ki++) {
            const int64_t u = i * g.sh - g.ph + ki * g.dh;
            if (u < 0 || u >= g.h) continue;
            for (int64_t kj = 0; kj < g.kw; kj++) {
                const int64_t v = j * g.sw - g.pw + kj * g.dw;
                if (v < 0 || v >= g.w) continue;
                const float *ds = dy + (s * g.c + grp * cog) * hw + u * g.w + v;
                const float *ws = w + c * cog * taps + ki * g.kw + kj;
                for (int64_t o = 0; o < cog; o++) acc += ds[o * hw] * ws[o * taps];
            }
        }
        dx[e] = accum ? dx[e] + acc : acc;
    }
}

/* a block per weight element (c, o', ki, kj): the sum over samples and input positions of
 * x[s, c, i, j] dy[s, o, i sh - ph + ki dh, j sw - pw + kj dw], each thread's positions in order,
 * then the block's sum (reduce.h, a fixed order) */
__global__ void convt_wgrad(float *dw, const float *x, const float *dy, conv_geom g, int64_t b) {
    // dw (g.oc, g.c / groups, kh, kw), x (b, g.oc, g.oh, g.ow), dy (b, g.c, g.h, g.w)
    cu_pdl_enter();
    const int64_t cog = g.c / g.groups, taps = g.kh * g.kw, ohw = g.oh * g.ow, hw = g.h * g.w;
    for (int64_t k = blockIdx.x; k < g.oc * cog * taps; k += gridDim.x) {
        const int64_t kj = k % g.kw, ki = k / g.kw % g.kh, ol = k / taps % cog, c = k / (taps * cog);
        const int64_t o = c / g.ocg * cog + ol;
        float acc = 0.0f;
        for (int64_t p = threadIdx.x; p < b * ohw; p += blockDim.x) {
            const int64_t s = p / ohw, i = p % ohw / g.ow, j = p % g.ow;
            const int64_t u = i * g.sh - g.ph + ki * g.dh, v = j * g.sw - g.pw + kj * g.dw;
            if (u < 0 || u >= g.h || v < 0 || v >= g.w) continue;
            acc += x[(s * g.oc + c) * ohw + i * g.ow + j] * dy[(s * g.c + o) * hw + u * g.w + v];
        }
        acc = block_sum(acc);
        if (threadIdx.x == 0) dw[k] = acc;
    }
}

/* a block per output channel: db[o] = the sum of dy[:, o] over samples and positions */
__global__ void convt_bgrad(float *db, const float *dy, conv_geom g, int64_t b) {
    cu_pdl_enter();
    const int64_t hw = g.h * g.w;
    for (int64_t o = blockIdx.x; o < g.c; o += gridDim.x) {
        float acc = 0.0f;
        for (int64_t p = threadIdx.x; p < b * hw; p += blockDim.x) acc += dy[(p / hw * g.c + o) * hw + p % hw];
        acc = block_sum(acc);
        if (threadIdx.x == 0) db[o] = acc;
    }
}

int cu_convt_forward(cu_graph *gr, const mpscy_node *n, int64_t b, int train, char *err, size_t en) {
    (void)train;
    const int64_t i = cu_node_index(gr, n);
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    CU_TRY(cu_launch(gr, convt_forward, cu_blocks(b * g.c * g.h * g.w, CU_THREADS, 8192), CU_THREADS, gr->stream,
                     gr->y[i], (const float *)gr->y[n->in[0]], (const float *)cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0),
                     (const float *)cu_tensor(gr, n, MPSCY_ROLE_PARAM, 1), g, b),
           "convt_forward");
    return CU_LAUNCHED("convt_forward");
}

int cu_convt_backward(cu_graph *gr, const mpscy_node *n, int64_t b, char *err, size_t en) {
    const int64_t i = cu_node_index(gr, n);
    const conv_geom g = mpscy_conv_geometry(&gr->plan, n);
    const float *dy = gr->dy[i], *x = gr->y[n->in[0]], *w = cu_tensor(gr, n, MPSCY_ROLE_PARAM, 0);
    float *dx = gr->dy[n->in[0]], *dw = cu_tensor_grad(gr, n, 0), *db = cu_tensor_grad(gr, n, 1);
    if (dx) {
        CU_TRY(cu_launch(gr, convt_dgrad, cu_blocks(b * g.oc * g.oh * g.ow, CU_THREADS, 8192), CU_THREADS, gr->stream,
                         dx, dy, w, g, b, (int)n->accum[0]),
               "convt_dgrad");
        const int st = CU_LAUNCHED("convt_dgrad");
        if (st != MPSCY_OK) return st;
    }
    if (dw) {
        CU_TRY(cu_launch(gr, convt_wgrad, cu_blocks(g.oc * (g.c / g.groups) * g.kh * g.kw, 1, 65535), CU_THREADS,
                         gr->stream, dw, x, dy, g, b),
               "convt_wgrad");
        const int st = CU_LAUNCHED("convt_wgrad");
        if (st != MPSCY_OK) return st;
    }
    if (db) {
        CU_TRY(cu_launch(gr, convt_bgrad, cu_blocks(g.c, 1, 65535), CU_THREADS, gr->stream, db, dy, g, b),
               "convt_bgrad");
        return CU_LAUNCHED("convt_bgrad");
    }
    return MPSCY_OK;
}
