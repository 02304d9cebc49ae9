"""The cuda engine around its kernels: partial batches, no allocation and one ABI call per step
(native counters, and memray when installed), errors that leave state untouched, deferred staging
of large inputs (pieces pulled while the graph runs), TF32 as an opt-in, device info. Layer,
optimizer and kernel-form results are in the other test_cuda_*.py files."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import optim

from cuda_util import (FORWARD_TOL, FUSED_MODELS, LAYER_MODELS, PARAM_TOL, _train_step_form, compare_training,
                       cuda_only, pair)
from layer_refs import rel_err


# ----------------------------------------------------------------------------- partial batches, allocation, errors

@cuda_only
def test_partial_batches_train_on_exactly_their_rows(rng):
    """Full batches replay the captured graph, partial ones launch the same kernels over exactly
    their rows; many sizes, interleaved: rows beyond the batch never leak into a step."""
    cpu, gpu = pair(LAYER_MODELS["dense_relu"][0], (12,), batch=32)
    rows = [32, 17, 32, 5, 1, 32, 9, 2, 3, 4, 6, 7, 8, 10, 11, 32]
    compare_training(cpu, gpu, rng, steps=2 * len(rows), rows=rows)


@cuda_only
def test_no_allocation_and_one_call_per_step(rng):
    cpu, gpu = pair(LAYER_MODELS["dense_relu"][0], (12,), batch=32)
    x = rng.standard_normal((32, 12)).astype(np.float32)
    y = rng.integers(0, 5, 32).astype(np.int32)
    xs, ys = x[:20].copy(), y[:20].copy()
    for _ in range(3):  # capture the full and the partial batch graphs
        gpu.step(x, y)
        gpu.step(xs, ys)
    s0 = gpu.stats()
    for _ in range(500):
        gpu.step(x, y)
        gpu.step(xs, ys)
    s1 = gpu.stats()
    assert s1["allocations"] == s0["allocations"] and s1["frees"] == s0["frees"]
    assert s1["bytes_in_use"] == s0["bytes_in_use"]
    assert s1["steps"] - s0["steps"] == 1000
    assert s1["calls"] - s0["calls"] == 1000  # one ABI call per step
    # every malloc/mmap of the process over 1,000 full-batch steps (graph replays). Measured on an
    # H100 (driver 580): one 88-byte block, allocated and freed again inside the CUDA driver (no
    # symbols), about once per thousand launches; tests/test_alloc.py's 500 steps see none. So:
    # nothing may stay allocated, and at most that one transient block.
    memray = pytest.importorskip("memray")
    import gc
    import tempfile
    from alloc_trace import trace_steps
    gc.collect()
    with tempfile.TemporaryDirectory() as d:
        on_thread, elsewhere, r = trace_steps(memray, lambda: gpu.step(x, y), 1000, d)
    assert r.applied
    assert on_thread == [], f"{len(on_thread)} host allocations on the stepping thread in 1,000 cuda steps"
    # the driver's helper threads: one 88-byte block about once per thousand launches (H100)
    assert len(elsewhere) <= 2, f"{len(elsewhere)} allocations on driver threads over 1,000 cuda steps"


@cuda_only
def test_errors_leave_state_untouched(rng):
    cpu, gpu = pair(LAYER_MODELS["dense_relu"][0], (12,), loss="sparse_cross_entropy")
    x = rng.standard_normal((16, 12)).astype(np.float32)
    y = rng.integers(0, 5, 16).astype(np.int32)
    gpu.step(x, y)
    before, state = gpu.get_parameters(), gpu.get_optimizer_state()
    bad = y.copy()
    bad[3] = 5
    with pytest.raises(mpscy.InvalidArgumentError, match="label"):
        gpu.step(x, bad)
    with pytest.raises(mpscy.ShapeError):
        gpu.step(np.zeros((17, 12), np.float32), np.zeros(17, np.int32))
    with pytest.raises(mpscy.DTypeError):
        gpu.step(x.astype(np.float64), y)
    with pytest.raises(mpscy.NonFiniteError):
        gpu.step(np.full((16, 12), np.nan, np.float32), y)
    # a finite input whose forward overflows: NonFiniteError on the device's decision
    huge = {k: np.full_like(v, 3e37) for k, v in before.items()}
    gpu.set_parameters(huge)
    with pytest.raises(mpscy.NonFiniteError, match="not finite"):
        gpu.step(x, y)
    after = gpu.get_parameters()
    assert all(np.array_equal(after[k], huge[k]) for k in huge)
    assert gpu.get_optimizer_state()["step"] == state["step"]
    for slot, v in state.items():
        if isinstance(v, dict):
            s = gpu.get_optimizer_state()[slot]
            assert all(np.array_equal(s[p], v[p]) for p in v), slot
    gpu.set_parameters(before)
    assert gpu.step(x, y).applied
    assert gpu.get_optimizer_state()["step"] == state["step"] + 1


# deferred staging (step.cu): one input of 64 KB or more at the built batch is copied into
# pinned memory by the host while the step's graph already runs, piece by piece, each piece
# flagged for the graph's pull kernel

def _deferred_cnn():
    return [L.Conv2D(8, 3, padding=1, bias=False), L.BatchNorm(), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(10)]


@cuda_only
@pytest.mark.parametrize("threads", ["1", "4"])
def test_deferred_staging_matches_cpu(threads, monkeypatch, rng):
    """A (3, 32, 32) input at batch 32 (384 KB: 12 pieces of 32 KB) on one staging thread and on
    four: training with full and partial batches (partial ones are staged before they run),
    eval and predict all agree with the cpu, which stages everything before the call."""
    monkeypatch.setenv("MPSCY_STAGE_THREADS", threads)
    cpu, gpu = pair(_deferred_cnn, (3, 32, 32), batch=32)
    compare_training(cpu, gpu, rng, steps=12, rows=[32, 32, 5, 32])
    x = rng.standard_normal((70, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 70).astype(np.int32)
    # the trained parameters agree within PARAM_TOL (12 Adam steps through a BatchNorm, whose sums
    # each device orders its own way), so their predictions do: 1.35e-5 with the first layer's
    # weight gradient by output rows (conv_dw_rows), within 1e-5 by its tiles
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= PARAM_TOL
    ec, eg = cpu.evaluate(x, y), gpu.evaluate(x, y)
    assert abs(eg["loss"] - ec["loss"]) <= 1e-5 * abs(ec["loss"]) and eg["accuracy"] == ec["accuracy"]


@cuda_only
@pytest.mark.parametrize("pdl", ["default", "1"])
def test_first_convolution_beside_the_pull_gives_the_same_bits(pdl, monkeypatch, rng):
    """The first convolution of a deferred input starts while the pull still runs, each block once
    the parts holding its samples are copied (MPSCY_CUDA_PULL_CONV, on by default). It computes
    exactly what it computes after the whole pull (=0): with the ReLU fused (the README's first
    layer) and with BatchNorm after it, 8 training steps over full and partial batches (partial
    ones are staged before they run) on one staging thread and on four, then evaluate and predict
    (more rows than a batch, so a partial last batch too), give bit-identical losses, parameters,
    predictions and evaluations, and each run matches the cpu. The third model's 32 channels at
    batch 64 run as blocks of 16 channels beside the pull and of all 32 after it."""
    if pdl != "default":
        monkeypatch.setenv("MPSCY_CUDA_PDL", pdl)
    adam, sgd = (lambda: optim.Adam(1e-3)), (lambda: optim.SGD(0.01, momentum=0.9))
    models = [(_deferred_cnn, 32, adam),
              (lambda: [L.Conv2D(16, 3, padding=1), L.ReLU(), L.Conv2D(8, 3, 2, 1), L.ReLU(), L.Flatten(),
                        L.Dense(10)], 32, adam),
              (lambda: [L.Conv2D(32, 3, padding=1), L.ReLU(), L.Conv2D(8, 3, 2, 1), L.ReLU(), L.Flatten(),
                        L.Dense(10)], 64, sgd)]
    for build, batch, opt in models:
        rows = [batch, batch, 5, batch, batch, batch * 19 // 32, batch, batch]
        xs = [rng.standard_normal((r, 3, 32, 32)).astype(np.float32) for r in rows]
        ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
        xe = rng.standard_normal((2 * batch + 6, 3, 32, 32)).astype(np.float32)
        ye = rng.integers(0, 10, len(xe)).astype(np.int32)
        runs = []
        for beside, threads in (("1", "4"), ("1", "1"), ("0", "4")):
            monkeypatch.setenv("MPSCY_CUDA_PULL_CONV", beside)
            monkeypatch.setenv("MPSCY_STAGE_THREADS", threads)
            cpu, gpu = pair(build, (3, 32, 32), opt=opt, batch=batch)
            losses = []
            for x, y in zip(xs, ys):
                rc, rg = cpu.step(x, y), gpu.step(x, y)
                assert rg.applied and rc.applied
                assert abs(rg.loss - rc.loss) <= 1e-4 * max(abs(rc.loss), 1e-3), (rc.loss, rg.loss)
                losses.append(rg.loss)
            pg, pc = gpu.get_parameters(), cpu.get_parameters()
            assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL
            pred = gpu.predict(xe)
            assert rel_err(pred, cpu.predict(xe)) <= FORWARD_TOL
            runs.append((losses, pg, pred, gpu.evaluate(xe, ye)))
        assert len(runs[0][1]) >= 4
        for losses, pg, pred, ev in runs[1:]:
            assert losses == runs[0][0]
            assert all(np.array_equal(pg[k], runs[0][1][k]) for k in pg)
            assert np.array_equal(pred, runs[0][2]) and ev == runs[0][3]


@cuda_only
def test_deferred_nan_input_leaves_state_untouched(rng):
    """A NaN or Inf found while the graph already runs: NonFiniteError naming the row, as when
    the caller's check finds it first (by its row in the caller's array, with the same message,
    through predict and evaluate over several batches too); parameters, BatchNorm statistics, optimizer state and the
    step count stay as they were, and the next step matches a cpu engine that never saw it."""
    cpu, gpu = pair(_deferred_cnn, (3, 32, 32), batch=32)
    x = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    cpu.step(x, y)
    gpu.step(x, y)
    before, state = gpu.get_parameters(), gpu.get_optimizer_state()
    for row, value in ((0, np.nan), (17, np.inf), (31, -np.inf)):
        bad = x.copy()
        bad[row, 2, 31, 31] = value  # the last element of its row: pieces' edges included
        with pytest.raises(mpscy.NonFiniteError, match=f"NaN or Inf at row {row}"):
            gpu.step(bad, y)
        with pytest.raises(mpscy.NonFiniteError, match=f"NaN or Inf at row {row}"):
            gpu.predict(bad)
        with pytest.raises(mpscy.NonFiniteError, match=f"NaN or Inf at row {row}"):
            gpu.evaluate(bad, y)
    # predict and evaluate over several batches name the row in the caller's array, with the
    # message of a row the caller's check finds (row 66 is in the last, partial batch, staged first)
    xl, yl = np.concatenate([x, x, x[:5]]), np.concatenate([y, y, y[:5]])
    for row in (33, 63, 66):
        bad = xl.copy()
        bad[row, 1, 0, 0] = np.nan
        with pytest.raises(mpscy.NonFiniteError, match=f"^x contains NaN or Inf at row {row}$"):
            gpu.predict(bad)
        with pytest.raises(mpscy.NonFiniteError, match=f"^x contains NaN or Inf at row {row}$"):
            gpu.evaluate(bad, yl)
    after = gpu.get_parameters()
    assert all(np.array_equal(after[k], before[k]) for k in before)  # running_mean/var included
    got = gpu.get_optimizer_state()
    assert got["step"] == state["step"] == 1
    for slot, v in state.items():
        if isinstance(v, dict):
            assert all(np.array_equal(got[slot][p], v[p]) for p in v), slot
    x2 = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    rc, rg = cpu.step(x2, y), gpu.step(x2, y)
    assert rg.applied and abs(rg.loss - rc.loss) <= 1e-4 * abs(rc.loss)
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL


@cuda_only
def test_deferred_one_kernel_step(monkeypatch, capfd, rng):
    """The one-kernel MLP step (mlp.cu) pulls a deferred input in its own copy phase: the
    benchmark MLP (784 inputs at batch 32: 100 KB, four pieces) on two staging threads (the
    default), on one and on four gives the same losses and parameters, bit for bit, as with the batch staged before the launch
    (MPSCY_CUDA_DEFER=0), over full and partial batches (partial ones are staged first), and each
    run matches the cpu. A NaN or Inf then fails the step naming its row and leaves parameters,
    optimizer state and step count as they were; the next step matches the cpu."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    build = FUSED_MODELS["benchmark_mlp"][0]
    rows = [32, 32, 7, 32, 32, 1, 32, 32]
    xs = [rng.standard_normal((r, 784)).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
    runs = []
    for defer, threads in (("1", None), ("1", "1"), ("1", "4"), ("0", "1")):  # None: the default, two
        monkeypatch.setenv("MPSCY_CUDA_DEFER", defer)
        if threads is None:
            monkeypatch.delenv("MPSCY_STAGE_THREADS", raising=False)
        else:
            monkeypatch.setenv("MPSCY_STAGE_THREADS", threads)
        capfd.readouterr()
        cpu, gpu = pair(build, (784,), batch=32)
        assert _train_step_form(capfd).startswith("one kernel, grid")
        losses = []
        for x, y in zip(xs, ys):
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            assert rg.applied and abs(rg.loss - rc.loss) <= 1e-4 * abs(rc.loss), (rc.loss, rg.loss)
            losses.append(rg.loss)
        pc, pg = cpu.get_parameters(), gpu.get_parameters()
        assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL
        runs.append((losses, pg, cpu, gpu))
    for losses, pg, _, _ in runs[1:]:
        assert losses == runs[0][0]
        assert all(np.array_equal(pg[k], runs[0][1][k]) for k in pg)
    monkeypatch.setenv("MPSCY_CUDA_DEFER", "1")
    _, _, cpu, gpu = runs[0]
    before, state = gpu.get_parameters(), gpu.get_optimizer_state()
    for row, value in ((0, np.nan), (13, np.inf), (31, -np.inf)):
        bad = xs[0].copy()
        bad[row, 783] = value  # the last element of its row; row 31's is the last of the batch
        with pytest.raises(mpscy.NonFiniteError, match=f"NaN or Inf at row {row}"):
            gpu.step(bad, ys[0])
    after, got = gpu.get_parameters(), gpu.get_optimizer_state()
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert got["step"] == state["step"] == len(rows)
    for slot, v in state.items():
        if isinstance(v, dict):
            assert all(np.array_equal(got[slot][p], v[p]) for p in v), slot
    rc, rg = cpu.step(xs[1], ys[1]), gpu.step(xs[1], ys[1])
    assert rg.applied and abs(rg.loss - rc.loss) <= 1e-4 * abs(rc.loss)
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL


@cuda_only
@pytest.mark.parametrize("model", ["pull", "one_kernel"])
def test_deferred_step_numbers_start_again_cleanly(model, monkeypatch, rng):
    """Deferred steps carry a number (their pieces' flags, and the device's mark of a step whose
    input held a NaN or Inf) that starts again at 1 after 2^31 - 1 steps; the device's marks are
    cleared then, so a later step with an earlier bad step's number still applies its update.
    With the period made 3 (MPSCY_CUDA_SEQ_PERIOD, a testing knob), steps numbered 1 .. 3, 1 .. 3:
    the second a NaN (NonFiniteError naming its row), then four clean ones, the last numbered as
    the bad one: every clean step applied, and losses and parameters bit for bit those of an
    engine with the default period given the same calls. Both of the device's readers of the
    flags: the pull kernel (a convolution model) and the one-kernel MLP step's copy phase."""
    if model == "pull":
        build, shape, batch = _deferred_cnn, (3, 32, 32), 32
    else:
        build, shape, batch = FUSED_MODELS["benchmark_mlp"][0], (784,), 32
    xs = [rng.standard_normal((batch,) + shape).astype(np.float32) for _ in range(5)]
    ys = [rng.integers(0, 10, batch).astype(np.int32) for _ in range(5)]
    bad = xs[0].copy()
    bad[5].flat[7] = np.nan
    runs = []
    for period in ("3", ""):
        monkeypatch.setenv("MPSCY_CUDA_SEQ_PERIOD", period)
        gpu = mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss="sparse_cross_entropy",
                           optimizer=optim.Adam(1e-3), batch_size=batch, device="cuda", seed=3)
        losses = [gpu.step(xs[0], ys[0])]
        with pytest.raises(mpscy.NonFiniteError, match="NaN or Inf at row 5"):
            gpu.step(bad, ys[0])
        losses += [gpu.step(x, y) for x, y in zip(xs[1:], ys[1:])]
        assert [r.applied for r in losses] == [True] * 5, period
        runs.append(([r.loss for r in losses], gpu.get_parameters(), gpu.get_optimizer_state()["step"]))
    assert runs[0][0] == runs[1][0] and runs[0][2] == runs[1][2] == 5
    assert sorted(runs[0][1]) == sorted(runs[1][1])
    for k in runs[0][1]:
        assert np.array_equal(runs[0][1][k], runs[1][1][k]), k


@cuda_only
def test_deferred_staging_allocates_nothing(rng):
    """Deferred steps allocate nothing and stay one ABI call each, on the staging threads too."""
    gpu = pair(_deferred_cnn, (3, 32, 32), batch=32)[1]
    x = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    for _ in range(3):
        gpu.step(x, y)
        gpu.predict(x)
    s0 = gpu.stats()
    for _ in range(300):
        gpu.step(x, y)
    s1 = gpu.stats()
    assert s1["allocations"] == s0["allocations"] and s1["frees"] == s0["frees"]
    assert s1["calls"] - s0["calls"] == 300


# ----------------------------------------------------------------------------- tf32, device info

@cuda_only
def test_tf32_is_opt_in(rng):
    build = lambda: [L.Dense(512), L.ReLU(), L.Dense(10)]
    cpu, gpu = pair(build, (512,), batch=64)
    tf = mpscy.Engine(mpscy.Sequential(build(), input_shape=(512,)), loss="sparse_cross_entropy",
                      batch_size=64, device="cuda", seed=3, precision="tf32")
    x = rng.standard_normal((64, 512)).astype(np.float32)
    ref = cpu.predict(x)
    e32, e_tf = rel_err(gpu.predict(x), ref), rel_err(tf.predict(x), ref)
    assert e32 <= FORWARD_TOL
    assert 10 * e32 < e_tf < 1e-2, (e32, e_tf)


@cuda_only
def test_device_info():
    info = mpscy.Engine(mpscy.Sequential([L.Dense(4)], input_shape=(3,)), loss="mse", device="cuda").device_info()
    assert info["backend"] == "cuda" and info["threads"] > 0 and info["memory_bytes"] > 0
    assert mpscy.backends()[0] == "cuda"
