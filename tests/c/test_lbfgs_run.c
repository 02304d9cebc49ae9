/* test_lbfgs_run.c — common/lbfgs.c's mpscy_lbfgs_run, the order of one MPSCY_MODE_LBFGS call's
 * parts and its undo rule, which every backend's L-BFGS runs through (cpu and metal with the
 * host's parts, cuda with its stream's). Fake parts record what ran; a part can be made to fail,
 * which no backend's own evaluation can be made to do on demand. Prints "ok <checks> <failures>". */
#include "common/lbfgs.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int checks, failures;
#define CHECK(cond)                                                          \
    do {                                                                     \
        checks++;                                                            \
        if (!(cond)) {                                                       \
            failures++;                                                      \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                    \
    } while (0)

/* what the fake parts did, in order: one letter a part; and how they answer */
typedef struct fake {
    char log[64];
    double t[4];  /* step_to's t, in order */
    int nt;
    int restore_err_null;      /* the last restore was given no error buffer */
    int fail_at;               /* a part's letter that fails with MPSCY_DEVICE, 0: none */
    int finite;                /* what evaluate reports */
    double gtd;                /* what direction reports */
} fake;

static int rec(fake *f, char c, char *err, size_t n) {
    size_t k = strlen(f->log);
    f->log[k] = c;
    f->log[k + 1] = 0;
    if (f->fail_at == c) {
        if (err) snprintf(err, n, "part %c failed", c);
        return MPSCY_DEVICE;
    }
    return MPSCY_OK;
}

static int restore(void *ctx, char *err, size_t n) {
    fake *f = ctx;
    f->restore_err_null = err == NULL;
    return rec(f, 'R', err, n);
}
static int save(void *ctx, char *err, size_t n) { return rec(ctx, 'S', err, n); }
static int set_base(void *ctx, char *err, size_t n) { return rec(ctx, 'B', err, n); }
static int step_to(void *ctx, double t, char *err, size_t n) {
    fake *f = ctx;
    f->t[f->nt++] = t;
    return rec(f, 'M', err, n);
}
static int direction(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    (void)a;
    r->lbfgs_gtd = ((fake *)ctx)->gtd;
    return rec(ctx, 'D', err, n);
}
static int evaluate(void *ctx, const mpscy_step_args *a, mpscy_step_result *r, char *err, size_t n) {
    (void)a;
    r->finite = ((fake *)ctx)->finite;
    r->loss = r->finite ? 1.5 : INFINITY;
    return rec(ctx, 'E', err, n);
}
static int finish(void *ctx, char *err, size_t n) { return rec(ctx, 'F', err, n); }

static const mpscy_lbfgs_parts parts = {restore, save, set_base, step_to, direction, evaluate, finish};

static int run(fake *f, int32_t ops, mpscy_step_result *r, double *scalars, char *err, size_t n) {
    mpscy_plan plan;
    mpscy_step_args a;
    memset(&plan, 0, sizeof plan);
    memset(&a, 0, sizeof a);
    memset(r, 0, sizeof *r);
    plan.optim.tolerance_change = 1e-9;
    a.lbfgs_ops = ops;
    a.lbfgs_t_prev = 0.25;
    a.lbfgs_t = 0.5;
    strcpy(err, "untouched");
    return mpscy_lbfgs_run(&parts, f, &plan, scalars, "fake", &a, r, err, n);
}

int main(void) {
    char err[256];
    mpscy_step_result r;
    enum { ALL = MPSCY_LBFGS_ROLLBACK | MPSCY_LBFGS_BEGIN | MPSCY_LBFGS_FINALIZE | MPSCY_LBFGS_DIRECTION |
                 MPSCY_LBFGS_MOVE | MPSCY_LBFGS_COUNT | MPSCY_LBFGS_EVAL };

    /* every part, in mpscy.h's order: rollback, begin, finalize, direction, base, move, evaluate */
    fake f = {.finite = 1, .gtd = -1.0};
    double scalars[2 * MPSCY_LBFGS_S_SAVED] = {7};
    CHECK(run(&f, ALL, &r, scalars, err, sizeof err) == MPSCY_OK);
    CHECK(strcmp(f.log, "RSMDBMEF") == 0);
    CHECK(f.nt == 2 && f.t[0] == 0.25 && f.t[1] == 0.5);
    CHECK(scalars[MPSCY_LBFGS_S_STEP] == 8);
    CHECK(r.applied == 1 && r.finite == 1 && r.lbfgs_stopped == 0);
    CHECK(strcmp(err, "untouched") == 0);

    /* a move that does not count leaves the step count alone */
    f = (fake){.finite = 1, .gtd = -1.0};
    CHECK(run(&f, MPSCY_LBFGS_MOVE | MPSCY_LBFGS_EVAL, &r, scalars, err, sizeof err) == MPSCY_OK);
    CHECK(strcmp(f.log, "MEF") == 0 && scalars[MPSCY_LBFGS_S_STEP] == 8);

    /* a direction that does not descend stops the call: no base, move or evaluation */
    f = (fake){.finite = 1, .gtd = 0.0};
    CHECK(run(&f, ALL, &r, scalars, err, sizeof err) == MPSCY_OK);
    CHECK(strcmp(f.log, "RSMDF") == 0);
    CHECK(r.lbfgs_stopped == 1 && scalars[MPSCY_LBFGS_S_STEP] == 8);

    /* a non-finite evaluation is undone at once: NONFINITE, nothing applied, the restore given the
     * error buffer */
    f = (fake){.finite = 0, .gtd = -1.0};
    CHECK(run(&f, MPSCY_LBFGS_MOVE | MPSCY_LBFGS_EVAL, &r, scalars, err, sizeof err) == MPSCY_NONFINITE);
    CHECK(strcmp(f.log, "MER") == 0);
    CHECK(f.restore_err_null == 0 && r.applied == 0);
    CHECK(strstr(err, "not finite; the LBFGS step was undone") != NULL);
    CHECK(strstr(err, "fake") != NULL);

    /* a failed evaluation is undone too, and keeps its own status and message (the restore gets
     * no error buffer); cuda's evaluation can fail this way, the cpu's cannot */
    f = (fake){.finite = 1, .gtd = -1.0, .fail_at = 'E'};
    CHECK(run(&f, MPSCY_LBFGS_MOVE | MPSCY_LBFGS_EVAL, &r, scalars, err, sizeof err) == MPSCY_DEVICE);
    CHECK(strcmp(f.log, "MER") == 0);
    CHECK(f.restore_err_null == 1 && r.applied == 0);
    CHECK(strcmp(err, "part E failed") == 0);

    /* a non-finite evaluation whose restore fails reports the restore's failure */
    f = (fake){.finite = 0, .gtd = -1.0, .fail_at = 'R'};
    CHECK(run(&f, MPSCY_LBFGS_EVAL, &r, scalars, err, sizeof err) == MPSCY_DEVICE);
    CHECK(strcmp(f.log, "ER") == 0 && strcmp(err, "part R failed") == 0);

    /* a failing part ends the call there */
    f = (fake){.finite = 1, .gtd = -1.0, .fail_at = 'S'};
    CHECK(run(&f, ALL, &r, scalars, err, sizeof err) == MPSCY_DEVICE);
    CHECK(strcmp(f.log, "RS") == 0 && r.applied == 0 && strcmp(err, "part S failed") == 0);
    f = (fake){.finite = 1, .gtd = -1.0, .fail_at = 'D'};
    CHECK(run(&f, ALL, &r, scalars, err, sizeof err) == MPSCY_DEVICE);
    CHECK(strcmp(f.log, "RSMD") == 0);
    f = (fake){.finite = 1, .gtd = -1.0, .fail_at = 'F'};
    CHECK(run(&f, ALL, &r, scalars, err, sizeof err) == MPSCY_DEVICE);
    CHECK(strcmp(f.log, "RSMDBMEF") == 0);

    printf("ok %d checks, %d failures\n", checks, failures);
    return failures != 0;
}
