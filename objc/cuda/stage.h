/* stage.h — the host half of a deferred batch (step.cu): while a step's graph already runs, the
 * graph's staging threads copy input 0's rows into pinned staging piece by piece and raise each
 * piece's flag, which the graph's pull kernel waits on. Plain C (stage.c is compiled by the host
 * compiler with the extension, for _staging.h's vectorized copy); step.cu includes it too. */
#ifndef MPSCY_CUDA_STAGE_H
#define MPSCY_CUDA_STAGE_H

#include <stdint.h>

#include "../common/pool.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CU_STAGE_BAD 0x80000000u     /* flag bit: the piece held a NaN or Inf */
#define CU_STAGE_MAX_PIECES 64
#define CU_STAGE_MIN_PIECE 8192      /* floats (32 KB) */
#define CU_STAGE_STAMPS (CU_STAGE_MAX_PIECES + 8) /* a staging's times (cu_stage_pieces' stamp) */

/* Floats per piece for n floats: at least CU_STAGE_MIN_PIECE (4096 to 1024 measured no better
 * for the MLP b32's 100 KB on the H100's host), a multiple of 16, at most CU_STAGE_MAX_PIECES
 * pieces. */
int64_t cu_stage_piece(int64_t n);

/* Staging threads for input 0's batch of `bytes` (_staging.h's policy, the Cython bridge's too),
 * at least two when the batch is staged while its step runs (deferred). */
int cu_stage_threads(int64_t bytes, int deferred);

/* CLOCK_MONOTONIC ns: the staging's stamps' clock (_staging.h's mpscy_stage_now), which the
 * host's other verbose times (step.cu) are taken on too, so that they subtract */
int64_t cu_now_ns(void);

/* Whether batches are staged with non-temporal stores (_staging.h's mpscy_copy_exp_nt), as by
 * default; $MPSCY_STAGE_STREAM=0 stages them with plain stores (a measuring knob, read when a
 * graph is built). */
int cu_stage_stream(void);

/* Copies n floats src -> dst in pieces of `piece` floats claimed by the pool's threads (NULL: the
 * caller alone), with non-temporal stores where `stream` is set; when flags is given, stores seq
 * into flags[p] as piece p lands (release order: its floats are visible first), with
 * CU_STAGE_BAD set when the piece held a NaN or Inf. With hook, whichever thread starts first
 * runs hook(arg) before any piece (the launch of the graph that waits on the flags, so that the
 * other threads stage while it is launched) and its return value lands in *hook_status. stamp:
 * NULL, or CU_STAGE_STAMPS times (_staging.h's mpscy_stage_job.stamp). Returns the index of the
 * first NaN or Inf of src, or -1. */
int64_t cu_stage_pieces(mpscy_pool *pool, float *dst, const float *src, int64_t n, int64_t piece, uint32_t *flags,
                        uint32_t seq, int stream, int (*hook)(void *), void *arg, int *hook_status, int64_t *stamp);

#ifdef __cplusplus
}
#endif
#endif /* MPSCY_CUDA_STAGE_H */
