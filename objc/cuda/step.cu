/* step.cu — a CUDA step is one graph launch and one synchronization. At build, each kind of
 * step (train, eval, gradients, predict) is recorded at the built batch into a CUDA graph:
 * staging copy, forward, loss, backward, norm, clip, update, commit. Per-step values travel in
 * the pinned params block the graph copies first, so schedules never re-capture. A partial
 * batch runs the same kernels launched directly over exactly its rows. Whether an update is
 * applied is decided on the device (the optimizer reads a flag), and the result comes back
 * through pinned memory the kernels write.
 *
 * Deferred staging: when the caller hands the batch over unstaged (mpscy_step_args.x_src) and
 * the graph has one input of CU_DEFER_MIN bytes or more, the train, eval and predict graphs begin
 * with a pull kernel instead of copying input 0: the host launches the graph first, then copies
 * the rows into pinned staging piece by piece (stage.c, on the graph's staging threads), raising
 * each piece's flag; the pull kernel's blocks wait for their piece's flag and copy it to the
 * device. Host copy, PCIe transfer and the graph's launch overlap instead of running one after
 * another. A piece with a NaN or Inf is flagged bad: the device then applies no update and
 * commits nothing (bad_seq), and the call fails as the caller's own check would have.
 *
 * Early return: a training step returns as soon as its result is final (loss, correct count,
 * finite, applied: update.h's decide() marks it with the step's number in cu_result.done),
 * while its update and commits still run; the device's `pending` graph says so. The next
 * training step of the same graph is ordered after them on the same stream (the host only
 * writes pinned staging, which the running step has long read), so staging the next batch
 * overlaps the update; every other call on the device first waits for them (cu_settle).
 * MPSCY_CUDA_EARLY=0 waits for the whole step every time. A step that mlp.cu decides before its
 * weight gradients (fu_early) returns before its norm, too: the norm lands in the ring slot the
 * launch picked (never an owed norm's), and the next training call or mpscy_graph_grad_norm
 * hands it over. */
#include "cuda.h"

#include <math.h>
#include <string.h>

#include <mutex>

#define FAIL(status, ...) MPSCY_FAIL(err, n, (status), CU, __VA_ARGS__)

/* dst (n) from the pinned staging src as the host's pieces land. Block 0's first warp is the
 * one reader of the host's flags: its lanes read them all at once (consecutive words, one PCIe
 * round trip a poll), each lane relaying its pieces to device memory (S->piece_seq[p]) as their
 * flags carry this step's number P->seq; block 1 + k copies part k % CU_PULL_SPLIT of piece
 * k / CU_PULL_SPLIT once the relay shows it. Measured on the H200: with every block polling its own
 * flag, 2, 4 and 8 blocks per piece took 324, 338 and 375 us per CNN step (reads over PCIe
 * crowding out the data's); one thread reading the flags in piece order, one round trip each,
 * took 332, 336 and 331 us with 1, 2 and 4 blocks; the warp's reads took the CNN step from 296.1
 * to 278.8 us and the wide MLP's from 683.4 to 669.6 (A/B, one call), the CNN's pull from ~40
 * to 20.9 us (CUPTI), what 786 KB take at SM-load speed over PCIe (bench/pcie_probe.cu: 20.1
 * us, the copy engine 18.5). A piece flagged bad (NaN or Inf) marks the
 * step in S->bad_seq, which keeps the update and the commits from running. */
__global__ void pull_kernel(float *__restrict__ dst, const float *src, int64_t n, int64_t piece,
                            const uint32_t *flags, const cu_params *P, cu_scratch *S, cu_result *R, int parts) {
    cu_pdl_enter();
    const uint32_t seq = P->seq;
    if (blockIdx.x == 0) {
        if (threadIdx.x < 32) cu_relay_pieces(flags, (n + piece - 1) / piece, seq, NULL, S->piece_seq, S, R);
        return;
    }
    const int64_t k = blockIdx.x - 1, p = k / CU_PULL_SPLIT, part = cu_pull_part(piece);
    if (threadIdx.x == 0)
        while ((cu_load_acquire_gpu(&S->piece_seq[p]) & ~CU_STAGE_BAD) != seq) __nanosleep(64);
    __syncthreads();
    const int64_t lo = min(p * piece + (k % CU_PULL_SPLIT) * part, n), hi = min(min(lo + part, (p + 1) * piece), n);
    cu_copy_pinned(dst, src, lo, hi);
    if (!parts) return;
    /* the part is copied: every thread's stores visible at GPU scope, then one release for the
     * consumer started beside the pull (cu_pull_parts) */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) cu_store_release_gpu(&S->part_seq[k], seq);
}

/* whether the captured step of `kind` pulls input 0 itself (deferred staging): not the
 * gradients-only kind (L-BFGS stages itself and reads gradients after bad input). The whole-step
 * kernel (mlp.cu) pulls it in its own copy phase. */
static int defers(const cu_graph *g, int kind) {
    return g->defer && kind != CU_KIND_GRAD;
}

int cu_fork_mark(cu_graph *g, char *err, size_t en) {
    if (g->side == g->stream) return MPSCY_OK;  /* MPSCY_CUDA_STREAMS=1 */
    CU_TRY(cudaEventRecord(g->fork, g->stream), "fork event");
    return MPSCY_OK;
}

int cu_fork_follow(cu_graph *g, cudaStream_t side, char *err, size_t en) {
    if (g->side == g->stream) return MPSCY_OK;
    CU_TRY(cudaStreamWaitEvent(side, g->fork, 0), "side stream wait");
    g->forked |= g->alt && side == g->alt ? 2 : 1;
    return MPSCY_OK;
}

int cu_fork(cu_graph *g, cudaStream_t side, char *err, size_t en) {
    int st = cu_fork_mark(g, err, en);
    return st != MPSCY_OK ? st : cu_fork_follow(g, side, err, en);
}

int cu_wait_streams(cu_graph *g, cudaStream_t to, const cudaStream_t from[3], int mask, char *err, size_t en) {
    for (int k = 0; k < 3; k++)
        if (mask >> k & 1) {  /* each wait refers to the record just before it */
            CU_TRY(cudaEventRecord(g->join, from[k]), "stream event");
            CU_TRY(cudaStreamWaitEvent(to, g->join, 0), "stream wait");
        }
    return MPSCY_OK;
}

int cu_join(cu_graph *g, char *err, size_t en) {
    const int f = g->forked;
    g->forked = 0;
    const cudaStream_t sides[3] = {g->side, g->alt, g->nrm};
    return cu_wait_streams(g, g->stream, sides, f, err, en);
}

/* Everything one step does, enqueued on g->stream (inside a capture). deferred: input 0 is
 * pulled as the host stages it (pull_kernel), not copied with the params block. */
static int enqueue(cu_graph *g, int kind, int64_t b, int deferred, char *err, size_t en) {
    const mpscy_plan *p = &g->plan;
    cudaStream_t s = g->stream;
    int st;
    g->pull_next = 0;
    /* params block, target and the first input's rows in one copy; other inputs after */
    size_t first = p->n_inputs > 0 ? g->off_input[0] : g->off_target;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (p->nodes[i].kind == MPSCY_LAYER_INPUT) {
            size_t rows = (size_t)b * p->nodes[i].size * sizeof(float), o = g->off_input[p->nodes[i].input_index];
            if (p->nodes[i].input_index == 0) first = o + rows;
            else CU_TRY(cudaMemcpyAsync(g->stage_d + o, g->stage_h + o, rows, cudaMemcpyHostToDevice, s), "input copy");
        }
    if (deferred) first = g->off_input[0];
    if (kind == CU_KIND_TRAIN && g->fu) return cu_fused_step(g, b, first, deferred, err, en);  /* copies the staging itself */
    CU_TRY(cudaMemcpyAsync(g->stage_d, g->stage_h, first, cudaMemcpyHostToDevice, s), "staging copy");
    if (deferred) {
        g->pull_next = cu_conv_direct_beside(g);  /* the parts flagged only for that consumer */
        const int64_t n = b * g->in0_size, piece = cu_stage_piece(n), pieces = (n + piece - 1) / piece;
        CU_TRY(cu_launch(g, pull_kernel, dim3((unsigned)(1 + pieces * CU_PULL_SPLIT)), CU_THREADS, s,
                         (float *)(g->stage_d + g->off_input[0]), (const float *)(g->stage_h + g->off_input[0]), n,
                         piece, (const uint32_t *)g->flags_h, (const cu_params *)g->params_d, g->scratch, g->result,
                         g->pull_next),
               "pull");
        if ((st = CU_LAUNCHED("pull")) != MPSCY_OK) return st;
    }

    int train = kind == CU_KIND_TRAIN || kind == CU_KIND_GRAD;
    const int head = train && g->head;  /* the output Dense runs with the loss (head.cu) */
    for (int32_t i = 0; i < p->n_nodes; i++) {
        const mpscy_node *node = &p->nodes[i];
        if (node->kind == MPSCY_LAYER_INPUT || (head && (i == p->output || i == g->head_drop))) continue;
        st = cu_layers[node->kind].forward(g, node, b, train, err, en);
        g->pull_next = 0;  /* only the first layer's first kernel follows the pull */
        if (st != MPSCY_OK) return st;
    }
    if (kind == CU_KIND_PREDICT) {
        CU_TRY(cudaMemcpyAsync(g->out_h, g->y[p->output], (size_t)b * p->out_size * sizeof(float),
                               cudaMemcpyDeviceToHost, s), "output copy");
        return MPSCY_OK;
    }
    st = head ? cu_head(g, b, err, en) : cu_loss(g, train ? g->dy[p->output] : NULL, b, !train, err, en);
    if (st != MPSCY_OK) return st;
    if (!train) return MPSCY_OK;

    /* forks (the forward's too: columns of direct convolutions) are joined once after backward;
     * only a training forward forks, so evaluation and prediction steps end with nothing to join.
     * Each node's squares of the gradient norm follow its backward (cu_norm_part). */
    g->norm_parts = 0;
    if (head && (st = cu_norm_part(g, p->output, err, en)) != MPSCY_OK) return st;
    for (int32_t i = p->n_nodes - 1; i >= 0; i--) {
        const mpscy_node *node = &p->nodes[i];
        if (!node->grad || node->kind == MPSCY_LAYER_INPUT || (head && i == p->output)) continue;
        if ((st = cu_layers[node->kind].backward(g, node, b, err, en)) != MPSCY_OK) return st;
        if ((st = cu_norm_part(g, i, err, en)) != MPSCY_OK) return st;
    }
    if ((st = cu_join(g, err, en)) != MPSCY_OK) return st;
    if ((st = cu_norm_and_update(g, kind == CU_KIND_TRAIN, err, en)) != MPSCY_OK) return st;
    if (kind == CU_KIND_GRAD) return MPSCY_OK;
    for (int32_t i = 0; i < p->n_nodes; i++)
        if (cu_layers[p->nodes[i].kind].commit &&
            (st = cu_layers[p->nodes[i].kind].commit(g, &p->nodes[i], b, 0, err, en)) != MPSCY_OK)
            return st;
    return MPSCY_OK;
}

void cu_cache_clear(cu_graph *g) {
    for (int k = 0; k < CU_KINDS; k++)
        if (g->exec[k]) {
            cudaGraphExecDestroy(g->exec[k]);
            mpscy_count_free(&g->base.dev->stats, 0);
            g->exec[k] = NULL;
        }
}

/* Records the step of `kind` at the built batch into a CUDA graph (at build: a capture counts
 * as one allocation in the device's stats, and no step ever captures). */
int cu_capture(cu_graph *g, int kind, char *err, size_t en) {
    g->gws_used = g->gcount_used = 0;
    g->side_turn = 0;
    memset(g->dz_ready, 0, (size_t)g->plan.n_nodes);
    g->cols_recorded = 0;
    CU_TRY(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    int st = enqueue(g, kind, g->plan.batch, defers(g, kind), err, en);
    if (st != MPSCY_OK && g->forked) cu_join(g, NULL, 0);
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(g->stream, &graph);
    if (st == MPSCY_OK && e != cudaSuccess)
        st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "capturing the step: %s", cudaGetErrorString(e));
    cudaGraphExec_t exec = NULL;
    if (st == MPSCY_OK) {
        e = cudaGraphInstantiate(&exec, graph, 0);
        if (e != cudaSuccess) st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "instantiating the step graph: %s", cudaGetErrorString(e));
    }
    if (st == MPSCY_OK) {
        e = cudaGraphUpload(exec, g->stream);
        if (e != cudaSuccess) st = MPSCY_FAIL(err, en, MPSCY_DEVICE, CU, "uploading the step graph: %s", cudaGetErrorString(e));
    }
    if (graph) cudaGraphDestroy(graph);
    if (st != MPSCY_OK) {
        if (exec) cudaGraphExecDestroy(exec);
        cudaGetLastError();
        return st;
    }
    mpscy_count_alloc(&g->base.dev->stats, 0);
    g->exec[kind] = exec;
    return MPSCY_OK;
}

/* mlp.cu's linger: the kernel that ran deferred step s = g->lg_live, still waiting after its
 * update, takes step g->seq = s + 1 if it sees the request before it gives up. The host writes
 * the request (the params block and labels already in pinned memory before it), then reads
 * lg_closing; the kernel writes lg_closing, then reads the request (fu_linger_verdict). Each
 * side's store reaches memory before its load is served, so one of them sees the other's word:
 * no closing seen, the kernel will see the request and take the step; closing seen, the host
 * waits for the kernel's verdict. 1: the kernel takes the step, nothing to launch. */
static int linger_claim(cu_graph *g) {
    cu_result *R = g->result;
    const uint32_t s = g->lg_live;
    if (g->lg_result_ns) {  /* the host's turn, for MPSCY_CUDA_VERBOSE's count (lg_report) */
        g->lg_turn_ns += cu_now_ns() - g->lg_result_ns;
        g->lg_turns++;
    }
    __atomic_store_n(&R->lg_req, g->seq, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&R->lg_closing, __ATOMIC_SEQ_CST) != s) return 1;
    /* taken: its verdict, or a later step's (this thread was held up while the kernel ran the
     * step, lingered again and gave up, overwriting the verdict; the numbers never wrap between) */
    for (unsigned i = 1;; i++) {
        const unsigned long long v = __atomic_load_n(&R->lg_verdict, __ATOMIC_ACQUIRE);
        if (v == 2ull * s + 1ull || (v >> 1) > s) return 1;
        if (v == 2ull * s) return 0;
        /* the verdict follows lg_closing by a PCIe round trip; a kernel that failed gives none */
        if (i % 1024 == 0 && cudaStreamQuery(g->stream) != cudaErrorNotReady) {
            const unsigned long long w = __atomic_load_n(&R->lg_verdict, __ATOMIC_ACQUIRE);
            return w == 2ull * s + 1ull || (w >> 1) > s;
        }
        MPSCY_CPU_RELAX();
    }
}

/* The graph whose kernel may linger on each GPU, whichever engine (mpscy_device) made it: a
 * lingering kernel holds every multiprocessor, so another graph's step on that GPU would wait for
 * the linger to run out. Set and cleared under the lock, so a graph is never stopped by another
 * after it was destroyed. */
#define CU_LG_GPUS 64
static std::mutex lg_lock;
static cu_graph *lg_slot[CU_LG_GPUS];

static cu_graph **linger_slot(int ordinal) {
    return ordinal >= 0 && ordinal < CU_LG_GPUS ? &lg_slot[ordinal] : NULL;
}

/* g's kernel may linger now (on), or no longer (off) */
static void linger_mark(cu_graph *g, int on) {
    cu_graph **slot = linger_slot(g->dev->ordinal);
    if (!slot || (__atomic_load_n(slot, __ATOMIC_ACQUIRE) == g) == on) return;
    std::lock_guard<std::mutex> hold(lg_lock);
    if (on) __atomic_store_n(slot, g, __ATOMIC_RELEASE);
    else if (*slot == g) __atomic_store_n(slot, (cu_graph *)NULL, __ATOMIC_RELEASE);
}

/* Before work goes on GPU `ordinal` (g's, or with g NULL any other: device.cu's allocations and
 * frees, which wait for the whole GPU): a graph's kernel lingering there, other than g's, is told
 * to end (the request 0); that graph's next step finds itself no longer marked and launches. */
void cu_linger_yield(int ordinal, const cu_graph *g) {
    cu_graph **slot = linger_slot(ordinal);
    cu_graph *o = slot ? __atomic_load_n(slot, __ATOMIC_ACQUIRE) : NULL;
    if (!o || o == g) return;
    std::lock_guard<std::mutex> hold(lg_lock);
    if ((o = *slot) != NULL && o != g) {
        __atomic_store_n(&o->result->lg_req, 0u, __ATOMIC_SEQ_CST);
        __atomic_store_n(slot, (cu_graph *)NULL, __ATOMIC_RELEASE);
    }
}

/* A lingering kernel stopped (the request 0: it ends at once) before anything else goes on the
 * graph's stream or reads what it writes; the caller then waits for the stream. */
void cu_linger_stop(cu_graph *g) {
    if (!g->lg_live) return;
    g->lg_live = 0;
    g->lg_result_ns = 0;
    __atomic_store_n(&g->result->lg_req, 0u, __ATOMIC_SEQ_CST);
    linger_mark(g, 0);
}

struct launch_arg { cu_graph *g; int kind; int claim, claimed; };

/* the graph's launch from a staging thread (stage.h's hook): the device made current there
 * first; or the step handed to the lingering kernel (claim), which needs no launch */
static int launch_hook(void *p) {
    launch_arg *a = (launch_arg *)p;
    cudaError_t e = cudaSetDevice(a->g->dev->ordinal);
    if (e == cudaSuccess && a->claim && (a->claimed = linger_claim(a->g))) return 0;
    if (e == cudaSuccess) e = cudaGraphLaunch(a->g->exec[a->kind], a->g->stream);
    return (int)e;
}

/* x_src's element `bad` is a NaN or Inf: the call fails naming its row */
static int x_nonfinite(const cu_graph *g, int64_t bad, int *x_bad, char *err, size_t en) {
    *x_bad = 1;
    return MPSCY_FAIL(err, en, MPSCY_NONFINITE, CU, "x contains NaN or Inf at row %lld", (long long)(bad / g->in0_size));
}

/* A full batch is one launch of its graph; a partial batch (b < built) runs the same kernels
 * launched one by one over exactly its rows, which allocates nothing (a new capture would).
 * x: input 0's rows still to stage (mpscy_step_args.x_src), or NULL. When the graph of `kind`
 * pulls them itself, they are staged while it runs (the graph launched by the first staging thread); otherwise before. Rows
 * with a NaN or Inf: MPSCY_NONFINITE with *x_bad set (with nothing launched, or with the
 * device's update and commits held back by bad_seq). */
static int launch(cu_graph *g, int kind, int64_t b, const float *x, int *x_bad, char *err, size_t en) {
    const int deferred = b == g->plan.batch && defers(g, kind);
    const int64_t n = b * g->in0_size;
    float *dst = x ? (float *)(g->stage_h + g->off_input[0]) : NULL;
    int64_t bad = -1;
    *x_bad = 0;
    g->params_h->seq = 0;
    const int early = kind == CU_KIND_TRAIN && g->early;
    if (early) g->rseq = g->rseq % 0x7fffffffu + 1;
    g->params_h->rseq = early ? g->rseq : 0;
    g->params_h->nslot = g->norm_owed ? g->owed_slot ^ 1u : 0u;  /* a late norm never lands on an owed one */
    /* a kernel still lingering takes this step if it is its next: the full batch, staged by the
     * host, the step numbers going on; for anything else it stops, and the stream is waited for */
    const int linger = kind == CU_KIND_TRAIN && deferred && cu_fused_lingers(g);
    cu_linger_yield(g->dev->ordinal, g);
    cu_graph **slot = linger_slot(g->dev->ordinal);
    const int claim = g->lg_live && linger && x && g->lg_live == g->seq && g->seq != g->seq_period && slot &&
                      __atomic_load_n(slot, __ATOMIC_ACQUIRE) == g;
    if (claim && g->lg_result_ns) g->lg_enter_ns += cu_now_ns() - g->lg_result_ns;  /* MPSCY_CUDA_VERBOSE */
    if (g->lg_live && !claim) {  /* g is the device's pending graph: its kernel stopped, its stream waited for */
        const int st = cu_settle(g->base.dev, err, en);
        if (st != MPSCY_OK) return st;
    }
    if (x && !deferred && (bad = cu_stage_pieces(g->stage_pool, dst, x, n, cu_stage_piece(n), NULL, 0, g->stage_stream,
                                                 NULL, NULL, NULL, NULL)) >= 0)
        return x_nonfinite(g, bad, x_bad, err, en);
    if (deferred) {
        if (g->seq == g->seq_period) {
            /* the numbers start again at 1: what the device marked with them (a bad input's
             * step, the pull's relayed flags and parts) is cleared first, in stream order, or an
             * old mark could match a new step of the same number */
            const size_t at = offsetof(cu_scratch, bad_seq), end = offsetof(cu_scratch, clip_scale);
            CU_TRY(cudaMemsetAsync((char *)g->scratch + at, 0, end - at, g->stream), "clearing the step marks");
        }
        g->seq = g->seq % g->seq_period + 1;
        g->params_h->seq = g->seq;
        g->result->stalled = 0;
    }
    if (linger && !claim) __atomic_store_n(&g->result->lg_req, g->seq, __ATOMIC_RELEASE);  /* not a request: its own step */
    launch_arg la = {g, kind, claim, 0};
    if (deferred && x) {
        /* the first staging thread to start launches the graph (or hands the step to the
         * lingering kernel), the others stage meanwhile (measured on the H200's host: 5-6 us per
         * step less than launching first) */
        int ls = 0;
        int64_t *stamp = g->lg_result_ns ? g->lg_stamp : NULL;
        bad = cu_stage_pieces(g->stage_pool, dst, x, n, cu_stage_piece(n), g->flags_h, g->seq, g->stage_stream, launch_hook,
                              &la, &ls, stamp);
        if (g->lg_result_ns && la.claimed) {  /* MPSCY_CUDA_VERBOSE's figures (lg_report) */
            g->lg_stage_ns += cu_now_ns() - g->lg_result_ns;
            g->lg_stages++;
            for (int k = 0; k < CU_STAGE_STAMPS; k++)  /* each piece's flag, each task's start */
                if (stamp[k]) g->lg_stamp_ns[k] += stamp[k] - g->lg_result_ns;
        }
        CU_TRY((cudaError_t)ls, "graph launch");
    } else if (b == g->plan.batch) {
        CU_TRY(cudaGraphLaunch(g->exec[kind], g->stream), "graph launch");
    } else {
        g->gws_used = g->gcount_used = 0;
        g->side_turn = 0;
        memset(g->dz_ready, 0, (size_t)g->plan.n_nodes);
        g->cols_recorded = 0;
        int st = enqueue(g, kind, b, 0, err, en);
        if (st != MPSCY_OK && g->forked) cu_join(g, NULL, 0);
        if (st != MPSCY_OK) {
            cudaStreamSynchronize(g->stream);
            return st;
        }
    }
    if (deferred && !x) /* the caller staged the rows itself: every piece is there */
        for (int64_t p = 0, piece = cu_stage_piece(n); p * piece < n; p++) __atomic_store_n(&g->flags_h[p], g->seq, __ATOMIC_RELEASE);
    if (early) {
        /* until the result is final, or the stream is done (a step with nothing to decide) or failed */
        cu_device *d = (cu_device *)g->base.dev;
        const volatile unsigned int *done = &g->result->done;
        for (unsigned i = 1;; i++) {
            if (*done == g->rseq) {
                __atomic_thread_fence(__ATOMIC_ACQUIRE);
                d->pending = g;
                if (linger) {  /* its kernel may wait for the next step */
                    g->lg_live = g->seq;
                    if (g->lg_report) g->lg_result_ns = cu_now_ns();
                    linger_mark(g, 1);
                }
                break;
            }
            if (i % 64 == 0) {
                cudaError_t e = cudaStreamQuery(g->stream);
                if (e == cudaSuccess && la.claimed && *done != g->rseq) {
                    /* the lingering kernel ended without the step it was handed (the handshake
                     * failed on this machine): launch it after all */
                    la.claimed = 0;
                    __atomic_store_n(&g->result->lg_req, g->seq, __ATOMIC_RELEASE);
                    CU_TRY(cudaGraphLaunch(g->exec[kind], g->stream), "graph launch");
                    continue;
                }
                if (e == cudaSuccess) break;
                if (e != cudaErrorNotReady) CU_TRY(e, "step");
            }
            MPSCY_CPU_RELAX();
        }
    } else {
        CU_TRY(cudaStreamSynchronize(g->stream), "step");
    }
    g->lg_steps += linger;
    g->lg_taken += la.claimed;
    if (deferred && g->result->stalled)
        return MPSCY_FAIL(err, en, MPSCY_DEVICE, CU,
                          "the step's input copy stalled (a piece unflagged for %g s; a profiler that runs the "
                          "graph inside its launch call needs MPSCY_CUDA_DEFER=0)", CU_PULL_PATIENCE_NS * 1e-9);
    return bad >= 0 ? x_nonfinite(g, bad, x_bad, err, en) : MPSCY_OK;
}

/* What the kernels wrote into pinned memory for the evaluation just synchronized (whether an
 * update was applied is the caller's to read: an L-BFGS call has its own). */
static void read_result(const cu_graph *g, mpscy_step_result *r) {
    const cu_result *res = g->result;
    r->loss = res->loss;
    r->correct = res->correct;
    r->grad_norm = res->grad_norm;
    r->finite = res->finite;
}

/* The norm of training step `seq` from ring slot k, once final (an acquire read of its mark);
 * 0 when not yet: a probe, never a wait */
static int norm_of(const cu_graph *g, uint32_t seq, uint32_t k, double *out) {
    const cu_result *res = g->result;
    if (__atomic_load_n(&res->norm_seq[k], __ATOMIC_ACQUIRE) != seq) return 0;
    *out = res->norm_ring[k];
    return 1;
}

/* After any training call, failed ones too: the norm a step before still owes, once final (it is
 * when this call's kernel ran: that step's kernels had ended) */
static void pay_owed(cu_graph *g, mpscy_step_result *r) {
    if (g->norm_owed && norm_of(g, g->norm_owed, g->owed_slot, &r->prev_grad_norm)) {
        r->prev_grad_norm_ready = 1;
        g->norm_owed = 0;
    }
}

/* After a training step's result: decided before its norm was known (mlp.cu's early decision),
 * the step owes it unless it has landed already */
static void owe_norm(cu_graph *g, mpscy_step_result *r) {
    const uint32_t k = g->params_h->nslot;
    if (g->result->norm_late == g->rseq && !norm_of(g, g->rseq, k, &r->grad_norm)) {
        r->grad_norm = NAN;
        r->grad_norm_pending = 1;
        g->norm_owed = g->rseq;
        g->owed_slot = k;
    }
}

int cu_graph_grad_norm(mpscy_graph gh, double *out, char *err, size_t n) {
    cu_graph *g = (cu_graph *)gh;
    if (!g->norm_owed) return FAIL(MPSCY_INVALID, "no training step's gradient norm is pending");
    if (!norm_of(g, g->norm_owed, g->owed_slot, out)) {  /* not landed yet: the step finished first */
        int st = cu_settle(gh->dev, err, n);
        if (st != MPSCY_OK) return st;
        if (!norm_of(g, g->norm_owed, g->owed_slot, out))
            return FAIL(MPSCY_DEVICE, "training step %u ended without writing its gradient norm", (unsigned)g->norm_owed);
    }
    g->norm_owed = 0;
    return MPSCY_OK;
}

int cu_forward_backward(cu_graph *g, int64_t b, mpscy_step_result *r, char *err, size_t n) {
    int x_bad;
    int st = launch(g, CU_KIND_GRAD, b, NULL, &x_bad, err, n);
    if (st == MPSCY_OK) read_result(g, r);
    return st;
}

int cu_graph_step(mpscy_graph gh, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    cu_graph *g = (cu_graph *)gh;
    int64_t b = a->batch;  /* rows, mode and labels checked by the dispatcher */
    /* a training step of the pending graph itself is ordered after its update on the stream */
    cu_device *d = (cu_device *)gh->dev;
    if (d->pending && (d->pending != g || a->mode != MPSCY_MODE_TRAIN)) {
        int st = cu_settle(gh->dev, err, n);
        if (st != MPSCY_OK) return st;
    }
    /* every kind of call (an L-BFGS call's evaluations too) draws its Dropout masks from its own
     * key and counter, as the cpu's do: the params block carries them */
    g->params_h->seed = a->seed;
    g->params_h->counter = a->counter;
    if (a->mode == MPSCY_MODE_LBFGS) return cu_lbfgs_step(g, a, r, err, n);
    int kind = a->mode == MPSCY_MODE_TRAIN ? CU_KIND_TRAIN : a->mode == MPSCY_MODE_GRAD ? CU_KIND_GRAD : CU_KIND_EVAL;
    int64_t t = (int64_t)g->scalars[0] + 1;
    cu_optim_params(g, a, t, g->params_h);
    int st = launch(g, kind, b, a->x_src, &r->x_nonfinite, err, n);
    if (kind == CU_KIND_TRAIN) pay_owed(g, r);
    if (st != MPSCY_OK) return st;

    read_result(g, r);
    r->applied = g->result->applied;
    if (kind == CU_KIND_TRAIN && g->early) owe_norm(g, r);
    if (kind == CU_KIND_EVAL) return MPSCY_OK;
    if (!r->finite)
        return MPSCY_FAIL_NONFINITE(err, n, CU, a->mode, r);
    if (r->applied) cu_optim_applied(g, t);
    return MPSCY_OK;
}

int cu_graph_predict(mpscy_graph gh, const mpscy_step_args *a, char *err, size_t n) {
    int x_bad;
    int st = cu_settle(gh->dev, err, n);
    if (st != MPSCY_OK) return st;
    return launch((cu_graph *)gh, CU_KIND_PREDICT, a->batch, a->x_src, &x_bad, err, n);  /* rows checked by the dispatcher */
}

int cu_settle(mpscy_device dev, char *err, size_t n) {
    cu_device *d = (cu_device *)dev;
    cu_graph *g = d->pending;
    if (!g) return MPSCY_OK;
    d->pending = NULL;
    cu_linger_stop(g);
    cudaError_t e = cudaStreamSynchronize(g->stream);
    /* no kernel lingers now, so no old closing or verdict can pass for a later kernel's when the
     * step numbers start again */
    g->result->lg_closing = 0u;
    g->result->lg_verdict = 0ull;
    if (e != cudaSuccess) return FAIL(MPSCY_DEVICE, "the last training step's update: %s", cudaGetErrorString(e));
    return MPSCY_OK;
}
