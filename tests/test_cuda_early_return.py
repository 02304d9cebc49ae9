"""A cuda training step that returns before its update has finished ($MPSCY_CUDA_EARLY, on by
default): later steps, reads and gradients-only calls give the bits of an engine that waits for
every step, and both match the cpu. The update's own arithmetic is tested in test_cuda_optim.py."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import optim

from cuda_util import FUSED_MODELS, LAYER_MODELS, PARAM_TOL, cuda_only, pair
from layer_refs import rel_err


@cuda_only
@pytest.mark.parametrize("fused", ["default", "0"])
@pytest.mark.parametrize("name", ["dense_relu", "conv_s2_dgrad", "batchnorm2d", "dropout"])
def test_early_return_matches_waiting(name, fused, monkeypatch, rng):
    """A training step returns once its result is final (loss, accuracy, update applied or not)
    while its update and BatchNorm commits still run (MPSCY_CUDA_EARLY, on by default). It then
    behaves as an engine that waits for every step (=0): 8 training steps (full and partial
    batches), each followed at once by a call that reads or uses the device (predict,
    parameters, evaluate, optimizer state, a learning-rate change, in turn), give bit-identical
    losses, accuracies, predictions, parameters, running statistics and optimizer slots, and both
    match the cpu. dense_relu by default takes the one-kernel step (mlp.cu)."""
    if fused == "0":
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    build, shape = LAYER_MODELS[name]
    rows = [16, 9, 16, 7, 16, 16, 9, 16]
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 5, r).astype(np.int32) for r in rows]
    runs = []
    for early in ("1", "0"):
        monkeypatch.setenv("MPSCY_CUDA_EARLY", early)
        cpu, gpu = pair(build, shape)
        seen = []
        for s, (x, y) in enumerate(zip(xs, ys)):
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            assert rg.applied and rc.applied
            assert abs(rg.loss - rc.loss) <= 1e-4 * max(abs(rc.loss), 1e-3), (s, rc.loss, rg.loss)
            seen.append((rg.loss, rg.accuracy))
            use = s % 5
            if use == 0:
                seen.append(gpu.predict(xs[0]))
            elif use == 1:
                seen.append(gpu.get_parameters())
            elif use == 2:
                seen.append(gpu.evaluate(xs[1], ys[1]))
            elif use == 3:
                seen.append(gpu.get_optimizer_state())
            else:
                cpu.learning_rate = gpu.learning_rate = 5e-4
        pg, pc = gpu.get_parameters(), cpu.get_parameters()
        for k in pc:
            assert rel_err(pg[k], pc[k]) <= PARAM_TOL, k
        runs.append((seen, pg))
    (seen1, p1), (seen0, p0) = runs
    assert len(seen1) == len(seen0) == 8 + 7
    for a, b in zip(seen1, seen0):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
        elif isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], dict):
                    assert all(np.array_equal(a[k][q], b[k][q]) for q in a[k]), k
                elif isinstance(a[k], np.ndarray):
                    assert np.array_equal(a[k], b[k]), k
                else:
                    assert a[k] == b[k], k
        else:
            assert a == b
    assert p1.keys() == p0.keys() and all(np.array_equal(p1[k], p0[k]) for k in p0)


@cuda_only
@pytest.mark.parametrize("model", ["wide", "one_kernel"])
def test_consecutive_steps_queue_behind_the_update(model, monkeypatch, rng):
    """Training steps one after another with integer labels: each next step's labels are checked
    and its batch staged while the last step's update still runs (the staging handle the label
    check reads does not wait for it), its kernels queued behind that update. Six steps, full
    and partial batches, a label out of range refused in between (nothing run), give the losses,
    accuracies and parameters of an engine that waits for every step (MPSCY_CUDA_EARLY=0) and of
    one whose staging handle waits (MPSCY_CUDA_IO_SETTLE=1), bit for bit. "wide": an 8.4M-parameter
    Adam update with clipping behind a deferred 256 KB batch; "one_kernel": the benchmark MLP's
    one-kernel step."""
    if model == "wide":
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
        build = lambda: [L.Dense(2048), L.ReLU(), L.Dense(10)]  # noqa: E731
        shape, batch, rows = (4096,), 16, [16, 16, 9, 16, 16, 16]
    else:
        build, shape, batch = FUSED_MODELS["benchmark_mlp"][0], (784,), 32
        rows = [32, 32, 7, 32, 32, 32]
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
    runs = []
    for knobs in ({}, {"MPSCY_CUDA_EARLY": "0"}, {"MPSCY_CUDA_IO_SETTLE": "1"}):
        for k in ("MPSCY_CUDA_EARLY", "MPSCY_CUDA_IO_SETTLE"):
            monkeypatch.setenv(k, knobs.get(k, ""))
        gpu = mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss="sparse_cross_entropy",
                           optimizer=optim.Adam(1e-3), batch_size=batch, device="cuda", seed=3,
                           clip_grad_norm=0.5)
        seen = []
        for s, (x, y) in enumerate(zip(xs, ys)):
            r = gpu.step(x, y)
            assert r.applied
            seen.append((r.loss, r.accuracy))
            if s == 3:
                with pytest.raises(mpscy.InvalidArgumentError, match="label 10 at row 2"):
                    gpu.step(x, np.where(np.arange(len(y)) == 2, 10, y).astype(np.int32))
        runs.append((seen, gpu.get_parameters(), gpu.get_optimizer_state()["step"]))
    for seen, params, steps in runs[1:]:
        assert seen == runs[0][0] and steps == runs[0][2] == 6
        assert sorted(params) == sorted(runs[0][1])
        for k in params:
            assert np.array_equal(params[k], runs[0][1][k]), k


@cuda_only
def test_early_return_reads_wait_for_the_update(monkeypatch, rng):
    """With 8.4 M parameters the Adam update (~0.1 GB of traffic) is still running when the step
    returns early. Reads made at once after it (parameters, one tensor, optimizer state, a
    gradients-only step, synchronize then parameters) see the update finished, clipping included:
    bit-identical to an engine that waits for every step (MPSCY_CUDA_EARLY=0)."""
    x = rng.standard_normal((16, 4096)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    got = []
    for early in ("1", "0"):
        monkeypatch.setenv("MPSCY_CUDA_EARLY", early)
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
        e = mpscy.Engine(mpscy.Sequential([L.Dense(2048), L.ReLU(), L.Dense(10)], input_shape=(4096,)),
                         loss="sparse_cross_entropy", optimizer=optim.Adam(1e-2), batch_size=16, device="cuda",
                         seed=5, clip_grad_norm=0.5)
        assert sum(v.size for v in e.get_parameters().values()) == 4096 * 2048 + 2048 + 2048 * 10 + 10
        reads = []
        for s in range(5):
            e.step(x, y)
            if s == 0:
                reads.append(e.get_parameters())
            elif s == 1:
                reads.append({"w": e.get_parameters()["dense_0.weight"]})
            elif s == 2:
                reads.append(e.get_optimizer_state()["exp_avg"])
            elif s == 3:
                reads.append(e.gradients(x, y))  # a gradients-only step on the same graph
            else:
                e.synchronize()
                reads.append(e.get_parameters())
        got.append(reads)
    for a, b in zip(*got):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
