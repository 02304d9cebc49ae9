/* test_abi.c — a plain-C test of the ABI: includes only mpscy.h, links the CPU backend, and
 * trains a tiny MLP (2-16-2, XOR-like blobs) without Python. Also checks status codes and
 * error lines, buffers, tensors, counters (one call per step, no allocation per step) and the
 * no-update rule for a non-finite step. Prints "ok N checks" and exits 0 on success. */
#include "mpscy.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int checks = 0, failures = 0;
#define CHECK(cond, ...)                                              \
    do {                                                              \
        checks++;                                                     \
        if (!(cond)) {                                                \
            failures++;                                               \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);               \
            printf(__VA_ARGS__);                                      \
            printf("\n");                                             \
        }                                                             \
    } while (0)

static uint32_t lcg = 12345;
static float frand(void) { lcg = lcg * 1664525u + 1013904223u; return (float)(lcg >> 8) / 16777216.0f; }

int main(void) {
    char err[MPSCY_ERR_LEN] = {0};
    mpscy_device dev = NULL;
    int st;

    CHECK(mpscy_abi_version() == MPSCY_ABI_VERSION, "abi version %d", mpscy_abi_version());
    st = mpscy_device_create("cuda-nope", &dev, err, sizeof err);
    CHECK(st == MPSCY_INVALID && dev == NULL && strstr(err, "unknown backend"), "unknown backend: %d %s", st, err);
    st = mpscy_device_create("metal", &dev, err, sizeof err);
    CHECK(st == MPSCY_DEVICE || st == MPSCY_OK, "metal: %d %s", st, err);
    if (st == MPSCY_DEVICE) CHECK(strstr(err, "[null::") == err && strstr(err, "not built"), "null message: %s", err);
    mpscy_device_destroy(dev);
    dev = NULL;
    mpscy_device_destroy(NULL); /* accepted */

    st = mpscy_device_create("cpu", &dev, err, sizeof err);
    CHECK(st == MPSCY_OK && dev, "cpu device: %s", err);
    mpscy_device_info info;
    CHECK(mpscy_device_info_get(dev, &info, err, sizeof err) == MPSCY_OK && strcmp(info.backend, "cpu") == 0, "info");

    /* buffers */
    mpscy_buffer buf = NULL, priv = NULL;
    CHECK(mpscy_buffer_create(dev, 64, MPSCY_STORAGE_SHARED, &buf, err, sizeof err) == MPSCY_OK, "buffer: %s", err);
    CHECK(mpscy_buffer_create(dev, 64, MPSCY_STORAGE_PRIVATE, &priv, err, sizeof err) == MPSCY_OK, "private: %s", err);
    void *host = NULL;
    size_t nbytes = 0;
    CHECK(mpscy_buffer_host_pointer(buf, &host, &nbytes, err, sizeof err) == MPSCY_OK && host && nbytes == 64, "host ptr");
    CHECK(mpscy_buffer_host_pointer(priv, &host, &nbytes, err, sizeof err) == MPSCY_INVALID, "private has no host ptr");
    float in4[4] = {1, 2, 3, 4}, out4[4] = {0};
    CHECK(mpscy_buffer_write(priv, 8, in4, sizeof in4, err, sizeof err) == MPSCY_OK, "write");
    CHECK(mpscy_buffer_read(priv, 8, out4, sizeof out4, err, sizeof err) == MPSCY_OK && out4[3] == 4.0f, "read");
    st = mpscy_buffer_read(priv, 60, out4, sizeof out4, err, sizeof err);
    CHECK(st == MPSCY_SHAPE && strstr(err, "exceeds"), "read past end: %d %s", st, err);
    mpscy_buffer none = (mpscy_buffer)&info;
    CHECK(mpscy_buffer_create(dev, 0, MPSCY_STORAGE_SHARED, &none, err, sizeof err) == MPSCY_INVALID && none == NULL,
          "zero-byte buffer");
    mpscy_buffer_destroy(priv);
    mpscy_buffer_destroy(NULL);

    /* a 2-16-2 MLP: input, dense, relu, dense */
    enum { B = 32, H = 16 };
    mpscy_layer_desc L[4];
    memset(L, 0, sizeof L);
    L[0].kind = MPSCY_LAYER_INPUT; L[0].rank = 1; L[0].shape[0] = 2; strcpy(L[0].name, "input");
    L[1].kind = MPSCY_LAYER_DENSE; L[1].flags = MPSCY_FLAG_BIAS; L[1].n_inputs = 1; L[1].inputs[0] = 0;
    L[1].rank = 1; L[1].shape[0] = H; L[1].ints[0] = H; strcpy(L[1].name, "dense_0");
    L[2].kind = MPSCY_LAYER_RELU; L[2].n_inputs = 1; L[2].inputs[0] = 1; L[2].rank = 1; L[2].shape[0] = H;
    strcpy(L[2].name, "relu_1");
    L[3].kind = MPSCY_LAYER_DENSE; L[3].flags = MPSCY_FLAG_BIAS; L[3].n_inputs = 1; L[3].inputs[0] = 2;
    L[3].rank = 1; L[3].shape[0] = 2; L[3].ints[0] = 2; strcpy(L[3].name, "dense_2");

    mpscy_graph_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = 4; d.layers = L; d.output = 3; d.batch = B; d.target = MPSCY_TARGET_INDEX;
    d.loss.kind = MPSCY_LOSS_SPARSE_CE; d.loss.accuracy = MPSCY_ACCURACY_ARGMAX;
    d.optim.kind = MPSCY_OPTIM_ADAM; d.optim.lr = 0.01; d.optim.beta1 = 0.9; d.optim.beta2 = 0.999; d.optim.eps = 1e-8;

    mpscy_graph g = NULL;
    L[3].shape[0] = 3; /* a wrong resolved shape is caught */
    st = mpscy_graph_build(dev, &d, &g, err, sizeof err);
    CHECK(st == MPSCY_SHAPE && g == NULL && strstr(err, "[cpu::") == err && strstr(err, "dense_2"), "bad shape: %d %s", st, err);
    L[3].shape[0] = 2;
    d.loss.accuracy = MPSCY_ACCURACY_THRESHOLD; /* reads float targets: integer labels are refused */
    st = mpscy_graph_build(dev, &d, &g, err, sizeof err);
    CHECK(st == MPSCY_INVALID && g == NULL && strstr(err, "threshold"), "threshold with labels: %d %s", st, err);
    mpscy_graph_destroy(g);
    g = NULL;
    d.loss.accuracy = MPSCY_ACCURACY_ARGMAX;
    const float bad_weight[2] = {1.0f, -0.5f}; /* class weights are checked, and only read during the build */
    d.loss.class_weight = bad_weight;
    st = mpscy_graph_build(dev, &d, &g, err, sizeof err);
    CHECK(st == MPSCY_INVALID && g == NULL && strstr(err, "class weight 1 is -0.5"), "bad class weight: %d %s", st, err);
    d.loss.class_weight = NULL;
    st = mpscy_graph_build(dev, &d, &g, err, sizeof err);
    CHECK(st == MPSCY_OK && g, "build: %s", err);
    if (!g) { printf("cannot continue\n"); return 1; }

    /* tensors: weight, bias, weight, bias, 4 grads, exp_avg, exp_avg_sq, step */
    int32_t nt = 0;
    CHECK(mpscy_graph_tensor_count(g, &nt, err, sizeof err) == MPSCY_OK && nt == 11, "tensor count %d", nt);
    mpscy_tensor_info ti;
    CHECK(mpscy_graph_tensor_info(g, 0, &ti, err, sizeof err) == MPSCY_OK && strcmp(ti.name, "dense_0.weight") == 0 &&
          ti.rank == 2 && ti.shape[0] == H && ti.shape[1] == 2, "tensor 0: %s", ti.name);
    float w1[H * 2], b1[H], w2[2 * H], b2[2];
    for (int i = 0; i < H * 2; i++) { w1[i] = (frand() - 0.5f); w2[i] = (frand() - 0.5f) * 0.5f; }
    for (int i = 0; i < H; i++) b1[i] = 0.1f;
    b2[0] = b2[1] = 0;
    CHECK(mpscy_graph_tensor_write(g, 0, w1, sizeof w1, err, sizeof err) == MPSCY_OK, "write w1");
    CHECK(mpscy_graph_tensor_write(g, 1, b1, sizeof b1, err, sizeof err) == MPSCY_OK, "write b1");
    CHECK(mpscy_graph_tensor_write(g, 2, w2, sizeof w2, err, sizeof err) == MPSCY_OK, "write w2");
    CHECK(mpscy_graph_tensor_write(g, 3, b2, sizeof b2, err, sizeof err) == MPSCY_OK, "write b2");
    CHECK(mpscy_graph_tensor_write(g, 0, w1, 4, err, sizeof err) == MPSCY_SHAPE, "short write rejected");

    mpscy_buffer xin = NULL, yin = NULL;
    float *x = NULL;
    int32_t *y = NULL;
    CHECK(mpscy_graph_io(g, MPSCY_IO_INPUT, 0, &xin, err, sizeof err) == MPSCY_OK, "io input");
    CHECK(mpscy_graph_io(g, MPSCY_IO_TARGET, 0, &yin, err, sizeof err) == MPSCY_OK, "io target");
    CHECK(mpscy_graph_io(g, MPSCY_IO_INPUT, 1, &xin, err, sizeof err) == MPSCY_INVALID, "io index checked");
    mpscy_graph_io(g, MPSCY_IO_INPUT, 0, &xin, err, sizeof err);
    mpscy_buffer_host_pointer(xin, (void **)&x, NULL, err, sizeof err);
    mpscy_buffer_host_pointer(yin, (void **)&y, NULL, err, sizeof err);
    mpscy_buffer_destroy(xin); /* graph-owned: ignored */

    mpscy_step_args a;
    memset(&a, 0, sizeof a);
    a.batch = B; a.mode = MPSCY_MODE_TRAIN; a.lr = 0.01; a.beta1 = 0.9; a.beta2 = 0.999;
    mpscy_step_result r;
    double first = 0, last = 0;
    mpscy_stats s0, s1;
    for (int step = 0; step < 300; step++) {
        for (int i = 0; i < B; i++) { /* XOR of the signs of two coordinates */
            float u = frand() * 2 - 1, v = frand() * 2 - 1;
            x[2 * i] = u; x[2 * i + 1] = v;
            y[i] = (u > 0) != (v > 0);
        }
        if (step == 1) mpscy_device_stats(dev, &s0, err, sizeof err);
        st = mpscy_graph_step(g, &a, &r, err, sizeof err);
        if (st != MPSCY_OK) { CHECK(0, "step %d: %s", step, err); break; }
        if (step == 0) first = r.loss;
        last = r.loss;
    }
    mpscy_device_stats(dev, &s1, err, sizeof err);
    CHECK(last < 0.5 * first, "loss fell: %.4f -> %.4f", first, last);
    CHECK(r.applied == 1 && r.correct >= B * 3 / 4, "trained: applied %d, %lld/%d correct", r.applied, (long long)r.correct, B);
    CHECK(s1.allocations == s0.allocations && s1.bytes_in_use == s0.bytes_in_use, "no allocation per step");
    CHECK(s1.calls - s0.calls == 299 && s1.steps - s0.steps == 299, "one ABI call per step: %lld", (long long)(s1.calls - s0.calls));
    /* the cpu's step returns with its gradient norm: none is ever pending */
    CHECK(r.grad_norm_pending == 0 && r.prev_grad_norm_ready == 0 && isfinite(r.grad_norm) && r.grad_norm > 0,
          "norm with the step: pending %d, %g", r.grad_norm_pending, r.grad_norm);
    double owed = -1.0;
    st = mpscy_graph_grad_norm(g, &owed, err, sizeof err);
    CHECK(st == MPSCY_INVALID && strstr(err, "no training step's gradient norm is pending") && owed == -1.0,
          "no norm pending: %d %s", st, err);
    CHECK(mpscy_graph_grad_norm(NULL, &owed, err, sizeof err) == MPSCY_INVALID, "grad_norm of a NULL graph");

    int64_t t_step = 0;
    CHECK(mpscy_graph_tensor_read(g, nt - 1, &t_step, sizeof t_step, err, sizeof err) == MPSCY_OK && t_step == 300,
          "optimizer step count %lld", (long long)t_step);

    /* bad label: rejected before anything runs */
    y[3] = 7;
    st = mpscy_graph_step(g, &a, &r, err, sizeof err);
    CHECK(st == MPSCY_INVALID && strstr(err, "label 7 at row 3"), "label range: %d %s", st, err);
    y[3] = 0;
    a.batch = B + 1;
    CHECK(mpscy_graph_step(g, &a, &r, err, sizeof err) == MPSCY_SHAPE, "batch too large");
    a.batch = B;

    /* a non-finite input: NONFINITE, parameters and optimizer state unchanged */
    float before[H * 2], after[H * 2];
    mpscy_graph_tensor_read(g, 0, before, sizeof before, err, sizeof err);
    x[0] = INFINITY;
    st = mpscy_graph_step(g, &a, &r, err, sizeof err);
    CHECK(st == MPSCY_NONFINITE && r.applied == 0 && r.finite == 0, "non-finite step: %d %s", st, err);
    mpscy_graph_tensor_read(g, 0, after, sizeof after, err, sizeof err);
    CHECK(memcmp(before, after, sizeof before) == 0, "parameters untouched by a non-finite step");
    mpscy_graph_tensor_read(g, nt - 1, &t_step, sizeof t_step, err, sizeof err);
    CHECK(t_step == 300, "step count untouched: %lld", (long long)t_step);
    x[0] = 0.5f;

    /* x_src (the backend stages the rows itself) only where the device says so: not on the cpu,
     * whose info reports stage_min_bytes 0; refused before anything runs */
    mpscy_device_info di;
    CHECK(mpscy_device_info_get(dev, &di, err, sizeof err) == MPSCY_OK && di.stage_min_bytes == 0,
          "cpu stage_min_bytes %lld", (long long)di.stage_min_bytes);
    float src[B * 2] = {0};
    a.x_src = src;
    mpscy_graph_tensor_read(g, 0, before, sizeof before, err, sizeof err);
    st = mpscy_graph_step(g, &a, &r, err, sizeof err);
    CHECK(st == MPSCY_UNSUPPORTED && strstr(err, "x_src"), "x_src on cpu: %d %s", st, err);
    st = mpscy_graph_predict(g, &a, err, sizeof err);
    CHECK(st == MPSCY_UNSUPPORTED && strstr(err, "x_src"), "x_src on cpu, predict: %d %s", st, err);
    mpscy_graph_tensor_read(g, 0, after, sizeof after, err, sizeof err);
    CHECK(memcmp(before, after, sizeof before) == 0, "parameters untouched by a refused x_src step");
    a.x_src = NULL;

    /* predict: one call per batch into the output buffer */
    mpscy_buffer ob = NULL;
    float *o = NULL;
    mpscy_graph_io(g, MPSCY_IO_OUTPUT, 0, &ob, err, sizeof err);
    mpscy_buffer_host_pointer(ob, (void **)&o, NULL, err, sizeof err);
    a.batch = 5;
    CHECK(mpscy_graph_predict(g, &a, err, sizeof err) == MPSCY_OK && isfinite(o[0]) && isfinite(o[9]), "predict");

    mpscy_graph_destroy(g);

    /* the first Dense frozen: trainable parameters first in the slab, no ".grad" or optimizer
     * state for the frozen ones: dense_2's weight and bias, then dense_0's, 2 grads, 2 slots, step */
    L[1].flags |= MPSCY_FLAG_FROZEN;
    g = NULL;
    st = mpscy_graph_build(dev, &d, &g, err, sizeof err);
    CHECK(st == MPSCY_OK && g, "frozen build: %s", err);
    CHECK(mpscy_graph_tensor_count(g, &nt, err, sizeof err) == MPSCY_OK && nt == 9, "frozen tensor count %d", nt);
    int64_t want_offset[4] = {2 * H + 2, 2 * H + 2 + 2 * H, 0, 2 * H};  /* dense_0.weight, .bias, dense_2.weight, .bias */
    for (int32_t t = 0; t < 4; t++)
        CHECK(mpscy_graph_tensor_info(g, t, &ti, err, sizeof err) == MPSCY_OK && ti.role == MPSCY_ROLE_PARAM &&
              ti.offset == want_offset[t], "frozen layout: %s at %lld", ti.name, (long long)ti.offset);
    CHECK(mpscy_graph_tensor_info(g, 4, &ti, err, sizeof err) == MPSCY_OK && strcmp(ti.name, "dense_2.weight.grad") == 0,
          "first grad: %s", ti.name);
    CHECK(mpscy_graph_tensor_info(g, 6, &ti, err, sizeof err) == MPSCY_OK && ti.role == MPSCY_ROLE_OPTIM &&
          ti.count == 2 * H + 2, "exp_avg over the trainable floats: %lld", (long long)ti.count);
    mpscy_graph_tensor_read(g, 0, before, sizeof before, err, sizeof err);
    a.batch = B;
    CHECK(mpscy_graph_step(g, &a, &r, err, sizeof err) == MPSCY_OK && r.applied, "frozen step: %s", err);
    mpscy_graph_tensor_read(g, 0, after, sizeof after, err, sizeof err);
    CHECK(memcmp(before, after, sizeof before) == 0, "the frozen weight kept");
    mpscy_graph_destroy(g);

    /* class weights are copied at build: a graph built from an array changed afterwards computes
     * the loss of the weights it was built with (that of a graph built from {1, 3}), not the new
     * ones' (that of a graph built from {50, 0.01}) */
    L[1].flags &= ~MPSCY_FLAG_FROZEN;
    float cw[2] = {1.0f, 3.0f}, cw_same[2] = {1.0f, 3.0f}, cw_new[2] = {50.0f, 0.01f};
    const float *weights[3] = {cw, cw_same, cw_new};
    double eval_loss[3] = {0, 0, 0};
    a.batch = B;
    a.mode = MPSCY_MODE_EVAL;
    for (int k = 0; k < 3; k++) {
        mpscy_graph gw = NULL;
        d.loss.class_weight = weights[k];
        st = mpscy_graph_build(dev, &d, &gw, err, sizeof err);
        CHECK(st == MPSCY_OK && gw, "weighted build %d: %s", k, err);
        if (!gw) continue;
        if (k == 0) { cw[0] = 50.0f; cw[1] = 0.01f; }
        mpscy_graph_tensor_write(gw, 0, w1, sizeof w1, err, sizeof err);
        mpscy_graph_tensor_write(gw, 1, b1, sizeof b1, err, sizeof err);
        mpscy_graph_tensor_write(gw, 2, w2, sizeof w2, err, sizeof err);
        mpscy_graph_tensor_write(gw, 3, b2, sizeof b2, err, sizeof err);
        float *xw = NULL;
        int32_t *yw = NULL;
        mpscy_buffer xb = NULL, yb = NULL;
        mpscy_graph_io(gw, MPSCY_IO_INPUT, 0, &xb, err, sizeof err);
        mpscy_graph_io(gw, MPSCY_IO_TARGET, 0, &yb, err, sizeof err);
        mpscy_buffer_host_pointer(xb, (void **)&xw, NULL, err, sizeof err);
        mpscy_buffer_host_pointer(yb, (void **)&yw, NULL, err, sizeof err);
        for (int i = 0; i < B; i++) { xw[2 * i] = 0.1f * (float)(i % 7) - 0.3f; xw[2 * i + 1] = 0.05f * (float)i - 0.8f; yw[i] = i % 2; }
        st = mpscy_graph_step(gw, &a, &r, err, sizeof err);
        CHECK(st == MPSCY_OK && isfinite(r.loss), "weighted eval %d: %s", k, err);
        eval_loss[k] = r.loss;
        mpscy_graph_destroy(gw);
    }
    d.loss.class_weight = NULL;
    CHECK(eval_loss[0] == eval_loss[1] && eval_loss[0] != eval_loss[2], "class weights copied at build: %.9g %.9g %.9g",
          eval_loss[0], eval_loss[1], eval_loss[2]);
    mpscy_buffer_destroy(buf);
    mpscy_device_stats(dev, &s1, err, sizeof err);
    CHECK(s1.allocations - s1.frees == 1 && s1.peak_bytes >= s1.bytes_in_use, "everything freed but the device: %lld allocs, %lld frees",
          (long long)s1.allocations, (long long)s1.frees);
    mpscy_device_destroy(dev);
    printf("%s %d checks, %d failures\n", failures ? "FAILED" : "ok", checks, failures);
    return failures ? 1 : 0;
}
