/* test_staging.c — _staging.h's copies for a device's batch: the non-temporal copy
 * (mpscy_copy_exp_nt) against the plain one over lengths and misalignments of both ends, its
 * largest exponent (a NaN or Inf found wherever it lies), and a staging job of pieces with
 * flags, streamed, on a pool of threads. Prints "ok <checks> <failures> failures". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "_staging.h"

static int checks, failures;

#define CHECK(cond, ...)                     \
    do {                                     \
        checks++;                            \
        if (!(cond)) {                       \
            failures++;                      \
            printf("FAIL: " __VA_ARGS__);    \
            printf("\n");                    \
        }                                    \
    } while (0)

int main(void) {
    enum { N = 4096 + 64 };
    float *src = aligned_alloc(64, (N + 64) * sizeof(float)), *a = aligned_alloc(64, (N + 64) * sizeof(float)),
          *b = aligned_alloc(64, (N + 64) * sizeof(float));
    uint32_t seed = 12345u;
    for (int i = 0; i < N + 64; i++) {
        seed = seed * 1664525u + 1013904223u;
        src[i] = ((float)(seed >> 8) / 16777216.0f - 0.5f) * 1e3f;
    }
    src[7] = -0.0f;
    /* every length up to 70 and some longer, each end at every 4-byte offset of a 32-byte line */
    const int lens[] = {0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 70, 1000, 4096};
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++)
        for (int so = 0; so < 8; so++)
            for (int d = 0; d < 8; d++) {
                const int n = lens[li];
                memset(a, 0xab, (N + 64) * sizeof(float));
                memset(b, 0xab, (N + 64) * sizeof(float));
                const uint32_t ma = mpscy_copy_exp(a + d, src + so, n), mb = mpscy_copy_exp_nt(b + d, src + so, n);
                CHECK(ma == mb, "n %d src+%d dst+%d: largest exponent %08x against %08x", n, so, d, mb, ma);
                CHECK(memcmp(a, b, (N + 64) * sizeof(float)) == 0, "n %d src+%d dst+%d: bytes differ", n, so, d);
            }
    /* a NaN or an Inf anywhere is the largest exponent 0x7f800000, and only then */
    const int at[] = {0, 5, 8, 15, 16, 17, 31, 32, 1000, 4095};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++)
        for (int inf = 0; inf < 2; inf++) {
            float *s = malloc(4096 * sizeof(float));
            memcpy(s, src, 4096 * sizeof(float));
            s[at[k]] = inf ? -INFINITY : NAN;
            const uint32_t m = mpscy_copy_exp_nt(b + 3, s, 4096);
            CHECK(m == 0x7f800000u, "%s at %d: largest exponent %08x", inf ? "-inf" : "nan", at[k], m);
            CHECK(mpscy_first_nonfinite(b + 3, 4096) == at[k], "%s at %d: copied at %lld", inf ? "-inf" : "nan", at[k],
                  (long long)mpscy_first_nonfinite(b + 3, 4096));
            free(s);
        }
    CHECK(mpscy_copy_exp_nt(b, src, 4096) < 0x7f800000u, "finite values: no NaN found");
    /* a job of 7 pieces (the last short), streamed by 3 threads, each flag raised with the step's number */
    {
        mpscy_pool *pool = NULL;
        CHECK(mpscy_pool_create(NULL, 3, &pool) == 0, "pool");
        uint32_t flags[MPSCY_STAGE_MAX_CHUNKS] = {0};
        mpscy_stage_job j;
        memset(b, 0, (N + 64) * sizeof(float));
        j.dst = b + 1;
        j.src = src;
        j.n = 4000;
        j.chunk = 608;
        j.chunks = (j.n + j.chunk - 1) / j.chunk;
        j.stream = 1;
        src[2500] = INFINITY;
        const int64_t bad = mpscy_stage_run(pool, &j, flags, 9u, NULL, NULL);
        src[2500] = 1.0f;
        CHECK(bad == 2500, "first non-finite %lld, expected 2500", (long long)bad);
        b[1 + 2500] = 1.0f;
        CHECK(memcmp(b + 1, src, 4000 * sizeof(float)) == 0, "the job's copy differs");
        for (int c = 0; c < 7; c++)
            CHECK(flags[c] == (c == 4 ? (9u | MPSCY_STAGE_BAD) : 9u), "piece %d flag %08x", c, flags[c]);
        CHECK(flags[7] == 0, "no eighth piece");
        mpscy_pool_destroy(pool);
    }
    printf("ok %d checks, %d failures\n", checks, failures);
    free(src);
    free(a);
    free(b);
    return failures != 0;
}
