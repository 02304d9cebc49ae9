"""Callbacks for `Engine.fit`, with Keras's hooks and semantics: `History` (what fit returns),
`EarlyStopping`, `ModelCheckpoint`, `LearningRateScheduler` (a Keras-style function or an
`mpscy.optim.schedules` schedule) and `CSVLogger`. A callback sees the engine as
`self.engine` and stops training by setting `self.engine.stop_training = True`. Epoch numbers
passed to hooks are 0-based, as in Keras; file names and printed lines count from 1."""

import csv
import inspect
import math
import os
import string

import numpy as np

from ._checks import can_write_file, can_write_in, choice, finite, integer, nonneg_int, number, path, warn_user
from ._weak import WeakEngine
from .errors import InvalidArgumentError

__all__ = ["Callback", "CallbackList", "History", "EarlyStopping", "ModelCheckpoint",
           "LearningRateScheduler", "CSVLogger"]


class Callback:
    """Base class; override the hooks you need. `params` holds epochs, steps, verbose (as
    Keras's).
    `engine` is the engine fit runs, held weakly (engine.history is a callback: a strong
    reference back would keep a dropped engine's memory until the cycle collector ran)."""

    engine = WeakEngine()
    _log_keys = None  # the keys of fit's epoch logs, when no callback of the user's may add more

    def __init__(self):
        self.engine = None
        self.params = {}

    def set_engine(self, engine):
        """Called by fit before training: the engine it trains."""
        self.engine = engine

    def set_params(self, params):
        """Called by fit before training: epochs, steps per epoch, verbose."""
        self.params = dict(params)

    def on_train_begin(self, logs=None):
        """Before the first epoch."""

    def on_train_end(self, logs=None):
        """After the last epoch, or when training stopped early: logs are the last epoch's (as
        Keras passes them; empty when fit ran no epoch)."""

    def on_epoch_begin(self, epoch, logs=None):
        """Before epoch `epoch` (0-based) runs its first batch."""

    def on_epoch_end(self, epoch, logs=None):
        """After epoch `epoch`: logs holds its loss, accuracy, metrics, validation values and
        lr; a callback may add keys for those after it."""

    def on_train_batch_begin(self, batch, logs=None):
        """Before batch `batch` (0-based within the epoch); called only when overridden."""

    def on_train_batch_end(self, batch, logs=None):
        """After batch `batch`: logs holds the epoch's running mean loss and accuracy so far (as
        Keras's) and the batch's size; called only when overridden."""

    def _release(self):
        """What the callback holds open for a fit, let go when the fit ends however it ends (fit's
        CallbackList.release); nothing here."""

    def __getattr__(self, name):
        # only for attributes that are not found: Keras's self.model is told where it is here
        if name == "model":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute 'model': an mpscy callback sees "
                                 "the engine fit trains as self.engine (Keras's self.model.stop_training = True "
                                 "is self.engine.stop_training = True; self.engine.model is the layers' model)",
                                 name=name, obj=self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self)


def _overrides(cb, name):
    return getattr(type(cb), name, None) is not getattr(Callback, name)


class CallbackList:
    """Calls each hook on every callback, in order. Batch hooks are dispatched only to the
    callbacks that override them, so fit builds no per-batch logs when nobody reads them."""

    def __init__(self, callbacks, engine, params, log_keys=None):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                from .optim.schedules import Schedule  # late: schedules is optim's
                hint = ""
                if isinstance(cb, Schedule):  # Keras's ReduceLROnPlateau is a callback; here it is a schedule
                    hint = (f": {type(cb).__name__} is a learning-rate schedule here; attach it with "
                            f"engine.set_schedule(schedule, per=\"epoch\") and fit steps it")
                raise InvalidArgumentError(f"callbacks must be mpscy.callbacks.Callback instances, got "
                                           f"{type(cb).__name__}{hint}")
            if isinstance(cb, LearningRateScheduler):
                cb._check_engine(engine)   # before any callback is given the engine
        for cb in self.callbacks:
            cb.set_engine(engine)
            cb.set_params(params)
            cb._log_keys = None if log_keys is None else list(log_keys)
        self.batch_begin = [cb for cb in self.callbacks if _overrides(cb, "on_train_batch_begin")]
        self.batch_end = [cb for cb in self.callbacks if _overrides(cb, "on_train_batch_end")]

    def call(self, hook, *args):
        """Calls hook (a method name) with args on every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def release(self):
        """Whatever each callback holds open for the fit (CSVLogger's file), released however the
        fit ended: an interrupted fit runs no on_train_end."""
        for cb in self.callbacks:
            cb._release()


class History(Callback):
    """Per-epoch logs: ``history.history["loss"][i]`` is epoch i's value; ``history.epoch``
    lists the epoch indices run. `Engine.fit` returns one."""

    def __init__(self):
        super().__init__()
        self.history = {}
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


_MAX_NAMES = ("acc", "accuracy", "auc", "f1", "precision", "recall", "r2", "top")


def _monitor(monitor):
    if not isinstance(monitor, str) or not monitor:
        raise InvalidArgumentError(f"monitor must be the name of a log entry (a non-empty str such as 'val_loss'), "
                                   f"got {monitor!r}")
    return monitor


def _verbose(verbose):
    return int(verbose) if isinstance(verbose, bool) else integer(verbose, "verbose")


def _mode(monitor, mode):
    choice(mode, ("auto", "min", "max"), "mode")
    if mode != "auto":
        return mode
    name = monitor[4:] if monitor.startswith("val_") else monitor
    return "max" if any(name == m or name.startswith(m) or name.endswith(m) for m in _MAX_NAMES) else "min"


class _Monitor:
    """The best value of a monitored log entry so far, in Keras's "improvement" sense."""

    def __init__(self, monitor, mode, min_delta=0.0):
        self.monitor = _monitor(monitor)
        self.mode = _mode(monitor, mode)
        self.min_delta = abs(finite(min_delta, "min_delta"))
        self.best = math.inf if self.mode == "min" else -math.inf

    def improved(self, value, reference=None):
        ref = self.best if reference is None else reference
        if self.mode == "min":
            return value + self.min_delta < ref
        return value - self.min_delta > ref

    def value(self, logs, who):
        v = (logs or {}).get(self.monitor)
        if v is None:
            warn_user(f"{who}: '{self.monitor}' is not in the logs (available: {sorted(logs or {})}); skipping",
                      RuntimeWarning)
        return v


class EarlyStopping(Callback):
    """Stops training when `monitor` has not improved by more than min_delta for `patience`
    epochs (Keras semantics). With restore_best_weights, parameters and BatchNorm statistics
    of the best epoch are written back when training ends, whether it stopped early or ran all
    its epochs, as Keras 3 does (Keras 2 restored them only when it stopped early)."""

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, mode="auto", baseline=None,
                 restore_best_weights=False, start_from_epoch=0, verbose=0):
        super().__init__()
        self._m = _Monitor(monitor, mode, min_delta)
        self.monitor, self.patience = monitor, nonneg_int(patience, "patience")
        self.baseline = None if baseline is None else number(baseline, "baseline")
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = nonneg_int(start_from_epoch, "start_from_epoch")
        self.verbose = _verbose(verbose)

    def on_train_begin(self, logs=None):
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best_weights = None
        self._m.best = math.inf if self._m.mode == "min" else -math.inf

    @property
    def best(self):
        """The best value of the monitored quantity so far (inf or -inf before the first)."""
        return self._m.best

    def on_epoch_end(self, epoch, logs=None):
        current = self._m.value(logs, "EarlyStopping")
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.engine.get_parameters()  # the first epoch watched is the best so far
            self.best_epoch = epoch
        self.wait += 1
        if self._m.improved(current):
            self._m.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self.engine.get_parameters()
            if self.baseline is None or self._m.improved(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.engine.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"EarlyStopping: restoring the weights of epoch {self.best_epoch + 1}")
            self.engine.set_parameters(self.best_weights)


class ModelCheckpoint(Callback):
    """Saves the engine (`engine.save`: parameters, statistics, optimizer, generator, counters,
    schedule) at the end of each epoch to `filepath`, which may hold format fields such as
    ``"ckpt-{epoch:02d}-{val_loss:.3f}.mpscy"`` (epoch counts from 1; every other field is a
    log entry, a float). With save_best_only it writes only when `monitor` improved.

    What would fail only when the first epoch ends is refused before training: a filepath that
    is no format string or cannot format an epoch and floats (when constructed), and (when fit
    starts) a folder that cannot be made or written, a filepath that is a folder, and a field
    that none of the logs will hold (checked when every callback that may add log entries is
    one of this module's)."""

    def __init__(self, filepath, monitor="val_loss", save_best_only=False, mode="auto", verbose=0, *,
                 save_weights_only=False, save_freq="epoch"):
        super().__init__()
        if save_weights_only is not False:  # Keras's options, told what they are here
            raise InvalidArgumentError(f"ModelCheckpoint save_weights_only={save_weights_only!r}: an mpscy checkpoint "
                                       "is the whole engine (engine.save); the weights alone are "
                                       "engine.get_parameters(), or mpscy.onnx.export for a model file")
        if save_freq != "epoch":
            raise InvalidArgumentError(f"ModelCheckpoint save_freq={save_freq!r}: it saves at each epoch's end "
                                       "(save_freq='epoch'); for saves every N batches, a callback whose "
                                       "on_train_batch_end calls self.engine.save(...)")
        self.filepath = path(filepath, "ModelCheckpoint filepath")
        self._fields = _format_fields(self.filepath)
        self._m = _Monitor(monitor, mode)
        self.monitor = monitor
        self.save_best_only = bool(save_best_only)
        self.verbose = _verbose(verbose)
        self.saved = []

    @property
    def best(self):
        """The best value of the monitored quantity so far (inf or -inf before the first)."""
        return self._m.best

    def on_train_begin(self, logs=None):
        known = self._log_keys
        if known is not None:
            missing = [f for f in self._fields if f != "epoch" and f not in known]
            if missing:
                raise InvalidArgumentError(f"ModelCheckpoint filepath {self.filepath!r} names {missing}, which this "
                                           f"fit does not log (its logs hold {sorted(known)} and the epoch)")
        _check_writable(self.filepath.format(**_sample(self._fields)), "ModelCheckpoint filepath", make_folders=True,
                        replaces=True, hint=f"; give a file name in it, such as "
                                            f"{os.path.join(self.filepath, 'model-{epoch:02d}.mpscy')!r}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            current = self._m.value(logs, "ModelCheckpoint")
            if current is None or not self._m.improved(current):
                return
            self._m.best = current
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError) as e:
            raise InvalidArgumentError(f"ModelCheckpoint filepath {self.filepath!r} names {e} which is "
                                       f"not in the logs {sorted(logs)}") from None
        except (ValueError, TypeError, AttributeError) as e:  # a log value a callback set, not a float
            raise InvalidArgumentError(f"ModelCheckpoint filepath {self.filepath!r} cannot format the logs "
                                       f"{logs}: {e}") from None
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)  # as Keras's ModelCheckpoint
        self.engine.save(path)
        self.saved.append(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved {path}")


def _format_fields(filepath):
    """The names of filepath's format fields, after checking that it formats with the epoch as
    an int and every other field as a float."""
    what = f"ModelCheckpoint filepath {filepath!r}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(filepath) if f is not None]
    except ValueError as e:
        raise InvalidArgumentError(f"{what} is not a format string: {e}") from None
    names = []
    for f in fields:
        name = f.split(".", 1)[0].split("[", 1)[0]
        if not name.isidentifier():
            raise InvalidArgumentError(f"{what} has the field {{{f}}}: fields name the epoch or a log entry, as "
                                       "{epoch:02d} or {val_loss:.3f}")
        names.append(name)
    try:
        filepath.format(**_sample(names))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise InvalidArgumentError(f"{what} cannot format the epoch (an int) and log entries (floats): "
                                   f"{type(e).__name__}: {e}") from None
    return list(dict.fromkeys(names))


def _sample(names):
    return {n: 1 if n == "epoch" else 1.0 for n in names}


def _check_writable(target, what, make_folders, replaces, hint=""):
    """Refuses a file path that could not be written: a folder (hint ends that message); its
    folder (or, with make_folders, the nearest existing folder above it) missing, not a folder,
    or not writable, where the file is new or replaced through a temporary file beside it
    (replaces: engine.save's way); else an existing file that is not writable."""
    if os.path.isdir(target):
        raise InvalidArgumentError(f"{what} {target!r} is a folder{hint}")
    probe = os.path.dirname(os.path.abspath(target))
    if make_folders:
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
    if not os.path.exists(probe):
        raise InvalidArgumentError(f"{what} {target!r}: the folder {probe!r} does not exist")
    if not os.path.isdir(probe):
        raise InvalidArgumentError(f"{what} {target!r}: {probe!r} is not a folder")
    if os.path.exists(target) and not replaces:
        if not can_write_file(target):
            raise InvalidArgumentError(f"{what} {target!r} is not writable")
    elif not can_write_in(probe):
        raise InvalidArgumentError(f"{what} {target!r}: the folder {probe!r} is not writable")


def _schedule_metric(logs, monitor, who):
    """The value a schedule that takes a metric (ReduceLROnPlateau) steps on at an epoch's end:
    logs[monitor]; the default "val_loss" falls back to the training loss when there is no
    validation data; any other missing key warns and skips the step, as Keras's callback does."""
    logs = logs or {}
    if monitor in logs:
        return logs[monitor]
    if monitor == "val_loss" and "loss" in logs:
        return logs["loss"]
    warn_user(f"{who}: '{monitor}' is not in the logs (available: {sorted(logs)}); the schedule did not step",
              RuntimeWarning)
    return None


def _check_direction(schedule, monitor, who):
    """Warns when a schedule that takes a metric in a fixed direction (ReduceLROnPlateau's mode,
    torch's default "min") watches a key that improves the other way by its name, as
    EarlyStopping's mode="auto" reads it: val_accuracy in mode "min" would cut the rate each
    time accuracy rises. A warning, not an error: the name is only a hint. Schedules that take
    no metric are passed over."""
    mode = getattr(schedule, "mode", None)
    if mode not in ("min", "max") or not _takes_metric(schedule) or _mode(monitor, "auto") == mode:
        return
    other = "max" if mode == "min" else "min"
    warn_user(f"{who}: {type(schedule).__name__} is in mode={mode!r} but monitors {monitor!r}, which by its name "
              f"improves as it {'rises' if other == 'max' else 'falls'}: the rate would be cut while it improves; "
              f"build the schedule with mode={other!r}")


def _positional_count(fn):
    """How many positional arguments fn requires (None when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _takes_metric(schedule):
    return bool(_positional_count(schedule.step))


class LearningRateScheduler(Callback):
    """Changes the learning rate between epochs.

    `schedule` is either a Keras-style function ``f(epoch, lr) -> new lr`` or ``f(epoch) -> new
    lr`` (applied at the start of each epoch) or an `mpscy.optim.schedules` object built on the
    engine (its ``step()`` runs at the end of each epoch; ``step(logs[monitor])`` for schedules
    that take a metric, such as ReduceLROnPlateau: without validation data "val_loss" means the
    training loss, and another missing key warns and skips the step). The learning rate is
    logged as "lr"."""

    def __init__(self, schedule, monitor="val_loss", verbose=0):
        super().__init__()
        if not callable(schedule) and not hasattr(schedule, "step"):
            raise InvalidArgumentError("schedule must be a function f(epoch, lr) or an object with step()")
        self.schedule = schedule
        self.monitor = _monitor(monitor)
        self.verbose = _verbose(verbose)
        self._is_object = hasattr(schedule, "step")
        self._metric = self._is_object and _takes_metric(schedule)
        _check_direction(schedule, self.monitor, "LearningRateScheduler")
        self._epoch_only = not self._is_object and _positional_count(schedule) == 1  # Keras's f(epoch)

    def _check_engine(self, engine):
        # as engine.set_schedule: a schedule object steps the engine it was built on, which fit
        # would step behind its back while training this one
        if self._is_object and getattr(self.schedule, "engine", engine) is not engine:
            raise InvalidArgumentError(f"LearningRateScheduler: this schedule ({type(self.schedule).__name__}) was "
                                       "built on another engine; build it on the engine fit trains")

    def on_epoch_begin(self, epoch, logs=None):
        if self._is_object:
            return
        if self._epoch_only:
            value = self.schedule(epoch)
        else:
            value = self.schedule(epoch, float(self.engine.learning_rate))
        try:
            lr = float(value)
        except (TypeError, ValueError, OverflowError):
            lr = None
        if lr is None or not (np.isfinite(lr) and lr >= 0):  # refused before the rate is set
            name = getattr(self.schedule, "__name__", type(self.schedule).__name__)
            raise InvalidArgumentError(f"LearningRateScheduler: the schedule function {name} returned {value!r} for "
                                       f"epoch {epoch}; a learning rate is a finite number >= 0")
        self.engine.learning_rate = lr
        if self.verbose:
            print(f"Epoch {epoch + 1}: learning rate {lr:.6g}")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.setdefault("lr", float(self.engine.learning_rate))
        if not self._is_object:
            return
        if self._metric:
            value = _schedule_metric(logs, self.monitor, "LearningRateScheduler")
            if value is not None:
                self.schedule.step(value)
        else:
            self.schedule.step()


class CSVLogger(Callback):
    """Writes one row per epoch (epoch, then the log keys in sorted order) to a CSV file, after
    its header; with append=True, after the rows already there, in their header's order. The
    file is checked when fit starts and opened when the first epoch ends, so a fit that fails
    before then leaves an earlier log as it was."""

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename = path(filename, "CSVLogger filename")
        if not isinstance(separator, str) or len(separator) != 1:
            raise InvalidArgumentError(f"CSVLogger separator must be a 1-character str, got {separator!r}")
        self.separator = separator
        self.append = bool(append)
        self._file = None
        self._writer = None
        self._keys = None
        self._dropped_warned = False

    def on_train_begin(self, logs=None):
        _check_writable(self.filename, "CSVLogger filename", make_folders=False, replaces=False)
        self._release()  # a file an earlier fit that failed left open
        self._keys, self._dropped_warned = None, False
        if self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0:
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f, delimiter=self.separator), None)
            self._keys = header[1:] if header else None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._file is None:
            self._file = open(self.filename, "a" if self.append else "w", newline="")
            self._writer = csv.writer(self._file, delimiter=self.separator)
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer.writerow(["epoch"] + self._keys)
        elif set(logs) - set(self._keys) and not self._dropped_warned:
            self._dropped_warned = True   # once a fit: the file's header fixes its columns
            warn_user(f"CSVLogger {self.filename!r} appends under its header {['epoch'] + self._keys}, which has no "
                      f"column for {sorted(set(logs) - set(self._keys))}: those are not written (log this run to a "
                      f"new file to keep them)")
        self._writer.writerow([epoch] + [_csv_value(logs.get(k)) for k in self._keys])
        self._file.flush()

    def on_train_end(self, logs=None):
        self._release()

    def _release(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v
