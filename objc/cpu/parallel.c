/* parallel.c — the CPU backend's own worker threads (pthreads, no OpenMP): a pool started when a
 * graph is built and joined when it is destroyed, a fork-join `cpu_parallel` that runs tasks
 * 0..n-1 (one per thread, claimed by whichever thread is free, the caller included), and a GEMM split over the pool, each part a
 * single-threaded BLAS call. OpenBLAS itself is kept single-threaded, so its idle threads never
 * spin against ours (Accelerate manages its own). Workers spin briefly between tasks, then sleep. */
#include "cpu.h"
#include "blas.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_ROUNDS 20000    /* about 100 us of polling before a worker sleeps */
#define MAX_THREADS 64

typedef struct worker_arg {
    struct cpu_pool *pool;
    int32_t id;
} worker_arg;

struct cpu_pool {
    mpscy_device dev;             /* the pool's own bytes are counted on it (thread stacks are libc's) */
    int32_t n;                    /* threads, the caller included */
    worker_arg args[MAX_THREADS];
    int fork_generation;          /* fork_generation when the workers were started */
    pthread_t threads[MAX_THREADS];
    _Atomic unsigned generation;  /* bumped once per parallel region */
    _Atomic uint64_t claim;       /* (generation << 32) | next task index of the region */
    _Atomic int pending;          /* tasks of the current region not yet finished */
    _Atomic int stop;
    cpu_task fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sleepers;                 /* guarded by mu */
};


static _Thread_local int in_region;   /* nested cpu_parallel calls run inline */

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
static void run_tasks(struct cpu_pool *p, unsigned gen) {
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
    struct cpu_pool *p = w->pool;
    unsigned seen = 0;
    in_region = 1;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&p->generation, memory_order_acquire) == seen && ++spins < SPIN_ROUNDS)
            CPU_RELAX();
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

int cpu_pool_create(mpscy_device dev, int32_t threads, cpu_pool **out) {
    *out = NULL;
    mpscy_blas_set_threads(1);  /* all parallelism is ours, with or without a pool */
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) return MPSCY_OK;  /* no pool: everything runs on the caller */
    pthread_once(&atfork_once, register_atfork);
    struct cpu_pool *p = cpu_alloc(dev, sizeof *p);
    if (!p) return MPSCY_OOM;
    p->dev = dev;
    p->n = 1;
    p->fork_generation = fork_generation;
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

void cpu_pool_destroy(cpu_pool *p) {
    if (!p) return;
    if (p->fork_generation != fork_generation) {  /* the workers belong to the parent process */
        cpu_free(p->dev, p, sizeof *p);
        return;
    }
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int32_t t = 1; t < p->n; t++) pthread_join(p->threads[t], NULL);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    cpu_free(p->dev, p, sizeof *p);
}

int32_t cpu_parallel(cpu_pool *p, cpu_task fn, void *ctx) {
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
        if (spins < SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();  /* a worker that claimed a task lost its core: let it run */
    }
    return p->n;
}

void cpu_split(int64_t n, int32_t t, int32_t nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* ------------------------------------------------------------------ GEMM over the pool */

typedef struct gemm_job {
    int ta, tb;
    int64_t m, n, k, lda, ldb, ldc;
    float alpha, beta;
    const float *a, *b;
    float *c;
} gemm_job;

static void gemm_part(void *ctx, int32_t t, int32_t nt) {
    const gemm_job *j = ctx;
    int split_m = j->m >= j->n;
    int64_t lo, hi, total = split_m ? j->m : j->n, align = total >= 16 * nt ? 16 : 1;
    cpu_split(total / align, t, nt, &lo, &hi);
    lo *= align;
    hi = t == nt - 1 ? total : hi * align;
    if (hi <= lo) return;
    const float *a = j->a, *b = j->b;
    float *c = j->c;
    int64_t m = j->m, n = j->n;
    if (split_m) {  /* rows [lo, hi) of C: rows of op(A) */
        a += j->ta ? lo : lo * j->lda;
        c += lo * j->ldc;
        m = hi - lo;
    } else {        /* columns [lo, hi) of C: columns of op(B) */
        b += j->tb ? lo * j->ldb : lo;
        c += lo;
        n = hi - lo;
    }
    cblas_sgemm(CblasRowMajor, j->ta ? CblasTrans : CblasNoTrans, j->tb ? CblasTrans : CblasNoTrans,
                (blasint)m, (blasint)n, (blasint)j->k, j->alpha, a, (blasint)j->lda, b, (blasint)j->ldb,
                j->beta, c, (blasint)j->ldc);
}

void cpu_gemm(cpu_pool *p, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    // c (m, n) row-major = alpha op(a) op(b) + beta c; op(a) (m, k), op(b) (k, n)
    gemm_job j = {ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, a, b, c};
    if (!p || in_region || m * n * k < (int64_t)1 << 18) gemm_part(&j, 0, 1);
    else cpu_parallel(p, gemm_part, &j);
}
