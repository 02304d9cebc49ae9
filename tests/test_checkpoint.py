"""Checkpoints: a model saved mid-training and loaded on another engine continues bitwise
as the uninterrupted run (losses, parameters, optimizer state, counters, learning rate and an
attached schedule); the file is standard safetensors; truncated, corrupted or foreign files
raise CheckpointError and leave the engine untouched."""
import hashlib
import json
import os
import struct
import sys

import numpy as np
import pytest

import mpscy
from mpscy import checkpoint, layers, optim


class Halving:
    """A minimal schedule with PyTorch's protocol: halves the learning rate every `every`
    steps; state_dict/load_state_dict as torch.optim.lr_scheduler."""

    def __init__(self, engine, every=3):
        self.engine, self.every = engine, every
        self.base_lr = engine.learning_rate
        self.last_epoch = 0
        engine.learning_rate = self.base_lr

    def step(self):
        self.last_epoch += 1
        self.engine.learning_rate = self.base_lr * 0.5 ** (self.last_epoch // self.every)

    def get_last_lr(self):
        return [self.engine.learning_rate]

    def state_dict(self):
        return {"every": self.every, "base_lr": self.base_lr, "last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        self.every, self.base_lr, self.last_epoch = state["every"], state["base_lr"], state["last_epoch"]


@pytest.fixture(scope="module")
def digits():
    x, y = mpscy.datasets.load_digits()
    return x[:640], y[:640]


def _engine(device, optimizer, seed=3, model=None):
    model = model or mpscy.Sequential([layers.Dense(32), layers.Tanh(), layers.Dense(16), layers.ReLU(),
                                       layers.Dense(10)], input_shape=(64,))
    return mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optimizer, batch_size=32,
                        device=device, seed=seed)


def _batches(x, y, start, count, b=32):
    n = len(x)
    for i in range(start, start + count):
        j = (i * b) % (n - b)
        yield x[j:j + b], y[j:j + b]


def _assert_same_state(a, b):
    _assert_same_arrays(a.get_parameters(), b.get_parameters(), a.get_optimizer_state(), b.get_optimizer_state())


def _assert_same_arrays(pa, pb, sa, sb):
    """Parameters pa and pb, and optimizer states sa and sb, equal bit for bit."""
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], dict):
            for p in sa[k]:
                np.testing.assert_array_equal(sa[k][p], sb[k][p], err_msg=f"{k}/{p}")
        else:
            assert sa[k] == sb[k], k


@pytest.mark.parametrize("make_opt", [
    lambda: optim.Adam(lr=2e-3, amsgrad=True, weight_decay=1e-3),
    lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    lambda: optim.AdamW(lr=1e-3),
], ids=["adam-amsgrad", "sgd-nesterov", "adamw"])
def test_resume_is_bitwise(device, digits, tmp_path, make_opt):
    x, y = digits
    ref = _engine(device, make_opt())
    run = _engine(device, make_opt())
    for xb, yb in _batches(x, y, 0, 20):
        assert ref.step(xb, yb).loss == run.step(xb, yb).loss
    run.learning_rate = ref.learning_rate = 7e-4      # a hand-changed rate is state too
    run.epoch = ref.epoch = 2
    path = tmp_path / "mid.mpscy"
    run.save(path)
    run.close()
    resumed = mpscy.load(path, device=device)
    assert resumed.iterations == 20 and resumed.epoch == 2 and resumed.learning_rate == pytest.approx(7e-4)
    _assert_same_state(ref, resumed)
    for xb, yb in _batches(x, y, 20, 50):
        assert ref.step(xb, yb).loss == resumed.step(xb, yb).loss   # bitwise, every step
    _assert_same_state(ref, resumed)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_resume_through_fit_and_model_checkpoint(device, digits, tmp_path):
    """fit 4 epochs == fit 2 epochs, ModelCheckpoint, load, fit(initial_epoch=2, epochs=4)."""
    x, y = digits
    xv, yv = mpscy.datasets.load_digits()[0][1500:], mpscy.datasets.load_digits()[1][1500:]
    full = _engine(device, optim.Adam(1e-3))
    h_full = full.fit(x, y, epochs=4, validation_data=(xv, yv), verbose=0)

    half = _engine(device, optim.Adam(1e-3))
    ckpt = mpscy.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.mpscy"))
    half.fit(x, y, epochs=2, validation_data=(xv, yv), verbose=0, callbacks=[ckpt])
    assert ckpt.saved == [str(tmp_path / "e1.mpscy"), str(tmp_path / "e2.mpscy")]
    resumed = mpscy.load(tmp_path / "e2.mpscy", device=device)
    assert resumed.epoch == 2
    h_rest = resumed.fit(x, y, epochs=4, initial_epoch=2, validation_data=(xv, yv), verbose=0)
    assert h_rest.epoch == [2, 3]
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert h_rest.history[k] == h_full.history[k][2:], k
    _assert_same_state(full, resumed)


def test_attached_schedule_is_saved_and_continues(device, digits, tmp_path):
    x, y = digits
    ref = _engine(device, optim.SGD(lr=0.1, momentum=0.5))
    ref.set_schedule(Halving(ref, every=4), per="step")
    run = _engine(device, optim.SGD(lr=0.1, momentum=0.5))
    run.set_schedule(Halving(run, every=4), per="step")
    ref.fit(x[:320], y[:320], epochs=1, shuffle=False, verbose=0)   # 10 steps -> lr 0.1 / 4
    run.fit(x[:320], y[:320], epochs=1, shuffle=False, verbose=0)
    assert ref.learning_rate == pytest.approx(0.1 / 4)
    run.save(tmp_path / "s.mpscy")
    resumed = mpscy.load(tmp_path / "s.mpscy", device=device)
    assert isinstance(resumed.schedule, Halving) and resumed.schedule.engine is resumed
    assert resumed.schedule.state_dict() == ref.schedule.state_dict()
    h1 = ref.fit(x[:320], y[:320], epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    h2 = resumed.fit(x[:320], y[:320], epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    assert h1.history == h2.history and h2.history["lr"] == [pytest.approx(0.1 / 16)]  # the last step ran at step 19: 0.1 / 2**4
    assert resumed.learning_rate == ref.learning_rate == pytest.approx(0.1 / 32)
    _assert_same_state(ref, resumed)


def test_functional_model_and_metadata_round_trip(device, tmp_path):
    inp = mpscy.Input((6,), name="features")
    h = layers.Dense(8, name="hidden")(inp)
    out = layers.Dense(1, bias=False, name="head")(layers.GELU(approximate="tanh")(h))
    engine = mpscy.Engine(mpscy.Model(inp, out), loss=mpscy.losses.Huber(delta=0.3),
                          optimizer=optim.SGD(0.01), batch_size=8, device=device, seed=1,
                          clip_grad_norm=0.5)
    meta = {"classes": ["a", "b"], "mean": np.float32(0.5), "size": (8, 8)}
    engine.save(tmp_path / "f.mpscy", meta=meta)
    loaded = mpscy.load(tmp_path / "f.mpscy", device=device, batch_size=3)
    assert type(loaded.model) is mpscy.Model and loaded.batch_size == 3
    assert [n.name for n in loaded.model.nodes] == ["features", "hidden", "gelu_1", "head"]
    assert loaded.model.nodes[2].layer.approximate == "tanh" and loaded.model.nodes[3].layer.bias is False
    assert loaded.loss.delta == 0.3 and loaded.clip_grad_norm == 0.5
    assert loaded.checkpoint_meta == {"classes": ["a", "b"], "mean": 0.5, "size": [8, 8]}
    xs = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(xs), engine.predict(xs))


def test_file_is_standard_safetensors(device, tmp_path):
    engine = _engine(device, optim.Adam())
    path = tmp_path / "m.mpscy"
    engine.save(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0                       # header padded to 8 bytes
    meta = header.pop("__metadata__")
    assert meta["format"] == "mpscy-checkpoint" and len(meta["sha256"]) == 64
    w = header["params/dense_0.weight"]
    assert w["dtype"] == "F32" and w["shape"] == [32, 64]
    b0, b1 = w["data_offsets"]
    np.testing.assert_array_equal(np.frombuffer(raw[8 + n + b0:8 + n + b1], "<f4").reshape(32, 64),
                                  engine.get_parameters()["dense_0.weight"])
    m = header["optimizer/exp_avg_sq/dense_2.bias"]
    assert m["dtype"] == "F32" and m["shape"] == [16]
    assert json.loads(meta["mpscy"])["optimizer_state"]["step"] == 0
    st = pytest.importorskip("safetensors.numpy")
    loaded = st.load_file(str(path))
    np.testing.assert_array_equal(loaded["params/dense_0.weight"], engine.get_parameters()["dense_0.weight"])


@pytest.fixture
def saved(device, tmp_path):
    engine = _engine(device, optim.Adam())
    path = tmp_path / "good.mpscy"
    engine.save(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_truncated_file_raises(saved, tmp_path, cut):
    _, raw = saved
    bad = tmp_path / "cut.mpscy"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(mpscy.CheckpointError, match="truncated|corrupted"):
        mpscy.load(bad, device="cpu")


def test_corrupted_files_raise(saved, tmp_path):
    path, raw = saved
    (n,) = struct.unpack("<Q", raw[:8])
    flipped = bytearray(raw)
    flipped[8 + n + 100] ^= 0x10                    # one bit of a weight
    bad = tmp_path / "bits.mpscy"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(mpscy.CheckpointError, match="SHA-256"):
        mpscy.load(bad, device="cpu")
    header = bytearray(raw)
    header[9] = ord("#")                            # the JSON header
    bad.write_bytes(bytes(header))
    with pytest.raises(mpscy.CheckpointError, match="corrupted header"):
        mpscy.load(bad, device="cpu")
    bad.write_bytes(raw + b"\0" * 4)
    with pytest.raises(mpscy.CheckpointError, match="unexpected bytes"):
        mpscy.load(bad, device="cpu")
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a checkpoint" * 3)
    with pytest.raises(mpscy.CheckpointError, match="is not an mpscy checkpoint: it looks like a zip archive "
                                                    "\\(torch.save's format"):
        mpscy.load(bad, device="cpu")
    bad.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s." * 2)   # pickle protocol 2
    with pytest.raises(mpscy.CheckpointError, match="it looks like a Python pickle"):
        mpscy.load(bad, device="cpu")
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(mpscy.CheckpointError, match="it looks like an HDF5 file \\(Keras's .h5\\)"):
        mpscy.load(bad, device="cpu")
    checkpoint.write_safetensors(bad, {"w": np.zeros(3, np.float32)}, {"format": "pt"})
    with pytest.raises(mpscy.CheckpointError, match="not an mpscy checkpoint"):
        mpscy.load(bad, device="cpu")
    with pytest.raises(mpscy.CheckpointError, match="does not exist"):
        mpscy.load(tmp_path / "missing.mpscy", device="cpu")
    assert issubclass(mpscy.CheckpointError, (mpscy.Error, ValueError))


def test_an_onnx_file_is_named_as_one(tmp_path):
    """mpscy.load of the ONNX file `train --onnx` or mpscy.onnx.export wrote says what it is and
    what reads it (it said "header of 7166195045615405576 bytes announced")."""
    pytest.importorskip("onnx")
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), loss="mse", device="cpu")
    path = tmp_path / "model.bin"
    mpscy.onnx.export(engine, str(path))
    with pytest.raises(mpscy.CheckpointError, match=r"model.bin' is not an mpscy checkpoint: it looks like an ONNX "
                                                    r"model \(a protobuf\): read it with mpscy.onnx.load"):
        mpscy.load(path, device="cpu")


def test_a_flipped_bit_in_the_description_is_detected(tmp_path):
    """The SHA-256 covered the tensor bytes only: one bit flipped in a number of the JSON
    description (the epoch counter 3 -> 2 here; the learning rate, step counts, L-BFGS's ro and
    the schedule's state live there too) loaded silently with the wrong value."""
    engine = _engine("cpu", optim.Adam(1e-3))
    engine.epoch = 3
    engine.save(tmp_path / "e.mpscy")
    raw = (tmp_path / "e.mpscy").read_bytes()
    at = raw.index(b'\\"epoch\\": 3') + len(b'\\"epoch\\": ')
    flipped = bytearray(raw)
    flipped[at] ^= 0x01                              # '3' -> '2': still valid JSON
    (tmp_path / "f.mpscy").write_bytes(bytes(flipped))
    with pytest.raises(mpscy.CheckpointError, match="SHA-256"):
        mpscy.load(tmp_path / "f.mpscy", device="cpu")
    assert mpscy.load(tmp_path / "e.mpscy", device="cpu").epoch == 3


def test_restore_checks_the_model_first(device, saved, tmp_path):
    path, _ = saved
    other = mpscy.Engine(mpscy.Sequential([layers.Dense(5), layers.Dense(10)], input_shape=(64,)),
                         batch_size=4, device=device)
    before = other.get_parameters()
    with pytest.raises(mpscy.CheckpointError, match="does not match this model"):
        checkpoint.restore(other, path)
    for k, v in other.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    sgd = _engine(device, optim.SGD(0.1, momentum=0.9), seed=9)
    before = sgd.get_parameters()
    with pytest.raises(mpscy.CheckpointError, match="holds Adam state; this engine uses SGD"):
        checkpoint.restore(sgd, path)
    for k, v in sgd.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    same = _engine(device, optim.Adam(), seed=9)
    checkpoint.restore(same, path)
    np.testing.assert_array_equal(same.get_parameters()["dense_0.weight"],
                                  mpscy.load(path, device=device).get_parameters()["dense_0.weight"])


class Warmup:
    """A composed schedule (as LinearWarmup(then=...)): its state_dict nests the inner one's."""

    def __init__(self, engine, steps, then):
        self.engine, self.steps, self.then, self.last_epoch = engine, steps, then, 0
        self.base_lr = then.base_lr
        engine.learning_rate = self.base_lr / steps

    def step(self):
        self.last_epoch += 1
        if self.last_epoch < self.steps:
            self.engine.learning_rate = self.base_lr * (self.last_epoch + 1) / self.steps
        else:
            self.then.step()

    def state_dict(self):
        state = {k: v for k, v in vars(self).items() if k not in ("engine", "then")}
        state["then"] = self.then.state_dict()
        return state

    def load_state_dict(self, state):
        state = dict(state)
        self.then.load_state_dict(state.pop("then"))
        vars(self).update(state)


def test_composed_schedule_is_rebuilt_with_its_child(device, digits, tmp_path):
    x, y = digits
    engines = [_engine(device, optim.SGD(lr=0.2)) for _ in range(2)]
    for e in engines:
        e.set_schedule(Warmup(e, 3, Halving(e, every=2)), per="step")
        e.fit(x[:160], y[:160], epochs=1, shuffle=False, verbose=0)     # 5 steps: into the inner schedule
    engines[1].save(tmp_path / "w.mpscy")
    resumed = mpscy.load(tmp_path / "w.mpscy", device=device)
    s = resumed.schedule
    assert isinstance(s, Warmup) and isinstance(s.then, Halving) and s.then.engine is resumed
    assert s.state_dict() == engines[0].schedule.state_dict()
    h1 = engines[0].fit(x[:160], y[:160], epochs=3, initial_epoch=1, shuffle=False, verbose=0)
    h2 = resumed.fit(x[:160], y[:160], epochs=3, initial_epoch=1, shuffle=False, verbose=0)
    assert h1.history == h2.history
    _assert_same_state(engines[0], resumed)


def test_a_failed_restore_changes_nothing(device, saved, tmp_path):
    path, _ = saved
    desc, tensors = checkpoint.read(path)
    del desc["optimizer_state"]["exp_avg"]                     # a damaged but well-formed file
    bad = tmp_path / "partial.mpscy"
    checkpoint.write_safetensors(bad, tensors, {"format": checkpoint.FORMAT, "mpscy": json.dumps(desc)},
                                 checksum=True)
    engine = _engine(device, optim.Adam(), seed=21)
    before, opt_before = engine.get_parameters(), engine.get_optimizer_state()
    with pytest.raises(mpscy.CheckpointError, match="exp_avg"):
        checkpoint.restore(engine, bad)
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    assert engine.get_optimizer_state()["step"] == opt_before["step"]


# ----------------------------------------------------------------------------- BatchNorm, Dropout, schedules
needs_layers = pytest.mark.skipif(not all(hasattr(layers, n) for n in ("Conv2D", "BatchNorm", "Dropout")),
                                  reason="needs Conv2D, BatchNorm and Dropout (issue 3)")


def _cnn_bn_dropout():
    return mpscy.Sequential([layers.Conv2D(8, 3, padding=1), layers.BatchNorm(), layers.ReLU(),
                             layers.Conv2D(8, 3, stride=2, padding=1), layers.ReLU(), layers.Dense(32),
                             layers.BatchNorm(momentum=0.2), layers.ReLU(), layers.Dropout(0.3), layers.Dense(10)],
                            input_shape=(1, 8, 8))


@needs_layers
def test_batchnorm_statistics_and_dropout_masks_continue(device, tmp_path):
    x, y = mpscy.datasets.load_digits(images=True)
    ref = mpscy.Engine(_cnn_bn_dropout(), optimizer=optim.Adam(2e-3), batch_size=32, device=device, seed=4)
    run = mpscy.Engine(_cnn_bn_dropout(), optimizer=optim.Adam(2e-3), batch_size=32, device=device, seed=4)
    for xb, yb in _batches(x, y, 0, 15):
        assert ref.step(xb, yb).loss == run.step(xb, yb).loss
    run.save(tmp_path / "bn.mpscy")
    stats = {k: v for k, v in run.get_parameters().items() if "running" in k}
    assert len(stats) == 4 and not np.allclose(stats["batchnorm_1.running_mean"], 0)
    resumed = mpscy.load(tmp_path / "bn.mpscy", device=device)
    for k, v in stats.items():
        np.testing.assert_array_equal(resumed.get_parameters()[k], v)
    for xb, yb in _batches(x, y, 15, 40):     # dropout masks and statistics continue exactly
        assert ref.step(xb, yb).loss == resumed.step(xb, yb).loss
    _assert_same_state(ref, resumed)
    np.testing.assert_array_equal(ref.predict(x[:64]), resumed.predict(x[:64]))
    # a generator restored to another counter would draw other masks: the check has teeth
    other = mpscy.load(tmp_path / "bn.mpscy", device=device)
    other._g().counter = other._g().counter + 1
    xb, yb = next(_batches(x, y, 15, 1))
    fresh = mpscy.load(tmp_path / "bn.mpscy", device=device)
    assert other.step(xb, yb).loss != fresh.step(xb, yb).loss


def _schedules():
    return pytest.importorskip("mpscy.optim.schedules")


@pytest.mark.parametrize("kind", ["step", "onecycle", "warmup-cosine", "plateau"])
def test_real_schedules_resume(device, digits, tmp_path, kind):
    S = _schedules()
    x, y = digits

    def make():
        if kind == "onecycle":      # also cycles beta1 (a per-step value saved in the checkpoint)
            e = _engine(device, optim.Adam(1e-3))
            return e, S.OneCycleLR(e, max_lr=5e-3, total_steps=80), "step"
        e = _engine(device, optim.SGD(0.05, momentum=0.9))
        if kind == "step":
            return e, S.StepLR(e, step_size=2, gamma=0.5), "epoch"
        if kind == "warmup-cosine":
            return e, S.LinearWarmup(e, warmup_steps=6, then=S.CosineAnnealingLR(e, T_max=20)), "step"
        return e, S.ReduceLROnPlateau(e, factor=0.5, patience=0), "epoch"

    engines = []
    for _ in range(2):
        e, sched, per = make()
        e.set_schedule(sched, per=per, monitor="loss")
        e.fit(x[:320], y[:320], epochs=2, verbose=0)
        engines.append(e)
    ref, run = engines
    run.save(tmp_path / "s.mpscy")
    resumed = mpscy.load(tmp_path / "s.mpscy", device=device)
    assert type(resumed.schedule) is type(ref.schedule) and resumed.schedule.engine is resumed
    assert resumed.learning_rate == ref.learning_rate and resumed.betas == ref.betas
    assert resumed.momentum == ref.momentum
    h1 = ref.fit(x[:320], y[:320], epochs=4, initial_epoch=2, verbose=0)
    h2 = resumed.fit(x[:320], y[:320], epochs=4, initial_epoch=2, verbose=0)
    assert h1.history == h2.history
    _assert_same_state(ref, resumed)
    assert resumed.schedule.get_last_lr() == ref.schedule.get_last_lr()


def test_lbfgs_state_is_saved(device, digits, tmp_path):
    if not hasattr(optim, "LBFGS"):
        pytest.skip("needs optim.LBFGS (issue 4)")
    x, y = digits
    make = lambda: _engine(device, optim.LBFGS(lr=0.5, history_size=5, max_iter=4))  # noqa: E731
    ref, run = make(), make()
    for xb, yb in _batches(x, y, 0, 4, b=32):
        assert ref.step(xb, yb).loss == run.step(xb, yb).loss
    run.save(tmp_path / "l.mpscy")
    resumed = mpscy.load(tmp_path / "l.mpscy", device=device)
    for xb, yb in _batches(x, y, 4, 4, b=32):
        assert ref.step(xb, yb).loss == resumed.step(xb, yb).loss
    pa, pb = ref.get_parameters(), resumed.get_parameters()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_restore_takes_the_checkpoints_seed_and_schedule_classes(device, digits, tmp_path):
    """restore into an engine built with another seed and another composed schedule continues
    as load does: the engine's seed (fit's shuffling orders) is the checkpoint's, and a
    LinearWarmup whose `then` is of another class (MultiStepLR against the saved ExponentialLR)
    is replaced by the saved one, not given its state (which had set MultiStepLR's gamma to
    ExponentialLR's). Two more epochs of shuffled fit: the same losses, rates and parameters."""
    x, y = digits
    sched = optim.schedules
    a = _engine(device, optim.SGD(0.1), seed=0)
    a.set_schedule(sched.LinearWarmup(a, 2, then=sched.ExponentialLR(a, 0.5)), per="step")
    a.fit(x[:160], y[:160], epochs=1, verbose=0)
    a.save(tmp_path / "s.mpscy")
    loaded = mpscy.load(tmp_path / "s.mpscy", device=device)
    c = _engine(device, optim.SGD(0.1), seed=1)
    c.set_schedule(sched.LinearWarmup(c, 2, then=sched.MultiStepLR(c, [100], 0.1)), per="step")
    with pytest.warns(UserWarning, match=r"restore replaces the attached LinearWarmup\(then=MultiStepLR\) "
                                         r"\(per='step'\) with the checkpoint's LinearWarmup\(then=ExponentialLR\) "
                                         r"\(per='step'\)"):
        checkpoint.restore(c, tmp_path / "s.mpscy")
    assert c.seed == loaded.seed == 0
    assert type(c._schedule.then).__name__ == "ExponentialLR"
    runs = [e.fit(x[:160], y[:160], epochs=3, initial_epoch=1, verbose=0).history for e in (loaded, c)]
    assert runs[0]["loss"] == runs[1]["loss"] and runs[0]["lr"] == runs[1]["lr"] and len(runs[0]["loss"]) == 2
    assert loaded.learning_rate == c.learning_rate == pytest.approx(0.1 * 0.5 ** 13)
    _assert_same_state(loaded, c)


def test_schedule_state_of_another_schedule_is_refused():
    """load_state_dict refuses a state with fields this schedule lacks or lacking fields it has
    (ExponentialLR's into MultiStepLR), before anything changes."""
    sched = optim.schedules
    e = _engine("cpu", optim.SGD(0.1))
    ms, ex = sched.MultiStepLR(e, [3], 0.1), sched.ExponentialLR(_engine("cpu", optim.SGD(0.1)), 0.5)
    before = ms.state_dict()
    with pytest.raises(mpscy.InvalidArgumentError, match=r"lacks \['milestones'\]"):
        ms.load_state_dict(ex.state_dict())
    assert ms.state_dict() == before


def test_save_refuses_what_load_would(tmp_path):
    """A BatchNorm fed a value near float32's limit keeps an infinite running variance (as
    PyTorch's does) while the step's loss and gradients stay finite; load refuses such a file,
    so save refuses to write it, naming the buffer, and leaves no file behind."""
    model = mpscy.Sequential([layers.Dense(6), layers.BatchNorm(), layers.ReLU(), layers.Dense(3)], input_shape=(4,))
    e = mpscy.Engine(model, loss="mse", optimizer=optim.Adam(1e-2), batch_size=8, device="cpu", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    e.save(tmp_path / "ok.mpscy")
    x[3] = 3e38
    assert e.step(x, y).applied
    assert not np.isfinite(e.get_parameters()["batchnorm_1.running_var"]).all()
    with pytest.raises(mpscy.NonFiniteError, match="batchnorm_1.running_var contains NaN or Inf"):
        e.save(tmp_path / "bad.mpscy")
    assert not (tmp_path / "bad.mpscy").exists() and (tmp_path / "ok.mpscy").exists()


def test_sequential_reloads_as_sequential(tmp_path):
    """A Sequential's description (each layer fed by the one before) is rebuilt as a Sequential
    with its layers, not as a functional Model (`_rebuild_model` compared node k's inputs with
    [k] instead of [k - 1], so no Sequential ever matched)."""
    model = mpscy.Sequential([layers.Dense(4), layers.ReLU(), layers.Dense(3)], input_shape=(5,))
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device="cpu", seed=0)
    engine.save(tmp_path / "seq.mpscy")
    loaded = mpscy.load(tmp_path / "seq.mpscy", device="cpu")
    assert isinstance(loaded.model, mpscy.Sequential)
    assert [type(layer).__name__ for layer in loaded.model.layers] == ["Dense", "ReLU", "Dense"]
    assert [n.name for n in loaded.model.nodes] == [n.name for n in model.nodes]
    loaded.save(tmp_path / "again.mpscy")
    assert checkpoint.read(tmp_path / "again.mpscy")[0]["model"]["class"] == "Sequential"
    # Keras 3's form, its Input first: the input's name comes back too
    keras = mpscy.Sequential([mpscy.Input((5,), name="features"), layers.Dense(3)])
    mpscy.Engine(keras, loss="mse", batch_size=4, device="cpu").save(tmp_path / "keras.mpscy")
    back = mpscy.load(tmp_path / "keras.mpscy", device="cpu").model
    assert isinstance(back, mpscy.Sequential) and [n.name for n in back.nodes] == ["features", "dense_0"]


def test_restore_refuses_another_layer_setup_or_optimizer_algorithm(device, digits, tmp_path):
    """Parameter names and shapes alone would let a ReLU model take a Tanh model's weights, or
    plain SGD a Nesterov run's momentum buffers; the step values (rate, momentum, weight decay)
    are the checkpoint's to set."""
    x, y = digits
    saved = _engine(device, optim.SGD(0.1, momentum=0.9, nesterov=True))
    for xb, yb in _batches(x, y, 0, 3):
        saved.step(xb, yb)
    path = tmp_path / "nesterov.mpscy"
    saved.save(path)
    relu = mpscy.Sequential([layers.Dense(32), layers.ReLU(), layers.Dense(16), layers.ReLU(), layers.Dense(10)],
                            input_shape=(64,))
    cases = [
        (_engine(device, optim.SGD(0.1, momentum=0.9, nesterov=True), model=relu),
         r"saved from another model: its node 2 is tanh_\d+: Tanh\(\) of \[1\], this engine's is relu_\d+: ReLU\(\) of \[1\]"),
        (_engine(device, optim.SGD(0.1, momentum=0.9)),
         r"saved by SGD with nesterov=True; this engine's has nesterov=False"),
        (_engine(device, optim.SGD(0.1, momentum=0.9, nesterov=True, dampening=0.0, maximize=True)),
         r"with maximize=False; this engine's has maximize=True"),
    ]
    for engine, message in cases:
        before = engine.get_parameters()
        with pytest.raises(mpscy.CheckpointError, match=message):
            checkpoint.restore(engine, path)
        for k, v in engine.get_parameters().items():
            np.testing.assert_array_equal(v, before[k])
        assert engine.iterations == 0
    other_values = _engine(device, optim.SGD(0.5, momentum=0.5, nesterov=True, weight_decay=0.1))
    checkpoint.restore(other_values, path)
    assert other_values.learning_rate == pytest.approx(0.1) and other_values.momentum == pytest.approx(0.9)
    assert other_values.weight_decay == 0.0
    _assert_same_state(saved, other_values)


def test_a_failed_schedule_restore_leaves_the_rate_and_schedule(device, digits, tmp_path):
    engine = _engine(device, optim.Adam(1e-2))
    sched = optim.schedules.OneCycleLR(engine, max_lr=0.5, total_steps=10)
    sched.step()
    state, lr, betas = sched.state_dict(), engine.learning_rate, engine.betas
    with pytest.raises(mpscy.InvalidArgumentError, match="betas"):
        sched.load_state_dict({**state, "last_epoch": 7, "_last_lr": 0.123, "_last_momentum": 1.5})
    assert (engine.learning_rate, engine.betas) == (lr, betas)
    assert sched.state_dict() == state
    step = optim.schedules.StepLR(engine, step_size=2)
    state, lr = step.state_dict(), engine.learning_rate
    with pytest.raises(mpscy.InvalidArgumentError):
        step.load_state_dict({**state, "last_epoch": 99, "gamma": 3.0, "_last_lr": -1.0})
    assert engine.learning_rate == lr and step.state_dict() == state
    warm = optim.schedules.LinearWarmup(engine, 3, then=optim.schedules.StepLR(engine, step_size=2))
    state, lr = warm.state_dict(), engine.learning_rate
    inner = {**state["then"], "last_epoch": 5}
    with pytest.raises(mpscy.InvalidArgumentError):
        warm.load_state_dict({**state, "then": inner, "_last_lr": float("nan")})
    assert engine.learning_rate == lr and warm.state_dict() == state


def test_load_keywords_and_a_missing_folder(device, saved, tmp_path):
    """load's keywords override the engine settings, never what the checkpoint is (model, loss,
    optimizer, seed: a clear error, not Python's "multiple values" TypeError); a missing folder
    is named as the folder that does not exist, before anything is written."""
    path, _ = saved
    engine = mpscy.load(path, device=device, clip_grad_norm=1.0, precision="fp32")
    assert engine.clip_grad_norm == 1.0
    for kw in (dict(seed=5), dict(loss="mse", optimizer=optim.SGD(0.1))):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"load takes .* from the checkpoint"):
            mpscy.load(path, device=device, **kw)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"load got unexpected keyword arguments \['foo'\]"):
        mpscy.load(path, device=device, foo=1)                 # not Engine's raw TypeError
    missing = tmp_path / "no_such_folder" / "x.mpscy"
    with pytest.raises(FileNotFoundError, match="the folder to write into does not exist") as info:
        engine.save(missing)
    assert info.value.filename == str(missing.parent) and ".tmp" not in str(info.value)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        engine.save(folder)
    assert info.value.filename == str(folder) and ".tmp" not in str(info.value)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the temporary file went too


def test_restore_loads_the_state_into_an_attached_schedule_of_the_same_class(device, tmp_path):
    """restore into an engine with a StepLR of its own attached: that schedule object stays and
    takes the saved state (last_epoch 5 after 5 steps), so the next step's rate is the run's
    (0.1 * 0.5 ** 2 after step 6), not a fresh schedule's (0.1)."""
    x, y = mpscy.datasets.load_digits()

    def make():
        model = mpscy.Sequential([layers.Dense(16), layers.ReLU(), layers.Dense(10)], input_shape=(64,))
        e = mpscy.Engine(model, optimizer=optim.SGD(0.1), batch_size=32, device=device, seed=0)
        e.set_schedule(optim.schedules.StepLR(e, step_size=3, gamma=0.5), per="step")
        return e

    a = make()
    a.fit(x[:160], y[:160], epochs=1, shuffle=False, verbose=0)   # 5 steps
    assert a.schedule.last_epoch == 5 and a.learning_rate == pytest.approx(0.05)
    a.save(tmp_path / "s.mpscy")
    c = make()
    mine = c.schedule
    checkpoint.restore(c, tmp_path / "s.mpscy")
    assert c.schedule is mine and mine.state_dict() == a.schedule.state_dict()
    ha = a.fit(x[:160], y[:160], epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    hc = c.fit(x[:160], y[:160], epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    assert ha.history["loss"] == hc.history["loss"]
    assert a.learning_rate == c.learning_rate == pytest.approx(0.1 * 0.5 ** 3)


# ----------------------------------------------------------------------------- damaged files, bad arguments
def _rewrite(src, dst, header=None, desc=None):
    """A copy of checkpoint `src` with its safetensors header edited by `header(dict)` or its
    JSON description by `desc(dict)`, the description's SHA-256 recomputed (the tensor bytes are
    kept), so that only the edit is wrong."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    if desc is not None:
        meta = head["__metadata__"]
        text = json.dumps(desc(json.loads(meta["mpscy"])))
        meta["mpscy"], meta["mpscy_sha256"] = text, hashlib.sha256(text.encode()).hexdigest()
    if header is not None:
        head = header(head)
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


def test_a_checkpoint_never_imports_the_modules_it_names(device, trained, tmp_path, monkeypatch):
    """A checkpoint is data (safetensors, pickle-free): the module a loss, optimizer, layer or
    schedule class is said to come from is looked up among the modules already imported (mpscy's
    own aside), never imported, so a file cannot run a module's top-level code (its SHA-256 is no
    guard: anyone can recompute it). Before, load imported any module named. A name that is not
    a class, or a class that is not a schedule, is refused as a CheckpointError too."""
    path = trained
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Adam: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    edits = {"loss": _set("loss", "module", "ckpt_side_effect"), "optimizer": _set("optimizer", "module", "ckpt_side_effect"),
             "layer": _set("model", "nodes", 1, "module", "ckpt_side_effect"), "schedule": _set("schedule", "module", "ckpt_side_effect")}
    for what, edit in edits.items():
        bad = _rewrite(path, tmp_path / f"{what}.mpscy", desc=edit)
        with pytest.raises(mpscy.CheckpointError, match=r"ckpt_side_effect\.\w+ cannot be found; import the module that "
                                                       r"defines it first \(a checkpoint never imports a module itself\)"):
            mpscy.load(bad, device=device)
    assert not marker.exists() and "ckpt_side_effect" not in sys.modules
    for what, edit, msg in (("schedule", _at(("schedule",), lambda c, k: c[k].update(module="os", **{"class": "getcwd"})),
                             r"os\.getcwd is not a class"),
                            ("schedule", _at(("schedule",), lambda c, k: c[k].update(module="json", **{"class": "JSONDecoder"})),
                             r"json\.JSONDecoder is not a schedule: it needs step\(\)"),
                            ("loss", _set("loss", "module", "json"), r"json\.\w+ cannot be found")):
        with pytest.raises(mpscy.CheckpointError, match=msg):
            mpscy.load(_rewrite(path, tmp_path / f"{what}2.mpscy", desc=edit), device=device)


def _at(path, change):
    """An edit of a description: change(container, key) at the nested `path`."""
    def edit(d):
        c = d
        for k in path[:-1]:
            c = c[k]
        change(c, path[-1])
        return d
    return edit


def _set(*path_and_value):
    *path, value = path_and_value
    return _at(path, lambda c, k: c.__setitem__(k, value))


def _drop(*path):
    return _at(path, lambda c, k: c.__delitem__(k))


@pytest.fixture
def trained(device, digits, tmp_path):
    """A checkpoint of an Adam run 4 steps in, epoch 2, with a StepLR attached."""
    x, y = digits
    e = _engine(device, optim.Adam(1e-2), seed=5)
    e.set_schedule(optim.schedules.StepLR(e, step_size=2, gamma=0.5), per="step")
    e.fit(x[:128], y[:128], epochs=2, shuffle=False, verbose=0)
    assert e.iterations == 8 and e.epoch == 2
    e.save(tmp_path / "run.mpscy", meta={"note": "ok", "mean": np.arange(3, dtype=np.float32)})
    return tmp_path / "run.mpscy"


def _snapshot(engine):
    return (engine.get_parameters(), engine.get_optimizer_state(), engine.iterations, engine.epoch,
            engine.learning_rate, engine.betas, engine.seed, engine.schedule)


def _assert_unchanged(engine, snap):
    params, state, iterations, epoch, lr, betas, seed, schedule = snap
    _assert_same_arrays(engine.get_parameters(), params, engine.get_optimizer_state(), state)
    assert (engine.iterations, engine.epoch, engine.learning_rate, engine.betas, engine.seed) == \
        (iterations, epoch, lr, betas, seed)
    assert engine.schedule is schedule and not hasattr(engine, "checkpoint_meta")


def _refused(device, bad, message):
    """restore of `bad` into a fresh engine (another seed, rate and epoch) raises CheckpointError
    matching `message` and changes nothing; load refuses it alike."""
    engine = _engine(device, optim.Adam(3e-3), seed=11)
    engine.epoch = 1
    snap = _snapshot(engine)
    with pytest.raises(mpscy.CheckpointError, match=message):
        checkpoint.restore(engine, bad)
    _assert_unchanged(engine, snap)
    with pytest.raises(mpscy.CheckpointError, match=message):
        mpscy.load(bad, device=device)


@pytest.mark.parametrize("edit, message", [
    (_drop("rng"), r"malformed description: rng is missing"),
    (_drop("counters"), r"malformed description: counters is missing"),
    (_drop("rng", "counter"), r"rng\.counter is missing"),
    (_set("rng", "seed", -1), r"rng\.seed must be an integer in \[0, 2\*\*64\), got -1"),
    (_set("counters", "epoch", "x"), r"counters\.epoch must be an integer in \[0, 2\*\*64\), got 'x'"),
    (_set("step_values", "lr", "x"), r"step_values\.lr must be a number, got 'x'"),
    (_set("meta", {"__ndarray__": 1, "dtype": "bogus"}), r"meta holds a malformed array: data type 'bogus'"),
    (_set("schedule", "per", "often"), r"schedule\.per must be 'step' or 'epoch', got 'often'"),
    (_set("schedule", "state", "_last_lr", -1.0), r"cannot be restored into this engine: learning rate must be"),
], ids=["no-rng", "no-counters", "no-rng-counter", "rng-seed", "epoch-str", "lr-str", "meta-dtype", "schedule-per",
        "schedule-refuses"])
def test_a_refused_restore_changes_nothing(device, trained, tmp_path, edit, message):
    """Parameters and optimizer state were written inside the rollback, but the generator,
    counters, step values and meta were read after it: a file lacking `rng`, or with a bad
    epoch, raised a raw KeyError/ValueError/OverflowError/TypeError with the parameters, the
    optimizer's step and the iterations already changed. Every field is now checked first; a
    schedule the engine refuses (the last field that can fail) is rolled back."""
    _refused(device, _rewrite(trained, tmp_path / "bad.mpscy", desc=edit), message)


@pytest.mark.parametrize("edit, message", [
    (_set("step_values", "lr", -1.0), r"step_values\.lr must be finite and >= 0, got -1\.0"),
    (_set("step_values", "lr", float("nan")), r"step_values\.lr must be finite and >= 0, got nan"),
    (_set("step_values", "weight_decay", float("inf")), r"step_values\.weight_decay must be finite and >= 0, got inf"),
    (_set("step_values", "beta1", 2.0), r"step_values\.beta1 must be in \[0, 1\), got 2\.0"),
    (_set("step_values", "beta2", True), r"step_values\.beta2 must be a number, got True"),
    (_set("counters", "epoch", -1), r"counters\.epoch must be an integer in \[0, 2\*\*64\), got -1"),
    (_set("engine", "seed", -1), r"engine\.seed must be an integer in \[0, 2\*\*64\), got -1"),
    (_set("rng", "counter", 2**64), r"rng\.counter must be an integer in \[0, 2\*\*64\), got 18446744073709551616"),
    (_set("initial_lr", "x"), r"initial_lr must be a number, got 'x'"),
    (_set("initial_lr", -0.5), r"initial_lr must be finite and >= 0, got -0\.5"),
], ids=["lr-negative", "lr-nan", "wd-inf", "beta1", "beta2-bool", "epoch", "engine-seed", "counter", "initial-lr-str",
        "initial-lr-negative"])
def test_restore_applies_the_setters_rules(device, trained, tmp_path, edit, message):
    """The step values, counters and seeds were written without the public setters' checks: a
    negative or NaN rate, beta1 = 2, epoch -1 or seed -1 were taken and broke the next fit or
    save. They are refused as the setters refuse them, naming the field and the value."""
    _refused(device, _rewrite(trained, tmp_path / "bad.mpscy", desc=edit), message)


def _nodes(edit):
    return lambda d: {**d, "model": {**d["model"], "nodes": edit(d["model"]["nodes"])}}


@pytest.mark.parametrize("header, desc, message", [
    (lambda h: {**h, "__metadata__": 5}, None, r"corrupted header: __metadata__ must map names to strings, got 5"),
    (lambda h: {**h, "__metadata__": {**h["__metadata__"], "mpscy": 5}}, None,
     r"corrupted header: __metadata__\['mpscy'\] must be a string, got 5"),
    (lambda h: {**h, "params/dense_0.bias": {**h["params/dense_0.bias"], "shape": [2**62 + 1, 32]}}, None,
     r"tensor 'params/dense_0.bias' has 128 bytes for shape \(4611686018427387905, 32\)"),  # 32 in int64
    (lambda h: {**h, "params/dense_0.bias": {**h["params/dense_0.bias"], "shape": [32.0]}}, None,
     r"the header entry of 'params/dense_0.bias' is malformed"),
    (None, lambda d: [1], r"malformed description: it must be a JSON object, got \[1\]"),
    (None, _drop("model"), r"malformed description: model is missing"),
    (None, _drop("optimizer", "class"), r"malformed description: optimizer\.class is missing"),
    (None, _set("loss", "config", 5), r"loss\.config must be a JSON object, got 5"),
    (None, _set("version", "1"), r"checkpoint version '1'; this mpscy reads version 1"),
    (None, _nodes(lambda n: []), r"model\.nodes must be a non-empty list, got \[\]"),
    (None, _nodes(lambda n: [n[0], {**n[1], "inputs": [7]}, *n[2:]]),
     r"model\.nodes\[1\]\.inputs must be a non-empty list of earlier nodes' indices \(below 1\), got \[7\]"),
    (None, _nodes(lambda n: [{**n[0], "shape": None}, *n[1:]]),
     r"model\.nodes\[0\]\.shape must be a list of positive integers, got None"),
    (None, _nodes(lambda n: [n[0], {**n[1], "config": "x"}, *n[2:]]),
     r"model\.nodes\[1\]\.config must be a JSON object, got 'x'"),
    (None, _set("optimizer_state", "exp_avg", {"__tensor__": []}), r"lacks the tensor \[\]"),
], ids=["metadata-int", "description-int", "huge-shape", "float-shape", "description-list", "no-model",
        "no-optimizer-class", "loss-config", "version-str", "no-nodes", "inputs-out-of-range", "input-shape",
        "node-config", "tensor-name"])
def test_damaged_headers_and_descriptions_are_checkpoint_errors(device, trained, tmp_path, header, desc, message):
    """Neither SHA-256 covers the safetensors header, and a description may be re-hashed: a
    foreign __metadata__, a description that is a list or lacks keys, no nodes or inputs out of
    range raised AttributeError, KeyError, IndexError or OverflowError; each is now a
    CheckpointError naming what is wrong, from load and restore alike, before anything changes."""
    _refused(device, _rewrite(trained, tmp_path / "bad.mpscy", header=header, desc=desc), message)


def test_a_path_must_be_a_path(device, tmp_path):
    """None or an int (which open() would take as a file descriptor, and close) raised a raw
    TypeError; bytes paths are paths (save once wrote its temporary file under "b'...'")."""
    engine = _engine(device, optim.Adam())
    for path in (None, 5, 1.5):
        name = type(path).__name__
        message = rf"a checkpoint path must be a str, bytes or os.PathLike, got {name}"
        for call in (lambda: engine.save(path), lambda: mpscy.load(path, device=device),
                     lambda: checkpoint.restore(engine, path), lambda: checkpoint.read(path)):
            with pytest.raises(mpscy.InvalidArgumentError, match=message):
                call()
    path = os.fsencode(tmp_path / "bytes.mpscy")
    engine.save(path)
    np.testing.assert_array_equal(mpscy.load(path, device=device).get_parameters()["dense_0.weight"],
                                  engine.get_parameters()["dense_0.weight"])
    assert os.listdir(tmp_path) == ["bytes.mpscy"]


def test_save_refuses_meta_json_cannot_hold(tmp_path):
    """A self-referencing meta raised a raw RecursionError; it and every other value JSON cannot
    hold are refused naming meta before anything is written: an earlier file at the path stays."""
    engine = _engine("cpu", optim.Adam())
    path = tmp_path / "m.mpscy"
    engine.save(path, meta={"v": 1})
    raw = path.read_bytes()
    loop = {"a": 1}
    loop["self"] = loop
    chain = []
    chain.append({"up": chain})
    for meta, message in [(loop, "it contains itself"), (chain, "it contains itself"),
                          ({"classes": {1, 2}}, "Object of type set is not JSON serializable"),
                          ({"fn": print}, "is not JSON serializable")]:
        with pytest.raises(mpscy.InvalidArgumentError, match=f"^meta is not JSON-serializable: .*{message}"):
            engine.save(path, meta=meta)
        assert path.read_bytes() == raw and os.listdir(tmp_path) == ["m.mpscy"]
    assert mpscy.load(path, device="cpu").checkpoint_meta == {"v": 1}


def test_loading_does_not_repeat_the_build_warnings(device, tmp_path):
    """A model whose build warned (Keras's BatchNorm momentum, a channels-last-looking input, a
    probability loss on an unsquashed output) warns when it is built, once: mpscy.load rebuilds
    it silently (an inference script would repeat them at every load, at mpscy's own lines)."""
    import warnings
    with warnings.catch_warnings(record=True) as built:
        warnings.simplefilter("always")
        model = mpscy.Sequential([layers.Conv2D(2, 3), layers.BatchNorm(momentum=0.95), layers.Flatten(),
                                  layers.Dense(1)], input_shape=(20, 20, 3))
        engine = mpscy.Engine(model, loss="binary_cross_entropy", batch_size=4, device=device)
    assert len([w for w in built if issubclass(w.category, UserWarning)]) == 3
    assert all(w.filename == __file__ for w in built)   # at the user's lines, not mpscy's
    path = tmp_path / "m.mpscy"
    engine.save(path)
    with warnings.catch_warnings(record=True) as loaded:
        warnings.simplefilter("always")
        back = mpscy.load(path, device=device)
    assert [str(w.message) for w in loaded] == [] and back.model.nodes[2].layer.momentum == 0.95


def test_a_truncated_checkpoint_is_not_taken_for_a_pickle(tmp_path):
    """A header length whose first bytes are 80 03 (0x380 = 896, a multiple of 8 as headers are
    padded) is a truncated safetensors file, not a pickle: the format sniffing needs a pickle's
    next opcode too."""
    path = tmp_path / "h.mpscy"
    header = b'{"__metadata__":{"note":"' + b"x" * 868 + b'"}}'
    assert len(header) == 0x380
    path.write_bytes(struct.pack("<Q", len(header)) + header[:400])
    with pytest.raises(mpscy.CheckpointError, match="is truncated or not a safetensors file: header of 896 bytes"):
        mpscy.load(path, device="cpu")


def test_a_checkpoint_keeps_the_engine_s_threads(digits, tmp_path):
    """On the cpu a convolution's weight gradient depends on the thread count in its last bits, so
    a resumed run is bitwise only with the saved engine's threads: load takes them unless told
    otherwise (it took 0, every core), a file without them (written before) loads with 0, and a
    bad count is refused naming the field. Found by a user trial."""
    x, y = digits
    model = lambda: mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.ReLU(), layers.Flatten(),  # noqa: E731
                                      layers.Dense(10)], input_shape=(1, 8, 8))
    make = lambda: mpscy.Engine(model(), optimizer=optim.SGD(0.05, momentum=0.9), batch_size=32,  # noqa: E731
                                device="cpu", seed=1, threads=1)
    xi = x.reshape(-1, 1, 8, 8)
    full = make()
    full.fit(xi[:256], y[:256], epochs=4, shuffle=False, verbose=0)
    half = make()
    half.fit(xi[:256], y[:256], epochs=2, shuffle=False, verbose=0)
    half.save(tmp_path / "t1.mpscy")
    resumed = mpscy.load(tmp_path / "t1.mpscy", device="cpu")
    assert resumed.device_info()["threads"] == 1
    resumed.fit(xi[:256], y[:256], epochs=4, initial_epoch=resumed.epoch, shuffle=False, verbose=0)
    _assert_same_arrays(resumed.get_parameters(), full.get_parameters(), resumed.get_optimizer_state(),
                        full.get_optimizer_state())
    assert mpscy.load(tmp_path / "t1.mpscy", device="cpu", threads=2).device_info()["threads"] == 2
    old = _rewrite(tmp_path / "t1.mpscy", tmp_path / "old.mpscy", desc=_drop("engine", "threads"))
    assert mpscy.load(old, device="cpu")._threads == 0
    bad = _rewrite(tmp_path / "t1.mpscy", tmp_path / "bad.mpscy", desc=_set("engine", "threads", 10**6))
    with pytest.raises(mpscy.CheckpointError, match=r"engine.threads must be in \[0, 64\], got 1000000"):
        mpscy.load(bad, device="cpu")


# ----------------------------------------------------------------------------- saves inside an epoch
class _SaveEachBatch(mpscy.callbacks.Callback):
    """Saves after every batch (the README's way of saving every N batches) and interrupts the
    run after batch `stop` of epoch `epoch`, as a crash or Ctrl-C would."""

    def __init__(self, path, epoch, stop):
        super().__init__()
        self.path, self.epoch, self.stop = path, epoch, stop

    def on_train_batch_end(self, batch, logs=None):
        self.engine.save(self.path)
        if self.engine.epoch == self.epoch and batch == self.stop:
            raise KeyboardInterrupt


def _dropout_mlp():
    return mpscy.Sequential([layers.Dense(32), layers.Tanh(), layers.Dropout(0.2), layers.Dense(10)],
                            input_shape=(64,))


def _one_cycle_run(device):
    e = mpscy.Engine(_dropout_mlp(), optimizer=optim.SGD(lr=0.05, momentum=0.9), batch_size=16, device=device,
                     seed=2)
    e.set_schedule(optim.schedules.OneCycleLR(e, 0.1, epochs=3, steps_per_epoch=7), per="step")
    return e


def _fit_data(x, y, source):
    if source == "arrays":
        return dict(x=x[:100], y=y[:100], shuffle=True)        # 7 batches, the last of 4 rows
    from mpscy import data
    return dict(x=data.DataLoader(data.ArrayDataset(x[:100], y[:100]), batch_size=16, shuffle=True, seed=9))


@pytest.mark.parametrize("source, stop", [("arrays", 3), ("arrays", 6), ("loader", 2), ("restore", 3),
                                          ("saved again", 3)])
def test_a_save_inside_an_epoch_continues_from_its_batch(device, digits, tmp_path, source, stop):
    """The README's mid-epoch saves (a callback's engine.save in on_train_batch_end) held the
    epoch's number only, and fit(initial_epoch=) ran that epoch from its first batch while a
    per-step schedule was already past those batches: the rates shifted, and a OneCycleLR built
    for the run overran ("OneCycleLR stepped 22 times; total_steps is 21"). A save inside fit's
    epoch now records its batches done and the epoch's sums so far, and a fit with
    initial_epoch=engine.epoch passes over those batches of the same shuffled order: interrupted
    after batch `stop` of epoch 2 (the last batch too) and resumed, the run is bit for bit the
    uninterrupted one, History included, through mpscy.load or restore, for arrays and a
    DataLoader, with Dropout masks drawn as they were; a loaded engine saved again before any fit
    keeps the position (it was dropped, and the copy reran the epoch)."""
    x, y = digits
    kind = "loader" if source == "loader" else "arrays"
    full = _one_cycle_run(device)
    h_full = full.fit(epochs=3, verbose=0, **_fit_data(x, y, kind))
    run = _one_cycle_run(device)
    path = tmp_path / "mid.mpscy"
    with pytest.raises(KeyboardInterrupt):
        run.fit(epochs=3, verbose=0, callbacks=[_SaveEachBatch(path, 1, stop)], **_fit_data(x, y, kind))
    assert checkpoint.read(path)[0]["position"]["batches"] == stop + 1
    if source == "restore":
        resumed = _one_cycle_run(device)
        checkpoint.restore(resumed, path)
    elif source == "saved again":
        mpscy.load(path, device=device).save(tmp_path / "again.mpscy")
        assert checkpoint.read(tmp_path / "again.mpscy")[0]["position"] == checkpoint.read(path)[0]["position"]
        resumed = mpscy.load(tmp_path / "again.mpscy", device=device)
    else:
        resumed = mpscy.load(path, device=device)
    assert resumed.epoch == 1 and resumed.schedule.last_epoch == 7 + stop + 1
    h = resumed.fit(epochs=3, initial_epoch=resumed.epoch, verbose=0, **_fit_data(x, y, kind))
    _assert_same_state(full, resumed)
    assert resumed.iterations == full.iterations and resumed.schedule.last_epoch == 21
    assert h.epoch == [1, 2] and h.history == {k: v[1:] for k, v in h_full.history.items()}


def test_an_optimizer_state_whose_squares_overflowed_is_saved(device, tmp_path):
    """Adam after a finite gradient past 1.8e19 holds +Inf in exp_avg_sq (3117 entries here), as
    torch's state does: save refused it ("holds finite values only"), so ModelCheckpoint failed
    from then on. It is saved, loaded and continued bit for bit; set_optimizer_state takes +Inf
    in a sum of squares and still refuses NaN and -Inf there, and Inf in exp_avg."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 40)).astype(np.float32), rng.integers(0, 10, 32)

    def make():
        return mpscy.Engine(mpscy.Sequential([layers.Dense(64, name="a"), layers.ReLU(), layers.Dense(10)],
                                             input_shape=(40,)), optimizer=optim.Adam(1e-3), batch_size=32,
                            device=device, seed=1)

    e = make()
    e.step(x, y)
    assert e.step(x * 1e30, y).applied
    state = e.get_optimizer_state()
    overflowed = sum(int(np.isposinf(v).sum()) for v in state["exp_avg_sq"].values())
    assert overflowed == 3117 if device == "cpu" else abs(overflowed - 3117) <= 31   # the last bits of g near 1.8e19
    e.save(tmp_path / "m.mpscy")
    f = mpscy.load(tmp_path / "m.mpscy", device=device)
    assert [e.step(x, y).loss for _ in range(3)] == [f.step(x, y).loss for _ in range(3)]
    _assert_same_state(e, f)
    g = make()
    g.set_optimizer_state(state)
    for slot, bad in (("exp_avg_sq", np.nan), ("exp_avg_sq", -np.inf), ("exp_avg", np.inf)):
        broken = {k: {p: a.copy() for p, a in v.items()} if isinstance(v, dict) else v for k, v in state.items()}
        broken[slot]["a.bias"][0] = bad
        with pytest.raises(mpscy.InvalidArgumentError, match=rf"optimizer slot '{slot}' for 'a.bias' contains NaN "
                                                             r"or Inf"):
            g.set_optimizer_state(broken)


def test_a_loader_s_position_is_taken_only_where_its_order_repeats(device, digits, tmp_path):
    """A mid-epoch position over a loader: an mpscy DataLoader's order is its shuffle, seed and
    drop_last, so another seed or shuffle runs the epoch from its first batch with a warning
    (they skipped the first batches of another order, silently); a shuffling torch DataLoader
    draws its order from torch's global generator, so its position is never taken; one that
    takes its rows in sequence is continued, bit for bit the uninterrupted run."""
    from mpscy import data
    x, y = digits
    x, y = x[:96], y[:96]

    def mine(**kw):
        return data.DataLoader(data.ArrayDataset(x, y), batch_size=16, **{"shuffle": True, "seed": 9, **kw})

    def run_to(path, loader):
        e = _engine(device, optim.SGD(0.05, momentum=0.9))
        with pytest.raises(KeyboardInterrupt):
            e.fit(loader, epochs=3, verbose=0, callbacks=[_SaveEachBatch(path, 1, 2)])
        return mpscy.load(path, device=device)

    path = tmp_path / "mid.mpscy"
    for other, this in ((dict(seed=1), "shuffle=True, seed=1"), (dict(shuffle=False), "shuffle=False, seed=9")):
        e = run_to(path, mine())
        with pytest.warns(UserWarning, match=r"it was saved by a fit with order 'DataLoader\(shuffle=True, seed=9, "
                                             r"drop_last=False\)' \(this fit's 'DataLoader\(" + this):
            e.fit(mine(**other), epochs=2, initial_epoch=1, verbose=0)
        assert e.iterations == 6 + 3 + 6
    torch = pytest.importorskip("torch")
    tds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
    e = run_to(path, torch.utils.data.DataLoader(tds, batch_size=16, shuffle=True))
    with pytest.warns(UserWarning, match=r"this fit's loader does not give an epoch's batches in an order a later fit "
                                         r"repeats"):
        e.fit(torch.utils.data.DataLoader(tds, batch_size=16, shuffle=True), epochs=2, initial_epoch=1, verbose=0)
    assert e.iterations == 6 + 3 + 6
    shuffled = lambda: torch.utils.data.DataLoader(tds, batch_sampler=torch.utils.data.BatchSampler(  # noqa: E731
        torch.utils.data.RandomSampler(tds), 16, False))   # its loader.sampler is a SequentialSampler
    e = run_to(path, shuffled())
    with pytest.warns(UserWarning, match=r"this fit's loader does not give an epoch's batches in an order"):
        e.fit(shuffled(), epochs=2, initial_epoch=1, verbose=0)
    assert e.iterations == 6 + 3 + 6
    in_order = lambda: torch.utils.data.DataLoader(tds, batch_size=16)  # noqa: E731
    full = _engine(device, optim.SGD(0.05, momentum=0.9))
    full.fit(in_order(), epochs=3, verbose=0)
    e = run_to(path, in_order())
    e.fit(in_order(), epochs=3, initial_epoch=1, verbose=0)
    assert e.iterations == full.iterations == 18
    _assert_same_state(full, e)
    # a collate_fn that joins two rows an item: batches of 32 rows from a batch_size of 16 (the
    # position's rows checked against 16 a batch refused the whole file)
    two = torch.utils.data.TensorDataset(torch.from_numpy(x.reshape(48, 2, 64)),
                                         torch.from_numpy(y.reshape(48, 2).astype(np.int64)))
    joined = lambda: torch.utils.data.DataLoader(two, batch_size=16, collate_fn=lambda items: (  # noqa: E731
        torch.cat([a for a, _ in items]), torch.cat([b for _, b in items])))
    e = run_to(path, joined())
    assert checkpoint.read(path)[0]["position"]["rows"] == 3 * 32
    e.fit(joined(), epochs=3, initial_epoch=1, verbose=0)   # epoch 2 was saved after its last batch
    assert e.iterations == 3 + 3 + 3


def test_positions_of_9d93c77_a_save_before_the_first_epoch_and_a_refused_warning(device, digits, tmp_path):
    """A position without its loader order (written by 9d93c77) loads, and over arrays it is
    continued; a save from on_train_begin of a fit that continues a position keeps it (it was
    dropped); restore under warnings-as-errors, raising its schedule warning, changes nothing (it
    raised after restoring)."""
    import warnings
    x, y = digits
    full = _one_cycle_run(device)
    full.fit(epochs=3, verbose=0, **_fit_data(x, y, "arrays"))
    run = _one_cycle_run(device)
    path = tmp_path / "mid.mpscy"
    with pytest.raises(KeyboardInterrupt):
        run.fit(epochs=3, verbose=0, callbacks=[_SaveEachBatch(path, 1, 3)], **_fit_data(x, y, "arrays"))
    old = _rewrite(path, tmp_path / "old.mpscy", desc=_drop("position", "order"))
    e = mpscy.load(old, device=device)

    class SaveFirst(mpscy.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.engine.save(tmp_path / "begin.mpscy")

    e.fit(epochs=3, initial_epoch=1, verbose=0, callbacks=[SaveFirst()], **_fit_data(x, y, "arrays"))
    _assert_same_state(full, e)
    assert checkpoint.read(tmp_path / "begin.mpscy")[0]["position"]["batches"] == 4
    other = _one_cycle_run(device)
    other.set_schedule(optim.schedules.StepLR(other, 2), per="epoch")
    before = other.get_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"restore replaces the attached StepLR \(per='epoch'\) with the "
                                              r"checkpoint's OneCycleLR \(per='step'\)"):
            checkpoint.restore(other, path)
    assert other.epoch == 0 and other.iterations == 0 and type(other.schedule).__name__ == "StepLR"
    assert all(np.array_equal(v, before[k]) for k, v in other.get_parameters().items())


def test_a_position_fit_cannot_take_is_passed_over_with_a_warning(device, digits, tmp_path):
    """A fit that does not continue the saved epoch (another initial_epoch, batch size or
    shuffling) runs it from its first batch, as before, saying why; the position is this fit's to
    take or leave (the next fit does not take it), and a save between epochs or outside fit
    holds none."""
    x, y = digits
    run = _engine(device, optim.SGD(0.05, momentum=0.9))
    path = tmp_path / "mid.mpscy"
    with pytest.raises(KeyboardInterrupt):
        run.fit(x[:320], y[:320], epochs=3, verbose=0, callbacks=[_SaveEachBatch(path, 1, 3)])
    run.save(tmp_path / "after.mpscy")                     # outside fit: no position
    assert "position" not in checkpoint.read(tmp_path / "after.mpscy")[0]
    for kwargs, why in [(dict(initial_epoch=0), r"this fit starts at initial_epoch=0, not 1"),
                        (dict(initial_epoch=1, batch_size=16), r"it was saved by a fit with batch_size 32 \(this "
                                                                r"fit's 16\)"),
                        (dict(initial_epoch=1, shuffle=False), r"it was saved by a fit with shuffle True \(this "
                                                               r"fit's False\)")]:
        e = mpscy.load(path, device=device)
        with pytest.warns(UserWarning, match=r"^this engine was saved inside epoch 2, after its batch 3, and " + why +
                          r": that epoch runs from its first batch again \(a per-step schedule saved with it is 4 "
                          r"steps ahead of its batches\)$"):
            h = e.fit(x[:320], y[:320], epochs=2, verbose=0, **kwargs)
        assert e.iterations == 10 + 4 + 10 * len(h.epoch) * 32 // kwargs.get("batch_size", 32)
        steps = e.iterations
        e.fit(x[:320], y[:320], epochs=e.epoch + 1, initial_epoch=e.epoch, verbose=0)   # no warning, whole
        assert e.iterations == steps + 10
    e = mpscy.load(path, device=device)
    e.epoch = 4
    with pytest.warns(UserWarning, match=r"saved inside epoch 2, after its batch 3, and the engine's epoch is now 4"):
        e.fit(x[:320], y[:320], epochs=5, initial_epoch=4, verbose=0)
    e = mpscy.load(path, device=device)
    e.fit(x[:320], y[:320], epochs=2, initial_epoch=1, verbose=0)
    assert e.iterations == 10 + 10
    e.save(tmp_path / "end.mpscy")
    assert "position" not in checkpoint.read(tmp_path / "end.mpscy")[0]
    e.fit(x[:320], y[:320], epochs=3, initial_epoch=2, verbose=0)   # nothing left to pass over
    assert e.iterations == 30


@pytest.fixture
def mid_epoch(device, digits, tmp_path):
    """A checkpoint saved inside the second epoch of an Adam run (the engine of _refused), after
    its batch 1."""
    x, y = digits
    e = _engine(device, optim.Adam(1e-2), seed=5)
    with pytest.raises(KeyboardInterrupt):
        e.fit(x[:128], y[:128], epochs=2, verbose=0, callbacks=[_SaveEachBatch(tmp_path / "mid.mpscy", 1, 1)])
    return tmp_path / "mid.mpscy"


@pytest.mark.parametrize("edit, message", [
    (_set("position", "batches", 0), r"position\.batches must be an integer >= 1, got 0"),
    (_set("position", "rows", True), r"position\.rows must be an integer >= 0, got True"),
    (_set("position", "loss_sum", "x"), r"position\.loss_sum must be a finite number, got 'x'"),
    (_set("position", "lr", -1.0), r"position\.lr must be a finite number >= 0, got -1\.0"),
    (_set("position", "shuffle", 1), r"position\.shuffle must be true, false or null, got 1"),
    (_drop("position", "void"), r"position must have the fields \['acc_sum', 'batch_size', .*\], got \['acc_sum'"),
    (_set("position", [2]), r"position must be a JSON object, got \[2\]"),
    # each field valid, together not (a resumed fit divided by 0 counted labels at the epoch's end)
    (_set("position", "counted", 0), r"position is inconsistent: 0 counted labels for 2 applied batches"),
    (_set("position", "rows", 10 ** 9), r"position is inconsistent: 1000000000 rows for 2 applied batches of at "
                                         r"most 32"),
    (_set("position", "void", 3), r"position is inconsistent: void batches past its batches"),
    (_at(("position", "has_acc"), lambda c, k: c.update(has_acc=False, acc_sum=5.0)),
     r"position is inconsistent: an accuracy sum without accuracy"),
], ids=["batches-0", "rows-bool", "loss-str", "lr-negative", "shuffle-int", "no-void", "list", "counted-0",
        "rows-huge", "void-past", "acc-without"])
def test_a_damaged_position_is_a_checkpoint_error(device, mid_epoch, tmp_path, edit, message):
    """The position of a save inside an epoch is checked with the rest of the description: a
    damaged one is a CheckpointError naming the field, from load and restore, changing nothing."""
    assert checkpoint.read(mid_epoch)[0]["position"]["batches"] == 2
    _refused(device, _rewrite(mid_epoch, tmp_path / "bad.mpscy", desc=edit), message)
