"""`Engine.fit`: the epoch loop around the one-call training step, with Keras's conventions —
shuffling, validation, metrics, callbacks, a progress bar (tqdm when installed, plain lines
otherwise), a schedule attached with `Engine.set_schedule`, and a `History` of per-epoch logs.
The loss and accuracy come from each step's StepResult, so reading them adds no device
synchronization. Nothing here runs native code except through the engine's public methods and
its graph's check_input and check_target (a step's own rules, over a whole array). The batch
sources (arrays, loaders, validation data) are _sources.py's."""

import math
import os
import sys
import time
import warnings

import numpy as np

from . import callbacks as _callbacks, errors as _errors, metrics as _metrics
from ._checks import choice, nonneg_int, number, path, warn_user
from ._attached import _check_schedules, _position_record, _resumed, _step_schedule, set_schedule
from ._sources import (_Arrays, _Loader, _as_inputs, _as_target, _batches_of, _check_passes, _describe,
                       _evaluate, _in_batch, _is_loader, _predict, _rows, _validation_source)
from .errors import InvalidArgumentError, ShapeError, StateError

__all__ = ["fit", "set_schedule"]


# ----------------------------------------------------------------------------- progress
def _fmt(k, v):
    if isinstance(v, float):
        return f"{k}: {v:.3g}" if k == "lr" else f"{k}: {v:.4f}"
    return f"{k}: {v}"


class _Progress:
    """verbose=1: a tqdm bar per epoch (steps/s, ETA, running loss and accuracy), refreshed at
    most every `interval` seconds so its cost per step is one clock read; without tqdm, one
    line redrawn in place on a terminal. verbose=2: one line per epoch. verbose=0: silent."""

    def __init__(self, verbose, epochs, interval=0.1):
        self.verbose, self.epochs, self.interval = verbose, epochs, interval
        self.file = sys.stdout
        self.bar = None  # close() may come before the first begin(): no epoch to run, or a failure
        self.tqdm = None
        if verbose == 1:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                self.tqdm = None
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())

    def begin(self, epoch, steps):
        self.epoch, self.steps = epoch, steps
        self.t0 = self.last = time.perf_counter()
        self.shown = 0
        self.bar = None
        if self.verbose == 1 and self.tqdm is not None:
            self.bar = self.tqdm(total=steps, desc=f"Epoch {epoch + 1}/{self.epochs}", unit="step",
                                 file=self.file, mininterval=self.interval, dynamic_ncols=True, leave=True)

    def step(self, done, loss, acc):
        if self.verbose != 1:
            return
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        self._draw(done, loss, acc, now)

    def _draw(self, done, loss, acc, now):
        post = f"loss={loss:.4f}" + ("" if acc is None else f", accuracy={acc:.4f}")
        if self.bar is not None:
            self.bar.set_postfix_str(post, refresh=False)
            self.bar.update(done - self.shown)
            self.shown = done
        elif self.tty:
            self.file.write("\r" + self._plain(done, now, post.replace("=", " ")))
            self.file.flush()

    def _plain(self, done, now, post):
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        total = "?" if self.steps is None else self.steps
        eta = "" if not self.steps or rate == 0 else f" ETA {(self.steps - done) / rate:.1f}s"
        return f"Epoch {self.epoch + 1}/{self.epochs} {done}/{total} {elapsed:.1f}s {rate:.0f} step/s{eta} {post}"

    def end(self, done, logs):
        if self.verbose == 0:
            return
        now = time.perf_counter()
        items = " - ".join(_fmt(k, v) for k, v in logs.items() if v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(items.replace(": ", "="), refresh=False)
            self.bar.update(done - self.shown)
            self.bar.close()
            return
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"Epoch {self.epoch + 1}/{self.epochs} - {done} steps - {elapsed:.2f}s - {rate:.0f} step/s - {items}"
        self.file.write(("\r" if self.verbose == 1 and self.tty else "") + line + "\n")
        self.file.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- fit
def fit(engine, x=None, y=None, epochs=1, batch_size=None, validation_data=None, validation_split=0.0,
        shuffle=True, callbacks=(), verbose="auto", metrics=(), initial_epoch=0, plot_to=None):
    """See `Engine.fit`. Every option, the data (arrays whole; a loader's batches as they come),
    and an attached schedule's room for this fit's steps (_check_schedules) are checked before
    the first step. A fit that continues the epoch a checkpoint was saved inside passes over the
    batches it had done (_resumed). engine.history becomes this fit's History, and
    engine.stop_training is reset, once a step has been applied: a fit that fails before its
    first completed step (a bad option or first batch, a NonFiniteError at the first step, a
    callback raising before it) leaves the previous History and stop_training as they were; one
    that fails later leaves its partial History, as Keras's does."""
    verbose = choice(verbose, (0, 1, 2, "auto"), "verbose")
    if verbose == "auto":
        verbose = 1
    epochs, initial_epoch = nonneg_int(epochs, "epochs"), nonneg_int(initial_epoch, "initial_epoch")
    if not isinstance(shuffle, (bool, np.bool_)):
        raise InvalidArgumentError(f"shuffle must be True or False, got {shuffle!r} (Keras's 'batch', for HDF5 "
                                   f"arrays, has no use here: fit shuffles every row of in-memory arrays)")
    validation_split = number(validation_split, "validation_split")
    if not 0.0 <= validation_split < 1.0:
        raise InvalidArgumentError(f"validation_split must be in [0, 1), got {validation_split!r}")
    metric_objs = _fit_metrics(engine, metrics)
    callbacks = _callback_list(callbacks)
    if plot_to is not None:
        _check_plot_to(plot_to)
    if batch_size is None:
        batch_size = engine.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= engine.batch_size:
        raise InvalidArgumentError(f"batch_size must be an integer in [1, {engine.batch_size}] (the engine's "
                                   f"built batch size), got {batch_size!r}")
    runs = max(epochs - initial_epoch, 0)  # epochs this call trains (at most: a callback may stop it)
    x = _batches_of(x, y, engine)
    if _is_loader(x):
        if y is not None:
            raise InvalidArgumentError("pass y inside the DataLoader, not separately")
        if validation_split:
            raise InvalidArgumentError("validation_split needs arrays; pass validation_data with a DataLoader")
        loader_batch = getattr(x, "batch_size", None)
        if isinstance(loader_batch, int) and loader_batch > engine.batch_size:
            raise InvalidArgumentError(f"the DataLoader's batch_size {loader_batch} exceeds the engine's built "
                                       f"batch size {engine.batch_size}")
        _check_passes(x, "x", runs)
        source = _Loader(engine, x)
    else:
        if validation_split:
            if validation_data is not None:
                raise InvalidArgumentError("give validation_data or validation_split, not both")
            xs, y = _as_inputs(x, len(engine.model.input_shapes)), _as_target(engine, y)
            n = _rows(xs)
            if len(y) != n:  # before the split, which would cut both to the training rows
                raise ShapeError(f"y has {len(y)} rows for {n} rows of x")
            cut = int(math.floor(n * (1.0 - validation_split)))  # Keras's split: the last rows
            if cut in (0, n):
                raise InvalidArgumentError(f"validation_split={validation_split} of {n} rows leaves an empty split")
            one = len(xs) == 1
            validation_data = ((xs[0][cut:] if one else [a[cut:] for a in xs]), y[cut:])
            x, y = (xs[0][:cut] if one else [a[:cut] for a in xs]), y[:cut]
        source = _Arrays(engine, x, y, int(batch_size), bool(shuffle))
    val = _validation_source(engine, validation_data, runs)

    history = _callbacks.History()
    steps = source.__len__()  # None for a loader without a length (len() could not return that)
    known = steps if isinstance(source, _Arrays) else source.exact_len()   # steps an epoch surely has
    record = _position_record(source, batch_size, shuffle)
    skip, resumed = _resumed(engine, initial_epoch, runs, known, record)
    # History after the caller's callbacks, as Keras appends it: keys they add to an epoch's logs
    # reach it (and the epoch's line, printed after them)
    cbs = _callbacks.CallbackList([*callbacks, history], engine,
                                  {"epochs": epochs, "steps": steps, "verbose": verbose},
                                  _log_keys(engine, val, metric_objs, callbacks))
    if runs:
        _check_schedules(engine, callbacks, known, runs, skip)
    schedule, per = engine._schedule, engine._schedule_per
    sched_metric = schedule is not None and _callbacks._takes_metric(schedule)
    previous = engine.history, engine.stop_training
    progress = _Progress(verbose, epochs)
    step = engine.step
    trained = False  # until a step is applied, a failure puts `previous` back
    inside, done = False, 0
    seen = loss_sum = counted = acc_sum = has_acc = void = lr_used = None
    pending = getattr(engine, "_resume_position", None)

    def position():
        # where a save inside an epoch is (checkpoint.save asks): its batches done and its sums so
        # far, so that a fit resumed from it passes over those batches and logs the epoch's means
        if not inside or done == 0:
            return None
        return {**record, "batches": done, "rows": seen, "counted": counted, "loss_sum": loss_sum,
                "acc_sum": acc_sum, "has_acc": has_acc, "void": void, "lr": lr_used}

    last_logs = {}
    try:
        engine.stop_training = False
        engine.history = history  # callbacks see it from on_train_begin on, as in Keras
        # a save from on_train_begin finds the engine as loaded, its pending position too
        # (checkpoint._fit_position); from then on the position is this fit's
        cbs.call("on_train_begin", {})
        if runs:
            engine._resume_position = None   # taken by this fit (or passed over, with a warning)
        engine._fit_position = position
        for epoch in range(initial_epoch, epochs):
            seen, loss_sum, counted, acc_sum, has_acc, done, void = 0, 0.0, 0, 0.0, False, 0, 0
            carried = resumed is not None and epoch == initial_epoch   # the saved epoch, after its batch skip - 1
            if carried:
                seen, loss_sum, counted, acc_sum = resumed["rows"], resumed["loss_sum"], resumed["counted"], \
                    resumed["acc_sum"]
                has_acc, void, lr_used, done = resumed["has_acc"], resumed["void"], resumed["lr"], skip
            inside = True
            cbs.call("on_epoch_begin", epoch, {})
            progress.begin(epoch, steps)
            if not carried:
                lr_used = engine.learning_rate
            where = lambda k: f"epoch {epoch + 1}, batch {k}"  # noqa: E731
            first = done
            for b, (xb, yb) in enumerate(source.epoch(engine.epoch, where, first), first):
                for cb in cbs.batch_begin:
                    cb.on_train_batch_begin(b, {})
                try:
                    if per == "step":
                        lr_used = engine.learning_rate
                    r = step(xb, yb)  # the StepResult already holds the loss: no extra sync
                except _errors.NonFiniteError as e:
                    if _counted(engine, where, b) != 0:
                        raise _in_batch(e, where(b)) from e
                    # every label is ignore_index: torch's step sees a NaN loss and zero gradients;
                    # nothing was changed (a failed step changes nothing), and the batch is skipped (its
                    # batch-begin callbacks have run)
                    void += 1
                    done = b + 1
                    continue
                except _errors.Error as e:
                    raise _in_batch(e, where(b)) from e
                trained = True
                n = r.batch_size
                seen += n
                c = _counted(engine, where, b)   # under ignore_index, the labels that counted, as staging counted them
                c = n if c < 0 else c
                counted += c   # loss and accuracy: means over the labels that count, as val_loss's and evaluate's
                loss_sum += r.loss * c
                if r.accuracy is not None:
                    acc_sum += r.accuracy * c
                    has_acc = True
                if per == "step":
                    _step_schedule(schedule, sched_metric, {"loss": r.loss}, "loss", where, b)
                done = b + 1
                if verbose == 1:
                    progress.step(done, loss_sum / counted, acc_sum / counted if has_acc else None)
                if cbs.batch_end:
                    blogs = {"loss": loss_sum / counted, "accuracy": acc_sum / counted if has_acc else None,
                             "batch_size": n}
                    for cb in cbs.batch_end:
                        cb.on_train_batch_end(b, blogs)
                if engine.stop_training:
                    break
            inside = False
            if void:
                warn_user(f"epoch {epoch + 1}: {void} training batch{'es' if void > 1 else ''} whose every label is "
                          f"the loss's ignore_index {engine.loss.ignore_index} skipped (no update: torch's step "
                          "would see a NaN loss and zero gradients)")
            if seen == 0:
                raise InvalidArgumentError("the training data yielded no batch" if not void else
                                           "every training batch's labels are all the loss's ignore_index")
            engine.epoch += 1  # its steps are applied: counted before anything below can fail
            trained = True     # (a resumed epoch's were applied by the fit that saved it)
            logs = {"loss": loss_sum / counted}
            if has_acc:
                logs["accuracy"] = acc_sum / counted
            if val is not None:
                ev = _evaluate(engine, val)
                logs["val_loss"] = ev["loss"]
                if ev["accuracy"] is not None:
                    logs["val_accuracy"] = ev["accuracy"]
            if metric_objs:
                prefix, target = ("val_", val) if val is not None else ("", _metric_source(source))
                y_true, outputs = _predict(engine, target)
                for m in metric_objs:
                    logs[prefix + m.name] = _metric_value(m, y_true, outputs, engine.loss, prefix + m.name)
            logs["lr"] = float(lr_used)
            if per == "epoch":
                _step_schedule(schedule, sched_metric, logs, engine._schedule_monitor, lambda _: f"epoch {epoch + 1}")
            cbs.call("on_epoch_end", epoch, logs)
            last_logs = logs
            progress.end(done, logs)
            if engine.stop_training:
                break
        cbs.call("on_train_end", dict(last_logs))   # the last epoch's logs, as Keras passes them
    except BaseException:
        if not trained:
            engine.history, engine.stop_training = previous
            engine._resume_position = pending
        raise
    finally:
        progress.close()
        cbs.release()
        engine._fit_position = None
    if not trained:  # no epoch to run (or every batch skipped): the previous record stays the engine's
        engine.history = previous[0]
    if plot_to is not None and not history.epoch:
        warnings.warn("fit ran no epoch: plot_to has nothing to plot", RuntimeWarning, stacklevel=3)
    elif plot_to is not None:
        from . import plot as _plot
        target = val if val is not None else _metric_source(source)
        y_true, outputs = _predict(engine, target)
        _plot.fit_report(plot_to, history, y_true, outputs, engine.loss)
    return history


def _counted(engine, where, b):
    """The labels the last step counted (-1: every row), or the StateError a closed engine's next
    step gives, said to be batch b's (where(b), formatted only then): another thread may close the
    engine during a step."""
    g = engine._graph
    if g is None:
        raise _in_batch(StateError("this engine is closed"), where(b))
    return g.counted


def _log_keys(engine, val, metric_objs, callbacks):
    """The keys of every epoch's logs, as fit builds them before on_epoch_end; None when a
    callback of the user's own may add more (one not of mpscy.callbacks that has its own
    on_epoch_end)."""
    if any(type(cb).__module__ != _callbacks.__name__ and _callbacks._overrides(cb, "on_epoch_end")
           for cb in callbacks):
        return None
    acc = engine.loss.accuracy(tuple(engine.model.output_shape)) != "none"
    keys = ["loss"] + (["accuracy"] if acc else [])
    if val is not None:
        keys += ["val_loss"] + (["val_accuracy"] if acc else [])
    prefix = "val_" if val is not None else ""
    return keys + [prefix + m.name for m in metric_objs] + ["lr"]


def _check_plot_to(plot_to):
    """What would make the report fail after the whole run, refused before it."""
    folder = path(plot_to, "plot_to")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InvalidArgumentError(f"plot_to {folder!r} exists and is not a folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plot_to needs matplotlib: pip install 'mpscy[plot]'") from None


def _fit_metrics(engine, metrics):
    """The Metric objects fit computes at each epoch's end. "accuracy" is the engine's own (its
    steps' and evaluate's, as Keras's running accuracy is) when its loss has one, so it is not
    computed again another way; classification metrics need one label per row, which a
    multi-label head (BCE over several outputs) does not have."""
    if isinstance(metrics, (str, _metrics.Metric)) or callable(metrics):
        metrics = [metrics]
    elif metrics is not None and not isinstance(metrics, (list, tuple)):
        raise InvalidArgumentError(f"metrics must be a metric name, a callable or a list of them, got {metrics!r}")
    objs = [_metrics.get(m) for m in (metrics or ())]
    out_shape = tuple(engine.model.output_shape)
    acc = engine.loss.accuracy(out_shape)
    if acc != "none":
        objs = [m for m in objs if m.name != "accuracy"]
    outputs = int(np.prod(out_shape))
    if acc == "threshold" and outputs > 1:
        bad = [m.name for m in objs if m.kind == "classification"]
        if bad:
            raise InvalidArgumentError(f"metrics {bad} need one class label per row; this model's "
                                       f"{type(engine.loss).__name__} over {outputs} outputs is "
                                       "multi-label (its accuracy is the per-output threshold accuracy)")
    if engine.loss.target == "index":
        bad = [m.name for m in objs if m.kind == "regression"]
        if bad:
            raise InvalidArgumentError(f"metrics {bad} compare the outputs with targets of their shape; this "
                                       f"model's {type(engine.loss).__name__} takes class labels")
    if outputs == 1:
        bad = [m.name for m in objs if m.kind == "classification" and m.name.startswith("top")]
        if bad:
            raise InvalidArgumentError(f"metrics {bad} rank the classes' scores; this model has one output (a "
                                       "binary head: 'accuracy', 'f1' or 'roc_auc' apply)")
    return objs


_KERAS_FIT = {
    "class_weight": "class weights belong to the loss here, as in torch: SparseCrossEntropy(weight=[w_0, ..., "
                    "w_{C-1}] or your class_weight dict) or CrossEntropy(weight=...), whose mean divides by the "
                    "summed label weights (Keras's class_weight divides by the batch size)",
    "sample_weight": "per-sample weights are not supported; for classes, the loss's weight= (class weights)",
    "steps_per_epoch": "an epoch is one pass over x: give a DataLoader or a list of that many (x, y) batches, or "
                       "slice the arrays",
    "validation_steps": "validation runs over all of validation_data (slice it, or give a DataLoader of fewer batches)",
    "validation_batch_size": "validation runs at the engine's built batch size",
    "validation_freq": "validation runs at every epoch's end",
    "max_queue_size": "give a mpscy.data.DataLoader (or a torch DataLoader with its own workers)",
    "workers": "give a mpscy.data.DataLoader (or a torch DataLoader with its own workers)",
    "use_multiprocessing": "give a mpscy.data.DataLoader (or a torch DataLoader with its own workers)",
}


def keras_fit_argument(kwargs):
    """The TypeError message for fit's unknown keyword arguments: for Keras's, what takes their
    place here."""
    name = sorted(kwargs)[0]
    if name in _KERAS_FIT:
        return f"fit() got Keras's argument {name!r}: {_KERAS_FIT[name]}"
    return f"fit() got an unexpected keyword argument {name!r}"


def _callback_list(callbacks):
    """fit's callbacks as a list: one Callback, or a list or tuple of them (each checked by
    CallbackList, still before anything runs)."""
    if isinstance(callbacks, _callbacks.Callback):
        return [callbacks]
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise InvalidArgumentError(f"callbacks must be an mpscy.callbacks.Callback or a list of them, got "
                                   f"{_describe(callbacks)}")
    return list(callbacks)


def _metric_value(metric, y_true, outputs, loss, key):
    """A metric's value, or NaN with a warning where the data leave it undefined (ROC AUC over
    validation labels that lack a class), as scikit-learn's UndefinedMetricWarning: one epoch's
    data does not end a run that has already applied its steps. A function that returns no
    single number (an array of per-output values) is refused by name, at its first evaluation."""
    try:
        value = metric.compute(y_true, outputs, loss)
    except InvalidArgumentError as e:
        warnings.warn(f"{key} is undefined on this data, logged as NaN: {e}", RuntimeWarning, stacklevel=3)
        return math.nan
    return metric.scalar(value)


def _metric_source(source):
    return source.arrays() if isinstance(source, _Arrays) else source.loader
