/* im2col.c — the convolution's columns on the CPU (im2col.h): for each tap its valid output rows
 * and columns, copies of input rows into the columns (im2col) and their sums back into an input
 * gradient (col2im), a band of output rows of a chunk of samples at a time; a strided input
 * split into its stride phases first, so that each tap's copies are contiguous. */
#include "im2col.h"

#include <string.h>

/* First and one-past-last output index o with 0 <= o*s - p + off < in (off = kernel tap * d). */
static void valid_range(int64_t *lo, int64_t *hi, int64_t out, int64_t in, int64_t s, int64_t p, int64_t off) {
    int64_t a = p - off;                       /* need o*s >= a */
    int64_t l = a <= 0 ? 0 : (a + s - 1) / s;
    int64_t b = in + p - off;                  /* need o*s < b */
    int64_t h = b <= 0 ? 0 : (b + s - 1) / s;
    *lo = l < out ? l : out;
    *hi = h < out ? h : out;
    if (*hi < *lo) *hi = *lo;
}

/* d[i] = s[i * stride]; strides 1 and 2 get their own loops, which the compiler vectorizes */
static inline void gather_row(float *restrict d, const float *restrict s, int64_t n, int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; i++) d[i] = s[i];
    else if (stride == 2)
        for (int64_t i = 0; i < n; i++) d[i] = s[2 * i];
    else
        for (int64_t i = 0; i < n; i++) d[i] = s[i * stride];
}

/* d[i * stride] += s[i], likewise */
static inline void scatter_add_row(float *restrict d, const float *restrict s, int64_t n, int64_t stride) {
    if (stride == 1)
        for (int64_t i = 0; i < n; i++) d[i] += s[i];
    else if (stride == 2)
        for (int64_t i = 0; i < n; i++) d[2 * i] += s[i];
    else
        for (int64_t i = 0; i < n; i++) d[i * stride] += s[i];
}

/* floor(a / s) for s > 0 */
static inline int64_t floor_div(int64_t a, int64_t s) { return a >= 0 ? a / s : -((-a + s - 1) / s); }

/* One tap (ki, kj): the output columns [lo, hi) and rows [olo, ohi) whose input lies inside the
 * (unpadded) image, and where output (oh, o) reads in a channel's planes: src + oh * rstep +
 * o * step, src counted from the channel's first plane (its value for (0, 0) may be negative,
 * but every valid position's is not). */
typedef struct {
    int64_t lo, hi, olo, ohi, src, rstep, step;
} conv_tap;

static conv_tap tap_at(const conv_geom *g, int64_t ki, int64_t kj) {
    conv_tap t;
    valid_range(&t.lo, &t.hi, g->ow, g->w, g->sw, g->pw, kj * g->dw);
    valid_range(&t.olo, &t.ohi, g->oh, g->h, g->sh, g->ph, ki * g->dh);
    int64_t r = ki * g->dh - g->ph, c = kj * g->dw - g->pw;  /* input (row, col) of output (0, 0) */
    if (use_phases(g)) {
        int64_t qr = floor_div(r, g->sh), qc = floor_div(c, g->sw), ws = phase_w(g);
        int64_t phase = (r - qr * g->sh) * g->sw + (c - qc * g->sw);
        t.src = phase * phase_h(g) * ws + qr * ws + qc;
        t.rstep = ws;
        t.step = 1;
    } else {
        t.src = r * g->w + c;
        t.rstep = g->sh * g->w;
        t.step = g->sw;
    }
    return t;
}

/* Output rows of one tap are one contiguous run in its plane when they are as wide as the
 * plane's rows (stride 1 with OW == W, or a phase plane with OW == WS). */
static int contiguous(const conv_geom *g, const conv_tap *t) {
    return t->step == 1 && t->rstep == g->ow && t->ohi > t->olo && t->hi > t->lo;
}

/* where output row oh's first valid column reads in a channel's planes */
static inline int64_t tap_src(const conv_tap *t, int64_t oh) { return t->src + oh * t->rstep + t->lo * t->step; }

/* Taps are handled TAP_BLOCK at a time, each block's geometry computed once for every channel and
 * sample (a channel's planes stay in cache across the block's taps). */
#define TAP_BLOCK 64

/* One input row split by column phase: phase pc's WS values at d + pc * pstride, zero-padded;
 * stride 2 in one pass over the row. Inlined into phase_split's SIMD clones. */
static inline void split_row(float *restrict d, int64_t pstride, const float *restrict s, int64_t w, int64_t sw,
                               int64_t ws) {
    if (sw == 2) {
        int64_t half = w / 2;
        for (int64_t j = 0; j < half; j++) {
            d[j] = s[2 * j];
            d[pstride + j] = s[2 * j + 1];
        }
        if (w % 2) {
            d[half] = s[w - 1];
            d[pstride + half] = 0.0f;
        }
        return;
    }
    for (int64_t pc = 0; pc < sw; pc++) {
        int64_t n = (w - pc + sw - 1) / sw;
        for (int64_t j = 0; j < n; j++) d[pc * pstride + j] = s[j * sw + pc];
        for (int64_t j = n; j < ws; j++) d[pc * pstride + j] = 0.0f;
    }
}

/* split_row undone: the row from its column phases */
static inline void merge_row(float *restrict d, const float *restrict s, int64_t pstride, int64_t w, int64_t sw) {
    if (sw == 2) {
        int64_t half = w / 2;
        for (int64_t j = 0; j < half; j++) {
            d[2 * j] = s[j];
            d[2 * j + 1] = s[pstride + j];
        }
        if (w % 2) d[w - 1] = s[half];
        return;
    }
    for (int64_t pc = 0; pc < sw; pc++)
        for (int64_t j = 0; pc + j * sw < w; j++) d[pc + j * sw] = s[pc * pstride + j];
}

/* xp (planes, sh*sw phases, HS, WS) from x (planes, H, W); a phase row past the input (H not a
 * multiple of sh) is left as it was: no tap reads it */
CPU_SIMD void cpu_phase_split(float *xp, const float *x, const conv_geom *g, int64_t planes) {
    int64_t hs = phase_h(g), ws = phase_w(g), ps = hs * ws, pf = plane_floats(g);
    for (int64_t p = 0; p < planes; p++) {
        float *d = xp + p * pf;
        for (int64_t row = 0; row < g->h; row++)
            split_row(d + ((row % g->sh) * g->sw * hs + row / g->sh) * ws, ps, x + (p * g->h + row) * g->w,
                      g->w, g->sw, ws);
    }
}

/* dx (planes, H, W) from its phases dxp (planes, sh*sw phases, HS, WS): phase_split undone */
CPU_SIMD void cpu_phase_merge(float *dx, const float *dxp, const conv_geom *g, int64_t planes) {
    int64_t hs = phase_h(g), ws = phase_w(g), pf = plane_floats(g);
    for (int64_t p = 0; p < planes; p++)
        for (int64_t row = 0; row < g->h; row++)
            merge_row(dx + (p * g->h + row) * g->w, dxp + p * pf + ((row % g->sh) * g->sw * hs + row / g->sh) * ws,
                      hs * ws, g->w, g->sw);
}

/* zeroes the columns outside [lo, hi) of the valid rows of one sample's (OH, OW) block */
static void zero_edge_columns(float *blk, const conv_geom *g, const conv_tap *t) {
    for (int64_t oh = t->olo; oh < t->ohi; oh++) {
        for (int64_t o = 0; o < t->lo; o++) blk[oh * g->ow + o] = 0.0f;
        for (int64_t o = t->hi; o < g->ow; o++) blk[oh * g->ow + o] = 0.0f;
    }
}

/* im2col of one tap and one sample: dst (OH, OW), its row of the columns, from xc, one input
 * channel's planes */
static inline void tap_gather(float *dst, const float *xc, const conv_geom *g, const conv_tap *t) {
    if (t->olo > 0) memset(dst, 0, (size_t)(t->olo * g->ow) * sizeof(float));
    if (contiguous(g, t)) {
        /* one copy from the first to the last valid element, then zero the edge columns */
        memcpy(dst + t->olo * g->ow + t->lo, xc + tap_src(t, t->olo),
               (size_t)((t->ohi - t->olo - 1) * g->ow + t->hi - t->lo) * sizeof(float));
        zero_edge_columns(dst, g, t);
    } else {
        for (int64_t oh = t->olo; oh < t->ohi; oh++) {
            float *d = dst + oh * g->ow;
            for (int64_t o = 0; o < t->lo; o++) d[o] = 0.0f;
            gather_row(d + t->lo, xc + tap_src(t, oh), t->hi - t->lo, t->step);
            for (int64_t o = t->hi; o < g->ow; o++) d[o] = 0.0f;
        }
    }
    if (t->ohi < g->oh) memset(dst + t->ohi * g->ow, 0, (size_t)((g->oh - t->ohi) * g->ow) * sizeof(float));
}

/* tap (ki, kj) of output rows [r0, r0 + nr) as a tap of a convolution of nr output rows */
static conv_tap band_tap(const conv_geom *g, int64_t ki, int64_t kj, int64_t r0, int64_t nr) {
    conv_tap t = tap_at(g, ki, kj);
    int64_t lo = t.olo - r0, hi = t.ohi - r0;
    t.olo = lo < 0 ? 0 : lo > nr ? nr : lo;
    t.ohi = hi < t.olo ? t.olo : hi > nr ? nr : hi;
    t.src += r0 * t.rstep;
    return t;
}

/* col2im of one tap and one sample: xc (one channel's planes) += src (OH, OW), whose edge
 * columns it zeroes when the tap is contiguous */
static inline void tap_scatter(float *xc, float *src, const conv_geom *g, const conv_tap *t) {
    if (contiguous(g, t)) {
        /* zero the edge columns, then one add over the span: they add 0 elsewhere */
        zero_edge_columns(src, g, t);
        scatter_add_row(xc + tap_src(t, t->olo), src + t->olo * g->ow + t->lo,
                        (t->ohi - t->olo - 1) * g->ow + t->hi - t->lo, 1);
        return;
    }
    for (int64_t oh = t->olo; oh < t->ohi; oh++)
        scatter_add_row(xc + tap_src(t, oh), src + oh * g->ow + t->lo, t->hi - t->lo, t->step);
}

/* The columns col (K, ld), rows ordered (c, ki, kj), of output rows [r0, r0 + nr) of bc samples
 * (bc*nr*OW of each row's ld), and the image xs (bc, C, plane_floats), the input or its phase
 * planes: im2col (back 0) writes col from xs; col2im (back 1) adds col into xs, zeroing col's
 * edge columns. */
static void columns(float *col, int64_t ld, float *xs, const conv_geom *g, int64_t bc, int64_t r0, int64_t nr,
                    int back) {
    conv_geom gb = *g;  /* the rows as a convolution of nr output rows */
    gb.oh = nr;
    gb.ohw = nr * g->ow;
    int64_t pf = plane_floats(g), taps = g->kh * g->kw;
    conv_tap tb[TAP_BLOCK];
    for (int64_t t0 = 0; t0 < taps; t0 += TAP_BLOCK) {
        int64_t nb = taps - t0 < TAP_BLOCK ? taps - t0 : TAP_BLOCK;
        for (int64_t q = 0; q < nb; q++) tb[q] = band_tap(g, (t0 + q) / g->kw, (t0 + q) % g->kw, r0, nr);
        for (int64_t c = 0; c < g->c; c++)
            for (int64_t q = 0; q < nb; q++) {
                float *row = col + (c * taps + t0 + q) * ld;
                for (int64_t b = 0; b < bc; b++) {
                    float *xc = xs + (b * g->c + c) * pf;  // one channel's planes
                    if (back) tap_scatter(xc, row + b * gb.ohw, &gb, &tb[q]);
                    else tap_gather(row + b * gb.ohw, xc, &gb, &tb[q]);
                }
            }
    }
}

void cpu_im2col(float *col, int64_t ld, const float *xs, const conv_geom *g, int64_t bc, int64_t r0, int64_t nr) {
    columns(col, ld, (float *)xs, g, bc, r0, nr, 0);  /* xs is only read */
}

void cpu_col2im(float *dxs, float *col, int64_t ld, const conv_geom *g, int64_t bc, int64_t r0, int64_t nr) {
    columns(col, ld, dxs, g, bc, r0, nr, 1);
}
