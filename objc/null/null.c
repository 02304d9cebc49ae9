/* null.c — the stand-in for a backend this build does not contain. It compiles everywhere
 * and has one job: say, through the error buffer, which backend is missing and why, so that
 * device="cuda" on a machine without it fails with a message rather than a crash. */
#include "../backend.h"

int mpscy_null_device_create(const char *backend, const char *why, char *err, size_t n) {
    return MPSCY_FAIL(err, n, MPSCY_DEVICE, "null", "backend '%s' was not built into this mpscy: %s",
                      backend, why);
}
