"""Engine.fit: it is exactly the documented step loop (same order, same parameters, History
equal to the mean step losses), costs one ABI call per step and nothing else, follows Keras's
verbose conventions, accepts DataLoaders, drives attached schedules, refuses bad options and
data before the first step, and prints a progress bar with tqdm or plain lines without it. The
callbacks it drives are test_callbacks.py's."""
import builtins
import io
import math
import sys

import numpy as np
import pytest

import mpscy
from mpscy import callbacks as cb, data, layers, optim

from fit_util import digits, digits_engine, same_params  # noqa: F401 (digits: a fixture)


def test_fit_is_the_documented_step_loop(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    h = engine.fit(xtr, ytr, epochs=3, batch_size=25, validation_data=(xte, yte), verbose=0)
    assert isinstance(h, cb.History) and engine.history is h and h.epoch == [0, 1, 2]
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 3 for v in h.history.values())

    ref = digits_engine(device)
    for epoch in range(3):
        order = np.random.Generator(np.random.PCG64([0, epoch])).permutation(len(xtr))
        xs, ys = xtr[order], ytr[order]
        loss = acc = 0.0
        for i in range(0, len(xs), 25):
            r = ref.step(xs[i:i + 25], ys[i:i + 25])
            loss += r.loss * r.batch_size
            acc += r.accuracy * r.batch_size
        assert h.history["loss"][epoch] == pytest.approx(loss / len(xs), rel=1e-12)
        assert h.history["accuracy"][epoch] == pytest.approx(acc / len(xs), rel=1e-12)
    assert same_params(engine, ref)
    final = ref.evaluate(xte, yte)
    assert h.history["val_loss"][-1] == final["loss"] and h.history["val_accuracy"][-1] == final["accuracy"]
    assert h.history["lr"] == [1e-3] * 3
    assert engine.epoch == 3 and engine.iterations == 3 * -(-len(xtr) // 25)
    assert h.history["loss"][-1] < h.history["loss"][0] * 0.75


def test_second_fit_call_draws_new_orders(device, digits):
    xtr, ytr, _, _ = digits
    a = digits_engine(device)
    a.fit(xtr, ytr, epochs=1, verbose=0)
    a.fit(xtr, ytr, epochs=1, verbose=0)      # engine.epoch is 1 now: the order of epoch 1
    b = digits_engine(device)
    b.fit(xtr, ytr, epochs=2, verbose=0)
    assert same_params(a, b) and a.epoch == b.epoch == 2


def test_one_abi_call_per_step_and_nothing_else(device, digits):
    """The loss comes from the StepResult: fit adds no read-back call per step."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    before = engine.stats()
    engine.fit(xtr, ytr, epochs=2, verbose=0)
    after = engine.stats()
    steps = 2 * -(-len(xtr) // 32)
    assert after["steps"] - before["steps"] == steps
    assert after["calls"] - before["calls"] == steps          # no read-back call of any kind
    assert after["allocations"] == before["allocations"]


def test_dataloader_input_matches_arrays(device, digits):
    xtr, ytr, xte, yte = digits
    a = digits_engine(device)
    ha = a.fit(xtr, ytr, epochs=2, shuffle=False, verbose=0, validation_data=(xte, yte))
    b = digits_engine(device)
    loader = data.DataLoader(data.ArrayDataset(xtr, ytr), batch_size=32, prefetch=2)
    val = data.DataLoader(data.ArrayDataset(xte, yte), batch_size=50)
    hb = b.fit(loader, epochs=2, verbose=0, validation_data=val)
    assert same_params(a, b)
    assert ha.history["loss"] == hb.history["loss"]
    assert hb.history["val_loss"] == pytest.approx(ha.history["val_loss"], rel=1e-6)
    # a shuffling loader is told each epoch (set_epoch), so its orders follow engine.epoch
    c = digits_engine(device)
    shuf = data.DataLoader(data.ArrayDataset(xtr, ytr), batch_size=32, shuffle=True, seed=4)
    c.fit(shuf, epochs=2, verbose=0)
    assert shuf.epoch == 2


def test_metrics_are_computed_on_validation_or_training_data(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    h = engine.fit(xtr, ytr, epochs=2, verbose=0, validation_data=(xte, yte), metrics=["f1", "top3", "roc_auc"])
    out = engine.predict(xte)
    assert h.history["val_f1"][-1] == pytest.approx(mpscy.metrics.f1(yte, out.argmax(1), average="macro"))
    assert h.history["val_top3"][-1] == pytest.approx(mpscy.metrics.top_k_accuracy(yte, out, 3))
    assert 0.5 < h.history["val_roc_auc"][-1] <= 1.0
    h2 = digits_engine(device).fit(xtr, ytr, epochs=1, verbose=0, metrics=["accuracy"])
    assert "accuracy" in h2.history and "val_accuracy" not in h2.history


def test_validation_split_takes_the_last_rows(device, digits):
    """As Keras: the first floor(n (1 - split)) rows train, the rest validate (10 rows at 0.25:
    7 and 3)."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    h = engine.fit(xtr, ytr, epochs=1, validation_split=0.2, verbose=0)
    cut = int(math.floor(len(xtr) * (1 - 0.2)))
    assert h.history["val_loss"][0] == engine.evaluate(xtr[cut:], ytr[cut:])["loss"]
    assert engine.iterations == -(-cut // 32)


def test_regression_history_has_no_accuracy(device):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float64)      # float64 is converted once
    y = x @ np.array([[1.0], [-2.0], [0.5]])
    model = mpscy.Sequential([layers.Dense(1)], input_shape=(3,))
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(0.1), batch_size=16, device=device)
    h = engine.fit(x, y, epochs=5, verbose=0, metrics=["r2"])
    assert "accuracy" not in h.history and h.history["loss"][-1] < h.history["loss"][0]
    assert h.history["r2"][-1] > 0.5


# ----------------------------------------------------------------------------- output
def test_verbose_2_prints_one_line_per_epoch(device, digits, capsys):
    xtr, ytr, xte, yte = digits
    digits_engine(device).fit(xtr, ytr, epochs=3, verbose=2, validation_data=(xte, yte))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("Epoch 1/3 - 43 steps - ")
    for key in ("step/s", "loss: ", "accuracy: ", "val_loss: ", "val_accuracy: ", "lr: 0.001"):
        assert key in lines[2]


def test_verbose_0_is_silent(device, digits, capsys):
    xtr, ytr, _, _ = digits
    digits_engine(device).fit(xtr, ytr, epochs=2, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_verbose_1_uses_tqdm_even_without_a_terminal(device, digits, capsys):
    pytest.importorskip("tqdm")
    xtr, ytr, _, _ = digits
    digits_engine(device).fit(xtr, ytr, epochs=2, verbose="auto")
    out = capsys.readouterr().out
    for key in ("Epoch 1/2", "Epoch 2/2", "43/43", "step/s", "loss=", "accuracy="):
        assert key in out, key


def test_verbose_1_plain_lines_without_tqdm(device, digits, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    xtr, ytr, _, _ = digits
    digits_engine(device).fit(xtr, ytr, epochs=2, verbose=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("Epoch 2/2 - 43 steps") and "loss: " in lines[1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    engine = digits_engine(device)
    progress = mpscy.training._Progress(1, 1, interval=0.0)   # redraw on every step
    progress.begin(0, 10)
    progress.step(4, 0.5, 0.75)
    progress.end(10, {"loss": 0.25})
    text = tty.getvalue()
    assert text.startswith("\rEpoch 1/1 4/10 ") and "step/s" in text and "ETA" in text and "loss 0.5000" in text
    assert text.endswith("loss: 0.2500\n")
    engine.close()


# ----------------------------------------------------------------------------- arguments, summary
def test_bad_arguments_are_rejected_before_training(device, digits):
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    loader = data.DataLoader(data.ArrayDataset(xtr, ytr), batch_size=8)
    cases = [
        (dict(x=xtr, y=ytr, batch_size=64), "batch_size"),
        (dict(x=xtr, y=ytr, verbose=3), "verbose"),
        (dict(x=loader, y=ytr), "inside the DataLoader"),
        (dict(x=xtr, y=None), "y is required"),
        (dict(x=xtr, y=None, validation_split=0.2), "y is required"),
        (dict(x=xtr, y=ytr, validation_split=1.5), "validation_split"),
        (dict(x=xtr, y=ytr, validation_data=(xtr,)), "validation_data"),
        (dict(x=xtr, y=ytr, metrics=["nope"]), "unknown metric"),
        (dict(x=xtr, y=ytr[:-1]), "rows"),
        (dict(x=xtr, y=ytr, callbacks=[object()]), "Callback"),
        (dict(x=data.DataLoader(data.ArrayDataset(xtr, ytr), batch_size=64)), "exceeds"),
        # found before the first step, not at a late batch or at the first epoch's validation
        (dict(x=xtr, y=np.concatenate([ytr, ytr]), validation_split=0.25), f"{2 * len(ytr)} rows for"),
        (dict(x=xtr, y=np.where(np.arange(len(ytr)) == len(ytr) - 1, 10, ytr).astype(np.int32)),
         f"label 10 at row {len(ytr) - 1} of y is outside"),
        (dict(x=xtr, y=ytr, validation_data=(xtr[:20], ytr[:19])), "validation y has 19 rows for 20"),
        (dict(x=xtr, y=ytr, validation_data=(xtr[:20], -ytr[:20] - 1)), "label -.* of validation y"),
        (dict(x=xtr, y=ytr, validation_data=(xtr[:20], ytr[:20].astype(np.float32))), "int32 or int64",
         mpscy.DTypeError),
        (dict(x=xtr, y=ytr, validation_data=(xtr[:20, :10], ytr[:20])), "validation x has shape"),
        (dict(x=xtr, y=ytr, validation_data=(xtr[:20].astype(np.uint8), ytr[:20])), "validation x must be float32",
         mpscy.DTypeError),
        (dict(x=xtr, y=ytr, validation_data=(np.where(np.arange(20)[:, None] == 7, np.nan, xtr[:20]), ytr[:20])),
         "validation x contains NaN or Inf at row 7", mpscy.NonFiniteError),
        # by its row in x (shuffled batches would name a row of some batch), before the first step
        (dict(x=np.where(np.arange(len(xtr))[:, None] == len(xtr) - 2, np.inf, xtr).astype(np.float32), y=ytr),
         f"^x contains NaN or Inf at row {len(xtr) - 2}$", mpscy.NonFiniteError),
    ]
    for kwargs, match, *cls in cases:
        with pytest.raises(cls[0] if cls else mpscy.InvalidArgumentError, match=match):
            engine.fit(**{"epochs": 1, "verbose": 0, **kwargs})
    assert engine.iterations == 0


def test_summary_table(device, capsys):
    engine = digits_engine(device)
    text = engine.summary()
    assert "dense_0" in text and "(None, 32)" in text and "Total parameters: 2,410" in text
    assert engine.summary(print_fn=print) is None
    assert capsys.readouterr().out.strip() == str(text).strip()


# ----------------------------------------------------------------------------- with issue 3 and 4 pieces
def test_fit_drives_real_schedules(device, digits):
    S = pytest.importorskip("mpscy.optim.schedules")
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device, opt=optim.SGD(0.1, momentum=0.9))
    engine.set_schedule(S.StepLR(engine, step_size=2, gamma=0.5), per="epoch")
    h = engine.fit(xtr, ytr, epochs=5, verbose=0)
    assert h.history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    steps = -(-len(xtr) // 32)
    engine = digits_engine(device, opt=optim.Adam(1e-3))
    one = S.OneCycleLR(engine, max_lr=1e-2, total_steps=3 * steps)
    engine.set_schedule(one, per="step")
    h = engine.fit(xtr, ytr, epochs=3, verbose=0)
    probe = digits_engine(device, opt=optim.Adam(1e-3))
    closed = S.OneCycleLR(probe, max_lr=1e-2, total_steps=3 * steps)
    assert h.history["lr"] == pytest.approx([closed.lr_at(k * steps - 1) for k in (1, 2, 3)], rel=1e-12)
    assert engine.betas[0] == pytest.approx(closed.momentum_at(3 * steps))
    engine = digits_engine(device, opt=optim.SGD(0.1))
    engine.set_schedule(S.ReduceLROnPlateau(engine, factor=0.5, patience=0), per="epoch")
    h = engine.fit(xtr, ytr, epochs=4, verbose=0, validation_data=(xte, yte), callbacks=[cb.EarlyStopping(patience=9)])
    assert engine.schedule.best == min(h.history["val_loss"])     # it was given val_loss


def test_batchnorm_models_skip_a_lone_last_row(device, digits):
    if not hasattr(layers, "BatchNorm"):
        pytest.skip("needs layers.BatchNorm (issue 3)")
    xtr, ytr, _, _ = digits
    model = mpscy.Sequential([layers.Dense(16), layers.BatchNorm(), layers.ReLU(), layers.Dense(10)], input_shape=(64,))
    engine = mpscy.Engine(model, batch_size=32, device=device)
    n = 32 * 5 + 1
    h = engine.fit(xtr[:n], ytr[:n], epochs=2, verbose=0)
    assert engine.iterations == 10 and len(h.epoch) == 2
    with pytest.raises(mpscy.InvalidArgumentError, match="2 rows"):
        engine.step(xtr[:1], ytr[:1])


def test_loader_leaves_a_lone_row_out_under_batchnorm(device):
    """BatchNorm cannot train on one row (PyTorch refuses it too): fit leaves a DataLoader's
    batch of one row out, as it leaves the arrays' lone last row out. 17 rows in batches of 8:
    2 steps an epoch either way, and the step count fit reports is 2."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((17, 4)).astype(np.float32)
    y = rng.integers(0, 3, 17).astype(np.int32)
    for source in ("loader", "arrays"):
        model = mpscy.Sequential([layers.Dense(6), layers.BatchNorm(), layers.ReLU(), layers.Dense(3)],
                                 input_shape=(4,))
        engine = mpscy.Engine(model, optimizer=optim.SGD(0.1), batch_size=8, device=device, seed=0)
        seen = []

        class Steps(cb.Callback):
            def on_train_begin(self, logs=None):
                seen.append(self.params["steps"])

        if source == "loader":
            h = engine.fit(data.DataLoader(data.ArrayDataset(x, y), batch_size=8), epochs=3, verbose=0,
                           callbacks=[Steps()])
        else:
            h = engine.fit(x, y, epochs=3, verbose=0, callbacks=[Steps()])
        assert engine.iterations == 6 and seen == [2], (source, engine.iterations, seen)
        assert len(h.history["loss"]) == 3 and all(np.isfinite(h.history["loss"]))


def test_no_epoch_to_run_returns_an_empty_history(device, digits):
    """As Keras: epochs=0, or initial_epoch >= epochs, trains nothing and returns an empty
    History (the progress display had no bar to close: an AttributeError hid everything)."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    for kw in (dict(epochs=0), dict(epochs=2, initial_epoch=2)):
        h = engine.fit(xtr, ytr, verbose=1, **kw)
        assert h.history == {} and h.epoch == []
    assert engine.iterations == 0
    assert same_params(engine, digits_engine(device))
    # a run already complete (a resume script's epochs=engine.epoch) keeps the engine's record:
    # no step was applied (README: engine.history becomes the new History once one has been)
    h0 = engine.fit(xtr[:96], ytr[:96], epochs=2, verbose=0)
    h = engine.fit(xtr[:96], ytr[:96], epochs=2, initial_epoch=engine.epoch, verbose=0)
    assert h.epoch == [] and h is not h0
    assert engine.history is h0 and h0.epoch == [0, 1]


def test_a_failure_before_the_first_epoch_comes_through_unchanged(device, digits):
    xtr, ytr, _, _ = digits
    bad = cb.LearningRateScheduler(lambda epoch, lr: float("nan"))
    with pytest.raises(mpscy.InvalidArgumentError, match="returned nan for epoch 0"):
        digits_engine(device).fit(xtr, ytr, epochs=2, verbose=1, callbacks=[bad])

    class Boom(cb.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise KeyError("from the user's callback")

    with pytest.raises(KeyError, match="from the user's callback"):
        digits_engine(device).fit(xtr, ytr, epochs=1, verbose=1, callbacks=[Boom()])


def test_a_loader_without_a_length_trains(device, digits):
    """Any re-iterable of batches: with no __len__, the steps are unknown (the progress shows
    "?"), as with a torch DataLoader over an IterableDataset."""
    xtr, ytr, _, _ = digits

    class Batches:
        def __iter__(self):
            return iter([(xtr[i:i + 32], ytr[i:i + 32]) for i in range(0, 96, 32)])

    a, b = digits_engine(device), digits_engine(device)
    h = a.fit(Batches(), epochs=2, verbose=0)
    assert a.iterations == 6 and len(h.history["loss"]) == 2
    b.fit(data.DataLoader(data.ArrayDataset(xtr[:96], ytr[:96]), batch_size=32), epochs=2, verbose=0)
    assert same_params(a, b)


def test_a_single_callback_need_not_be_in_a_list(device, digits):
    xtr, ytr, _, _ = digits
    seen = []

    class Count(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(epoch)

    digits_engine(device).fit(xtr, ytr, epochs=2, verbose=0, callbacks=Count())
    assert seen == [0, 1]


def test_accuracy_among_metrics_is_the_engines_own(device, digits):
    """metrics=["accuracy"] (as a Keras user writes it) keeps the engine's running training
    accuracy and evaluate's val_accuracy, not a second figure computed another way under the
    same key."""
    xtr, ytr, xte, yte = digits
    a, b = digits_engine(device), digits_engine(device)
    ha = a.fit(xtr, ytr, epochs=2, verbose=0)
    hb = b.fit(xtr, ytr, epochs=2, verbose=0, metrics=["accuracy", "f1"])
    assert hb.history["accuracy"] == ha.history["accuracy"]  # the steps' running accuracy
    assert "f1" in hb.history
    hv = digits_engine(device).fit(xtr, ytr, epochs=1, verbose=0, validation_data=(xte, yte), metrics=["accuracy"])
    assert set(hv.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}


def test_multi_label_heads_refuse_single_label_metrics(device, rng):
    """BCE over several outputs is multi-label: its accuracy is the per-output threshold
    accuracy; f1 or roc_auc over an argmax of multi-hot targets would mean nothing."""
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (rng.random((40, 3)) > 0.5).astype(np.float32)
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(6,)), loss="bce_with_logits",
                          optimizer=optim.SGD(0.1), batch_size=8, device=device, seed=0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"metrics \['f1', 'roc_auc'\] need one class label per row"):
        engine.fit(x, y, epochs=1, verbose=0, metrics=["f1", "roc_auc"])
    assert engine.iterations == 0
    h = engine.fit(x, y, epochs=1, verbose=0, validation_data=(x, y), metrics=["accuracy", "mse"])
    assert h.history["val_accuracy"][0] == engine.evaluate(x, y)["accuracy"]
    assert "val_mse" in h.history


def test_metrics_the_model_cannot_have_are_refused_before_the_first_step(device, digits, rng):
    """A metric that cannot apply to the model fails before any step, not as NaN with a warning
    at every epoch's end: a regression metric against class labels, a top-k accuracy of a
    single-output head, a callable that does not take (y_true, outputs)."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"metrics \['mse', 'r2'\] compare the outputs with "
                                                         r"targets of their shape; this model's SparseCrossEntropy "
                                                         r"takes class labels"):
        engine.fit(xtr, ytr, epochs=1, verbose=0, metrics=["accuracy", "mse", "r2"])
    with pytest.raises(mpscy.InvalidArgumentError, match="must take \\(y_true, outputs\\)"):
        engine.fit(xtr, ytr, epochs=1, verbose=0, metrics=[lambda a: 1.0])
    assert engine.iterations == 0
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (rng.random(40) > 0.5).astype(np.float32)
    binary = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(6,)), loss="bce_with_logits",
                          optimizer=optim.SGD(0.1), batch_size=8, device=device, seed=0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"metrics \['top1', 'top3'\] rank the classes' scores; "
                                                         r"this model has one output"):
        binary.fit(x, y, epochs=1, verbose=0, metrics=["top1", "top3", "f1"])
    assert binary.iterations == 0
    h = binary.fit(x, y, epochs=1, verbose=0, metrics=["f1", "roc_auc", "mse"])   # these apply
    assert {"f1", "roc_auc", "mse"} <= set(h.history)


def test_fit_converts_loader_batches_and_labels_as_it_converts_arrays(device, digits):
    """fit converts float64 inputs and integer labels of any width (uint8, as Keras's datasets
    give them) once, for arrays and for a DataLoader's batches alike; engine.step itself takes
    float32 and int32/int64 only, with no hidden copy."""
    xtr, ytr, xte, yte = digits
    x64, y8 = xtr[:96].astype(np.float64), ytr[:96].astype(np.uint8)
    ref = digits_engine(device)
    ref.fit(xtr[:96], ytr[:96], epochs=1, shuffle=False, verbose=0)
    a = digits_engine(device)
    a.fit(x64, y8, epochs=1, shuffle=False, verbose=0)
    b = digits_engine(device)
    loader = data.DataLoader(data.ArrayDataset(x64, y8), batch_size=32)
    h = b.fit(loader, epochs=1, verbose=0, validation_data=loader, metrics=["f1"])
    assert same_params(ref, a) and same_params(ref, b)
    assert h.history["val_loss"][0] == b.evaluate(xtr[:96], ytr[:96])["loss"]
    with pytest.raises(mpscy.DTypeError):
        b.step(x64[:32], ytr[:32])
    with pytest.raises(mpscy.DTypeError):
        b.step(xtr[:32], y8[:32])
    c = digits_engine(device)   # uint64 labels (np.unique's, say) as well, where they fit int64
    c.fit(xtr[:96], ytr[:96].astype(np.uint64), epochs=1, shuffle=False, verbose=0)
    assert same_params(ref, c)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"shuffle must be True or False, got 'batch'"):
        c.fit(xtr[:96], ytr[:96], epochs=1, shuffle="batch", verbose=0)


def test_a_loaders_bad_batch_is_named(device, digits):
    """A DataLoader's data is not checked up front (that would be a whole extra pass), so the
    error names the batch, whose rows it counts within."""
    xtr, ytr, _, _ = digits
    bad = ytr[:96].copy()
    bad[40] = 12
    loader = data.DataLoader(data.ArrayDataset(xtr[:96], bad), batch_size=32)
    good = data.DataLoader(data.ArrayDataset(xtr[:96], ytr[:96]), batch_size=32)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^epoch 1, batch 1: label 12 at row 8 is outside"):
        digits_engine(device).fit(loader, epochs=1, verbose=0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^validation batch 1: label 12 at row 8 of y is outside"):
        digits_engine(device).fit(good, epochs=1, verbose=0, validation_data=loader)


def test_empty_arrays_are_a_shape_error(device, digits):
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    with pytest.raises(mpscy.ShapeError, match=r"^validation x is empty \(0 rows\)"):
        engine.fit(xtr, ytr, verbose=0, validation_data=(xtr[:0], ytr[:0]))
    with pytest.raises(mpscy.ShapeError, match=r"^x is empty \(0 rows\)"):
        engine.fit(xtr[:0], ytr[:0], verbose=0)
    assert engine.iterations == 0


def test_a_torch_dataloader_trains_as_its_arrays(device, digits):
    """A torch DataLoader's batches are CPU tensors: fit takes them as arrays (NumPy reads them
    without a copy), so the step sees what the same arrays would give it."""
    torch = pytest.importorskip("torch")
    xtr, ytr, _, _ = digits
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(xtr[:96]),
                                                                        torch.from_numpy(ytr[:96].astype(np.int64))),
                                         batch_size=32)
    a, b = digits_engine(device), digits_engine(device)
    a.fit(loader, epochs=2, verbose=0, validation_data=loader)
    b.fit(xtr[:96], ytr[:96], epochs=2, shuffle=False, verbose=0)
    assert same_params(a, b)


def test_an_empty_validation_source_is_refused(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    empty = data.DataLoader(data.ArrayDataset(xte[:10], yte[:10]), batch_size=16, drop_last=True)
    with pytest.raises(mpscy.InvalidArgumentError, match="the validation DataLoader has no batch"):
        engine.fit(xtr, ytr, epochs=1, verbose=0, validation_data=empty)
    assert engine.iterations == 0

    class Once:  # used up after one pass, as a generator
        def __init__(self):
            self.it = iter([(xte[:32], yte[:32])])

        def __iter__(self):
            return self.it

    with pytest.raises(mpscy.InvalidArgumentError, match="the validation data yielded no batch"):
        engine.fit(xtr[:64], ytr[:64], epochs=2, verbose=0, validation_data=Once())
    assert engine.epoch == 2  # both epochs' steps were applied, and counted


def test_a_metric_the_data_leave_undefined_is_nan_not_the_end_of_the_run(device, digits):
    """ROC AUC over validation labels that lack a class is undefined: logged as NaN with a
    warning (as scikit-learn's UndefinedMetricWarning), and training goes on."""
    xtr, ytr, xte, yte = digits
    keep = yte != 9
    engine = digits_engine(device)
    with pytest.warns(RuntimeWarning, match="val_roc_auc is undefined on this data"):
        h = engine.fit(xtr, ytr, epochs=2, verbose=0, validation_data=(xte[keep], yte[keep]),
                       metrics=["roc_auc", "f1"])
    assert len(h.history["val_roc_auc"]) == 2 and all(math.isnan(v) for v in h.history["val_roc_auc"])
    assert all(0 < v <= 1 for v in h.history["val_f1"]) and engine.epoch == 2


def test_fit_checks_plot_to_before_training(device, tmp_path):
    pytest.importorskip("matplotlib")
    x, y = mpscy.datasets.load_digits()
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(10)], input_shape=(64,)), batch_size=64, device=device)
    a_file = tmp_path / "report.png"
    a_file.write_bytes(b"")
    with pytest.raises(mpscy.InvalidArgumentError, match="plot_to .* exists and is not a folder"):
        engine.fit(x[:256], y[:256], epochs=1, verbose=0, plot_to=a_file)
    assert engine.iterations == 0
    with pytest.warns(RuntimeWarning, match="fit ran no epoch: plot_to has nothing to plot"):
        h = engine.fit(x[:256], y[:256], epochs=0, verbose=0, plot_to=tmp_path / "none")
    assert h.history == {} and not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- one statement of each rule
def _small_engine(device, loss="sparse_cross_entropy", outputs=3, sigmoid=False):
    stack = [layers.Dense(outputs)] + ([layers.Sigmoid()] if sigmoid else [])
    return mpscy.Engine(mpscy.Sequential(stack, input_shape=(4,)), loss=loss, optimizer=optim.SGD(0.1),
                        batch_size=8, device=device, seed=0)


def _nan_at(a, row):
    a = a.copy()
    a[row].reshape(-1)[-1] = np.nan
    return a


_X = np.ones((8, 4), np.float32)
_LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
_DENSE = np.full((8, 3), 0.5, np.float32)
_BCE_BAD = _DENSE.copy()
_BCE_BAD[2, 1] = 1.5
# (engine kwargs, x, y): each breaks one rule a step checks in its batch
_RULE_CASES = {
    "label too large": ({}, _X, np.where(np.arange(8) == 5, 3, _LABELS).astype(np.int32)),
    "negative label": ({}, _X, np.where(np.arange(8) == 7, -1, _LABELS).astype(np.int64)),
    "int64 label beyond int32": ({}, _X, np.where(np.arange(8) == 4, np.int64(2 ** 33), _LABELS.astype(np.int64))),
    "float labels": ({}, _X, _LABELS.astype(np.float32)),
    "labels 2-d": ({}, _X, np.stack([_LABELS, _LABELS], 1)),
    "int x": ({}, _X.astype(np.int32), _LABELS),
    "x shape": ({}, np.ones((8, 5), np.float32), _LABELS),
    "NaN x": ({}, _nan_at(_X, 6), _LABELS),
    "Inf x": ({}, np.where(np.arange(8)[:, None] == 3, -np.inf, _X).astype(np.float32), _LABELS),
    "NaN target": ({"loss": "mse"}, _X, _nan_at(_DENSE, 4)),
    "bool targets": ({"loss": "mse"}, _X, _DENSE > 0),
    "target shape": ({"loss": "mse"}, _X, np.zeros((8, 4), np.float32)),
    "target rank": ({"loss": "mse"}, _X, np.zeros(8, np.float32)),
    "BCE target 1.5": ({"loss": "binary_cross_entropy", "sigmoid": True}, _X, _BCE_BAD),
    "BCE target NaN": ({"loss": "binary_cross_entropy", "sigmoid": True}, _X, _nan_at(_DENSE, 3)),
    "BCE target -0.25 of (n,)": ({"loss": "binary_cross_entropy", "sigmoid": True, "outputs": 1}, _X,
                                 np.where(np.arange(8) == 6, -0.25, 0.5).astype(np.float32)),
}


@pytest.mark.parametrize("case", list(_RULE_CASES))
def test_fit_refuses_what_a_step_refuses_in_the_same_words(device, case):
    """fit checks its arrays before it trains by the code each step checks its batch with (the
    engine's native staging, run without copying): the same error type and text, the array named
    as the user passed it (y, validation y, x, validation x) and a label's row as "of <array>"."""
    kwargs, x, y = _RULE_CASES[case]
    engine = _small_engine(device, **kwargs)
    with pytest.raises(mpscy.Error) as at_step:
        engine.step(x, y)
    with pytest.raises(mpscy.Error) as at_fit:
        engine.fit(x, y, epochs=1, verbose=0)
    good_x = np.ones((4, 4), np.float32)
    good_y = _LABELS[:4] if engine.loss.target == "index" else np.full((4, kwargs.get("outputs", 3)), 0.5, np.float32)
    with pytest.raises(mpscy.Error) as at_validation:
        engine.fit(good_x, good_y, epochs=1, verbose=0, validation_data=(x, y))
    assert engine.iterations == 0
    step, fit, val = at_step.value, at_fit.value, at_validation.value
    assert type(fit) is type(step) and type(val) is type(step), (step, fit, val)
    assert str(fit).replace(" of y ", " ") == str(step), (str(fit), str(step))
    assert str(val).replace("validation ", "") == str(fit), (str(val), str(fit))
    assert str(val).startswith("validation ") or " of validation y " in str(val)


def test_fit_checks_a_large_dataset_without_a_temporary(device):
    """fit's check of 2,000,000 rows before training allocates nothing the size of the data (the
    NumPy check it replaced made masks of the whole labels: several MB): labels out of range,
    a NaN target and a BinaryCrossEntropy target outside [0, 1], each in the last row."""
    import tracemalloc
    n = 2_000_000
    x = np.zeros((n, 4), np.float32)
    cases = [
        ({}, np.zeros(n, np.int64), 3, mpscy.InvalidArgumentError,
         f"^label 3 at row {n - 1} of y is outside \\[0, 3\\): the model's output has 3 classes, one fewer"),
        ({}, np.zeros(n, np.int32), -2, mpscy.InvalidArgumentError, f"^label -2 at row {n - 1} of y is outside"),
        ({"loss": "mse", "outputs": 1}, np.zeros(n, np.float32), np.inf, mpscy.NonFiniteError,
         f"^y contains NaN or Inf at row {n - 1}$"),
        ({"loss": "binary_cross_entropy", "sigmoid": True, "outputs": 1}, np.zeros((n, 1), np.float32), 1.5,
         mpscy.InvalidArgumentError, f"^y holds 1.5 at row {n - 1}; BinaryCrossEntropy"),
    ]
    bad_x = x.copy()
    bad_x[-1, 3] = np.nan
    for kwargs, y, value, error, match in cases:
        engine = _small_engine(device, **kwargs)
        y[-1] = value
        tracemalloc.start()
        try:
            with pytest.raises(error, match=match):
                engine.fit(x, y, epochs=1, verbose=0)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            y[-1] = 0
            with pytest.raises(mpscy.NonFiniteError, match=f"^x contains NaN or Inf at row {n - 1}$"):
                engine.fit(bad_x, y, epochs=1, verbose=0)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert peak < 256 << 10, (match, peak)
        assert engine.iterations == 0


def test_a_loader_batch_that_is_not_an_x_y_pair_is_named(device):
    """A two-input model fed ArrayDataset(xa, xb, y) (three items a batch, the natural slip for
    ArrayDataset([xa, xb], y)): fit fails before any step, naming the batch, what it was and
    the fix; the same loader as validation data names the validation batch; the parameters are
    those of the good epoch before it."""
    a, b = mpscy.Input((4,)), mpscy.Input((3,))
    model = mpscy.Model([a, b], layers.Dense(2)(layers.Concatenate()([a, b])))
    engine = mpscy.Engine(model, batch_size=8, device=device, seed=0)
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(20, 4)).astype(np.float32), rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 2, 20)
    bad = data.DataLoader(data.ArrayDataset(xa, xb, y), batch_size=8)
    good = data.DataLoader(data.ArrayDataset([xa, xb], y), batch_size=8)
    before = engine.get_parameters()
    with pytest.raises(mpscy.InvalidArgumentError,
                       match=r"^epoch 1, batch 0: the DataLoader gave 3 items, not an \(x, y\) pair; .*"
                             r"ArrayDataset\(\[x1, x2\], y\), not ArrayDataset\(x1, x2, y\)$"):
        engine.fit(bad, epochs=1, verbose=0)
    assert engine.iterations == 0
    assert all(np.array_equal(engine.get_parameters()[k], v) for k, v in before.items())
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^validation batch 0: the DataLoader gave 3 items"):
        engine.fit(good, epochs=1, verbose=0, validation_data=bad)
    assert engine.iterations == 3


class _Ragged(data.Dataset):
    """sample 5 has 3 features where the others have 4: its batch cannot be stacked"""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return np.zeros(4 if i != 5 else 3, np.float32), np.int64(0)


def test_a_loader_batch_that_cannot_be_built_is_named_in_validation_and_evaluate(device):
    """The loader's own error building a batch (samples that do not stack) named the training
    batch but not a validation or evaluate batch: its try covered the step, not the loop."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(4,)), batch_size=4, device=device)
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    ragged = data.DataLoader(_Ragged(), batch_size=4)
    with pytest.raises(mpscy.ShapeError, match=r"^epoch 1, batch 1: item 0 of the samples of _Ragged cannot be stacked"):
        engine.fit(ragged, epochs=1, verbose=0)
    with pytest.raises(mpscy.ShapeError, match=r"^validation batch 1: item 0 of the samples of _Ragged cannot be"):
        engine.fit(x, y, validation_data=ragged, epochs=1, verbose=0)
    with pytest.raises(mpscy.ShapeError, match=r"^batch 1: item 0 of the samples of _Ragged cannot be stacked"):
        engine.evaluate(ragged)


def test_a_dataset_given_where_batches_go_is_told_to_take_a_loader(device):
    """fit(dataset), evaluate(dataset) and validation_data=dataset took a Dataset of samples for a
    Keras Sequence of batches and failed on its first sample's shape: now told to wrap it in a
    DataLoader. A Dataset whose items are whole batches still trains as a Sequence does.
    predict(loader) said only that it wanted an array."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(4,)), batch_size=4, device=device)
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    ds = data.ArrayDataset(x, y)
    for call, what, where in ((lambda: engine.fit(ds, epochs=1, verbose=0), "x", "epoch 1, batch 0"),
                              (lambda: engine.evaluate(ds), "x", "batch 0"),
                              (lambda: engine.fit(x, y, validation_data=ds, epochs=1, verbose=0), "validation_data",
                               "validation batch 0")):
        with pytest.raises(mpscy.InvalidArgumentError,
                           match=rf"^{where}: {what} is a Dataset \(ArrayDataset\) of samples one at a time \(its "
                                 rf"first item's x has shape \(4,\), one sample's\); .*mpscy.data.DataLoader\({what}, "):
            call()
    with pytest.raises(mpscy.DTypeError, match=r"got DataLoader \(predict takes arrays, not a loader's batches"):
        engine.predict(data.DataLoader(ds, batch_size=4))
    assert engine.iterations == 2   # the validation case's epoch, before its validation

    class Batches(data.Dataset):  # item i is batch i (a pre-batched source)
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]
    engine.fit(Batches(), epochs=1, verbose=0, validation_data=Batches())
    assert engine.iterations == 4 and set(engine.evaluate(Batches())) == {"loss", "accuracy"}


# ----------------------------------------------------------------------------- options and sources refused up front
def _unchanged(engine, before, history):
    assert engine.iterations == 0 and engine.epoch == 0 and engine.history is history
    assert all(np.array_equal(engine.get_parameters()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=None), "epochs must be a non-negative integer, got None"),
    (dict(epochs=float("nan")), "epochs must be a non-negative integer, got nan"),
    (dict(epochs=float("inf")), "epochs must be a non-negative integer, got inf"),
    (dict(epochs="abc"), "epochs must be a non-negative integer, got 'abc'"),
    (dict(initial_epoch=None), "initial_epoch must be a non-negative integer, got None"),
    (dict(validation_split=None), "validation_split must be a number, got None"),
    (dict(validation_split="abc"), "validation_split must be a number, got 'abc'"),
    (dict(validation_split=10**400), "validation_split must be a number, got 1000"),
    (dict(metrics=5), "metrics must be a metric name, a callable or a list of them, got 5"),
    (dict(metrics=["top²"]), "unknown metric 'top²'"),
    (dict(callbacks=5), "callbacks must be an mpscy.callbacks.Callback or a list of them, got int"),
    (dict(plot_to=5), r"plot_to must be a path \(a non-empty str or os.PathLike\), got 5"),
    (dict(verbose=np.array([0, 1])), r"verbose must be 0, 1, 2 or 'auto', got array\(\[0, 1\]\)"),
])
def test_fit_options_are_refused_by_name_before_the_first_step(device, digits, kwargs, match):
    """Each option had been converted with a bare int()/float()/iteration: a raw TypeError,
    ValueError or OverflowError (NumPy's ambiguous truth value for an array verbose)."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    engine.fit(xtr[:64], ytr[:64], epochs=1, verbose=0)
    before, history = engine.get_parameters(), engine.history
    iterations = engine.iterations
    with pytest.raises(mpscy.InvalidArgumentError, match=match):
        engine.fit(xtr[:64], ytr[:64], **{"epochs": 1, "verbose": 0, **kwargs})
    assert engine.iterations == iterations and engine.epoch == 1 and engine.history is history
    assert all(np.array_equal(engine.get_parameters()[k], v) for k, v in before.items())


def test_a_str_or_a_used_up_iterator_is_no_data_source(device, digits):
    """A str was taken for a DataLoader (it has __iter__): as validation_data it trained a
    whole epoch before its first 'batch' failed; as x it was told to put y inside it. A str,
    bytes, a number, and a one-pass iterator for a fit of several epochs are refused up front,
    saying what they are."""
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    before, history = engine.get_parameters(), engine.history
    cases = [(dict(validation_data="abc"), r"validation_data must be \(x_val, y_val\), a list of \(x, y\) "
                                                     r"batches or a DataLoader, got str 'abc'"),
             (dict(validation_data=b"ab"), r"validation_data must be .* or a DataLoader, got bytes b'ab'"),
             (dict(validation_data=5), r"validation_data must be \(x_val, y_val\), .* or a DataLoader, got int"),
             (dict(validation_data=("abc", yte)), "validation x must be a numpy array, got str 'abc'"),
             (dict(x="abc"), r"x must be a numpy array, a DataLoader or another re-iterable of \(x, y\) batches, "
                             r"got str 'abc'"),
             (dict(x=None, y=None), "x must be a numpy array, a DataLoader or another re-iterable .*, got None"),
             (dict(validation_data=iter([(xte, yte)]), epochs=2),
              "validation_data is an iterator .*list_iterator.*, used up after one pass, and fit runs 2 epochs"),
             (dict(x=((xtr[i:i + 32], ytr[i:i + 32]) for i in (0, 32)), y=None, epochs=3, initial_epoch=1),
              r"x is an iterator \(generator\), used up after one pass, and fit runs 2 epochs")]
    for kwargs, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            engine.fit(**{"x": xtr, "y": ytr, "epochs": 1, "verbose": 0, **kwargs})
        _unchanged(engine, before, history)
    # a generator is still fine for a single epoch
    engine.fit(((xtr[i:i + 32], ytr[i:i + 32]) for i in (0, 32)), epochs=1, verbose=0,
               validation_data=iter([(xte[:32], yte[:32])]))
    assert engine.iterations == 2


def _first_step_fails(kind, xtr, ytr):
    """fit arguments whose first step (or what comes before it) fails, nothing trained."""
    if kind == "bad first batch":
        bad = data.DataLoader(data.ArrayDataset(xtr[:4], np.full(4, 99, np.int64)), batch_size=4)
        return dict(x=bad), mpscy.InvalidArgumentError, "epoch 3, batch 0: label 99 at row 0 is outside"
    if kind == "non-finite first step":  # finite inputs whose activations overflow: the step refuses the update
        return (dict(x=np.full((32, 64), 3e38, np.float32), y=ytr[:32]), mpscy.NonFiniteError,
                "epoch 3, batch 0: .*not finite")

    class Boom(cb.Callback):
        def on_train_begin(self, logs=None):
            raise KeyError("boom")
    return dict(x=xtr, y=ytr, callbacks=[Boom()]), KeyError, "boom"


@pytest.mark.parametrize("kind", ["bad first batch", "non-finite first step", "callback error"])
def test_a_fit_that_trains_nothing_keeps_the_previous_history(device, digits, kind):
    """A fit failing before its first completed step had replaced engine.history with an empty
    History (and reset stop_training): the previous run's record was lost for nothing."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    h0 = engine.fit(xtr[:96], ytr[:96], epochs=2, verbose=0)
    engine.stop_training = True  # as a callback of the last run left it
    before = engine.get_parameters()
    kwargs, error, match = _first_step_fails(kind, xtr, ytr)
    with pytest.raises(error, match=match):
        engine.fit(**{"epochs": 3, "initial_epoch": 2, "verbose": 0, **kwargs})
    assert engine.history is h0 and h0.epoch == [0, 1] and len(h0.history["loss"]) == 2
    assert engine.stop_training is True and engine.epoch == 2
    assert all(np.array_equal(engine.get_parameters()[k], v) for k, v in before.items())


def test_a_fit_that_fails_after_a_step_leaves_its_partial_history(device, digits):
    """Keras's semantics once a step is applied: engine.history is the failed fit's History,
    holding the epochs it completed."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    h0 = engine.fit(xtr[:64], ytr[:64], epochs=1, verbose=0)
    y = np.concatenate([ytr[:64], np.full(32, 99, np.int64)])
    bad = data.DataLoader(data.ArrayDataset(xtr[:96], y), batch_size=32)
    with pytest.raises(mpscy.InvalidArgumentError, match="epoch 2, batch 2: label 99"):
        engine.fit(bad, epochs=3, initial_epoch=1, verbose=0)
    assert engine.history is not h0 and engine.history.epoch == [] and engine.iterations == 4




def test_a_list_of_batches_or_a_sequence_is_a_data_source(digits):
    """A list (or tuple) of (x, y) batches, and a Keras Sequence-like object (a length and
    indexing, no iteration of its own), train as the same batches from a DataLoader would, for
    several epochs, and evaluate likewise; a list of arrays with y stays a model's inputs."""
    xtr, ytr, xte, yte = digits
    pairs = [(xtr[i:i + 32], ytr[i:i + 32]) for i in range(0, 320, 32)]

    class Sequence:
        def __len__(self):
            return len(pairs)

        def __getitem__(self, i):
            return pairs[i]

    engines = [digits_engine("cpu", seed=1) for _ in range(4)]
    for e, source in zip(engines, (pairs, tuple(pairs), Sequence(), iter_again(pairs))):
        h = e.fit(source, epochs=2, verbose=0, shuffle=False)
        assert len(h.epoch) == 2
    for e in engines[1:]:
        assert same_params(engines[0], e)
    assert engines[0].evaluate(pairs) == engines[0].evaluate(Sequence()) == engines[0].evaluate(iter_again(pairs))


class iter_again:
    """A re-iterable of the given batches (as a DataLoader is), for comparison."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_history_and_the_epoch_line_see_keys_the_callbacks_add(digits, capsys):
    """History runs after the caller's callbacks, as Keras appends it: a key a callback adds to
    an epoch's logs is in History and in the verbose=2 line; a schedule passed as a callback is
    refused, pointing to set_schedule."""
    xtr, ytr, xte, yte = digits

    class ValError(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_error"] = 1.0 - logs["val_accuracy"]

    e = digits_engine("cpu")
    h = e.fit(xtr, ytr, validation_data=(xte, yte), epochs=2, verbose=2, callbacks=[ValError()])
    assert h.history["val_error"] == [1.0 - a for a in h.history["val_accuracy"]]
    assert all("val_error: " in line for line in capsys.readouterr().out.strip().splitlines())
    plateau = optim.schedules.ReduceLROnPlateau(e, patience=1)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"ReduceLROnPlateau is a learning-rate schedule here; "
                                                         r"attach it with engine.set_schedule\(schedule, "
                                                         r"per=\"epoch\"\)"):
        e.fit(xtr, ytr, epochs=1, verbose=0, callbacks=[plateau])


def test_keras_s_other_fit_arguments_say_what_replaces_them(digits):
    """Keras's fit arguments that mpscy's fit has not are a TypeError naming the argument and
    what takes its place; any other unknown keyword is Python's usual TypeError; nothing trains."""
    xtr, ytr, _, _ = digits
    e = digits_engine("cpu")
    before = e.get_parameters()
    with pytest.raises(TypeError, match=r"fit\(\) got Keras's argument 'class_weight': class weights belong to the "
                                        r"loss here, as in torch: SparseCrossEntropy\(weight="):
        e.fit(xtr, ytr, class_weight={0: 1.0, 1: 2.0}, verbose=0)
    with pytest.raises(TypeError, match=r"'steps_per_epoch': an epoch is one pass over x"):
        e.fit(xtr, ytr, steps_per_epoch=3, verbose=0)
    with pytest.raises(TypeError, match=r"^fit\(\) got an unexpected keyword argument 'epoch'$"):
        e.fit(xtr, ytr, epoch=3, verbose=0)
    assert all(np.array_equal(v, e.get_parameters()[k]) for k, v in before.items())


def _regressor(device="cpu", outputs=1, batch=32):
    model = mpscy.Sequential([layers.Dense(8), layers.Tanh(), layers.Dense(outputs)], input_shape=(5,))
    return mpscy.Engine(model, loss="mse", optimizer=optim.SGD(0.05), batch_size=batch, device=device, seed=0)


def test_a_metric_function_sees_targets_shaped_as_the_outputs(device):
    """A step takes (n,) targets for a model of one output as (n, 1); a metric function was
    handed them as (n,) against (n, 1) outputs, which NumPy broadcast into an (n, n) table (the
    reported val_my_mse 0.8668 against val_mse 0.8513 on the same data). It now gets them
    shaped as the outputs; (n, outputs) targets, and class labels, are handed over as they are."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 5)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    shapes = []

    def my_mse(t, p):
        shapes.append((t.shape, p.shape))
        return float(np.mean((t - p) ** 2))

    e = _regressor(device)
    h = e.fit(x, y, validation_data=(x, y), metrics=[my_mse, "mse"], verbose=0)
    assert shapes == [((64, 1), (64, 1))]
    assert h.history["val_my_mse"][0] == pytest.approx(h.history["val_mse"][0], rel=1e-6)
    assert h.history["val_my_mse"][0] == pytest.approx(e.evaluate(x, y)["loss"], rel=1e-6)
    shapes.clear()
    y3 = rng.standard_normal((64, 3)).astype(np.float32)
    _regressor(device, outputs=3).fit(x, y3, metrics=[my_mse], verbose=0)
    assert shapes == [((64, 3), (64, 3))]


def test_a_close_during_a_step_is_the_closed_engine_s_state_error(device, digits):
    """Closing the engine from another thread while fit ran raised AttributeError: 'NoneType'
    object has no attribute 'counted' (fit read the closed engine's graph after the step). A
    close during a step (an engine.step that closes it once done stands in for the thread) now
    gives the StateError, named by batch, that a close from a callback gives at the next step."""
    xtr, ytr, _, _ = digits
    e = digits_engine(device)
    own = e.step

    def step_then_close(x, y):
        r = own(x, y)
        e.close()
        return r

    e.step = step_then_close
    with pytest.raises(mpscy.StateError, match=r"^epoch 1, batch 0: this engine is closed$"):
        e.fit(xtr, ytr, epochs=1, verbose=0)

    class CloseAfterBatch(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.engine.close()

    e = digits_engine(device)
    with pytest.raises(mpscy.StateError, match=r"^epoch 1, batch 3: this engine is closed$"):
        e.fit(xtr, ytr, epochs=1, verbose=0, callbacks=[CloseAfterBatch()])


def test_a_close_from_another_thread_is_a_state_error(device, digits):
    """The same with a real thread, closing the engine at its 5th step: whichever point of fit
    the close falls on, the error is the closed engine's StateError."""
    import threading
    xtr, ytr, _, _ = digits
    e = digits_engine(device, batch=8)
    started = threading.Event()

    class Signal(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                started.set()

    closer = threading.Thread(target=lambda: (started.wait(10), e.close()))
    closer.start()
    with pytest.raises(mpscy.StateError, match=r"this engine is closed"):
        e.fit(xtr, ytr, epochs=50, verbose=0, callbacks=[Signal()])
    closer.join()


def test_validation_data_takes_what_evaluate_takes(device, digits):
    """validation_data given as a list of (x, y) batches, which fit's x and evaluate take, was
    misread: two batches as (x_val, y_val) ("validation x must be a numpy array, got tuple of 2
    items"), three refused. A list or tuple is now (x_val, y_val) where its first item is the
    model's inputs (an array, or a list of one array per input), and else a list of batches;
    a Sequence-like object is taken too. Each gives the values the arrays give."""
    xtr, ytr, xte, yte = digits
    xte, yte = xte[:96], yte[:96]
    cuts = {2: (0, 48, 96), 3: (0, 32, 64, 96)}
    runs = {}
    for name in ("arrays", "list2", "tuple3", "sequence"):
        k = 3 if name == "tuple3" else 2
        pairs = [(xte[a:b], yte[a:b]) for a, b in zip(cuts[k], cuts[k][1:])]

        class Sequence:
            def __len__(self):
                return len(pairs)

            def __getitem__(self, i):
                return pairs[i]

        val = {"arrays": (xte, yte), "list2": pairs, "tuple3": tuple(pairs), "sequence": Sequence()}[name]
        e = digits_engine(device)
        runs[name] = e.fit(xtr[:256], ytr[:256], epochs=2, validation_data=val, metrics=["f1"], verbose=0).history
    for name in ("list2", "tuple3", "sequence"):
        assert runs[name]["loss"] == runs["arrays"]["loss"]
        assert runs[name]["val_loss"] == pytest.approx(runs["arrays"]["val_loss"], rel=1e-6)
        assert runs[name]["val_accuracy"] == runs["arrays"]["val_accuracy"]
        assert runs[name]["val_f1"] == runs["arrays"]["val_f1"]
    # a model of two inputs: ([xa, xb], y) is the arrays, a list of ([xa, xb], y) batches is batches
    a, b = mpscy.Input((3,)), mpscy.Input((2,))
    model = mpscy.Model([a, b], layers.Dense(1)(layers.Concatenate()([a, b])))
    rng = np.random.default_rng(1)
    xa, xb = rng.standard_normal((40, 3)).astype(np.float32), rng.standard_normal((40, 2)).astype(np.float32)
    y = rng.standard_normal((40, 1)).astype(np.float32)
    vals = {"arrays": ([xa, xb], y), "batches": [([xa[:20], xb[:20]], y[:20]), ([xa[20:], xb[20:]], y[20:])]}
    got = {}
    for name, val in vals.items():
        e = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(0.01), batch_size=16, device=device, seed=0)
        got[name] = e.fit([xa, xb], y, epochs=1, validation_data=val, verbose=0).history["val_loss"]
    assert got["batches"] == pytest.approx(got["arrays"], rel=1e-6)
    e = digits_engine(device)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"validation_data must be \(x_val, y_val\), a list of "
                                                         r"\(x, y\) batches or a DataLoader, got list of 3 items"):
        e.fit(xtr, ytr, validation_data=[xte, yte, yte], verbose=0)
