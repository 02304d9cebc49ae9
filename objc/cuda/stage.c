/* stage.c — see stage.h: pieces of a deferred batch copied by the staging threads, each flag
 * raised as its piece lands. The copy and its NaN/Inf check are _staging.h's (one pass). */
#include "stage.h"

#include "_staging.h"

int64_t cu_stage_piece(int64_t n) {
    int64_t piece = (n + CU_STAGE_MAX_PIECES - 1) / CU_STAGE_MAX_PIECES;
    piece = (piece + 15) / 16 * 16;
    return piece < CU_STAGE_MIN_PIECE ? CU_STAGE_MIN_PIECE : piece;
}

typedef struct stage_job {
    float *dst;
    const float *src;
    int64_t n, piece, pieces;
    uint32_t *flags, seq;
    int64_t next;     /* the next unclaimed piece (atomic); -1: the hook's turn */
    uint32_t bad;     /* some piece held a NaN or Inf (atomic) */
    int (*hook)(void *);
    void *arg;
    int status;
} stage_job;

/* Each thread claims pieces in order until none is left, so they land roughly in order. */
static void stage_task(void *ctx, int32_t t, int32_t nt) {
    (void)t;
    (void)nt;
    stage_job *j = (stage_job *)ctx;
    for (int64_t p; (p = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->pieces;) {
        if (p < 0) {
            j->status = j->hook(j->arg);
            continue;
        }
        int64_t lo = p * j->piece, hi = lo + j->piece < j->n ? lo + j->piece : j->n;
        uint32_t bad = mpscy_copy_exp(j->dst + lo, j->src + lo, hi - lo) == 0x7f800000u;
        if (bad) __atomic_store_n(&j->bad, 1u, __ATOMIC_RELAXED);
        if (j->flags) __atomic_store_n(&j->flags[p], j->seq | (bad ? CU_STAGE_BAD : 0u), __ATOMIC_RELEASE);
    }
}

int64_t cu_stage_pieces(mpscy_pool *pool, float *dst, const float *src, int64_t n, int64_t piece, uint32_t *flags,
                        uint32_t seq) {
    return cu_stage_pieces_after(pool, dst, src, n, piece, flags, seq, NULL, NULL, NULL);
}

int64_t cu_stage_pieces_after(mpscy_pool *pool, float *dst, const float *src, int64_t n, int64_t piece,
                              uint32_t *flags, uint32_t seq, int (*hook)(void *), void *arg, int *hook_status) {
    stage_job j = {dst, src, n, piece, (n + piece - 1) / piece, flags, seq, hook ? -1 : 0, 0, hook, arg, 0};
    mpscy_parallel(pool, stage_task, &j);
    if (hook_status) *hook_status = j.status;
    return j.bad ? mpscy_first_nonfinite(src, n) : -1;
}
