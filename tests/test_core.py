"""Core: Dense, ReLU, sparse cross-entropy and MSE against float64 NumPy references (whose
gradients are themselves checked by central finite differences), SGD and Adam over 20 steps
against NumPy re-implementations of torch.optim, partial batches, initialization, the Python API."""
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

from layer_refs import numeric_grad, rel_err

# ------------------------------------------------------------------ float64 references


def ref_forward(P, x, names=("dense_0", "dense_2")):
    """MLP Dense-ReLU-Dense in float64; returns output and the cache for backward."""
    w1, b1 = P[f"{names[0]}.weight"], P[f"{names[0]}.bias"]
    w2, b2 = P[f"{names[1]}.weight"], P[f"{names[1]}.bias"]
    h = x.reshape(len(x), -1) @ w1.T + b1
    r = np.maximum(h, 0)
    return r @ w2.T + b2, (x.reshape(len(x), -1), h, r, w1, w2)


def ref_backward(dout, cache):
    x, h, r, w1, w2 = cache
    g = {"dense_2.weight": dout.T @ r, "dense_2.bias": dout.sum(0)}
    dr = dout @ w2
    dh = dr * (h > 0)
    g["dense_0.weight"] = dh.T @ x
    g["dense_0.bias"] = dh.sum(0)
    g["input"] = dh @ w1
    return g


def ref_sparse_ce(logits, labels, smoothing=0.0):
    n, c = logits.shape
    m = logits.max(1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(1, keepdims=True))
    logp = logits - lse
    q = np.full((n, c), smoothing / c)
    q[np.arange(n), labels] += 1 - smoothing
    loss = -(q * logp).sum() / n
    return loss, (np.exp(logp) - q) / n


def ref_mse(out, target):
    d = out - target
    return (d ** 2).mean(), 2 * d / d.size


def as64(d):
    return {k: v.astype(np.float64) for k, v in d.items()}


def mlp(inputs=12, hidden=16, classes=5, shape=None):
    return mpscy.Sequential([layers.Dense(hidden), layers.ReLU(), layers.Dense(classes)],
                            input_shape=shape or (inputs,))


# ------------------------------------------------------------------ references are right


def test_reference_gradients_match_finite_differences(rng):
    """The float64 references' analytic gradients agree with central differences to 1e-6."""
    P = {"dense_0.weight": rng.standard_normal((7, 4)), "dense_0.bias": rng.standard_normal(7),
         "dense_2.weight": rng.standard_normal((3, 7)), "dense_2.bias": rng.standard_normal(3)}
    x = rng.standard_normal((5, 4))
    labels = rng.integers(0, 3, 5)
    target = rng.standard_normal((5, 3))
    for loss in ("ce", "mse"):
        def f():
            out, _ = ref_forward(P, x)
            return ref_sparse_ce(out, labels, 0.1)[0] if loss == "ce" else ref_mse(out, target)[0]
        out, cache = ref_forward(P, x)
        dout = ref_sparse_ce(out, labels, 0.1)[1] if loss == "ce" else ref_mse(out, target)[1]
        g = ref_backward(dout, cache)
        for name in P:
            assert rel_err(g[name], numeric_grad(f, P[name])) < 1e-6, (loss, name)
        assert rel_err(g["input"], numeric_grad(f, x)) < 1e-6


# ------------------------------------------------------------------ native vs references


@pytest.mark.parametrize("loss", ["sparse_cross_entropy", "mse"])
@pytest.mark.parametrize("rows", [8, 5, 1])
def test_forward_loss_and_gradients(device, rng, loss, rows):
    model = mlp()
    engine = mpscy.Engine(model, loss=loss, batch_size=8, device=device, seed=3, input_gradients=True)
    P = as64(engine.get_parameters())
    x = rng.standard_normal((rows, 12)).astype(np.float32)
    if loss == "mse":
        y = rng.standard_normal((rows, 5)).astype(np.float32)
    else:
        y = rng.integers(0, 5, rows).astype(np.int64)
    out, cache = ref_forward(P, x.astype(np.float64))
    ref_loss, dout = ref_sparse_ce(out, y) if loss != "mse" else ref_mse(out, y.astype(np.float64))
    g_ref = ref_backward(dout, cache)

    assert np.abs(engine.predict(x) - out).max() < 1e-5 * max(1, np.abs(out).max())
    g = engine.gradients(x, y)
    assert abs(g["loss"] - ref_loss) < 1e-5 * max(1, abs(ref_loss))
    for name in ("dense_0.weight", "dense_0.bias", "dense_2.weight", "dense_2.bias", "input"):
        assert rel_err(g[name], g_ref[name]) < 1e-4, name
    assert g["input"].shape == x.shape


def test_wrong_gradient_would_fail(device, rng):
    """The tolerance above is far below the size of a real mistake (here a missing ReLU mask)."""
    engine = mpscy.Engine(mlp(), loss="mse", batch_size=8, device=device, seed=3)
    P = as64(engine.get_parameters())
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.standard_normal((8, 5)).astype(np.float32)
    out, (x2, h, r, w1, w2) = ref_forward(P, x.astype(np.float64))
    dout = ref_mse(out, y)[1]
    wrong = (dout @ w2).T @ x2  # no (h > 0) mask
    assert rel_err(engine.gradients(x, y)["dense_0.weight"], wrong) > 1e-2


def test_dense_flattens_higher_rank_inputs_row_major(device, rng):
    model = mpscy.Sequential([layers.Dense(6), layers.ReLU(), layers.Dense(3)], input_shape=(2, 3, 4))
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device=device)
    P = as64(engine.get_parameters())
    assert P["dense_0.weight"].shape == (6, 24)
    x = rng.standard_normal((4, 2, 3, 4)).astype(np.float32)
    out, _ = ref_forward(P, x.astype(np.float64))
    assert np.abs(engine.predict(x) - out).max() < 1e-5


def test_dense_without_bias(device, rng):
    model = mpscy.Sequential([layers.Dense(4, bias=False)], input_shape=(3,))
    engine = mpscy.Engine(model, loss="mse", batch_size=2, device=device)
    params = engine.get_parameters()
    assert list(params) == ["dense_0.weight"]
    x = rng.standard_normal((2, 3)).astype(np.float32)
    assert np.allclose(engine.predict(x), x @ params["dense_0.weight"].T, atol=1e-6)


def test_partial_batch_uses_exactly_the_given_rows(device, rng):
    """A last partial batch: the loss is the mean over the rows given; stale rows never leak in."""
    engine = mpscy.Engine(mlp(), batch_size=16, device=device, optimizer=optim.SGD(lr=0.0))
    P = as64(engine.get_parameters())
    full_x = rng.standard_normal((16, 12)).astype(np.float32) * 100
    full_y = rng.integers(0, 5, 16)
    engine.step(full_x, full_y)  # fills the staging buffers with very different rows
    x = rng.standard_normal((3, 12)).astype(np.float32)
    y = rng.integers(0, 5, 3)
    r = engine.step(x, y)
    out, _ = ref_forward(P, x.astype(np.float64))
    assert r.batch_size == 3
    assert abs(r.loss - ref_sparse_ce(out, y)[0]) < 1e-5
    assert r.accuracy == np.mean(out.argmax(1) == y)


def test_int32_and_int64_labels_agree(device, rng):
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    results = []
    for dtype in (np.int32, np.int64):
        engine = mpscy.Engine(mlp(), batch_size=8, device=device, seed=1)
        results.append([engine.step(x, y.astype(dtype)).loss for _ in range(3)])
    assert results[0] == results[1]


# ------------------------------------------------------------------ optimizers vs NumPy torch.optim


def ref_sgd(p, g, state, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False):
    g = -g if maximize else g
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        buf = state.get("buf")
        buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
        state["buf"] = buf
        g = g + momentum * buf if nesterov else buf
    return p - lr * g


def ref_adam(p, g, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
             maximize=False, decoupled=False):
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    g = -g if maximize else g
    if decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * p
    m = state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", 0) + (1 - b2) * g * g
    if amsgrad:
        v = state["vmax"] = np.maximum(state.get("vmax", 0), v)
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
    return p - lr / (1 - b1 ** t) * m / denom


OPTIMIZERS = [
    ("sgd-plain", optim.SGD(lr=0.1), ref_sgd, dict(lr=0.1)),
    ("sgd-all", optim.SGD(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01, maximize=True), ref_sgd,
     dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01, maximize=True)),
    ("sgd-nesterov", optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02), ref_sgd,
     dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02)),
    ("adam-plain", optim.Adam(lr=0.01), ref_adam, dict(lr=0.01)),
    ("adam-all", optim.Adam(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True),
     ref_adam, dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("adamw", optim.AdamW(lr=0.01, weight_decay=0.1, amsgrad=True), ref_adam,
     dict(lr=0.01, weight_decay=0.1, amsgrad=True, decoupled=True)),
]


@pytest.mark.parametrize("name,opt,ref,kw", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_optimizer_matches_numpy_torch_algorithm(device, rng, name, opt, ref, kw):
    """20 steps from identical weights; the reference uses float64 gradients of the float64
    model at its own parameters, so the comparison covers forward, backward and update."""
    engine = mpscy.Engine(mlp(), loss="sparse_cross_entropy", optimizer=opt, batch_size=16, device=device, seed=7)
    P = as64(engine.get_parameters())
    states = {k: {} for k in P}
    for step in range(20):
        x = rng.standard_normal((16, 12)).astype(np.float32)
        y = rng.integers(0, 5, 16)
        out, cache = ref_forward(P, x.astype(np.float64))
        g = ref_backward(ref_sparse_ce(out, y)[1], cache)
        P = {k: ref(P[k], g[k], states[k], **kw) for k in P}
        r = engine.step(x, y)
        assert r.applied
    got = engine.get_parameters()
    for k in P:
        assert rel_err(got[k], P[k]) < 2e-5, k
    assert engine.get_optimizer_state()["step"] == 20


def test_optimizer_matches_torch_itself(device, rng):
    torch = pytest.importorskip("torch")
    engine = mpscy.Engine(mlp(), optimizer=optim.Adam(lr=0.01, weight_decay=0.01, amsgrad=True),
                          batch_size=16, device=device, seed=5)
    P = engine.get_parameters()
    tm = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    with torch.no_grad():
        for i, name in ((0, "dense_0"), (2, "dense_2")):
            tm[i].weight.copy_(torch.from_numpy(P[f"{name}.weight"]))
            tm[i].bias.copy_(torch.from_numpy(P[f"{name}.bias"]))
    topt = torch.optim.Adam(tm.parameters(), lr=0.01, weight_decay=0.01, amsgrad=True)
    for _ in range(20):
        x = rng.standard_normal((16, 12)).astype(np.float32)
        y = rng.integers(0, 5, 16)
        r = engine.step(x, y)
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        topt.step()
        assert abs(r.loss - loss.item()) < 1e-4
    got = engine.get_parameters()
    assert rel_err(got["dense_0.weight"], tm[0].weight.detach().numpy().astype(np.float64)) < 1e-4


def test_learning_rate_change_takes_effect_without_rebuild(device, rng):
    engine = mpscy.Engine(mlp(), optimizer=optim.SGD(lr=0.1), batch_size=8, device=device)
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    before = engine.get_parameters()
    allocations = engine.stats()["allocations"]
    engine.learning_rate = 0.0
    assert engine.learning_rate == 0.0
    engine.step(x, y)
    after = engine.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    engine.learning_rate = 0.5
    engine.step(x, y)
    assert not np.array_equal(engine.get_parameters()["dense_0.weight"], after["dense_0.weight"])
    assert engine.stats()["allocations"] == allocations


# ------------------------------------------------------------------ initialization and the API


def test_pytorch_default_initialization():
    engine = mpscy.Engine(mlp(inputs=400, hidden=300), batch_size=4, seed=11)
    p = engine.get_parameters()
    assert p["dense_0.weight"].shape == (300, 400) and p["dense_0.weight"].dtype == np.float32
    bound = 1 / np.sqrt(400)
    w = p["dense_0.weight"]
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound  # U(-1/sqrt(fan_in), ..)
    assert abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound
    assert np.abs(p["dense_0.bias"]).max() <= bound
    assert np.abs(p["dense_2.weight"]).max() <= 1 / np.sqrt(300)
    same = mpscy.Engine(mlp(inputs=400, hidden=300), batch_size=4, seed=11).get_parameters()
    other = mpscy.Engine(mlp(inputs=400, hidden=300), batch_size=4, seed=12).get_parameters()
    assert all(np.array_equal(p[k], same[k]) for k in p)
    assert not np.array_equal(p["dense_0.weight"], other["dense_0.weight"])


def test_parameter_round_trip_and_names(device, rng):
    engine = mpscy.Engine(mlp(), batch_size=4, device=device)
    params = engine.get_parameters()
    assert list(params) == ["dense_0.weight", "dense_0.bias", "dense_2.weight", "dense_2.bias"]
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    engine.set_parameters(new)
    got = engine.get_parameters()
    assert all(np.array_equal(got[k], new[k]) for k in new)
    got["dense_0.weight"][:] = 0  # copies, not views
    assert not np.array_equal(engine.get_parameters()["dense_0.weight"], got["dense_0.weight"])


def test_torch_tensors_that_numpy_cannot_read_directly(device, rng):
    """A torch tensor that requires grad, or of bfloat16 (NumPy has neither), given to predict,
    fit, evaluate, set_parameters and set_optimizer_state: read through .detach() and widened to
    float32 (exact), not refused by torch's own .numpy() with a RuntimeError or TypeError."""
    torch = pytest.importorskip("torch")
    engine = mpscy.Engine(mlp(), batch_size=8, device=device, seed=2)
    x = rng.standard_normal((10, 12)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    assert np.array_equal(engine.predict(xt), engine.predict(x))
    xb = torch.from_numpy(x).bfloat16()
    assert np.array_equal(engine.predict(xb), engine.predict(xb.float().numpy()))
    y = rng.integers(0, 5, 10)
    assert engine.evaluate(xt, torch.from_numpy(y)) == engine.evaluate(x, y)
    params = {k: torch.from_numpy(v).requires_grad_(True) for k, v in engine.get_parameters().items()}
    params["dense_0.weight"] = params["dense_0.weight"].detach().bfloat16().requires_grad_(True)
    engine.set_parameters(params)
    got = engine.get_parameters()
    assert np.array_equal(got["dense_0.weight"], params["dense_0.weight"].detach().float().numpy())
    assert np.array_equal(got["dense_2.bias"], params["dense_2.bias"].detach().numpy())
    engine.fit(xt, torch.from_numpy(y), epochs=1, verbose=0)
    assert engine.iterations == 2


def test_predict_and_evaluate_any_number_of_rows(device, rng):
    engine = mpscy.Engine(mlp(), batch_size=32, device=device, seed=2)
    P = as64(engine.get_parameters())
    x = rng.standard_normal((100, 12)).astype(np.float32)
    y = rng.integers(0, 5, 100)
    out, _ = ref_forward(P, x.astype(np.float64))
    pred = engine.predict(x)
    assert pred.shape == (100, 5) and pred.dtype == np.float32
    assert np.abs(pred - out).max() < 1e-5
    ev = engine.evaluate(x, y)
    assert abs(ev["loss"] - ref_sparse_ce(out, y)[0]) < 1e-5
    assert ev["accuracy"] == np.mean(out.argmax(1) == y)
    reg = mpscy.Engine(mlp(), loss="mse", batch_size=32, device=device, seed=2)
    t = rng.standard_normal((100, 5)).astype(np.float32)
    ev = reg.evaluate(x, t)
    assert ev["accuracy"] is None and abs(ev["loss"] - ref_mse(out, t)[0]) < 1e-5
    assert reg.step(x[:32], t[:32]).accuracy is None


def test_default_names_summary_stats_and_close(device):
    model = mpscy.Sequential([layers.Dense(8), layers.ReLU(), layers.Dense(3, name="head")], input_shape=(4,))
    with mpscy.Engine(model, batch_size=2, device=device) as engine:
        assert list(engine.get_parameters()) == ["dense_0.weight", "dense_0.bias", "head.weight", "head.bias"]
        text = engine.summary()
        for word in ("dense_0", "relu_1", "head", "Dense", "ReLU", "(None, 8)", "(None, 3)", "67"):
            assert word in text
        s = engine.stats()
        assert {"allocations", "frees", "bytes_in_use", "peak_bytes", "steps"} <= set(s)
        assert s["allocations"] > 0 and s["bytes_in_use"] > 0 and s["peak_bytes"] >= s["bytes_in_use"]
    assert engine.closed
    with pytest.raises(mpscy.StateError, match="closed"):
        engine.step(np.zeros((1, 4), np.float32), np.zeros(1, np.int32))
    with pytest.raises(mpscy.StateError):
        engine.get_parameters()


def test_backends_and_devices():
    assert "cpu" in mpscy.backends()
    assert mpscy.backends()[-1] == "cpu"
    model = mlp()
    for name in ("cuda", "metal"):
        if name not in mpscy.backends():
            with pytest.raises(mpscy.DeviceError, match=f"backend '{name}'"):
                mpscy.Engine(model, device=name)
    with pytest.raises(mpscy.InvalidArgumentError, match="unknown device"):
        mpscy.Engine(model, device="tpu")
    assert mpscy.Engine(model, device="auto").device == mpscy.backends()[0]



@pytest.mark.skipif(sys.platform == "darwin" or platform.machine() != "x86_64",
                    reason="OpenBLAS's x86-64 core names; macOS uses Accelerate")
def test_cpu_device_names_the_openblas_kernels():
    """The cpu device's name says which OpenBLAS kernels run: its own choice for the CPU, or
    the ones OPENBLAS_CORETYPE names (read once, when the bundled library loads)."""
    code = ("import mpscy; from mpscy import layers; print(mpscy.Engine(mpscy.Sequential("
            "[layers.Dense(1)], input_shape=(1,)), loss='mse', device='cpu').device_info()['name'])")
    def name(**env):  # the two variables this test sets are its own, whatever the suite runs under
        full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "MPSCY_CPU_GEMM")} | env
        return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                              check=True).stdout.strip()
    conv = "; small products in mpscy's AVX-512 kernels" if _cpu_flags() >= {"avx512f", "fma"} else ""
    assert name(OPENBLAS_CORETYPE="Nehalem") == f"CPU (OpenBLAS, Nehalem kernels{conv})"
    assert re.fullmatch(rf"CPU \(OpenBLAS, [A-Za-z0-9]+ kernels{re.escape(conv)}\)", name())
    assert name(OPENBLAS_CORETYPE="Nehalem", MPSCY_CPU_GEMM="0") == "CPU (OpenBLAS, Nehalem kernels)"


def _cpu_flags():
    """The x86 feature flags Linux lists for this CPU (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()

def test_step_result_fields(device, rng):
    engine = mpscy.Engine(mlp(), batch_size=8, device=device)
    r = engine.step(rng.standard_normal((8, 12)).astype(np.float32), rng.integers(0, 5, 8))
    assert isinstance(r, mpscy.StepResult)
    assert r.applied is True and r.batch_size == 8 and r.step_time_ns > 0 and r.grad_norm > 0
    assert 0 <= r.accuracy <= 1 and np.isfinite(r.loss)
    assert "StepResult(loss=" in repr(r)
