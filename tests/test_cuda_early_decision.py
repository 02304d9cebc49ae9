"""The cuda one-kernel step's early decision (mlp.cu's fu_early): the step returns once its loss
and whether its update applies are known, proving every gradient finite from a bound on the
weight gradients' factors, before the gradients themselves exist; its gradient norm follows
(StepResult.grad_norm: brought by the next training step, or waited for when read first). It
must change nothing but when the host learns the result: every figure and parameter bit for bit
as the decision at the end of the kernel ($MPSCY_CUDA_FUSED_EARLY=0), both as the cpu's, and where
the bound cannot prove finiteness the end decides, as the cpu would."""
import pickle

import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import optim

from cuda_util import FUSED_MODELS, PARAM_TOL, _train_step_form, cuda_only, pair
from layer_refs import rel_err


def _reads(gpu, r, s, xs, ys):
    """How step s's result is read: at once, after the next step, after an evaluate, after a
    predict, pickled after synchronize, or only at the end (then after several steps)."""
    use = s % 6
    if use == 0:
        return r.grad_norm
    if use == 2:
        gpu.evaluate(xs[0], ys[0])
    elif use == 3:
        gpu.predict(xs[1])
    elif use == 4:
        gpu.synchronize()
        return pickle.loads(pickle.dumps(r)).grad_norm
    return None


@cuda_only
@pytest.mark.parametrize("name", ["benchmark_mlp", "deep_linear_mix", "one_layer", "long_batch"])
def test_early_decision_changes_nothing_but_when(name, monkeypatch, rng):
    """12 steps (full and partial batches, clipping on the benchmark MLP) with each result's
    norm read in one of six ways (_reads): with the early decision the losses, accuracies,
    decisions, gradient norms and parameters are those of the end's decision bit for bit, and
    within PARAM_TOL (norms 1e-4) of the cpu's. With it, every full-batch step of these models
    (their values far from the bound) decides early; whether the norm is still to come when the
    host looks depends on the host's speed, so: most of them, and none without it."""
    build, shape, batch = FUSED_MODELS[name]
    rows = [batch, batch, 5, batch, batch, batch, batch, 1, batch, batch, batch, batch]
    classes = build()[-1].units
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, classes, r).astype(np.int32) for r in rows]
    runs = []
    for early in ("1", "0"):
        monkeypatch.setenv("MPSCY_CUDA_FUSED_EARLY", early)
        cpu, gpu = pair(build, shape, batch=batch, opt=lambda: optim.Adam(1e-3),
                        clip_grad_norm=0.5 if name == "benchmark_mlp" else None)
        results, owed, norms = [], [], {}
        for s, (x, y) in enumerate(zip(xs, ys)):
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            owed.append(rg._norm_owed)
            assert rg.applied and rc.applied
            got = _reads(gpu, rg, s, xs, ys)
            if got is not None:
                norms[s] = got
            results.append((rc, rg))
        gpu.synchronize()
        for s, (rc, rg) in enumerate(results):
            assert abs(rg.grad_norm - rc.grad_norm) <= 1e-4 * rc.grad_norm, (s, rc.grad_norm, rg.grad_norm)
            assert not rg._norm_owed, s
            assert norms.get(s, rg.grad_norm) == rg.grad_norm, s
            assert abs(rg.loss - rc.loss) <= 1e-4 * max(abs(rc.loss), 1e-3), s
        pc, pg = cpu.get_parameters(), gpu.get_parameters()
        assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL
        full = [o for o, r in zip(owed, rows) if r == batch]
        if early == "1":  # the tail may end before the host looks (a slow host, the first step): most
            assert sum(full) >= len(full) // 2, owed
        else:
            assert not any(owed), owed
        runs.append(([(rg.loss, rg.accuracy, rg.applied, rg.grad_norm) for _, rg in results], pg))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@cuda_only
def test_a_dropped_result_leaves_the_next_norms_right(monkeypatch, rng):
    """A result dropped before its norm came (the graph holds it weakly) costs nothing and
    leaves the later ones right: 6 benchmark-MLP steps, every other result dropped at once,
    the kept ones' norms against the cpu's (1e-4)."""
    build, shape, batch = FUSED_MODELS["benchmark_mlp"]
    cpu, gpu = pair(build, shape, batch=batch, opt=lambda: optim.SGD(0.1, momentum=0.5))
    kept = []
    for s in range(6):
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        rc, rg = cpu.step(x, y), gpu.step(x, y)
        if s % 2:
            kept.append((rc.grad_norm, rg))
        del rg
    for want, rg in kept:
        assert abs(rg.grad_norm - want) <= 1e-4 * want, (want, rg.grad_norm)


def _bound_model(early, monkeypatch, capfd, w0, w1, w2):
    monkeypatch.setenv("MPSCY_CUDA_FUSED_EARLY", early)
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    capfd.readouterr()
    engines = pair(lambda: [L.Dense(2, use_bias=False), L.Dense(2, use_bias=False), L.Dense(2, use_bias=False)],
                   (2,), batch=2, opt=lambda: optim.SGD(1e-37))  # lr * dW0 ~ 0.1: a normal float
    for e in engines:
        names = list(e.get_parameters())
        assert len(names) == 3, names
        e.set_parameters(dict(zip(names, [np.asarray(w, np.float32) for w in (w0, w1, w2)])))
    assert _train_step_form(capfd).startswith("one kernel")
    return engines


@cuda_only
@pytest.mark.parametrize("early", ["1", "0"])
def test_where_the_bound_fails_the_end_decides(early, monkeypatch, capfd):
    """Two rows x = (a, 0) with label 1 through Dense(2) x 3 without bias, W2 = diag(1e3, -1e3):
    dz of layer 2 is (0.5, -0.5) a row, of layer 1 (500, 500) W1-scaled below. The bound
    b max|input| max|dz| is 2 * 1e36 * 500 = 1e39 > FLT_MAX / 2 in both cases, so the early
    decision declines and the end decides, as the cpu:
      - W0 = I, W1 = 1e-6 I: dW1 = 2 * 500 * 1e36 overflows while the loss (~1e33) is finite: a
        NonFiniteError, parameters unchanged;
      - W0 = 1e-10 I, W1 = 1e-3 I: every gradient finite (dW0 = 2 * 0.5 * 1e36): applied, the
        norm known at return, the loss, the norm and the parameters as the cpu's."""
    x = np.array([[1e36, 0.0], [1e36, 0.0]], np.float32)
    y = np.array([1, 1], np.int32)
    w2 = np.diag([1e3, -1e3])
    cpu, gpu = _bound_model(early, monkeypatch, capfd, np.eye(2), 1e-6 * np.eye(2), w2)
    before = gpu.get_parameters()
    for e in (cpu, gpu):
        with pytest.raises(mpscy.NonFiniteError):
            e.step(x, y)
    after = gpu.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    cpu, gpu = _bound_model(early, monkeypatch, capfd, 1e-10 * np.eye(2), 1e-3 * np.eye(2), w2)
    rc, rg = cpu.step(x, y), gpu.step(x, y)
    assert rg.applied and rc.applied and not rg._norm_owed
    assert np.isfinite(rc.loss) and rc.loss > 1e25
    assert abs(rg.loss - rc.loss) <= 1e-5 * rc.loss and abs(rg.grad_norm - rc.grad_norm) <= 1e-4 * rc.grad_norm
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL


@cuda_only
def test_a_failed_step_between_keeps_each_norm(rng):
    """A step whose deferred rows hold a NaN fails after its kernel ran, between a step whose norm
    is still to come and the next: later steps' norms take the other slot (the launch picks it),
    and the failed call's result already brings the owed one. Steps A (ok), B (NaN row: NonFiniteError), C (ok), D (NaN), E (ok),
    with A's norm read after B, the others' after E: each as the cpu's (1e-4), parameters too."""
    build, shape, batch = FUSED_MODELS["benchmark_mlp"]
    cpu, gpu = pair(build, shape, batch=batch, opt=lambda: optim.SGD(0.1, momentum=0.5))
    for _ in range(2):  # warm: an engine's first steps may end before the host looks
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        cpu.step(x, y), gpu.step(x, y).grad_norm
    kept, owed = [], []
    for s in range(5):
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        if s % 2:
            x[3, 100] = np.nan
            before = kept[-1][1]
            owed.append(before._norm_owed)  # the last good step's norm still to come as this one launches
            for e in (cpu, gpu):
                with pytest.raises(mpscy.NonFiniteError, match="row 3"):
                    e.step(x, y)
            # the failed step decided at its kernel's end, after the one before ended: its call paid the norm
            assert not before._norm_owed
            if s == 1:
                want, rg = kept[0]
                assert abs(rg.grad_norm - want) <= 1e-4 * want
            continue
        rc, rg = cpu.step(x, y), gpu.step(x, y)
        kept.append((rc.grad_norm, rg))
    assert any(owed), owed  # a failure came while a norm was still to come
    for want, rg in kept:
        assert abs(rg.grad_norm - want) <= 1e-4 * want, (want, rg.grad_norm)
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL


@cuda_only
def test_close_pays_the_owed_norm(rng):
    """Engine.close() lets the graph go even while the last result's norm is still to come: the
    result gets its norm first (as the cpu's, 1e-4) and lets go of the graph."""
    build, shape, batch = FUSED_MODELS["benchmark_mlp"]
    cpu, gpu = pair(build, shape, batch=batch, opt=lambda: optim.SGD(0.1, momentum=0.5))
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    for _ in range(6):  # until a step returns before its norm (the first ones may not)
        rc, rg = cpu.step(x, y), gpu.step(x, y)
        if rg._norm_owed:
            break
    assert rg._norm_owed
    gpu.close()
    assert not rg._norm_owed  # its reference to the graph dropped
    assert abs(rg.grad_norm - rc.grad_norm) <= 1e-4 * rc.grad_norm
