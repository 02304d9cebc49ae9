/* plan_caps.h — what plan.c and plan_node.c share: the planner's size bounds and the arithmetic
 * that saturates at them, and the per-node rules plan_node.c exports to plan.c. Private to
 * objc/common. */
#ifndef MPSCY_PLAN_CAPS_H
#define MPSCY_PLAN_CAPS_H

#include "plan.h"

#include <stddef.h>
#include <string.h>

/* Sizes never wrap: a dimension may be at most PLAN_MAX_DIM (so that window and padding
 * arithmetic stays in int64), and every count, offset and slab total saturates just above
 * PLAN_CAP floats (2^58 bytes, past any device's memory), where the build refuses the model
 * rather than plan a slab too small for its writes. The BLAS products take 32-bit dimensions:
 * a Dense's input features and a convolution's K (C/groups x kh x kw) and positions (OH x OW)
 * stay below 2^31. */
#define PLAN_MAX_DIM ((int64_t)1 << 48)
#define PLAN_CAP ((int64_t)1 << 56)
#define PLAN_BLAS_MAX ((int64_t)0x7fffffff)

static inline int64_t cap_mul(int64_t a, int64_t b) {
    int64_t m;
    return a < 0 || b < 0 || __builtin_mul_overflow(a, b, &m) || m > PLAN_CAP ? PLAN_CAP + 1 : m;
}

static inline int64_t cap_add(int64_t a, int64_t b) {
    int64_t m;
    return __builtin_add_overflow(a, b, &m) || m > PLAN_CAP ? PLAN_CAP + 1 : m;
}

static inline int64_t capped_count(int32_t rank, const int64_t *shape) {
    int64_t c = 1;
    for (int32_t i = 0; i < rank; i++) c = cap_mul(c, shape[i]);
    return c;
}

static inline void set_shape(int32_t *rank, int64_t *shape, int32_t r, const int64_t *s) {
    *rank = r;
    for (int32_t i = 0; i < MPSCY_MAX_RANK; i++) shape[i] = i < r ? s[i] : 0;
}

/* node i's output shape from its inputs, its options checked, its tensors added (plan_node.c) */
int mpscy_plan_node(mpscy_plan *p, int32_t i, const char *component, char *err, size_t errlen);
/* how many inputs a layer kind takes (-1: two or more), and its name for messages */
int mpscy_plan_inputs(int32_t kind);
const char *mpscy_plan_kind_name(int32_t kind);

#endif
