/* pool.c — mpscy's own worker threads (pthreads, no OpenMP), shared by the CPU backend (its
 * kernels and GEMM splits) and the Python bridge (staging large batches): a pool started once
 * and joined when destroyed, and a fork-join `mpscy_parallel` that runs tasks 0..n-1 (one per
 * thread, claimed by whichever thread is free, the caller included). Workers spin briefly
 * between tasks, then sleep. */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#define SPIN_ROUNDS 20000    /* about 100 us of polling before a worker sleeps ($MPSCY_POOL_SPIN) */

typedef struct worker_arg {
    struct mpscy_pool *pool;
    int32_t id;
} worker_arg;

struct mpscy_pool {
    mpscy_stats *stats;           /* the pool's own bytes are counted there (thread stacks are libc's) */
    int32_t n;                    /* threads, the caller included */
    worker_arg args[MPSCY_MAX_THREADS];
    int fork_generation;          /* fork_generation when the workers were started */
    pthread_t threads[MPSCY_MAX_THREADS];
    _Atomic unsigned generation;  /* bumped once per parallel region */
    _Atomic uint64_t claim;       /* (generation << 32) | next task index of the region */
    _Atomic int pending;          /* tasks of the current region not yet finished */
    _Atomic int stop;
    mpscy_task fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sleepers;                 /* guarded by mu */
    int spin;                     /* polling rounds before a worker sleeps */
};


static _Thread_local int in_region;   /* nested mpscy_parallel calls run inline */

/* A forked child has none of its parent's workers: its pools then run everything inline and
 * are freed without joining. Bumped by a pthread_atfork handler registered once. */
static volatile int fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void after_fork_child(void) { fork_generation++; }
static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* Runs tasks of region `gen` until none is left to claim. Tasks are claimed, not assigned:
 * whichever thread is running takes the next one, so a worker that lost its core (a loaded
 * machine) delays nothing — the caller runs its share. The CAS only succeeds while the claim
 * word still belongs to `gen`, and a region ends only when all its tasks have finished, so
 * fn and ctx are valid for every claimed task. */
static void run_tasks(struct mpscy_pool *p, unsigned gen) {
    uint64_t c = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if ((unsigned)(c >> 32) != gen || (int32_t)(uint32_t)c >= p->n) return;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        p->fn(p->ctx, (int32_t)(uint32_t)c, p->n);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
        c = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    const worker_arg *w = arg;
    struct mpscy_pool *p = w->pool;
    unsigned seen = 0;
    in_region = 1;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&p->generation, memory_order_acquire) == seen && ++spins < p->spin)
            MPSCY_CPU_RELAX();
        if (atomic_load_explicit(&p->generation, memory_order_acquire) == seen) {
            pthread_mutex_lock(&p->mu);
            p->sleepers++;
            while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            p->sleepers--;
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = atomic_load_explicit(&p->generation, memory_order_acquire);
        run_tasks(p, seen);
    }
    return NULL;
}

int mpscy_pool_create(mpscy_stats *stats, int32_t threads, mpscy_pool **out) {
    *out = NULL;
    if (threads > MPSCY_MAX_THREADS) threads = MPSCY_MAX_THREADS;
    if (threads <= 1) return MPSCY_OK;  /* no pool: everything runs on the caller */
    pthread_once(&atfork_once, register_atfork);
    struct mpscy_pool *p = calloc(1, sizeof *p);
    if (!p) return MPSCY_OOM;
    if (stats) mpscy_count_alloc(stats, sizeof *p);
    p->stats = stats;
    p->n = 1;
    p->fork_generation = fork_generation;
    /* polling rounds of a worker between regions before it sleeps: a knob for timing the wake-ups */
    const char *sk = getenv("MPSCY_POOL_SPIN");
    p->spin = sk && *sk ? atoi(sk) : SPIN_ROUNDS;
    if (p->spin < 1) p->spin = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int32_t t = 1; t < threads; t++) {  /* fewer workers than asked is still a working pool */
        p->args[t].pool = p;
        p->args[t].id = t;
        if (pthread_create(&p->threads[t], NULL, worker, &p->args[t]) != 0) break;
        p->n = t + 1;
    }
    *out = p;
    return MPSCY_OK;
}

static void pool_free(struct mpscy_pool *p) {
    if (p->stats) mpscy_count_free(p->stats, sizeof *p);
    free(p);
}

void mpscy_pool_destroy(mpscy_pool *p) {
    if (!p) return;
    if (p->fork_generation != fork_generation) {  /* the workers belong to the parent process */
        pool_free(p);
        return;
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int32_t t = 1; t < p->n; t++) pthread_join(p->threads[t], NULL);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    pool_free(p);
}

int32_t mpscy_parallel(mpscy_pool *p, mpscy_task fn, void *ctx) {
    if (!p || in_region || p->fork_generation != fork_generation) {
        fn(ctx, 0, 1);
        return 1;
    }
    unsigned gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->pending, p->n, memory_order_relaxed);
    atomic_store_explicit(&p->claim, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&p->generation, gen, memory_order_release);
    pthread_mutex_lock(&p->mu);
    if (p->sleepers) pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    in_region = 1;
    run_tasks(p, gen);
    in_region = 0;
    for (int spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS) MPSCY_CPU_RELAX();
        else sched_yield();  /* a worker that claimed a task lost its core: let it run */
    }
    return p->n;
}

int mpscy_pool_in_region(void) { return in_region; }

void mpscy_split(int64_t n, int32_t t, int32_t nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

