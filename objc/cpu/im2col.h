/* im2col.h — the convolution's columns on the CPU (im2col.c): a tap's valid rows and columns,
 * a strided input split into its stride phases, and im2col / col2im of a band of output rows of
 * a chunk of samples. conv.c's products read and write them; nothing here multiplies. */
#ifndef MPSCY_CPU_IM2COL_H
#define MPSCY_CPU_IM2COL_H

#include "cpu.h"

typedef mpscy_conv_geom conv_geom;

/* A strided convolution whose kernel has more taps than the stride has phases (3x3 at stride 2)
 * first splits each input plane into its sh*sw phase planes, plane (pr, pc) holding the input's
 * rows pr, pr + sh, ... and columns pc, pc + sw, ... (each (HS, WS), HS = ceil(H / sh), padded
 * with zeros); every tap then reads one phase plane at stride 1, so its columns are contiguous
 * copies as at stride 1 instead of strided gathers, row by row. */
static inline int use_phases(const conv_geom *g) { return (g->sh > 1 || g->sw > 1) && g->kh * g->kw > g->sh * g->sw; }
static inline int64_t phase_h(const conv_geom *g) { return (g->h + g->sh - 1) / g->sh; }
static inline int64_t phase_w(const conv_geom *g) { return (g->w + g->sw - 1) / g->sw; }
/* floats of one input channel's planes as im2col reads them: (H, W), or its phases */
static inline int64_t plane_floats(const conv_geom *g) {
    return use_phases(g) ? g->sh * g->sw * phase_h(g) * phase_w(g) : g->h * g->w;
}

/* xp (planes, sh*sw phases, HS, WS) from x (planes, H, W); dx from its phases, undone */
void cpu_phase_split(float *xp, const float *x, const conv_geom *g, int64_t planes);
void cpu_phase_merge(float *dx, const float *dxp, const conv_geom *g, int64_t planes);

/* the columns col (K, ld), rows ordered (c, ki, kj), of output rows [r0, r0 + nr) of bc samples,
 * from the image xs (bc, C, plane_floats): the input or its phase planes; col2im adds col into
 * dxs, zeroing col's edge columns */
void cpu_im2col(float *col, int64_t ld, const float *xs, const conv_geom *g, int64_t bc, int64_t r0, int64_t nr);
void cpu_col2im(float *dxs, float *col, int64_t ld, const conv_geom *g, int64_t bc, int64_t r0, int64_t nr);

#endif /* MPSCY_CPU_IM2COL_H */
