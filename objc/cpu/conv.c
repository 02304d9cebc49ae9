/* conv.c — Conv2D and ConvTranspose2D on the CPU (NCHW, weight (OC, C / groups, KH, KW) as in
 * PyTorch; a transposed convolution runs the convolution it transposes backwards). Each worker
 * thread takes a share of the batch and, a chunk of samples at a time, builds the im2col matrix
 * (C*KH*KW, chunk*OH*OW; im2col.c), runs one single-threaded product per group (cpu_sgemm: gemm.c's
 * kernels on a CPU with AVX-512, else BLAS) and scatters the result to NCHW with the bias; backward recomputes the
 * columns instead of saving them and sums per-thread weight gradients. A sample whose columns
 * exceed L2 is done in bands of output rows instead (conv_bands), each band's columns built and
 * used while in L2 (32->32 channels at 64x64, 16 samples, 2 cores: forward 12.9 -> 7.7 ms). A strided input is
 * split into its stride phases first, so that the columns are contiguous copies. A ReLU that
 * is the convolution's only consumer is computed here, on data already in cache. Stride,
 * padding, dilation and groups are general; no Winograd, no direct convolution. A ConvTranspose2D
 * node's geometry (mpscy_conv_geometry) is that convolution's, from the node's output back to its
 * input: its forward is the convolution's input gradient (the backward task with no weight
 * gradient, its planes started from the bias), its input gradient the convolution's forward (accumulating when the
 * input has other consumers), its weight gradient the convolution's with x and dy swapped. */
#include "im2col.h"
#include "../common/activation_math.h"

#include <string.h>

/* Columns per GEMM: whole samples, about this many floats of im2col matrix at most, so that
 * one chunk's columns stay in L2 between im2col and the GEMM (measured: larger is slower); the
 * budget of a band too (2^16 to 2^19 measured: none faster). */
#define CONV_COL_FLOATS (1 << 17)

static conv_geom geom(const mpscy_plan *p, const mpscy_node *n) { return mpscy_conv_geometry(p, n); }

/* Samples per chunk when `threads` share a built batch of `batch`. */
static int64_t conv_chunk(const conv_geom *g, int64_t batch, int32_t threads) {
    int64_t per = g->k * g->ohw, chunk = CONV_COL_FLOATS / (per > 0 ? per : 1);
    int64_t t = threads > 1 ? threads : 1, share = (batch + t - 1) / t;
    if (chunk < 1) chunk = 1;
    return chunk < share ? chunk : share;
}

/* A weight gradient's product sums 16 lanes per element once per band (gemm.c's B^T kernel), a
 * cost bands of 256 to 448 columns repay only where a sample's columns exceed twice the L2
 * (64->64 channels at 32x32 or 32->64 at 64x64 stride 2 stepped 5-10% slower in bands). */
#define CONV_DW_BAND_FLOATS (1 << 20)

/* Bands of output rows per sample: 1 (whole samples, chunked as above) unless one sample's
 * columns exceed CONV_COL_FLOATS (CONV_DW_BAND_FLOATS with a weight gradient, dw); then each band's fit in it where one row's do, and are at least
 * 256 where OH allows (gemm.c's B^T kernel takes k >= 256). Band i is rows [i*OH/nb,
 * (i+1)*OH/nb): set by the geometry, never by the thread count. */
static int64_t conv_bands(const conv_geom *g, int dw) {
    if (g->k * g->ohw <= (dw ? CONV_DW_BAND_FLOATS : CONV_COL_FLOATS)) return 1;
    int64_t r = CONV_COL_FLOATS / (g->k * g->ow), rmin = (256 + g->ow - 1) / g->ow;
    if (r < rmin) r = rmin;
    int64_t nb = (g->oh + r - 1) / r, most = g->oh / rmin;  /* most: bands of rmin rows or more */
    if (nb > most) nb = most;
    return nb > 1 ? nb : 1;
}

/* Row stride of the columns and of dout: chunk*OHW, or in bands the widest band's columns
 * rounded up to an odd multiple of 16 floats, so that the rows of the B panel gemm.c keeps in
 * L1 spread over its sets (measured: 3-8% faster than 448 or 256 columns unpadded). */
static int64_t conv_ld(const conv_geom *g, int64_t chunk, int dw) {
    int64_t nb = conv_bands(g, dw);
    if (nb == 1) return chunk * g->ohw;
    int64_t ld = ((g->oh + nb - 1) / nb * g->ow + 15) / 16 * 16;
    return (ld / 16) % 2 ? ld : ld + 16;
}

/* ReLU's value and gradient rule (mpscy_relu_pass); both operands are loaded, so loops of it
 * vectorize */
static inline float select_pos(float m, float v) { return mpscy_relu_pass(m, v); }

/* dout (OC, bc*OHW) from dy (bc, OC, OHW), zeroed where the fused ReLU's output ry (bc, OC, OHW)
 * is not positive (ry NULL: no ReLU), adding each channel's sum (in double, cpu_lanes_sum) into db
 * (OC) when given. */
static void gather_rows(float *dout, float *db, const float *dy, const float *ry, int64_t oc, int64_t bc,
                        int64_t ohw) {
    int64_t n = bc * ohw;
    for (int64_t o = 0; o < oc; o++) {
        double acc[CPU_LANES] = {0};
        for (int64_t s = 0; s < bc; s++) {
            const float *restrict src = dy + (s * oc + o) * ohw;
            float *restrict dst = dout + o * n + s * ohw;
            if (ry) {
                const float *restrict m = ry + (s * oc + o) * ohw;
                for (int64_t i = 0; i < ohw; i++) dst[i] = select_pos(m[i], src[i]);
            } else {
                for (int64_t i = 0; i < ohw; i++) dst[i] = src[i];
            }
            cpu_lanes_sum(acc, dst, ohw);
        }
        if (db) db[o] += (float)cpu_lanes_total(acc);
    }
}

/* gather_rows for the n positions from off of one sample: dout (OC, ld) from dy (OC, OHW), each
 * channel's sum into its lanes acc (OC, CPU_LANES) when given, rotated so that each element
 * lands in the lane, and in the order, of the whole sample's sum: gather_rows' bits */
static void gather_band(float *dout, int64_t ld, double *acc, const float *dy, const float *ry, int64_t oc,
                        int64_t ohw, int64_t off, int64_t n) {
    for (int64_t o = 0; o < oc; o++) {
        const float *restrict src = dy + o * ohw + off;
        float *restrict dst = dout + o * ld;
        if (ry) {
            const float *restrict m = ry + o * ohw + off;
            for (int64_t i = 0; i < n; i++) dst[i] = select_pos(m[i], src[i]);
        } else {
            for (int64_t i = 0; i < n; i++) dst[i] = src[i];
        }
        if (!acc) continue;
        double a[CPU_LANES], *ao = acc + o * CPU_LANES;
        for (int64_t k = 0; k < CPU_LANES; k++) a[k] = ao[(off + k) % CPU_LANES];
        cpu_lanes_sum(a, dst, n);
        for (int64_t k = 0; k < CPU_LANES; k++) ao[(off + k) % CPU_LANES] = a[k];
    }
}

/* Work of one thread: samples [lo, hi) in chunks, with its own slice of the workspace. */
typedef struct conv_job {
    const conv_geom *g;
    float *y, *dx, *dw, *db, *ws;   /* ws: per-thread slices of wst floats */
    const float *x, *w, *bias, *dy; /* bias: added by a forward, or the backward task's start (a transposed forward) */
    const float *ry;                /* backward with a fused ReLU: its output, the gradient mask */
    int64_t b, chunk, wst;
    int accum, relu;
    int64_t nb, ld;                 /* bands per sample (conv_bands), row stride of col and dout */
} conv_job;

/* y (bc, OC, OHW) from out (OC, bc*OHW) plus the bias, through ReLU when it is fused here, or
 * added to y (accum: a transposed convolution's input gradient, no bias or ReLU); out may already
 * be y (one sample), then the bias and ReLU apply in place. */
static void scatter_rows(float *y, const float *out, const float *bias, int64_t oc, int64_t bc, int64_t ohw, int relu,
                         int accum) {
    int64_t n = bc * ohw;
    for (int64_t o = 0; o < oc; o++) {
        float bo = bias ? bias[o] : 0.0f;
        for (int64_t s = 0; s < bc; s++) {
            float *dst = y + (s * oc + o) * ohw;  // (OHW); may be src itself, so not restrict
            const float *src = out + o * n + s * ohw;
            if (dst == src && !bias && !relu) continue;
            if (accum)
                for (int64_t i = 0; i < ohw; i++) dst[i] += src[i];
            else if (relu)
                for (int64_t i = 0; i < ohw; i++) dst[i] = select_pos(src[i] + bo, src[i] + bo);
            else
                for (int64_t i = 0; i < ohw; i++) dst[i] = src[i] + bo;
        }
    }
}

/* Thread t > 0 leaves its partial dW (OC, K/groups) and db (OC) after its columns. */
static float *partial_dw(const conv_job *j, int32_t t) {
    return t == 0 ? j->dw : j->ws + t * j->wst + (j->g->k + j->g->oc) * j->ld;
}

static float *partial_db(const conv_job *j, int32_t t) {
    return t == 0 ? j->db : partial_dw(j, t) + j->g->oc * j->g->kg;
}

/* Thread t's phase planes (chunk, C, plane_floats), after its partial dW and db; in bands a
 * second set follows, dx's, as x's are still read while dx is summed. */
static float *phase_slice(const conv_job *j, int32_t t) {
    const conv_geom *g = j->g;
    return j->ws + t * j->wst + (g->k + g->oc) * j->ld + g->oc * g->kg + g->oc;
}

/* In bands, thread t's bias gradient lanes (OC, CPU_LANES) in double, after the phase planes */
static double *band_lanes(const conv_job *j, int32_t t) {
    float *p = phase_slice(j, t) + (use_phases(j->g) ? 2 * j->g->c * plane_floats(j->g) : 0);
    return (double *)(((uintptr_t)p + 7) & ~(uintptr_t)7);
}

/* What im2col reads for samples [b0, b0 + bc): the input itself, or its phases split into
 * thread t's planes. */
static const float *conv_source(const conv_job *j, int32_t t, int64_t b0, int64_t bc) {
    const conv_geom *g = j->g;
    const float *x = j->x + b0 * g->c * g->h * g->w;  // (bc, C, H, W)
    if (!use_phases(g)) return x;
    cpu_phase_split(phase_slice(j, t), x, g, bc * g->c);
    return phase_slice(j, t);
}

/* One sample in bands: a band's columns, its products straight into y (each output sums its K as
 * a whole sample's does: the same bits), then its bias and ReLU */
static void forward_bands(const conv_job *j, int32_t t, int64_t b0) {
    const conv_geom *g = j->g;
    float *col = j->ws + t * j->wst, *y = j->y + b0 * g->oc * g->ohw;  // (K, ld), (OC, OHW)
    const float *xs = conv_source(j, t, b0, 1);
    for (int64_t i = 0; i < j->nb; i++) {
        int64_t r0 = i * g->oh / j->nb, nr = (i + 1) * g->oh / j->nb - r0, n = nr * g->ow;
        float *yb = y + r0 * g->ow;  // (OC, n) of row stride OHW
        cpu_im2col(col, j->ld, xs, g, 1, r0, nr);
        for (int64_t gi = 0; gi < g->groups; gi++)
            cpu_sgemm(0, 0, g->ocg, n, g->kg, 1.0f, j->w + gi * g->ocg * g->kg, g->kg, col + gi * g->kg * j->ld,
                      j->ld, j->accum ? 1.0f : 0.0f, yb + gi * g->ocg * g->ohw, g->ohw, 1);
        for (int64_t o = 0; o < g->oc; o++)
            scatter_rows(yb + o * g->ohw, yb + o * g->ohw, j->bias ? j->bias + o : NULL, 1, 1, n, j->relu, j->accum);
    }
}

static void conv_forward_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    int64_t lo, hi;
    cpu_split(j->b, t, nt, &lo, &hi);
    if (j->nb > 1) {
        for (int64_t b0 = lo; b0 < hi; b0++) forward_bands(j, t, b0);
        return;
    }
    for (int64_t b0 = lo; b0 < hi; b0 += j->chunk) {
        int64_t bc = hi - b0 < j->chunk ? hi - b0 : j->chunk, n = bc * g->ohw;
        float *col = j->ws + t * j->wst, *out = col + g->k * n;  // (K, n), (OC, n)
        float *y = j->y + b0 * g->oc * g->ohw;                     // (bc, OC, OHW)
        cpu_im2col(col, n, conv_source(j, t, b0, bc), g, bc, 0, g->oh);
        if (bc == 1) out = y;  /* one sample: (OC, OHW) is already NCHW (added to it when accumulating) */
        for (int64_t gi = 0; gi < g->groups; gi++)
            cpu_sgemm(0, 0, g->ocg, n, g->kg, 1.0f, j->w + gi * g->ocg * g->kg, g->kg, col + gi * g->kg * n, n,
                      bc == 1 && j->accum ? 1.0f : 0.0f, out + gi * g->ocg * n, n, 1);
        scatter_rows(y, out, j->bias, g->oc, bc, g->ohw, j->relu, j->accum);
    }
}

/* A depthwise Conv2D's forward at stride 1 (groups = C = OC, ocg 1): each output plane a stencil
 * of its own input plane. The plane is copied into a zero-padded one of row length WP, and each tap
 * (i, j), in the order of W's row, adds w[i, j] times one contiguous run of it to an accumulator
 * of OH rows of length WP (its last WP - OW columns of each row spent), so every tap is one long
 * vector loop; the valid columns then go to y with the bias and ReLU. Planes whose padded copy
 * and accumulator pass DW_FLOATS take the columns and the product. */
#define DW_FLOATS 16384
static int depthwise_direct(const conv_geom *g) {
    const int64_t wp = g->w + 2 * g->pw, hp = g->h + 2 * g->ph;
    return g->groups == g->c && g->ocg == 1 && g->sh == 1 && g->sw == 1 && hp * wp + g->oh * wp <= DW_FLOATS &&
           g->kh * g->kw <= 64;
}

CPU_SIMD static void depthwise_plane(const conv_geom *g, float *restrict pad, float *restrict acc, const float *x,
                                     const float *w) {
    const int64_t wp = g->w + 2 * g->pw, hp = g->h + 2 * g->ph, n = (g->oh - 1) * wp + g->ow;
    memset(pad, 0, (size_t)(hp * wp) * sizeof(float));
    for (int64_t r = 0; r < g->h; r++) memcpy(pad + (r + g->ph) * wp + g->pw, x + r * g->w, (size_t)g->w * sizeof(float));
    for (int64_t q = 0; q < n; q++) acc[q] = 0.0f;
    for (int64_t i = 0; i < g->kh; i++)
        for (int64_t k = 0; k < g->kw; k++) {
            const float wv = w[i * g->kw + k], *src = pad + i * g->dh * wp + k * g->dw;
            for (int64_t q = 0; q < n; q++) acc[q] += wv * src[q];
        }
}

static void depthwise_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    float buf[DW_FLOATS];
    const int64_t wp = g->w + 2 * g->pw, hp = g->h + 2 * g->ph;
    int64_t lo, hi;
    cpu_split(j->b * g->c, t, nt, &lo, &hi);
    for (int64_t p = lo; p < hi; p++) {
        const int64_t c = p % g->c;
        float *acc = buf + hp * wp, *y = j->y + p * g->ohw;  // (OH, WP), (OH, OW)
        depthwise_plane(g, buf, acc, j->x + p * g->h * g->w, j->w + c * g->kh * g->kw);
        for (int64_t r = 0; r < g->oh; r++) memcpy(y + r * g->ow, acc + r * wp, (size_t)g->ow * sizeof(float));
        scatter_rows(y, y, j->bias ? j->bias + c : NULL, 1, 1, g->ohw, j->relu, 0);
    }
}

/* the dot product over OH rows of OW (row stride WP): not over the spent columns, whose 0s would
 * meet input values no output reads (an Inf there, where the dilation passes OW, made NaN) */
CPU_SIMD static double depthwise_dot(const float *a, const float *b, int64_t rows, int64_t ow, int64_t ld) {
    double acc[CPU_LANES] = {0};
    for (int64_t r = 0; r < rows; r++) {
        const float *ar = a + r * ld, *br = b + r * ld;
        int64_t q = 0;
        for (; q + CPU_LANES <= ow; q += CPU_LANES)
            for (int k = 0; k < CPU_LANES; k++) acc[k] += (double)ar[q + k] * br[q + k];
        for (; q < ow; q++) acc[q % CPU_LANES] += (double)ar[q] * br[q];
    }
    return cpu_lanes_total(acc);
}

CPU_SIMD static void depthwise_scatter(float *restrict dst, const float *restrict src, float wv, int64_t n) {
    for (int64_t q = 0; q < n; q++) dst[q] += wv * src[q];
}

/* The depthwise backward, in the forward's layout: dy (through the fused ReLU's mask) copied into
 * rows of length WP (the spent columns 0); each tap's weight gradient the dot product of those rows
 * with the rows of the padded input the tap read, in double over lanes (cpu_lanes); the padded
 * input gradient each tap's weight times dy's run added at the tap's offset, its border then
 * dropped. The threads take channels, each summing its samples in order: the same bits on any
 * thread count. (The padded copy is the forward's, written out: the two as one helper with the
 * tap loop a separate call measured a forward 1.1 -> 1.4 ms.) */
static void depthwise_backward_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    float buf[DW_FLOATS];
    const int64_t wp = g->w + 2 * g->pw, hp = g->h + 2 * g->ph, n = (g->oh - 1) * wp + g->ow, taps = g->kh * g->kw;
    float *pad = buf, *dyw = buf + hp * wp;  // (HP, WP) the padded x or dx, (OH, WP) dy
    int64_t lo, hi;
    cpu_split(g->c, t, nt, &lo, &hi);
    for (int64_t c = lo; c < hi; c++) {
        double dw[64] = {0}, db[CPU_LANES] = {0};  /* taps <= 64 (depthwise_direct) */
        const float *w = j->w + c * taps;
        for (int64_t s = 0; s < j->b; s++) {
            const int64_t p = s * g->c + c;
            const float *dy = j->dy + p * g->ohw, *ry = j->relu ? j->ry + p * g->ohw : NULL;
            for (int64_t r = 0; r < g->oh; r++) {
                float *d = dyw + r * wp;
                for (int64_t q = 0; q < g->ow; q++) d[q] = ry ? select_pos(ry[r * g->ow + q], dy[r * g->ow + q]) : dy[r * g->ow + q];
                for (int64_t q = g->ow; q < wp && r < g->oh - 1; q++) d[q] = 0.0f;
                if (j->db) cpu_lanes_sum(db, d, g->ow);
            }
            if (j->dw) {
                const float *x = j->x + p * g->h * g->w;
                memset(pad, 0, (size_t)(hp * wp) * sizeof(float));
                for (int64_t r = 0; r < g->h; r++)
                    memcpy(pad + (r + g->ph) * wp + g->pw, x + r * g->w, (size_t)g->w * sizeof(float));
                for (int64_t i = 0; i < g->kh; i++)
                    for (int64_t k = 0; k < g->kw; k++)
                        dw[i * g->kw + k] += depthwise_dot(dyw, pad + i * g->dh * wp + k * g->dw, g->oh, g->ow, wp);
            }
            if (j->dx) {
                memset(pad, 0, (size_t)(hp * wp) * sizeof(float));
                for (int64_t i = 0; i < g->kh; i++)
                    for (int64_t k = 0; k < g->kw; k++)
                        depthwise_scatter(pad + i * g->dh * wp + k * g->dw, dyw, w[i * g->kw + k], n);
                float *dx = j->dx + p * g->h * g->w;
                for (int64_t r = 0; r < g->h; r++) {
                    const float *src = pad + (r + g->ph) * wp + g->pw;
                    if (j->accum)
                        for (int64_t q = 0; q < g->w; q++) dx[r * g->w + q] += src[q];
                    else
                        memcpy(dx + r * g->w, src, (size_t)g->w * sizeof(float));
                }
            }
        }
        for (int64_t k = 0; j->dw && k < taps; k++) j->dw[c * taps + k] = (float)dw[k];
        if (j->db) j->db[c] = (float)cpu_lanes_total(db);
    }
}

/* planes (n, plane floats each) set to 0, or with bias (a ConvTranspose2D's forward, which
 * col2im then adds to) to bias[k % c] for plane k */
static void fill_planes(float *d, const float *bias, int64_t n, int64_t c, int64_t plane) {
    if (!bias) {
        memset(d, 0, (size_t)(n * plane) * sizeof(float));
        return;
    }
    for (int64_t k = 0; k < n; k++)
        for (int64_t i = 0; i < plane; i++) d[k * plane + i] = bias[k % c];
}

/* One sample in bands: a band's dout (the bias gradient's lanes kept across bands), dW += dout
 * col^T (starting dW at a thread's first band), then dcol = W^T dout added into dx (or its
 * phases), so that dx sums a row's taps across two bands in band order. */
static void backward_bands(const conv_job *j, int32_t t, int64_t b0, float *dw, float *db, int first) {
    const conv_geom *g = j->g;
    float *col = j->ws + t * j->wst, *dout = col + g->k * j->ld;  // (K, ld), (OC, ld)
    const float *dyc = j->dy + b0 * g->oc * g->ohw, *ry = j->relu ? j->ry + b0 * g->oc * g->ohw : NULL;
    double *acc = db ? band_lanes(j, t) : NULL;  // (OC, CPU_LANES)
    if (acc) memset(acc, 0, (size_t)(g->oc * CPU_LANES) * sizeof(double));
    const float *xs = dw ? conv_source(j, t, b0, 1) : NULL;
    float *dxc = j->dx ? j->dx + b0 * g->c * g->h * g->w : NULL, *dxs = dxc;  // (C, H, W)
    if (dxc && use_phases(g)) {
        dxs = phase_slice(j, t) + g->c * plane_floats(g);
        if (j->accum) cpu_phase_split(dxs, dxc, g, g->c);
        else fill_planes(dxs, j->bias, g->c, g->c, plane_floats(g));
    } else if (dxc && !j->accum) {
        fill_planes(dxc, j->bias, g->c, g->c, g->h * g->w);
    }
    for (int64_t i = 0; i < j->nb; i++) {
        int64_t r0 = i * g->oh / j->nb, nr = (i + 1) * g->oh / j->nb - r0, n = nr * g->ow;
        gather_band(dout, j->ld, acc, dyc, ry, g->oc, g->ohw, r0 * g->ow, n);
        if (dw) {
            cpu_im2col(col, j->ld, xs, g, 1, r0, nr);
            for (int64_t gi = 0; gi < g->groups; gi++)
                cpu_sgemm(0, 1, g->ocg, g->kg, n, 1.0f, dout + gi * g->ocg * j->ld, j->ld, col + gi * g->kg * j->ld,
                          j->ld, first && i == 0 ? 0.0f : 1.0f, dw + gi * g->ocg * g->kg, g->kg, 1);
        }
        if (!dxc) continue;
        for (int64_t gi = 0; gi < g->groups; gi++)
            cpu_sgemm(1, 0, g->kg, n, g->ocg, 1.0f, j->w + gi * g->ocg * g->kg, g->kg, dout + gi * g->ocg * j->ld,
                      j->ld, 0.0f, col + gi * g->kg * j->ld, j->ld, 1);
        cpu_col2im(dxs, col, j->ld, g, 1, r0, nr);
    }
    if (dxc && use_phases(g)) cpu_phase_merge(dxc, dxs, g, g->c);
    for (int64_t o = 0; acc && o < g->oc; o++) db[o] += (float)cpu_lanes_total(acc + o * CPU_LANES);
}

static void conv_backward_task(void *ctx, int32_t t, int32_t nt) {
    const conv_job *j = ctx;
    const conv_geom *g = j->g;
    int64_t lo, hi;
    cpu_split(j->b, t, nt, &lo, &hi);
    float *dw = j->dw ? partial_dw(j, t) : NULL, *db = j->db ? partial_db(j, t) : NULL;  /* NULL: frozen */
    if (db) memset(db, 0, (size_t)g->oc * sizeof(float));
    if (dw && hi == lo) memset(dw, 0, (size_t)(g->oc * g->kg) * sizeof(float));
    if (j->nb > 1) {
        for (int64_t b0 = lo; b0 < hi; b0++) backward_bands(j, t, b0, dw, db, b0 == lo);
        return;
    }
    for (int64_t b0 = lo; b0 < hi; b0 += j->chunk) {
        int64_t bc = hi - b0 < j->chunk ? hi - b0 : j->chunk, n = bc * g->ohw;
        float *col = j->ws + t * j->wst, *dout = col + g->k * n;  // (K, n), (OC, n)
        const float *dyc = j->dy + b0 * g->oc * g->ohw;            // (bc, OC, OHW)
        gather_rows(dout, db, dyc, j->relu ? j->ry + b0 * g->oc * g->ohw : NULL, g->oc, bc, g->ohw);
        if (dw) {
            cpu_im2col(col, n, conv_source(j, t, b0, bc), g, bc, 0, g->oh);
            for (int64_t gi = 0; gi < g->groups; gi++)
                cpu_sgemm(0, 1, g->ocg, g->kg, n, 1.0f, dout + gi * g->ocg * n, n, col + gi * g->kg * n, n,
                          b0 == lo ? 0.0f : 1.0f, dw + gi * g->ocg * g->kg, g->kg, 1);
        }
        if (!j->dx) continue;
        float *dxc = j->dx + b0 * g->c * g->h * g->w;  // (bc, C, H, W)
        for (int64_t gi = 0; gi < g->groups; gi++)  /* the columns are spent: reuse them for dcol */
            cpu_sgemm(1, 0, g->kg, n, g->ocg, 1.0f, j->w + gi * g->ocg * g->kg, g->kg, dout + gi * g->ocg * n, n, 0.0f,
                      col + gi * g->kg * n, n, 1);
        if (use_phases(g)) {  /* the phase planes are spent too: sum into them (from dx's phases
                               * when accumulating, so each sum runs in the same order), then interleave */
            float *dxp = phase_slice(j, t);
            if (j->accum)
                cpu_phase_split(dxp, dxc, g, bc * g->c);
            else
                fill_planes(dxp, j->bias, bc * g->c, g->c, plane_floats(g));
            cpu_col2im(dxp, col, n, g, bc, 0, g->oh);
            cpu_phase_merge(dxc, dxp, g, bc * g->c);
            continue;
        }
        if (!j->accum) fill_planes(dxc, j->bias, bc * g->c, g->c, g->h * g->w);
        cpu_col2im(dxc, col, n, g, bc, 0, g->oh);
    }
}

/* floats of one thread's workspace slice: columns (K, ld), the output or its gradient as
 * (OC, ld), a partial dW and db, then the phase planes of a chunk when they are used; in bands
 * a second set of them and the bias gradient's lanes (OC, CPU_LANES) in double */
static int64_t conv_slice(const conv_geom *g, int64_t chunk, int dw) {
    int64_t banded = conv_bands(g, dw) > 1, phases = use_phases(g) ? (banded ? 2 : 1) * chunk * g->c * plane_floats(g) : 0;
    return (g->k + g->oc) * conv_ld(g, chunk, dw) + g->oc * g->kg + g->oc + phases + (banded ? 2 * CPU_LANES * g->oc + 2 : 0);
}

/* j's chunk-dependent fields: bands, row stride, slice */
static void conv_layout(conv_job *j) {
    j->nb = conv_bands(j->g, j->dw != NULL);
    j->ld = conv_ld(j->g, j->chunk, j->dw != NULL);
    j->wst = conv_slice(j->g, j->chunk, j->dw != NULL);
}

int64_t cpu_conv_workspace(const mpscy_plan *p, const mpscy_node *n) {
    conv_geom g = geom(p, n);
    if (n->kind == MPSCY_LAYER_CONV2D && depthwise_direct(&g)) return 0;  /* a stack buffer, no columns */
    int64_t chunk = conv_chunk(&g, p->batch, p->threads), a = conv_slice(&g, chunk, 0), b = conv_slice(&g, chunk, 1);
    return (p->threads > 1 ? p->threads : 1) * (a > b ? a : b);
}

/* The ReLU node that is the only consumer of conv node i, or -1. Such a ReLU is computed inside
 * the convolution (forward: into the ReLU's output, the convolution's own output stays unwritten;
 * backward: the ReLU's gradient mask applied while gathering), and the ReLU node does nothing. */
int32_t cpu_conv_fused_relu(const mpscy_plan *p, int32_t i) {
    if (p->nodes[i].kind != MPSCY_LAYER_CONV2D || p->nodes[i].consumers != 1 || i == p->output) return -1;
    for (int32_t k = i + 1; k < p->n_nodes; k++)
        if (p->nodes[k].in[0] == i && p->nodes[k].n_in == 1)
            return p->nodes[k].kind == MPSCY_LAYER_RELU ? k : -1;
    return -1;
}

void cpu_conv_forward(cpu_graph *gr, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    // y (b, OC, OH, OW), x (b, C, H, W), w (OC, C/groups, KH, KW), bias (OC) or NULL
    (void)train; (void)a;
    int32_t i = (int32_t)(n - gr->plan.nodes), r = cpu_conv_fused_relu(&gr->plan, i);
    conv_geom g = geom(&gr->plan, n);
    conv_job j = {&g, gr->y[r >= 0 ? r : i], NULL, NULL, NULL, gr->ws, gr->y[n->in[0]],
                  cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0), cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 1), NULL, NULL,
                  b, conv_chunk(&g, gr->plan.batch, gr->plan.threads), 0, 0, r >= 0, 0, 0};
    if (depthwise_direct(&g)) {
        cpu_parallel(gr->pool, depthwise_task, &j);
        return;
    }
    conv_layout(&j);
    cpu_parallel(gr->pool, conv_forward_task, &j);
}

void cpu_conv_backward(cpu_graph *gr, const mpscy_node *n, int64_t b) {
    // dx (b, C, H, W) or NULL, dw (OC, C/groups, KH, KW) and db (OC) or NULL, dy (b, OC, OH, OW)
    int32_t i = (int32_t)(n - gr->plan.nodes), r = cpu_conv_fused_relu(&gr->plan, i);
    conv_geom g = geom(&gr->plan, n);
    conv_job j = {&g, NULL, gr->dy[n->in[0]], cpu_tensor_grad(gr, n, 0), cpu_tensor_grad(gr, n, 1), gr->ws,
                  gr->y[n->in[0]], cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0), NULL, gr->dy[r >= 0 ? r : i],
                  r >= 0 ? gr->y[r] : NULL, b, conv_chunk(&g, gr->plan.batch, gr->plan.threads), 0, n->accum[0],
                  r >= 0, 0, 0};
    if (depthwise_direct(&g)) {
        cpu_parallel(gr->pool, depthwise_backward_task, &j);
        return;
    }
    conv_layout(&j);
    int32_t nt = cpu_parallel(gr->pool, conv_backward_task, &j);
    for (int32_t t = 1; t < nt; t++) {  /* sum the partial weight and bias gradients */
        const float *pw = j.dw ? partial_dw(&j, t) : NULL, *pb = j.db ? partial_db(&j, t) : NULL;
        for (int64_t k = 0; pw && k < g.oc * g.kg; k++) j.dw[k] += pw[k];
        for (int64_t k = 0; pb && k < g.oc; k++) j.db[k] += pb[k];
    }
}

/* ConvTranspose2D: y (b, OC', OH', OW') = the input gradient of the convolution g from y's shape
 * back to x's, with x in place of that convolution's output gradient, summed onto the bias */
void cpu_convt_forward(cpu_graph *gr, const mpscy_node *n, int64_t b, int train, const mpscy_step_args *a) {
    (void)train; (void)a;
    int32_t i = (int32_t)(n - gr->plan.nodes);
    conv_geom g = geom(&gr->plan, n);
    conv_job j = {&g, NULL, gr->y[i], NULL, NULL, gr->ws, NULL, cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0),
                  cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 1), gr->y[n->in[0]], NULL, b,
                  conv_chunk(&g, gr->plan.batch, gr->plan.threads), 0, 0, 0, 0, 0};
    conv_layout(&j);
    cpu_parallel(gr->pool, conv_backward_task, &j);
}

/* its input gradient: the convolution's forward of dy (no bias); its weight gradient: the
 * convolution's, with dy as that convolution's input and x as its output gradient; its bias
 * gradient: dy summed over the batch and positions, sample by sample in a fixed order */
void cpu_convt_backward(cpu_graph *gr, const mpscy_node *n, int64_t b) {
    int32_t i = (int32_t)(n - gr->plan.nodes);
    conv_geom g = geom(&gr->plan, n);
    const float *dy = gr->dy[i];
    int64_t chunk = conv_chunk(&g, gr->plan.batch, gr->plan.threads);
    if (gr->dy[n->in[0]]) {
        conv_job j = {&g, gr->dy[n->in[0]], NULL, NULL, NULL, gr->ws, dy, cpu_tensor(gr, n, MPSCY_ROLE_PARAM, 0), NULL,
                      NULL, NULL, b, chunk, 0, n->accum[0], 0, 0, 0};
        conv_layout(&j);
        cpu_parallel(gr->pool, conv_forward_task, &j);
    }
    float *dw = cpu_tensor_grad(gr, n, 0), *db = cpu_tensor_grad(gr, n, 1);
    if (dw) {
        conv_job j = {&g, NULL, NULL, dw, NULL, gr->ws, dy, NULL, NULL, gr->y[n->in[0]], NULL, b, chunk, 0, 0, 0, 0, 0};
        conv_layout(&j);
        int32_t nt = cpu_parallel(gr->pool, conv_backward_task, &j);
        for (int32_t t = 1; t < nt; t++) {
            const float *pw = partial_dw(&j, t);
            for (int64_t k = 0; k < g.oc * g.kg; k++) dw[k] += pw[k];
        }
    }
    if (db) {
        int64_t hw = g.h * g.w;
        for (int64_t c = 0; c < g.c; c++) {  /* in double: b x hw values a channel, 131,072 for a U-Net's */
            double acc[CPU_LANES] = {0};
            for (int64_t s = 0; s < b; s++) cpu_lanes_sum(acc, dy + (s * g.c + c) * hw, hw);
            db[c] = (float)cpu_lanes_total(acc);
        }
    }
}
