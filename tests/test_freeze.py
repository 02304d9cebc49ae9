"""Frozen layers (Layer.trainable = False, torch's requires_grad_(False)): every optimizer over 30
steps with the first Dense frozen against the float64 reference that updates only the other
parameters; torch itself with clipping by norm; gradients flowing through a frozen Dense, Conv2D,
BatchNorm and LayerNorm unchanged; BatchNorm statistics still kept; L-BFGS over the trainable
parameters only; checkpoints; the summary; warnings and refusals; and the backward skipped below
the last trainable layer."""
import time

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

from optim_ref import CASES, RefLBFGS, digits_batches, loss_and_grad, max_rel_err, mlp

STEPS = 30
BATCH = 32
FROZEN = ("dense_0.weight", "dense_0.bias")


def _frozen_mlp():
    model = mlp()
    model.get_layer("dense_0").trainable = False
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_layer_matches_reference(device, case):
    """The reference steps only dense_2's tensors (weight decay included), with dense_0 held at its
    initial values in the gradient; dense_0 must come out bit for bit as it went in."""
    opt, ref, _, _ = CASES[case]
    ref = type(ref)(**ref.hp)
    e = mpscy.Engine(_frozen_mlp(), optimizer=opt, batch_size=BATCH, device=device, seed=3)
    p0 = e.get_parameters()
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    for x, y in digits_batches(BATCH, STEPS):
        _, g = loss_and_grad(p, x, y)
        trained = {k: p[k] for k in p if k not in FROZEN}
        ref.step(trained, {k: g[k] for k in trained})
        p.update(trained)
        assert e.step(x, y).applied
    got = e.get_parameters()
    for k in FROZEN:
        np.testing.assert_array_equal(got[k], p0[k])
    err = max_rel_err({k: got[k] for k in got if k not in FROZEN}, {k: p[k] for k in p if k not in FROZEN})
    assert err <= 1e-5, f"{case}: max relative error {err:.3g} after {STEPS} steps"
    assert max_rel_err({"w": p0["dense_2.weight"]}, {"w": p["dense_2.weight"]}) > 1e-3   # dense_2 moved
    state = e.get_optimizer_state()
    assert state["step"] == STEPS
    for slot, value in state.items():
        if isinstance(value, dict):
            assert sorted(value) == ["dense_2.bias", "dense_2.weight"], slot


def _three_layer_loss_and_grad(p, x, y):
    """Mean softmax cross-entropy of Dense-Tanh-Dense(mid)-Tanh-Dense and its gradient, float64."""
    x = x.astype(np.float64)
    h1 = np.tanh(x @ p["dense_0.weight"].T + p["dense_0.bias"])
    h2 = np.tanh(h1 @ p["mid.weight"].T + p["mid.bias"])
    z = h2 @ p["dense_4.weight"].T + p["dense_4.bias"]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    b = len(x)
    dz = np.exp(logp)
    dz[np.arange(b), y] -= 1.0
    dz /= b
    dh2 = (dz @ p["dense_4.weight"]) * (1 - h2 * h2)
    dh1 = (dh2 @ p["mid.weight"]) * (1 - h1 * h1)
    return -logp[np.arange(b), y].mean(), {
        "dense_4.weight": dz.T @ h2, "dense_4.bias": dz.sum(0), "mid.weight": dh2.T @ h1, "mid.bias": dh2.sum(0),
        "dense_0.weight": dh1.T @ x, "dense_0.bias": dh1.sum(0)}


@pytest.mark.parametrize("case", ["adam_decoupled", "sgd_dampening", "rmsprop_centered_momentum"])
def test_frozen_middle_layer_over_30_steps(device, case):
    """Trainable parameters on both sides of a frozen one in the slab, 30 steps against the float64
    reference; then the optimizer state carried into a second engine continues the same run."""
    def build():
        m = mpscy.Sequential([layers.Dense(16), layers.Tanh(), layers.Dense(12, name="mid"), layers.Tanh(),
                              layers.Dense(10)], input_shape=(64,))
        m.get_layer("mid").trainable = False
        return m
    opt, ref, _, _ = CASES[case]
    ref = type(ref)(**ref.hp)
    e = mpscy.Engine(build(), optimizer=opt, batch_size=BATCH, device=device, seed=6)
    p0 = e.get_parameters()
    p = {k: v.astype(np.float64) for k, v in p0.items()}
    batches = digits_batches(BATCH, STEPS + 5)
    for x, y in batches[:STEPS]:
        _, g = _three_layer_loss_and_grad(p, x, y)
        trained = {k: p[k] for k in p if not k.startswith("mid.")}
        ref.step(trained, {k: g[k] for k in trained})
        p.update(trained)
        e.step(x, y)
    got = e.get_parameters()
    for k in ("mid.weight", "mid.bias"):
        np.testing.assert_array_equal(got[k], p0[k])
    err = max_rel_err({k: got[k] for k in got if not k.startswith("mid.")}, {k: p[k] for k in p if not k.startswith("mid.")})
    assert err <= 1e-5, err
    again = mpscy.Engine(build(), optimizer=opt, batch_size=BATCH, device=device, seed=6)
    again.set_parameters(got)
    again.set_optimizer_state(e.get_optimizer_state())
    for x, y in batches[STEPS:]:
        assert e.step(x, y).loss == again.step(x, y).loss
    for k, v in e.get_parameters().items():
        np.testing.assert_array_equal(again.get_parameters()[k], v)


def test_frozen_layer_matches_torch_with_clipping(device):
    """torch: requires_grad_(False) on the first Linear, AdamW, clip_grad_norm_ over the parameters
    that have gradients. The clipping norm must leave the frozen layer's gradient out."""
    torch = pytest.importorskip("torch")
    batches = digits_batches(BATCH, 20)
    e = mpscy.Engine(_frozen_mlp(), optimizer=optim.AdamW(lr=1e-2, weight_decay=0.1), batch_size=BATCH,
                     device=device, seed=5, clip_grad_norm=0.05)
    p0 = e.get_parameters()
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k not in FROZEN) for k, v in p0.items()}
    trained = [v for k, v in tp.items() if k not in FROZEN]
    opt = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1, foreach=False)
    clipped = 0
    for x, y in batches:
        opt.zero_grad()
        xt = torch.tensor(x, dtype=torch.float64)
        z = torch.tanh(xt @ tp["dense_0.weight"].T + tp["dense_0.bias"]) @ tp["dense_2.weight"].T + tp["dense_2.bias"]
        torch.nn.functional.cross_entropy(z, torch.tensor(y, dtype=torch.long)).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(trained, 0.05))
        clipped += norm > 0.05
        opt.step()
        r = e.step(x, y)
        assert r.grad_norm == pytest.approx(norm, rel=1e-4)
    assert clipped >= 10                       # the clipping did act
    got = e.get_parameters()
    want = {k: v.detach().numpy() for k, v in tp.items()}
    for k in FROZEN:
        np.testing.assert_array_equal(got[k], p0[k])
    assert max_rel_err(got, want) <= 1e-5


def _grad_models():
    """(name, model builder, input shape, labels, layer to freeze): a frozen layer between
    trainable ones, so that its input gradient is needed and its parameter gradient is not."""
    def dense():
        return mpscy.Sequential([layers.Dense(12), layers.Tanh(), layers.Dense(12, name="mid"), layers.Tanh(),
                                 layers.Dense(5)], input_shape=(10,))

    def conv():
        return mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.ReLU(),
                                 layers.Conv2D(6, 3, stride=2, padding=1, name="mid"), layers.ReLU(),
                                 layers.Flatten(), layers.Dense(5)], input_shape=(2, 8, 8))

    def batchnorm():
        return mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.BatchNorm(name="mid"), layers.ReLU(),
                                 layers.GlobalAvgPool2D(), layers.Dense(5)], input_shape=(2, 6, 6))

    def layernorm():
        return mpscy.Sequential([layers.Dense(12), layers.LayerNorm(12, name="mid"), layers.Tanh(),
                                 layers.Dense(5)], input_shape=(10,))
    return {"dense": (dense, (10,)), "conv": (conv, (2, 8, 8)), "batchnorm": (batchnorm, (2, 6, 6)),
            "layernorm": (layernorm, (10,))}


@pytest.mark.parametrize("kind", sorted(_grad_models()))
def test_gradients_flow_through_a_frozen_layer(device, kind):
    """The other layers' gradients are those of the same model with nothing frozen (to float32
    rounding), the frozen layer has none, and one step leaves it as it was."""
    build, shape = _grad_models()[kind]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8,) + shape).astype(np.float32)
    y = rng.integers(0, 5, 8)
    # the mid layer's weight and bias moved off their defaults (BatchNorm/LayerNorm: off 1 and 0)
    full = mpscy.Engine(build(), optimizer=optim.SGD(lr=0.1, weight_decay=0.5), batch_size=8, device=device, seed=2)
    params = full.get_parameters()
    for k in params:
        if k.startswith("mid.") and not k.endswith(("running_mean", "running_var")):
            params[k] = (params[k] + rng.normal(0, 0.3, params[k].shape)).astype(np.float32)
    full.set_parameters(params)
    model = build()
    model.get_layer("mid").trainable = False
    frozen = mpscy.Engine(model, optimizer=optim.SGD(lr=0.1, weight_decay=0.5), batch_size=8, device=device, seed=2)
    frozen.set_parameters(params)
    want, got = full.gradients(x, y), frozen.gradients(x, y)
    mid = [k for k in want if k.startswith("mid.")]
    assert len(mid) == 2
    assert sorted(got) == sorted(k for k in want if k not in mid)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for k in got:
        if k != "loss":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6 * np.abs(want[k]).max())
    frozen.step(x, y)
    after = frozen.get_parameters()
    for k in mid:
        np.testing.assert_array_equal(after[k], params[k])
    moved = [k for k in after if not k.startswith("mid.") and not np.array_equal(after[k], params[k])]
    assert len(moved) >= 3


def test_frozen_batchnorm_keeps_running_statistics(device):
    """As torch: requires_grad=False freezes weight and bias, not the running statistics, which a
    train-mode step still updates exactly as the unfrozen layer's."""
    def build(freeze):
        m = mpscy.Sequential([layers.BatchNorm(momentum=0.3), layers.Conv2D(4, 3), layers.Flatten(),
                              layers.Dense(2)], input_shape=(3, 5, 5))
        m.layers[0].trainable = not freeze
        return m
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(16, 3, 5, 5)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    a = mpscy.Engine(build(False), optimizer=optim.SGD(lr=0.1), batch_size=16, device=device, seed=0)
    b = mpscy.Engine(build(True), optimizer=optim.SGD(lr=0.1), batch_size=16, device=device, seed=0)
    a.step(x, y)
    b.step(x, y)
    pa, pb = a.get_parameters(), b.get_parameters()
    for k in ("batchnorm_0.running_mean", "batchnorm_0.running_var"):
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-6)
    assert np.abs(pb["batchnorm_0.running_mean"]).min() > 0.3        # they did move, from 0
    np.testing.assert_array_equal(pb["batchnorm_0.weight"], np.ones(3, np.float32))
    np.testing.assert_array_equal(pb["batchnorm_0.bias"], np.zeros(3, np.float32))
    assert not np.array_equal(pa["batchnorm_0.weight"], np.ones(3, np.float32))


def test_lbfgs_trains_only_the_trainable_parameters(device):
    """L-BFGS's flat vectors cover dense_2 alone; against RefLBFGS over dense_2's flattened
    parameters, with dense_0 fixed (weight decay on dense_2 only), 4 steps (16 iterations). Not 5:
    the fifth step's last loss change is 1.5e-8 in float64, against tolerance_change 1e-8 and a
    float32 ulp of 1.2e-7 at loss 1.7, so whether it ends an iteration early is rounding (on an
    H100 it did: 19 iterations against 20)."""
    x, y = digits_batches(256, 1)[0]
    options = dict(lr=0.8, max_iter=4, max_eval=6, tolerance_grad=1e-6, tolerance_change=1e-8, history_size=5)
    wd = 1e-2
    e = mpscy.Engine(_frozen_mlp(), optimizer=optim.LBFGS(weight_decay=wd, **options), batch_size=len(x),
                     device=device, seed=3)
    p0 = {k: v.astype(np.float64) for k, v in e.get_parameters().items()}
    shapes = {k: p0[k].shape for k in ("dense_2.weight", "dense_2.bias")}

    def unflat(t):
        out, o = dict(p0), 0
        for k, s in shapes.items():
            n = int(np.prod(s))
            out[k] = t[o:o + n].reshape(s)
            o += n
        return out

    def fg(t):
        loss, g = loss_and_grad(unflat(t), x, y)
        return loss + 0.5 * wd * float(t @ t), np.concatenate([g[k].ravel() for k in shapes]) + wd * t

    theta = np.concatenate([p0[k].ravel() for k in shapes])
    ref = RefLBFGS(**options)
    for i in range(4):
        theta, ref_loss = ref.step(theta, fg)
        r = e.step(x, y)
        assert r.loss == pytest.approx(ref_loss, rel=1e-5)
        got = e.get_parameters()
        flat = np.concatenate([got[k].ravel() for k in shapes])
        assert np.abs(flat - theta).max() <= 1e-4 * np.abs(theta).max(), f"step {i}"
        for k in FROZEN:
            np.testing.assert_array_equal(got[k], p0[k].astype(np.float32))
    s = e.get_optimizer_state()
    assert s["d"].shape == theta.shape
    assert (s["func_evals"], s["n_iter"]) == (ref.s["func_evals"], ref.s["n_iter"]) == (16, 16)


def test_summary_counts_and_marks_frozen_layers():
    e = mpscy.Engine(_frozen_mlp(), batch_size=4, device="cpu")
    text = str(e.summary())
    assert "Total parameters: 1,210 (trainable 170, frozen 1,040, buffers 0)" in text
    assert "Dense (frozen)" in text and text.count("(frozen)") == 1
    plain = str(mpscy.Engine(mlp(), batch_size=4, device="cpu").summary())
    assert "Total parameters: 1,210 (trainable 1,210, buffers 0)" in plain


def test_checkpoint_keeps_frozen_layers(device, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 64)).astype(np.float32), rng.integers(0, 10, 32)
    e = mpscy.Engine(_frozen_mlp(), optimizer=optim.Adam(1e-2), batch_size=32, device=device, seed=1)
    e.step(x, y)
    e.save(tmp_path / "f.mpscy")
    loaded = mpscy.load(tmp_path / "f.mpscy", device=device)
    assert [layer.trainable for layer in loaded.model.layers] == [False, True, True]
    assert sorted(loaded.get_optimizer_state()["exp_avg"]) == ["dense_2.bias", "dense_2.weight"]
    a, b = e.step(x, y), loaded.step(x, y)
    assert a.loss == b.loss
    for k, v in e.get_parameters().items():
        np.testing.assert_array_equal(loaded.get_parameters()[k], v)
    # the same run with dense_0 trainable has other optimizer state: restore refuses it
    other = mpscy.Engine(mlp(), optimizer=optim.Adam(1e-2), batch_size=32, device=device, seed=1)
    with pytest.raises(mpscy.CheckpointError, match=r"saved from an engine with other frozen layers \(\['dense_0'\]; "
                                                     r"this engine: none\), so its optimizer state covers other"):
        mpscy.checkpoint.restore(other, tmp_path / "f.mpscy")
    # a layer changed after the build: the checkpoint keeps what the engine was built with
    with pytest.warns(UserWarning, match="now trainable=True"):
        e.model.get_layer("dense_0").trainable = True
    e.save(tmp_path / "g.mpscy")
    again = mpscy.load(tmp_path / "g.mpscy", device=device)
    assert again.model.get_layer("dense_0").trainable is False
    assert sorted(again.get_optimizer_state()["exp_avg"]) == ["dense_2.bias", "dense_2.weight"]
    mpscy.checkpoint.restore(e, tmp_path / "f.mpscy")   # the same run, though the layer now says otherwise
    # set_optimizer_state: the frozen layer has no slot
    state = e.get_optimizer_state()
    state["exp_avg"]["dense_0.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"'exp_avg' must map each trainable parameter's name to an "
                                                         r"array: frozen in this engine, so without state: "
                                                         r"\['dense_0.weight'\]"):
        e.set_optimizer_state(state)
    del state["exp_avg"]["dense_0.weight"], state["exp_avg"]["dense_2.bias"]
    state["exp_avg"]["oops"] = np.zeros(1, np.float32)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"missing \['dense_2.bias'\]; not parameters of this "
                                                         r"model: \['oops'\]"):
        e.set_optimizer_state(state)


def test_trainable_must_be_a_bool():
    layer = layers.Dense(3)
    for bad in ("False", 0, None):
        with pytest.raises(mpscy.InvalidArgumentError, match="trainable must be True or False"):
            layer.trainable = bad
    assert layer.trainable is True
    layer.trainable = np.bool_(False)
    assert layer.trainable is False


def test_get_layer_names_the_layers():
    model = mlp()
    assert model.get_layer("dense_2") is model.layers[2]
    with pytest.raises(mpscy.InvalidArgumentError, match="no layer named 'dense_9'.*dense_0, tanh_1, dense_2"):
        model.get_layer("dense_9")
    with pytest.raises(mpscy.InvalidArgumentError, match="no layer named 'input'"):
        model.get_layer("input")


def test_changing_trainable_after_the_build_warns_at_once():
    """The engine keeps the freezing it was built with; assigning another value to a layer of an
    open engine warns at that line (step() stays free of checks); assigning the built value back,
    a layer without parameters, or a closed engine's layer does not."""
    import warnings
    model = mpscy.Sequential([layers.Dense(16), layers.Tanh(), layers.Dense(10)], input_shape=(64,))
    e = mpscy.Engine(model, optimizer=optim.SGD(lr=0.1), batch_size=32, device="cpu")
    with pytest.warns(UserWarning, match="layer 'dense_0' is now trainable=False, but an open engine was built "
                                         "with trainable=True and keeps it") as w:
        model.get_layer("dense_0").trainable = False
    assert w[0].filename == __file__
    x, y = digits_batches(32, 1)[0]
    before = e.get_parameters()["dense_0.weight"]
    e.step(x, y)
    assert not np.array_equal(e.get_parameters()["dense_0.weight"], before)  # the engine keeps its build
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.get_layer("dense_0").trainable = True          # back to the built value
        model.get_layer("tanh_1").trainable = False          # nothing to freeze
    with pytest.warns(UserWarning, match="layers 'dense_0', 'dense_2' are now trainable=False") as w:
        model.trainable = False                              # Keras's whole-model switch: one warning
    assert len(w) == 1
    assert [layer.trainable for layer in model.layers] == [False, False, False] and model.trainable is False
    e.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.trainable = True
    assert model.trainable is True
    frozen = mpscy.Engine(_frozen_mlp(), batch_size=4, device="cpu")
    assert str(frozen.summary()).count("(frozen)") == 1


def test_model_trainable_freezes_every_layer():
    model = mlp()
    model.trainable = False
    with pytest.warns(UserWarning, match="every layer with parameters is frozen"):
        e = mpscy.Engine(model, batch_size=4, device="cpu")
    assert "trainable 0, frozen 1,210" in str(e.summary())
    with pytest.raises(mpscy.InvalidArgumentError, match="trainable must be True or False"):
        model.trainable = "no"
    # running statistics are no parameters: a non-affine BatchNorm has nothing to freeze
    norm = mpscy.Sequential([layers.Dense(4), layers.BatchNorm(affine=False), layers.Dense(3)], input_shape=(5,))
    norm.layers[0].trainable = norm.layers[2].trainable = False
    assert norm.trainable is False
    assert all("frozen" not in d.get("flags", ()) for d in norm.native_layers() if d["kind"] == "batchnorm")


def test_a_frozen_layer_without_parameters_changes_nothing(tmp_path):
    """trainable=False on a ReLU has nothing to freeze: the summary, the checkpoint and restore
    ignore it."""
    def build(relu_frozen):
        m = mpscy.Sequential([layers.Dense(4), layers.ReLU(), layers.Dense(3)], input_shape=(5,))
        m.layers[1].trainable = not relu_frozen
        return m
    a = mpscy.Engine(build(True), batch_size=4, device="cpu", seed=1)
    assert "(frozen)" not in str(a.summary())
    a.save(tmp_path / "r.mpscy")
    b = mpscy.Engine(build(False), batch_size=4, device="cpu", seed=1)
    mpscy.checkpoint.restore(b, tmp_path / "r.mpscy")


def test_every_layer_frozen_warns_and_updates_nothing(device):
    model = mpscy.Sequential([layers.Dense(8), layers.BatchNorm(), layers.Dense(3)], input_shape=(5,))
    for layer in model.layers:
        layer.trainable = False
    with pytest.warns(UserWarning, match="every layer with parameters is frozen"):
        e = mpscy.Engine(model, optimizer=optim.Adam(0.1, weight_decay=0.1), batch_size=6, device=device)
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 1.0, size=(6, 5)).astype(np.float32), rng.integers(0, 3, 6)
    before = e.get_parameters()
    r = e.step(x, y)
    assert r.applied and np.isfinite(r.loss) and r.grad_norm == 0.0
    after = e.get_parameters()
    for k, v in before.items():
        if "running" in k:
            assert not np.array_equal(after[k], v)
        else:
            np.testing.assert_array_equal(after[k], v)
    assert e.get_optimizer_state() == {"step": 1, "exp_avg": {}, "exp_avg_sq": {}}
    assert list(e.gradients(x, y)) == ["loss"]


def test_every_layer_frozen_warns_once_not_again_on_load(tmp_path):
    import warnings
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(5,))
    model.layers[0].trainable = False
    with pytest.warns(UserWarning, match="every layer with parameters is frozen"):
        e = mpscy.Engine(model, batch_size=4, device="cpu")
    e.save(tmp_path / "all.mpscy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = mpscy.load(tmp_path / "all.mpscy", device="cpu")
    assert loaded.model.layers[0].trainable is False


def test_no_backward_runs_below_the_first_trainable_layer():
    """A frozen convolutional stem needs no backward at all: the step costs about its forward, as
    evaluate on the same batch does, where the trainable stem's step also runs its weight and input
    gradients. On the 2-core CI machine the frozen step measured 0.98x-1.0x of evaluate and 0.35x
    of the trainable step; with the stem's backward run, its weight gradients skipped, 1.8x of
    evaluate (0.65x of the trainable step). Two worker threads on any machine; evaluate is the
    yardstick because the cost of backward against forward differs between hosts (a 16-core H100
    host measured the frozen step at 0.54x of the trainable one)."""
    def build(freeze):
        m = mpscy.Sequential([layers.Conv2D(32, 3, padding=1), layers.ReLU(), layers.Conv2D(32, 3, padding=1),
                              layers.ReLU(), layers.GlobalAvgPool2D(), layers.Dense(10)], input_shape=(16, 32, 32))
        for layer in m.layers[:4]:
            layer.trainable = not freeze
        return m

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16, 32, 32)).astype(np.float32), rng.integers(0, 10, 32)
    engines = {f: mpscy.Engine(build(f), optimizer=optim.SGD(lr=0.01), batch_size=32, device="cpu", threads=2)
               for f in (False, True)}
    runs = {False: lambda: engines[False].step(x, y), True: lambda: engines[True].step(x, y),
            "evaluate": lambda: engines[True].evaluate(x, y)}
    # Interleaved rounds, the least disturbed of 9 for each, after one to warm up, so that a slow
    # spell on a shared host slows all three alike. Timed one model after another (7 runs each),
    # CI once measured the frozen step at 1.43x of evaluate (8.7 ms against 6.1). Interleaved,
    # this 2-core machine measures 0.97x-1.04x over five runs; with a busy loop on one core,
    # 0.54x-1.02x over six (noisier, never near 1.3x).
    times = {k: float("inf") for k in runs}
    for f in runs.values():
        f()
    for _ in range(9):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k] = min(times[k], time.perf_counter() - t0)
    assert times[True] < 1.3 * times["evaluate"], times
    assert times[True] < 0.8 * times[False], times


def test_named_layers_give_the_summary_s_names():
    """named_layers() pairs each layer with the name the summary and the parameters use, a
    generated one for an unnamed layer (whose own name stays None), in node order; freezing by
    those names freezes those layers' parameters."""
    net = mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.ReLU(), layers.Flatten(),
                            layers.Dense(3, name="head")], input_shape=(1, 4, 4))
    pairs = net.named_layers()
    assert [n for n, _ in pairs] == ["conv2d_0", "relu_1", "flatten_2", "head"]
    assert [l for _, l in pairs] == net.layers and pairs[0][1].name is None
    for name, layer in pairs:
        layer.trainable = not name.startswith("conv")
    e = mpscy.Engine(net, batch_size=2, device="cpu")
    assert sorted(e.get_optimizer_state()["exp_avg"]) == ["head.bias", "head.weight"]
