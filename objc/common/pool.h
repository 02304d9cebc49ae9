/* pool.h — mpscy's own worker threads: see pool.c. */
#ifndef MPSCY_POOL_H
#define MPSCY_POOL_H

#include "../backend.h"

/* one spin-wait pause (a waiting loop's body) */
#if defined(__x86_64__) || defined(__i386__)
#define MPSCY_CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define MPSCY_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define MPSCY_CPU_RELAX() ((void)0)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* mpscy_parallel runs fn(ctx, t, nt) for t in 0..nt-1 (each t once, on whichever thread claims
 * it), returns when all are done, and returns nt. A NULL pool, a nested call or a forked child
 * runs fn(ctx, 0, 1). */
typedef struct mpscy_pool mpscy_pool;
typedef void (*mpscy_task)(void *ctx, int32_t t, int32_t nt);
/* threads, the caller included; 1 or fewer: *out = NULL (everything on the caller). The pool's
 * bytes are counted on stats when given. */
int mpscy_pool_create(mpscy_stats *stats, int32_t threads, mpscy_pool **out);
void mpscy_pool_destroy(mpscy_pool *p);
int32_t mpscy_parallel(mpscy_pool *p, mpscy_task fn, void *ctx);
/* 1 on a thread running a task of some pool (a nested mpscy_parallel runs inline there) */
int mpscy_pool_in_region(void);
/* [lo, hi): part t of nt of the range [0, n) */
void mpscy_split(int64_t n, int32_t t, int32_t nt, int64_t *lo, int64_t *hi);

#ifdef __cplusplus
}
#endif
#endif /* MPSCY_POOL_H */
