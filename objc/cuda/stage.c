/* stage.c — see stage.h: a deferred batch's pieces, copied and checked by _staging.h's job on
 * the graph's staging threads, each flag raised as its piece lands. */
#include "stage.h"

#include "_staging.h"

_Static_assert(CU_STAGE_BAD == MPSCY_STAGE_BAD, "one flag bit");
_Static_assert(CU_STAGE_MAX_PIECES <= MPSCY_STAGE_MAX_CHUNKS, "a job holds every piece");
_Static_assert(CU_STAGE_STAMPS == MPSCY_STAGE_STAMPS, "a job's times");

int64_t cu_stage_piece(int64_t n) {
    int64_t piece = (n + CU_STAGE_MAX_PIECES - 1) / CU_STAGE_MAX_PIECES;
    piece = (piece + 15) / 16 * 16;
    return piece < CU_STAGE_MIN_PIECE ? CU_STAGE_MIN_PIECE : piece;
}

int cu_stage_threads(int64_t bytes, int deferred) {
    /* deferred: at least two, so that one stages while the first launches the graph (a
     * cooperative launch took 3-8 us of the host's time on the H200, and 100 KB staged after it
     * arrived 5-6 us later); $MPSCY_STAGE_THREADS still decides when set */
    const int th = mpscy_stage_threads(bytes, 1);
    const char *knob = getenv("MPSCY_STAGE_THREADS");
    return deferred && th < 2 && !(knob && *knob) ? 2 : th;
}

int64_t cu_now_ns(void) { return mpscy_stage_now(); }

int cu_stage_stream(void) {
    const char *knob = getenv("MPSCY_STAGE_STREAM");
    return knob && *knob ? atoi(knob) != 0 : 1;
}

int64_t cu_stage_pieces(mpscy_pool *pool, float *dst, const float *src, int64_t n, int64_t piece, uint32_t *flags,
                        uint32_t seq, int stream, int (*hook)(void *), void *arg, int *hook_status, int64_t *stamp) {
    mpscy_stage_job j;
    j.stamp = stamp;
    j.stream = stream;
    j.dst = dst;
    j.src = src;
    j.n = n;
    j.chunk = piece;
    j.chunks = (n + piece - 1) / piece;
    int64_t bad = mpscy_stage_run(pool, &j, flags, seq, hook, arg);
    if (hook_status) *hook_status = j.status;
    return bad;
}
