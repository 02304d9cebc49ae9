"""The callbacks fit drives: Keras's hook order, EarlyStopping (restoring the best epoch),
ModelCheckpoint (best only, its folder, file names checked when built and against the log's
keys), LearningRateScheduler and schedules set per step or epoch, CSVLogger, stopping from a
batch, and every option, path and file name refused before the first step."""
import csv
import os
import re
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import callbacks as cb, layers, optim

from fit_util import digits, digits_engine, same_params  # noqa: F401 (digits: a fixture)


class Recorder(cb.Callback):
    def __init__(self):
        super().__init__()
        self.events, self.weights = [], []

    def on_train_begin(self, logs=None):
        self.events.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.events.append("batch")
        assert logs["loss"] > 0 and logs["batch_size"] >= 1

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(f"epoch_end {epoch}")
        self.weights.append(self.engine.get_parameters())

    def on_train_end(self, logs=None):
        self.events.append("train_end")


def test_callback_hooks_in_keras_order(device, digits):
    xtr, ytr, _, _ = digits
    rec = Recorder()
    digits_engine(device).fit(xtr[:96], ytr[:96], epochs=2, initial_epoch=0, verbose=0, callbacks=[rec])
    assert rec.events == ["train_begin", "epoch_begin 0", "batch", "batch", "batch", "epoch_end 0",
                          "epoch_begin 1", "batch", "batch", "batch", "epoch_end 1", "train_end"]
    assert rec.params == {"epochs": 2, "steps": 3, "verbose": 0}


def test_early_stopping_with_restore(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device, lr=0.0)        # nothing changes: val_loss never improves after epoch 0
    stop = cb.EarlyStopping(monitor="val_loss", patience=2)
    h = engine.fit(xtr, ytr, epochs=20, verbose=0, validation_data=(xte, yte), callbacks=[stop])
    assert len(h.epoch) == 3 and stop.stopped_epoch == 2

    engine = digits_engine(device, lr=3e-3)       # loss falls every epoch, so its maximum is epoch 0
    rec = Recorder()
    stop = cb.EarlyStopping(monitor="loss", mode="max", patience=1, restore_best_weights=True)
    h = engine.fit(xtr, ytr, epochs=10, verbose=0, callbacks=[rec, stop])
    assert h.epoch == [0, 1] and stop.best_epoch == 0
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, rec.weights[0][k])
    # training that runs all its epochs also ends on the best epoch's weights (Keras 3)
    engine = digits_engine(device, lr=3e-3)
    rec = Recorder()
    stop = cb.EarlyStopping(monitor="loss", mode="max", patience=10, restore_best_weights=True)
    h = engine.fit(xtr, ytr, epochs=3, verbose=0, callbacks=[rec, stop])
    assert h.epoch == [0, 1, 2] and stop.stopped_epoch == 0 and stop.best_epoch == 0
    assert not np.array_equal(rec.weights[2]["dense_0.weight"], rec.weights[0]["dense_0.weight"])
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, rec.weights[0][k])
    assert cb.EarlyStopping(monitor="val_accuracy")._m.mode == "max"
    assert cb.EarlyStopping(monitor="val_loss")._m.mode == "min"


def test_min_delta_counts_small_gains_as_none(device, digits):
    xtr, ytr, _, _ = digits
    stop = cb.EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
    h = digits_engine(device).fit(xtr, ytr, epochs=10, verbose=0, callbacks=[stop])
    assert len(h.epoch) == 2


def test_model_checkpoint_save_best_only(device, digits, tmp_path):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device, lr=0.0)
    ckpt = cb.ModelCheckpoint(str(tmp_path / "best-{epoch:02d}-{val_loss:.3f}.mpscy"), save_best_only=True)
    engine.fit(xtr, ytr, epochs=3, verbose=0, validation_data=(xte, yte), callbacks=[ckpt])
    assert len(ckpt.saved) == 1 and ckpt.saved[0].startswith(str(tmp_path / "best-01-"))
    engine = digits_engine(device)
    ckpt = cb.ModelCheckpoint(str(tmp_path / "e{epoch}.mpscy"), monitor="val_accuracy", save_best_only=True)
    engine.fit(xtr, ytr, epochs=3, verbose=0, validation_data=(xte, yte), callbacks=[ckpt])
    assert len(ckpt.saved) == 3    # accuracy rises each epoch here
    loaded = mpscy.load(ckpt.saved[-1], device=device)
    assert same_params(loaded, engine)
    with pytest.warns(RuntimeWarning, match="not in the logs"):
        digits_engine(device).fit(xtr[:64], ytr[:64], verbose=0,
                            callbacks=[cb.ModelCheckpoint(str(tmp_path / "x.mpscy"), save_best_only=True)])


class StepDecay:
    """A schedule with the mpscy/PyTorch protocol: x gamma on every step() call."""

    def __init__(self, engine, gamma=0.5):
        self.engine, self.gamma, self.calls = engine, gamma, 0

    def step(self):
        self.calls += 1
        self.engine.learning_rate = self.engine.learning_rate * self.gamma

    def state_dict(self):
        return {"gamma": self.gamma, "calls": self.calls}

    def load_state_dict(self, s):
        self.gamma, self.calls = s["gamma"], s["calls"]


class Plateau(StepDecay):
    def step(self, metric):
        self.calls += 1
        self.seen = metric


def test_learning_rate_scheduler_function_and_object(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    sched = cb.LearningRateScheduler(lambda epoch, lr: 1e-3 / (epoch + 1))
    h = engine.fit(xtr, ytr, epochs=3, verbose=0, callbacks=[sched])
    assert h.history["lr"] == pytest.approx([1e-3, 5e-4, 1e-3 / 3])
    plain = digits_engine(device)
    plain.fit(xtr, ytr, epochs=3, verbose=0)
    assert not same_params(engine, plain)        # the schedule changed the actual updates
    engine = digits_engine(device)
    obj = StepDecay(engine, 0.1)
    h = engine.fit(xtr, ytr, epochs=3, verbose=0, callbacks=[cb.LearningRateScheduler(obj)])
    assert obj.calls == 3 and h.history["lr"] == pytest.approx([1e-3, 1e-4, 1e-5])
    engine = digits_engine(device)
    pl = Plateau(engine)
    engine.fit(xtr, ytr, epochs=2, verbose=0, validation_data=(xte, yte), callbacks=[cb.LearningRateScheduler(pl)])
    assert pl.calls == 2 and pl.seen == engine.history.history["val_loss"][-1]


def test_set_schedule_per_step_and_per_epoch(device, digits):
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device, lr=1.0)
    s = StepDecay(engine, 0.9)
    engine.set_schedule(s, per="step")
    h = engine.fit(xtr[:320], ytr[:320], epochs=2, verbose=0)
    assert s.calls == 20 and engine.learning_rate == pytest.approx(0.9 ** 20)
    assert h.history["lr"] == pytest.approx([0.9 ** 9, 0.9 ** 19])   # the rate of each epoch's last step
    engine = digits_engine(device, lr=1.0)
    p = Plateau(engine)
    engine.set_schedule(p, per="epoch")
    engine.fit(xtr[:320], ytr[:320], epochs=2, verbose=0, validation_data=(xte, yte))
    assert p.calls == 2 and p.seen == engine.history.history["val_loss"][-1]
    with pytest.raises(mpscy.InvalidArgumentError, match="per"):
        engine.set_schedule(p, per="batch")
    with pytest.raises(mpscy.InvalidArgumentError, match="another engine"):
        engine.set_schedule(StepDecay(digits_engine(device)))
    engine.set_schedule(None)
    assert engine.schedule is None


def test_csv_logger(device, digits, tmp_path):
    xtr, ytr, xte, yte = digits
    path = tmp_path / "log.csv"
    h = digits_engine(device).fit(xtr, ytr, epochs=3, verbose=0, validation_data=(xte, yte),
                            callbacks=[cb.CSVLogger(path)])
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["epoch", "accuracy", "loss", "lr", "val_accuracy", "val_loss"]
    assert len(rows) == 4 and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [float(r[2]) for r in rows[1:]] == h.history["loss"]        # exact (repr floats)
    digits_engine(device).fit(xtr, ytr, epochs=1, verbose=0, validation_data=(xte, yte),
                        callbacks=[cb.CSVLogger(path, append=True)])
    assert len(list(csv.reader(open(path)))) == 5
    # appended under the old header, a new log column is not written: said once, at the user's fit line
    with pytest.warns(UserWarning, match=r"appends under its header \['epoch', 'accuracy', 'loss', 'lr', "
                                         r"'val_accuracy', 'val_loss'\], which has no column for \['val_f1'\]") as w:
        digits_engine(device).fit(xtr, ytr, epochs=2, verbose=0, validation_data=(xte, yte), metrics=["f1"],
                                  callbacks=[cb.CSVLogger(path, append=True)])
    assert len(w) == 1 and w[0].filename == __file__
    assert len(list(csv.reader(open(path)))) == 7


def test_csv_logger_closes_its_file_when_fit_is_interrupted(device, digits, tmp_path):
    """A fit interrupted in its second epoch (KeyboardInterrupt from a callback) runs no
    on_train_end, yet the CSVLogger's file is closed at once, with the first epoch's row."""
    xtr, ytr, _, _ = digits

    class Stop(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.engine.epoch == 1:
                raise KeyboardInterrupt

    logger = cb.CSVLogger(tmp_path / "log.csv")
    with pytest.raises(KeyboardInterrupt):
        digits_engine(device).fit(xtr, ytr, epochs=3, verbose=0, callbacks=[logger, Stop()])
    assert logger._file is None
    rows = list(csv.reader(open(tmp_path / "log.csv")))
    assert len(rows) == 2 and rows[1][0] == "0"

    class Mine(cb.CSVLogger):   # the release is not one more on_train_end call (with logs None)
        ends = []

        def on_train_end(self, logs=None):
            self.ends.append(logs)
            super().on_train_end(logs)

    h = digits_engine(device).fit(xtr, ytr, epochs=2, verbose=0, callbacks=[Mine(tmp_path / "b.csv")])
    assert Mine.ends == [{k: v[-1] for k, v in h.history.items()}]


def test_stop_training_from_a_batch_callback(device, digits):
    class StopAt(cb.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                self.engine.stop_training = True

    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    h = engine.fit(xtr, ytr, epochs=5, verbose=0, callbacks=[StopAt()])
    assert engine.iterations == 5 and len(h.epoch) == 1


def test_model_checkpoint_makes_its_folder(device, digits, tmp_path):
    xtr, ytr, _, _ = digits
    target = tmp_path / "runs" / "a" / "m-{epoch:02d}.mpscy"
    digits_engine(device).fit(xtr[:64], ytr[:64], epochs=1, verbose=0, callbacks=[cb.ModelCheckpoint(target)])
    assert (tmp_path / "runs" / "a" / "m-01.mpscy").is_file()


def test_learning_rate_scheduler_takes_keras_one_argument_functions(device, digits):
    xtr, ytr, _, _ = digits
    rates = []

    class Seen(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            rates.append(logs["lr"])

    digits_engine(device).fit(xtr[:64], ytr[:64], epochs=3, verbose=0,
                        callbacks=[cb.LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1)), Seen()])
    assert rates == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_a_plateau_schedule_with_a_missing_monitor_warns_and_skips(device, digits):
    """A typo in the monitored key no longer steps the schedule on the training loss in silence;
    "val_loss" without validation data still means the training loss."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device, lr=0.1)
    plateau = optim.schedules.ReduceLROnPlateau(engine, patience=0, factor=0.5)
    engine.set_schedule(plateau, per="epoch", monitor="val_typo")
    with pytest.warns(RuntimeWarning, match="'val_typo' is not in the logs") as caught:
        engine.fit(xtr[:64], ytr[:64], epochs=2, verbose=0)
    assert {w.filename for w in caught} == {__file__}   # attributed to the user's fit line, not to mpscy
    assert plateau.last_epoch == 0 and engine.learning_rate == pytest.approx(0.1)
    other = digits_engine(device, lr=0.1)
    fallback = optim.schedules.ReduceLROnPlateau(other, patience=0, factor=0.5)
    other.set_schedule(fallback, per="epoch")  # monitor "val_loss", no validation data: the loss
    other.fit(xtr[:64], ytr[:64], epochs=2, verbose=0)
    assert fallback.last_epoch == 2
    lrs = digits_engine(device, lr=0.1)
    sched = optim.schedules.ReduceLROnPlateau(lrs, patience=0, factor=0.5)
    with pytest.warns(RuntimeWarning, match="LearningRateScheduler: 'val_typo' is not in the logs"):
        lrs.fit(xtr[:64], ytr[:64], epochs=1, verbose=0, callbacks=[cb.LearningRateScheduler(sched, monitor="val_typo")])
    assert sched.last_epoch == 0


def test_a_plateau_schedule_warns_when_its_mode_goes_against_the_monitored_key(device):
    """ReduceLROnPlateau keeps torch's mode="min"; set to watch "val_accuracy" (or any key that
    EarlyStopping's mode="auto" reads as one to maximize) it would cut the rate while the key
    improves. set_schedule and LearningRateScheduler warn then, naming mode='max', and not for
    a loss in mode "min" or an accuracy in mode "max"."""
    engine = digits_engine(device, lr=0.1)
    wrong = optim.schedules.ReduceLROnPlateau(engine, patience=0)
    with pytest.warns(UserWarning, match=r"mode='min' but monitors 'val_accuracy'.*build the schedule with "
                                         r"mode='max'") as caught:
        engine.set_schedule(wrong, per="epoch", monitor="val_accuracy")
    assert len(caught) == 1 and {w.filename for w in caught} == {__file__}
    with pytest.warns(UserWarning, match=r"LearningRateScheduler: ReduceLROnPlateau is in mode='max' but monitors "
                                         r"'val_loss'.*mode='min'"):
        cb.LearningRateScheduler(optim.schedules.ReduceLROnPlateau(engine, mode="max"), monitor="val_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.set_schedule(optim.schedules.ReduceLROnPlateau(engine, mode="max"), monitor="val_accuracy")
        engine.set_schedule(optim.schedules.ReduceLROnPlateau(engine), monitor="val_loss")
        engine.set_schedule(optim.schedules.StepLR(engine, 1), monitor="val_accuracy")   # takes no metric
        cb.LearningRateScheduler(optim.schedules.ReduceLROnPlateau(engine, mode="max"), monitor="val_auc")


class _Score(cb.Callback):
    """Logs a given "score" per epoch and keeps a copy of the parameters at each epoch's end."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.params_at = scores, []

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.scores[epoch]
        self.params_at.append(self.engine.get_parameters())


def test_early_stopping_restores_the_best_epoch_not_the_first(device):
    """Scores 3, 1, 2, 4 (lower is better) over four epochs, patience 5: the weights written
    back at the end are epoch 1's (the best), not epoch 0's (the first watched)."""
    x, y = mpscy.datasets.load_digits()
    model = mpscy.Sequential([layers.Dense(16), layers.ReLU(), layers.Dense(10)], input_shape=(64,))
    engine = mpscy.Engine(model, optimizer=optim.SGD(0.05), batch_size=32, device=device, seed=0)
    score = _Score([3.0, 1.0, 2.0, 4.0])
    es = cb.EarlyStopping(monitor="score", mode="min", patience=5, restore_best_weights=True)
    h = engine.fit(x[:256], y[:256], epochs=4, callbacks=[score, es], verbose=0)
    assert h.epoch == [0, 1, 2, 3] and es.best == 1.0 and es.best_epoch == 1
    now = engine.get_parameters()
    assert all(np.array_equal(now[k], v) for k, v in score.params_at[1].items())
    assert not all(np.array_equal(now[k], v) for k, v in score.params_at[0].items())


@pytest.mark.parametrize("returned", ["abc", None, [0.1]])
def test_a_schedule_function_returning_no_number_is_named(device, digits, returned):
    xtr, ytr, _, _ = digits
    engine = digits_engine(device, lr=0.01)

    def halve(epoch, lr):
        return returned

    with pytest.raises(mpscy.InvalidArgumentError,
                       match=rf"^LearningRateScheduler: the schedule function halve returned "
                             rf"{re.escape(repr(returned))} for epoch 0; a learning rate is a finite number >= 0$"):
        engine.fit(xtr, ytr, epochs=2, verbose=0, callbacks=[cb.LearningRateScheduler(halve)])
    assert engine.learning_rate == pytest.approx(0.01) and engine.iterations == 0 and engine.history is None


def test_callback_options_are_checked_when_built():
    """Each raised a raw AttributeError/ValueError/TypeError, or (ModelCheckpoint(None)) only
    failed at the first epoch's end, after its steps."""
    cases = [(lambda: cb.EarlyStopping(monitor=5), r"monitor must be the name of a log entry .*got 5"),
             (lambda: cb.EarlyStopping(patience="x"), "patience must be a non-negative integer, got 'x'"),
             (lambda: cb.EarlyStopping(patience=-1), "patience must be a non-negative integer, got -1"),
             (lambda: cb.EarlyStopping(min_delta="x"), "min_delta must be a number, got 'x'"),
             (lambda: cb.EarlyStopping(min_delta=10**400), "min_delta must be a number"),
             (lambda: cb.EarlyStopping(baseline="x"), "baseline must be a number, got 'x'"),
             (lambda: cb.EarlyStopping(start_from_epoch=1.5), "start_from_epoch must be a non-negative integer"),
             (lambda: cb.EarlyStopping(mode=np.array(["min", "max"])),
              "mode must be 'auto', 'min' or 'max', got array"),
             (lambda: cb.ModelCheckpoint(None), r"ModelCheckpoint filepath must be a path .*got None"),
             (lambda: cb.ModelCheckpoint("", monitor=None), "ModelCheckpoint filepath must be a path .*got ''"),
             (lambda: cb.ModelCheckpoint("m.mpscy", monitor=None), "monitor must be the name of a log entry"),
             (lambda: cb.CSVLogger(None), r"CSVLogger filename must be a path .*got None"),
             (lambda: cb.CSVLogger("log.csv", separator=";;"), "CSVLogger separator must be a 1-character str"),
             (lambda: cb.LearningRateScheduler(lambda e: 0.1, verbose="x"), "verbose must be an integer, got 'x'")]
    for make, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            make()
    assert cb.EarlyStopping(patience=np.int64(2), verbose=True).patience == 2


def test_model_checkpoint_filepath_is_checked_when_built():
    """Each raised a raw ValueError or TypeError at the first epoch's end, after its steps."""
    cases = [("ck-{epoch:02d}-{val_loss:.3f", r"is not a format string: unmatched '\{' in format spec"),
             ("ck-}.mpscy", "is not a format string: Single '}' encountered"),
             ("ck-{}.mpscy", r"has the field \{\}: fields name the epoch or a log entry"),
             ("ck-{0}.mpscy", r"has the field \{0\}: fields name the epoch or a log entry"),
             ("ck-{epoch:.3q}.mpscy", r"cannot format the epoch \(an int\) and log entries \(floats\): "
                                      "ValueError: Unknown format code 'q'"),
             ("ck-{loss:d}.mpscy", r"cannot .*: ValueError: Unknown format code 'd' for object of type 'float'"),
             ("ck-{epoch[0]}.mpscy", r"cannot .*: TypeError: 'int' object is not subscriptable")]
    for filepath, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=rf"^ModelCheckpoint filepath '{re.escape(filepath)}' {match}"):
            cb.ModelCheckpoint(filepath)
    assert cb.ModelCheckpoint("ck-{epoch:03d}-{val_loss:.2e}-{epoch}.mpscy")._fields == ["epoch", "val_loss"]


def test_model_checkpoint_tells_what_keras_s_weights_only_and_batch_frequency_are_here():
    """save_weights_only=True and save_freq=<batches> (Keras's) were bare unexpected-keyword
    TypeErrors; their defaults are taken."""
    with pytest.raises(mpscy.InvalidArgumentError, match=r"save_weights_only=True: .*engine.get_parameters\(\)"):
        cb.ModelCheckpoint("ck.mpscy", save_weights_only=True)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"save_freq=10: .*on_train_batch_end calls self.engine.save"):
        cb.ModelCheckpoint("ck.mpscy", save_freq=10)
    assert cb.ModelCheckpoint("ck.mpscy", save_weights_only=False, save_freq="epoch").filepath == "ck.mpscy"


def test_fit_refuses_a_checkpoint_or_log_it_could_not_write(device, digits, tmp_path):
    """What used to fail when the first epoch ended (after its steps) is refused when fit
    starts: nothing trained, the previous History kept."""
    xtr, ytr, xte, yte = digits
    engine = digits_engine(device)
    before = engine.get_parameters()
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(cb.ModelCheckpoint(tmp_path / "ck-{epoch}-{val_los:.3f}.mpscy"),
              r"names \['val_los'\], which this fit does not log \(its logs hold \['accuracy', 'loss', 'lr', "
              r"'val_accuracy', 'val_loss'\] and the epoch\)"),
             (cb.ModelCheckpoint(tmp_path), "is a folder; give a file name in it, such as '.*model-"),
             (cb.ModelCheckpoint(afile / "sub" / "m-{epoch}.mpscy"), rf"{re.escape(repr(str(afile)))} is not a folder"),
             (cb.CSVLogger(tmp_path), "CSVLogger filename '.*' is a folder"),
             (cb.CSVLogger(tmp_path / "missing" / "log.csv"), "the folder '.*missing' does not exist"),
             (cb.CSVLogger(afile / "log.csv"), "is not a folder")]
    for callback, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            engine.fit(xtr, ytr, epochs=2, verbose=0, validation_data=(xte, yte), callbacks=[callback])
        assert engine.iterations == 0 and engine.history is None
    assert same_params(engine, digits_engine(device)) and all(np.array_equal(before[k], v) for k, v in
                                                         engine.get_parameters().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_model_checkpoint_may_name_a_key_a_users_callback_adds(device, digits, tmp_path):
    """fit cannot know what a callback of the user's adds to the logs, so the field is not
    refused then; fit's own keys are checked when only mpscy's callbacks run."""
    class Tag(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["tag"] = 7.0

    xtr, ytr, _, _ = digits
    ckpt = cb.ModelCheckpoint(tmp_path / "m-{epoch}-{tag:.0f}.mpscy")
    digits_engine(device).fit(xtr[:64], ytr[:64], epochs=2, verbose=0, callbacks=[Tag(), ckpt])
    assert [p.split("/")[-1] for p in ckpt.saved] == ["m-1-7.mpscy", "m-2-7.mpscy"]
    with pytest.raises(mpscy.InvalidArgumentError, match=r"names \['tag'\], which this fit does not log"):
        digits_engine(device).fit(xtr[:64], ytr[:64], epochs=1, verbose=0, callbacks=[cb.ModelCheckpoint(
            tmp_path / "m-{epoch}-{tag:.0f}.mpscy")])


@pytest.mark.parametrize("setup", ["classifier", "validation and metrics", "regression"])
def test_fit_knows_its_log_keys(device, digits, setup):
    """The keys fit gives ModelCheckpoint's check are the keys of the logs it then builds."""
    xtr, ytr, xte, yte = digits
    seen = {}

    class Look(cb.Callback):
        __module__ = cb.__name__  # as one of mpscy's: fit then knows every key

        def on_epoch_end(self, epoch, logs=None):
            seen["logs"], seen["known"] = sorted(logs), self._log_keys
    if setup == "regression":
        engine = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(64,)), loss="mse", batch_size=32,
                              device=device)
        engine.fit(xtr[:64], ytr[:64, None].astype(np.float32), verbose=0, metrics=["r2"], callbacks=[Look()])
        assert seen["logs"] == ["loss", "lr", "r2"]
    elif setup == "classifier":
        digits_engine(device).fit(xtr[:64], ytr[:64], verbose=0, callbacks=[Look()])
        assert seen["logs"] == ["accuracy", "loss", "lr"]
    else:
        digits_engine(device).fit(xtr[:64], ytr[:64], verbose=0, validation_data=(xte, yte),
                            metrics=["f1", "accuracy"], callbacks=[Look()])
        assert seen["logs"] == ["accuracy", "loss", "lr", "val_accuracy", "val_f1", "val_loss"]
    assert sorted(seen["known"]) == seen["logs"]


def test_csv_logger_leaves_an_earlier_log_when_fit_fails_before_an_epoch_ends(device, digits, tmp_path):
    xtr, ytr, _, _ = digits
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,1.5\n")
    logger = cb.CSVLogger(path)
    with pytest.raises(mpscy.NonFiniteError):
        digits_engine(device).fit(np.full((32, 64), 3e38, np.float32), ytr[:32], verbose=0, callbacks=[logger])
    assert path.read_text() == "epoch,loss\n0,1.5\n"
    digits_engine(device).fit(xtr[:64], ytr[:64], epochs=2, verbose=0, callbacks=[logger])  # the same logger again
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["epoch", "accuracy", "loss", "lr"] and [r[0] for r in rows[1:]] == ["0", "1"]


def test_fit_refuses_an_unwritable_folder(device, digits, tmp_path, monkeypatch):
    """os.access stands in for the permissions (the suite may run as root, who may write
    anywhere): a checkpoint needs its folder writable (engine.save writes a temporary file
    beside it), a CSV log an existing file writable or else its folder."""
    xtr, ytr, _, _ = digits
    locked = str(tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "log.csv").write_text("epoch,loss\n")
    monkeypatch.setattr(cb.os, "access", lambda p, mode: not str(p).startswith(locked))
    engine = digits_engine(device)
    cases = [(cb.ModelCheckpoint(tmp_path / "locked" / "m.mpscy"), f"the folder '{locked}' is not writable"),
             (cb.ModelCheckpoint(tmp_path / "locked" / "new" / "m.mpscy"), f"the folder '{locked}' is not writable"),
             (cb.CSVLogger(tmp_path / "locked" / "log.csv"), r"log.csv' is not writable"),
             (cb.CSVLogger(tmp_path / "locked" / "other.csv"), f"the folder '{locked}' is not writable")]
    for callback, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            engine.fit(xtr[:64], ytr[:64], verbose=0, callbacks=[callback])
    assert engine.iterations == 0 and not (tmp_path / "locked" / "new").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_fit_refuses_a_folder_nothing_can_be_made_in_even_for_root(device, digits):
    """/proc takes no new files, from root either, though os.access says root may: the check
    makes and removes a temporary file there."""
    xtr, ytr, _, _ = digits
    engine = digits_engine(device)
    for callback in (cb.ModelCheckpoint("/proc/mpscy-m.mpscy"), cb.CSVLogger("/proc/mpscy-log.csv")):
        with pytest.raises(mpscy.InvalidArgumentError, match="the folder '/proc' is not writable"):
            engine.fit(xtr[:64], ytr[:64], verbose=0, callbacks=[callback])
    assert engine.iterations == 0



def test_a_schedule_object_of_another_engine_is_refused_by_learning_rate_scheduler(device, digits):
    """LearningRateScheduler(schedules.StepLR(old_engine, ...)) stepped the other engine during
    new.fit (its rate halved each epoch, the new engine's untouched), where set_schedule refuses
    such a schedule; fit now refuses it alike, before the first step, changing neither engine."""
    xtr, ytr, _, _ = digits
    old, new = digits_engine(device, opt=optim.SGD(0.1)), digits_engine(device, opt=optim.SGD(0.1), seed=1)
    sched = optim.schedules.StepLR(old, step_size=1, gamma=0.5)
    before = new.get_parameters()
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^LearningRateScheduler: this schedule \(StepLR\) was "
                                                         r"built on another engine; build it on the engine fit "
                                                         r"trains$"):
        new.fit(xtr, ytr, epochs=2, verbose=0, callbacks=[cb.LearningRateScheduler(sched)])
    assert old.learning_rate == 0.1 and sched.last_epoch == 0 and new.epoch == 0
    assert all(np.array_equal(v, new.get_parameters()[k]) for k, v in before.items())
    with pytest.raises(mpscy.InvalidArgumentError, match="this schedule was built on another engine"):
        new.set_schedule(sched)
    h = old.fit(xtr, ytr, epochs=2, verbose=0, callbacks=[cb.LearningRateScheduler(sched)])   # its own: taken
    assert h.history["lr"] == [0.1, 0.05] and old.learning_rate == 0.025


def test_on_train_end_gets_the_last_epoch_s_logs(device, digits):
    """on_train_end was given {}; as Keras it now gets the last epoch's logs (keys a callback
    added included), also when a callback stopped training; {} when fit ran no epoch."""
    xtr, ytr, xte, yte = digits

    class Ends(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["extra"] = epoch
            if epoch == 1:
                self.engine.stop_training = True

        def on_train_end(self, logs=None):
            self.logs = logs

    end = Ends()
    h = digits_engine(device).fit(xtr, ytr, epochs=5, validation_data=(xte, yte), verbose=0, callbacks=[end])
    assert len(h.epoch) == 2
    assert end.logs == {k: v[-1] for k, v in h.history.items()} and end.logs["extra"] == 1
    assert set(end.logs) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "extra"}
    digits_engine(device).fit(xtr, ytr, epochs=2, initial_epoch=2, verbose=0, callbacks=[end])
    assert end.logs == {}


def test_keras_s_self_model_points_to_self_engine(device, digits):
    """Keras's callbacks write self.model.stop_training = True; an mpscy callback had no `model`
    and failed with a bare AttributeError. It now says where the engine is; a callback may still
    keep a `model` attribute of its own."""
    xtr, ytr, _, _ = digits

    class KerasStyle(cb.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    e = digits_engine(device)
    with pytest.raises(AttributeError, match=r"^'KerasStyle' object has no attribute 'model': an mpscy callback sees "
                                             r"the engine fit trains as self\.engine \(Keras's "
                                             r"self\.model\.stop_training = True is self\.engine\.stop_training = "
                                             r"True; self\.engine\.model is the layers' model\)$"):
        e.fit(xtr, ytr, epochs=2, verbose=0, callbacks=[KerasStyle()])
    assert not hasattr(cb.Callback(), "model")
    with pytest.raises(AttributeError, match=r"^'Callback' object has no attribute 'other'$"):
        cb.Callback().other

    class Own(cb.Callback):
        def __init__(self):
            super().__init__()
            self.model = "mine"

    assert Own().model == "mine"
