"""The cuda one-kernel step's linger (mlp.cu's fu_linger, step.cu's claim): past its update the
kernel waits a while for the graph's next training step, which the host then hands it instead of
launching a new kernel. It must change nothing but when work starts: every loss, decision,
gradient norm and parameter bit for bit as with $MPSCY_CUDA_FUSED_LINGER=0, every other call on
the device stopping the wait at once (none waits for the linger to run out), and a kernel that
gave up before the next step came leaving that step to a launch."""
import os
import re
import time

import numpy as np
import pytest

import mpscy
from mpscy import optim

from cuda_util import FUSED_MODELS, cuda_only, pair

SECOND = "1000000"  # a linger of 1 s: longer than any host's turnaround between two calls
FAST = 0.25         # s: a call that had to wait for the linger to run out would take 1 s


def _engines(monkeypatch, capfd, linger, period=None):
    monkeypatch.setenv("MPSCY_CUDA_FUSED_LINGER", linger)
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    if period:
        monkeypatch.setenv("MPSCY_CUDA_SEQ_PERIOD", str(period))
    capfd.readouterr()
    build, shape, batch = FUSED_MODELS["benchmark_mlp"]  # 100 KB batches: deferred staging
    cpu, gpu = pair(build, shape, batch=batch, opt=lambda: optim.Adam(1e-3), clip_grad_norm=0.5)
    form = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mpscy: cuda train step:")][-1]
    assert form.startswith("mpscy: cuda train step: one kernel, grid")
    assert ("lingering 1000000 us for the next step" in form) == (linger == SECOND), form
    prefetch = linger != "0" and os.environ.get("MPSCY_CUDA_FUSED_PREFETCH", "1") != "0"
    assert ("relaying its pieces meanwhile" in form) == prefetch, form
    return cpu, gpu, batch, shape


def _close(gpu, capfd):
    """Closes the engine (quickly, while its kernel lingers) and reads MPSCY_CUDA_VERBOSE's lines:
    how many of its training steps a lingering kernel took, of how many it could have; how many
    copying blocks loaded their slice of the new weights for those steps while it waited, of how
    many there were (None without that line: no layer 0 in the copy, or
    $MPSCY_CUDA_FUSED_PREFETCH=0)."""
    t0 = time.perf_counter()
    gpu.close()
    assert time.perf_counter() - t0 < FAST
    err = capfd.readouterr().err
    m = re.findall(r"mpscy: cuda lingering kernel took (\d+) of (\d+) training steps", err)
    f = re.findall(r"mpscy: cuda lingering kernel: (\d+) of (\d+) copying blocks' weight slices loaded while it waited",
                   err)
    return (tuple(map(int, m[-1])) if m else (0, 0)), (tuple(map(int, f[-1])) if f else None)


def _took(gpu, capfd):
    return _close(gpu, capfd)[0]


def _near_cpu(pairs):
    """Every (cpu, gpu) result pair's loss and gradient norm within 1e-4 of the cpu's."""
    for rc, rg in pairs:
        assert abs(rg.loss - rc.loss) <= 1e-4 * rc.loss and abs(rg.grad_norm - rc.grad_norm) <= 1e-4 * rc.grad_norm


def _paired_steps(cpu, gpu, data, batch, shape, n, pause_from=0):
    """n training steps of the same batches on both engines, 1 ms of host time before each gpu
    step from step pause_from on: the gpu's (loss, grad_norm) of each, within 1e-4 of the cpu's,
    and its parameters after. The norms are read once every step is done: a norm read before it
    has landed waits for its step's kernel, which stops a linger."""
    out = []
    for k in range(n):
        x, y = _batch(data, batch, shape)
        rc = cpu.step(x, y)
        if k >= pause_from:
            time.sleep(0.001)
        out.append((rc, gpu.step(x, y)))
    params = gpu.get_parameters()
    _near_cpu(out)
    return [(rg.loss, rg.grad_norm) for _, rg in out], params


def _batch(rng, rows, shape, nan=False):
    x = rng.standard_normal((rows,) + shape).astype(np.float32)
    if nan:
        x[3, 100] = np.nan
    return x, rng.integers(0, 10, rows).astype(np.int32)


PLAN = (["step"] * 4 + ["evaluate"] + ["step"] * 3 + ["partial"] + ["step"] * 2 + ["nan"] + ["step"] * 3
        + ["predict"] + ["step"] * 2 + ["parameters"] + ["step"] * 2 + ["synchronize"] + ["step"] * 2)


def _run_plan(cpu, gpu, batch, shape, rng, check_fast):
    results = []
    for act in PLAN:
        x, y = _batch(rng, 5 if act == "partial" else batch, shape, nan=act == "nan")
        t0 = time.perf_counter()
        if act in ("step", "partial"):
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            assert rg.applied and rc.applied
            results.append((rc, rg))
        elif act == "nan":
            for e in (cpu, gpu):
                with pytest.raises(mpscy.NonFiniteError, match="row 3"):
                    e.step(x, y)
        elif act == "evaluate":
            assert gpu.evaluate(x, y)["loss"] == pytest.approx(cpu.evaluate(x, y)["loss"], rel=1e-4)
        elif act == "predict":
            np.testing.assert_allclose(gpu.predict(x), cpu.predict(x), rtol=1e-4, atol=1e-5)
        elif act == "parameters":
            gpu.get_parameters()
        else:
            gpu.synchronize()
        if check_fast:
            assert time.perf_counter() - t0 < FAST, act
    return results


@cuda_only
def test_linger_changes_nothing_but_when(monkeypatch, capfd, rng):
    """The benchmark MLP (Adam, norm clipping at 0.5) through 24 calls: training steps back to
    back, and between them an evaluate, a partial batch, a batch with a NaN row (NonFiniteError),
    a predict, a parameter read and a synchronize. With a linger of 1 s every full-batch training
    call right after another is taken by the lingering kernel (13 of the 19 full-batch ones) and
    every call returns within 0.25 s (none waits for the linger); the losses, accuracies,
    decisions, gradient norms and parameters are those without the linger bit for bit, and the
    losses and norms within 1e-4 of the cpu's."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for linger in (SECOND, "0"):
        cpu, gpu, batch, shape = _engines(monkeypatch, capfd, linger)
        results = _run_plan(cpu, gpu, batch, shape, np.random.default_rng(seed), check_fast=linger == SECOND)
        pg = gpu.get_parameters()
        runs.append(([(rg.loss, rg.accuracy, rg.applied, rg.grad_norm) for _, rg in results], pg))
        _near_cpu(results)
        full = [a in ("step", "nan") for a in PLAN]
        want = sum(1 for k in range(1, len(PLAN)) if full[k] and full[k - 1])
        assert (want, sum(full)) == (13, 19)
        assert _took(gpu, capfd) == ((want, sum(full)) if linger == SECOND else (0, 0))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@cuda_only
def test_a_kernel_that_gave_up_leaves_the_step_to_a_launch(monkeypatch, capfd, rng):
    """With a linger of 20 us and 2 ms of host time between steps, every kernel has given up (and
    said so) before the next step comes: the host reads that and launches each step, 0 of 8 taken;
    losses, norms and parameters as without the linger, bit for bit."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for linger in ("20", "0"):
        cpu, gpu, batch, shape = _engines(monkeypatch, capfd, linger)
        data = np.random.default_rng(seed)
        out = []
        for _ in range(8):
            x, y = _batch(data, batch, shape)
            time.sleep(0.002)
            rg = gpu.step(x, y)
            out.append(rg)
        pg = gpu.get_parameters()
        runs.append(([(r.loss, r.grad_norm) for r in out], pg))
        assert _took(gpu, capfd) == ((0, 8) if linger == "20" else (0, 0))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@cuda_only
def test_the_step_numbers_starting_again_stop_the_linger(monkeypatch, capfd, rng):
    """Deferred steps are numbered 1 .. period ($MPSCY_CUDA_SEQ_PERIOD=3 here); when the numbers
    start again the device's marks are cleared in stream order, so that step is launched, not
    handed over: of 10 steps back to back, steps 1, 4, 7 and 10 launch and the other 6 are taken.
    Everything as without the linger, bit for bit, and within 1e-4 of the cpu."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for linger in (SECOND, "0"):
        cpu, gpu, batch, shape = _engines(monkeypatch, capfd, linger, period=3)
        data = np.random.default_rng(seed)
        out = []
        for _ in range(10):
            x, y = _batch(data, batch, shape)
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            out.append((rc, rg))
        pg = gpu.get_parameters()
        _near_cpu(out)
        runs.append(([(rg.loss, rg.grad_norm) for _, rg in out], pg))
        assert _took(gpu, capfd) == ((6, 10) if linger == SECOND else (0, 0))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@cuda_only
def test_two_engines_take_turns(monkeypatch, capfd, rng):
    """Two engines on one GPU, their training steps taking turns: each step first stops the other
    engine's lingering kernel (within 0.25 s, not the linger's 1 s), so none is taken (0 of 6
    each), and both train as they do alone without the linger, bit for bit."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for linger in (SECOND, "0"):
        _, a, batch, shape = _engines(monkeypatch, capfd, linger)
        _, b, _, _ = _engines(monkeypatch, capfd, linger)
        data = np.random.default_rng(seed)
        out = []
        for _ in range(6):
            for e in (a, b):
                x, y = _batch(data, batch, shape)
                t0 = time.perf_counter()
                out.append(e.step(x, y))
                assert time.perf_counter() - t0 < FAST
        params = (a.get_parameters(), b.get_parameters())
        runs.append(([(r.loss, r.grad_norm) for r in out], params))
        want = (0, 6) if linger == SECOND else (0, 0)
        assert (_took(a, capfd), _took(b, capfd)) == (want, want)
    assert runs[0][0] == runs[1][0]
    for k in range(2):
        assert all(np.array_equal(runs[0][1][k][n], runs[1][1][k][n]) for n in runs[0][1][k])


@cuda_only
def test_the_next_step_begun_while_lingering(monkeypatch, capfd, rng):
    """While the kernel lingers it begins the next step ($MPSCY_CUDA_FUSED_PREFETCH, on by default):
    block 0 relays its pieces as the host flags them, and each copying block loads its slice of
    the new weights once every block's update is done. With 1 ms or more of host time between
    steps every copying block does so in each of the 9 steps of 10 back to back that the kernel
    takes (their number times 9, above 0); with 0 the line is not printed. Losses, norms and
    parameters bit for bit as without the linger, either way, and within 1e-4 of the cpu."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for linger, prefetch in ((SECOND, "1"), (SECOND, "0"), ("0", "1")):
        monkeypatch.setenv("MPSCY_CUDA_FUSED_PREFETCH", prefetch)
        cpu, gpu, batch, shape = _engines(monkeypatch, capfd, linger)
        runs.append(_paired_steps(cpu, gpu, np.random.default_rng(seed), batch, shape, 10))
        took, early = _close(gpu, capfd)
        if linger == "0":
            assert (took, early) == ((0, 0), None)
            continue
        assert took == (9, 10)
        if prefetch == "0":
            assert early is None
        else:
            assert early is not None and early[1] > 0 and early[1] % 9 == 0 and early[0] == early[1], early
    for k in range(1, len(runs)):
        assert runs[k][0] == runs[0][0]
        assert all(np.array_equal(runs[k][1][n], runs[0][1][n]) for n in runs[0][1])


@cuda_only
def test_block_0_without_a_share_of_the_update(monkeypatch, capfd, rng):
    """Block 0 of the lingering kernel takes no share of the optimizer update by default (it
    reaches the linger sooner); $MPSCY_CUDA_FUSED_SKIP0=0 gives it one. 30 steps back to back and
    10 with 1 ms of host time between them: the lingering kernel takes 39 of 40 either way, its
    copying blocks' weight slices counted in 39 steps, and every loss, norm and parameter is bit
    for bit the same (and within 1e-4 of the cpu)."""
    seed = int(rng.integers(1 << 30))
    runs = []
    for skip in ("1", "0"):
        monkeypatch.setenv("MPSCY_CUDA_FUSED_SKIP0", skip)
        cpu, gpu, batch, shape = _engines(monkeypatch, capfd, SECOND)
        runs.append(_paired_steps(cpu, gpu, np.random.default_rng(seed), batch, shape, 40, pause_from=30))
        took, early = _close(gpu, capfd)
        assert took == (39, 40) and early is not None and early[1] > 0 and early[1] % 39 == 0, (took, early)
    assert runs[1][0] == runs[0][0]
    assert all(np.array_equal(runs[1][1][n], runs[0][1][n]) for n in runs[0][1])
