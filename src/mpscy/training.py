"""`Engine.fit`: the epoch loop around the one-call training step, with Keras's conventions —
shuffling, validation, metrics, callbacks, a progress bar (tqdm when installed, plain lines
otherwise), a schedule attached with `Engine.set_schedule`, and a `History` of per-epoch logs.
The loss and accuracy come from each step's StepResult, so reading them adds no device
synchronization. Nothing here runs native code except through the engine's public methods and
its graph's check_input and check_target (a step's own rules, over a whole array)."""

import math
import os
import sys
import time
import warnings

import numpy as np

from . import callbacks as _callbacks, errors as _errors, metrics as _metrics
from ._checks import choice, nonneg_int, number, path, warn_user
from .errors import InvalidArgumentError, ShapeError

__all__ = ["fit", "set_schedule"]


# ----------------------------------------------------------------------------- data sources
class _Arrays:
    """Arrays x, y batched in a seeded order per epoch (one gather per epoch, then contiguous
    slices, so a batch is never copied again). The order of the engine's k-th epoch overall is
    PCG64([engine seed, k]): a resumed run sees the same orders, and calling fit again does not
    replay the first call's orders."""

    def __init__(self, engine, x, y, batch_size, shuffle):
        self.n_inputs = len(engine.model.input_shapes)
        self.x = _as_inputs(x, self.n_inputs)
        self.y = _as_target(engine, y)
        self.n = _rows(self.x)
        _check_target(engine, self.y, self.n, "y")
        _check_inputs(engine, self.x, "x")  # before any step, a bad row by its row here
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, engine.seed
        # BatchNorm cannot train on one row (PyTorch refuses it too): a lone last row is left
        # out of that epoch (a different row each epoch when shuffling)
        self.stop = self.n - 1 if getattr(engine, "_batch_stats", None) and self.n % batch_size == 1 else self.n

    def __len__(self):
        return -(-self.stop // self.batch_size)

    def epoch(self, epoch, where=None):
        """The epoch's batches (slices of the arrays: nothing here raises, so `where`, which
        names a batch in a loader's errors, is not needed)."""
        x, y = self.x, self.y
        if self.shuffle:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n)
            x = [a[order] for a in x]
            y = y[order]
        b = self.batch_size
        one = self.n_inputs == 1
        stop = self.stop
        return ((x[0][i:min(i + b, stop)] if one else [a[i:min(i + b, stop)] for a in x], y[i:min(i + b, stop)])
                for i in range(0, stop, b))

    def arrays(self):
        return (self.x[0] if self.n_inputs == 1 else self.x), self.y


class _Loader:
    """A DataLoader (or any re-iterable of (x, y) batches with a length). With BatchNorm, a batch
    of one row is left out, as the arrays' lone last row is."""

    def __init__(self, engine, loader):
        self.engine, self.loader = engine, loader
        self.skip_single = bool(getattr(engine, "_batch_stats", None))

    def __len__(self):
        try:
            n = len(self.loader)
        except TypeError:
            return None
        dataset, b = getattr(self.loader, "dataset", None), getattr(self.loader, "batch_size", None)
        if (self.skip_single and isinstance(b, int) and not getattr(self.loader, "drop_last", False)
                and hasattr(dataset, "__len__") and len(dataset) % b == 1):
            n -= 1  # its last batch is one row
        return n

    def epoch(self, epoch, where):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        # each batch converted as fit converts arrays (float64 x, uint8 labels): no copy when it
        # already is what a step takes; an mpscy error in making it is said to be batch k's,
        # where(k), as a step's error is
        batches = _named(((_batch_inputs(self.engine, xb), _as_target(self.engine, yb))
                          for xb, yb in (_pair(batch) for batch in self.loader)), where)
        if not self.skip_single:
            return batches
        return (batch for batch in batches if len(batch[1]) != 1)


def _converted(a):
    """One input as fit, evaluate and predict take it: a CPU tensor of another library (a torch
    DataLoader's batches) as an array, float arrays of another precision as float32 (once, as
    Keras converts them), strided ones in C order; anything else as it is, for the checks to name."""
    if not isinstance(a, (np.ndarray, list, tuple)) and hasattr(a, "__array__"):
        a = np.asarray(a)
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a, dtype=np.float32 if np.issubdtype(a.dtype, np.floating) else None)
    return a


def _converted_inputs(x, n_inputs):
    """x (an array, or a list of them for a model of several inputs) with each array _converted."""
    return [_converted(a) for a in x] if n_inputs > 1 and isinstance(x, (list, tuple)) else _converted(x)


def _as_inputs(x, n_inputs, what="x"):
    arrays = list(x) if n_inputs > 1 and isinstance(x, (list, tuple)) else [x]
    if len(arrays) != n_inputs:
        raise InvalidArgumentError(f"this model has {n_inputs} inputs: pass {what} as a list of {n_inputs} arrays")
    for a in arrays:
        if not isinstance(a, np.ndarray) and not hasattr(a, "__array__"):
            also = ", a DataLoader or another re-iterable of (x, y) batches" if what == "x" else ""
            raise InvalidArgumentError(f"{what} must be a numpy array{also}, got {_describe(a)}")
    return [_converted(a) for a in arrays]


def _in_batch(e, where):
    """The same mpscy error, saying which batch: a DataLoader's rows are named within their
    batch (its data is not read ahead, as arrays are checked)."""
    return type(e)(f"{where}: {e}")


def _pair(batch):
    """A loader's item as (x, y), or an error saying what it was and what is expected."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    what = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
    raise InvalidArgumentError(f"the DataLoader gave {what}, not an (x, y) pair; a model of several inputs takes "
                               "([x1, x2, ...], y): ArrayDataset([x1, x2], y), not ArrayDataset(x1, x2, y)")


def _named(batches, where):
    """The batches, with an mpscy error raised while making batch k (a DataLoader's conversion
    or shape) said to be that batch's, where(k), as a step's error is."""
    it, k = iter(batches), 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except _errors.Error as e:
            raise _in_batch(e, where(k)) from e
        yield batch
        k += 1


def _batch_inputs(engine, x):
    n_inputs = len(engine.model.input_shapes)
    xs = _as_inputs(x, n_inputs)
    return xs[0] if n_inputs == 1 else xs


def _as_target(engine, y):
    if y is None:
        raise InvalidArgumentError("y is required when x is an array (pass a DataLoader to give both)")
    y = np.asarray(y)
    if engine.loss.target == "dense" and np.issubdtype(y.dtype, np.number):
        return np.ascontiguousarray(y, dtype=np.float32)
    if (np.issubdtype(y.dtype, np.integer) and y.dtype not in (np.int32, np.int64)
            and not (np.issubdtype(y.dtype, np.uint64) and y.size and y.max() > np.iinfo(np.int64).max)):
        return np.ascontiguousarray(y, dtype=np.int64)  # uint8 labels (Keras's datasets), int16, uint64 ...
    return np.ascontiguousarray(y)


def _check_target(engine, y, n, what):
    """The whole of a target array checked once, before any step: its rows, then by the engine's
    graph what each step would refuse in its own batch (the same native code, over every row,
    nothing copied), so that fit fails before it trains rather than at a late batch or at the
    first epoch's validation."""
    if y.ndim and len(y) != n:
        raise ShapeError(f"{what} has {len(y)} rows for {n} rows of x")
    engine._g().check_target(y, what, n)


def _check_inputs(engine, xs, what):
    """Inputs (training or validation arrays) checked once before training by the engine's graph,
    by each step's rules (dtype, shape, finite values) over every row (input k of several named
    what[k])."""
    g = engine._g()
    for k, a in enumerate(xs):
        g.check_input(a, k, what if len(xs) == 1 else f"{what}[{k}]")


def _rows(arrays, what="x"):
    rows = {len(a) for a in arrays}
    if len(rows) != 1:
        raise ShapeError(f"the inputs of {what} have different row counts: {sorted(rows)}")
    n = rows.pop()
    if n == 0:
        raise ShapeError(f"{what} is empty (0 rows)")
    return n


# iterable, but never a loader of (x, y) batches: a str would be taken apart into characters
_NOT_LOADERS = (str, bytes, bytearray, memoryview, list, tuple, dict, set, frozenset)


def _is_loader(x):
    return hasattr(x, "__iter__") and not hasattr(x, "shape") and not isinstance(x, _NOT_LOADERS)


class _Listed:
    """A list of (x, y) batches, or a Keras Sequence-like object (a length and indexing, no
    iteration of its own), as a re-iterable loader: item i for i in range(len)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return (self.items[i] for i in range(len(self.items)))


def _is_dataset(x):
    """mpscy's or torch's Dataset, whose items may be samples (one at a time) or whole batches"""
    from .data import DataLoader, Dataset
    if isinstance(x, DataLoader):
        return False
    return isinstance(x, Dataset) or any(c.__name__ in ("Dataset", "IterableDataset")
                                         and c.__module__.startswith("torch.utils.data") for c in type(x).__mro__)


class _DatasetBatches:
    """A Dataset given where batches go, its items taken as batches (as a Keras Sequence's are):
    where an iteration's first item's x has one sample's rank, not a batch's, the Dataset is of
    samples, and the caller is told to wrap it in a DataLoader (it failed on that item's shape)."""

    def __init__(self, source, dataset, what, engine):
        self.source, self.dataset, self.what = source, dataset, what
        self.ranks = [len(s) for s in engine.model.input_shapes]

    def __len__(self):
        return len(self.source)

    def __iter__(self):
        first = True
        for item in self.source:
            if first:
                first = False
                x = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else None
                x = x[0] if len(self.ranks) > 1 and isinstance(x, (tuple, list)) and x else x
                if len(getattr(x, "shape", ())) == self.ranks[0]:
                    raise InvalidArgumentError(
                        f"{self.what} is a Dataset ({type(self.dataset).__name__}) of samples one at a time (its first "
                        f"item's x has shape {tuple(x.shape)}, one sample's); fit, evaluate and validation_data take "
                        f"batches: mpscy.data.DataLoader({self.what}, batch_size=...), or torch's")
            yield item


def _batches_of(x, y, engine):
    """x itself, or x as a loader where it is a list or tuple of (x, y) pairs or a Sequence-like
    object and y is not given (a list of arrays stays the inputs of a model with several); a
    Dataset's items as batches, one of samples refused at its first item (_DatasetBatches)."""
    if y is None and _is_dataset(x):
        return _DatasetBatches(x if hasattr(x, "__iter__") else _Listed(x), x, "x", engine)
    if y is not None or hasattr(x, "shape") or isinstance(x, (str, bytes, dict)):
        return x
    if isinstance(x, (list, tuple)):
        pairs = len(x) > 0 and all(isinstance(b, (list, tuple)) and len(b) == 2 for b in x)
        return _Listed(x) if pairs else x
    if not hasattr(x, "__iter__") and hasattr(x, "__len__") and hasattr(x, "__getitem__"):
        return _Listed(x)
    return x


def _describe(v):
    """What a refused argument is, for its message: its type (with its length for a list or
    tuple, its start for a str or bytes)."""
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} of {len(v)} items"
    if isinstance(v, (str, bytes)):
        return f"{type(v).__name__} {v[:40]!r}"
    return "None" if v is None else type(v).__name__


def _check_passes(loader, what, epochs):
    """A loader is iterated once per epoch: a one-pass iterator (a generator) is refused before
    training when fit runs more than one epoch (its second epoch would find it used up)."""
    if epochs > 1 and hasattr(loader, "__next__"):
        raise InvalidArgumentError(f"{what} is an iterator ({_describe(loader)}), used up after one pass, and fit "
                                   f"runs {epochs} epochs: give a DataLoader or another re-iterable")


def _validation_source(engine, validation_data, epochs):
    if validation_data is None:
        return None
    if _is_dataset(validation_data):
        validation_data = _DatasetBatches(validation_data if hasattr(validation_data, "__iter__") else
                                          _Listed(validation_data), validation_data, "validation_data", engine)
    if _is_loader(validation_data):
        if hasattr(validation_data, "__len__") and len(validation_data) == 0:
            raise InvalidArgumentError("the validation DataLoader has no batch (drop_last with fewer rows than "
                                       "its batch_size?)")
        _check_passes(validation_data, "validation_data", epochs)
        return validation_data
    if not isinstance(validation_data, (list, tuple)) or len(validation_data) != 2:
        raise InvalidArgumentError(f"validation_data must be (x_val, y_val) or a DataLoader, got "
                                   f"{_describe(validation_data)}")
    n_inputs = len(engine.model.input_shapes)
    x = _as_inputs(validation_data[0], n_inputs, "validation x")
    y = _as_target(engine, validation_data[1])
    n = _rows(x, "validation x")
    _check_inputs(engine, x, "validation x")
    _check_target(engine, y, n, "validation y")
    return (x[0] if n_inputs == 1 else x), y


def _evaluate(engine, source, what="validation batch", source_name="the validation data"):
    """Eval-mode {"loss", "accuracy"} over arrays or a loader (the mean over all rows, as
    Engine.evaluate: under class weights with labels, over the labels' weights); a batch's error
    names it as `what` k, an empty source as `source_name`."""
    if isinstance(source, tuple):
        return engine.evaluate(*source)
    total, weight, acc, rows, counted = 0.0, 0.0, 0.0, 0, 0
    # building a batch (a loader's samples) is the batch's too; the iterator only in the for
    # statement, so that an error's traceback does not keep a prefetching loader's thread alive
    for k, batch in enumerate(_named(source, lambda k: f"{what} {k}")):
        try:
            xb, yb = _pair(batch)
            xb, yb = _batch_inputs(engine, xb), _as_target(engine, yb)
            n = len(yb)
            r, c = engine._eval_arrays(xb, yb)   # c: under ignore_index, the batch's labels that count
        except _errors.Error as e:
            raise _in_batch(e, f"{what} {k}") from e
        s, w = engine._mean_share(r["loss"], yb, n, lambda: xb, c)
        total += s
        weight += w
        c = n if c < 0 else c
        acc = None if r["accuracy"] is None else (acc or 0.0) + (r["accuracy"] * c if c else 0.0)
        rows += n
        counted += c
    if rows == 0:
        raise InvalidArgumentError(f"{source_name} yielded no batch (a generator is used up after one "
                                   "pass: give a DataLoader or another re-iterable)")
    return {"loss": total / weight if weight > 0 else float("nan"),
            "accuracy": None if acc is None else acc / counted if counted else float("nan")}


def _predict(engine, source):
    """(y_true, outputs) over arrays or a loader, for metrics and plots."""
    if isinstance(source, tuple):
        return source[1], engine.predict(source[0])
    ys, outs = [], []
    for xb, yb in source:
        ys.append(_as_target(engine, yb))
        outs.append(engine.predict(_batch_inputs(engine, xb)))
    return np.concatenate(ys), np.concatenate(outs)


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


# ----------------------------------------------------------------------------- schedules
def set_schedule(engine, schedule, per="epoch", monitor="val_loss"):
    """Attaches `schedule` (an mpscy.optim.schedules object built on this engine, or None to
    detach) for fit to step after every batch (per="step") or every epoch (per="epoch"; a
    schedule whose step() takes a metric gets logs[monitor]: "val_loss" without validation data
    is the training loss, another key missing from the logs warns and skips the step).
    Checkpoints save and restore it."""
    if schedule is None:
        engine._schedule, engine._schedule_per, engine._schedule_monitor = None, None, None
        return
    choice(per, ("step", "epoch"), "per")
    _callbacks._monitor(monitor)
    if not callable(getattr(schedule, "step", None)):
        raise InvalidArgumentError(f"a schedule needs a step() method, got {type(schedule).__name__}")
    owner = getattr(schedule, "engine", engine)
    if owner is not engine:
        raise InvalidArgumentError("this schedule was built on another engine")
    engine._schedule, engine._schedule_per, engine._schedule_monitor = schedule, per, monitor


def _step_schedule(schedule, takes_metric, logs, monitor):
    if takes_metric:
        value = _callbacks._schedule_metric(logs, monitor, "set_schedule")
        if value is not None:
            schedule.step(value)
    else:
        schedule.step()


# ----------------------------------------------------------------------------- fit
def fit(engine, x=None, y=None, epochs=1, batch_size=None, validation_data=None, validation_split=0.0,
        shuffle=True, callbacks=(), verbose="auto", metrics=(), initial_epoch=0, plot_to=None):
    """See `Engine.fit`. Every option, and the data (arrays whole; a loader's batches as they
    come), is checked before the first step. engine.history becomes this fit's History, and
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
    # History after the caller's callbacks, as Keras appends it: keys they add to an epoch's logs
    # reach it (and the epoch's line, printed after them)
    cbs = _callbacks.CallbackList([*callbacks, history], engine,
                                  {"epochs": epochs, "steps": steps, "verbose": verbose},
                                  _log_keys(engine, val, metric_objs, callbacks))
    schedule, per = engine._schedule, engine._schedule_per
    sched_metric = schedule is not None and _callbacks._takes_metric(schedule)
    previous = engine.history, engine.stop_training
    progress = _Progress(verbose, epochs)
    engine.stop_training = False
    engine.history = history  # callbacks see it from on_train_begin on, as in Keras
    step = engine.step
    trained = False  # until a step is applied, a failure puts `previous` back
    try:
        cbs.call("on_train_begin", {})
        for epoch in range(initial_epoch, epochs):
            cbs.call("on_epoch_begin", epoch, {})
            progress.begin(epoch, steps)
            seen, loss_sum, counted, acc_sum, has_acc, done, void = 0, 0.0, 0, 0.0, False, 0, 0
            lr_used = engine.learning_rate
            where = lambda k: f"epoch {epoch + 1}, batch {k}"  # noqa: E731
            for b, (xb, yb) in enumerate(source.epoch(engine.epoch, where)):
                for cb in cbs.batch_begin:
                    cb.on_train_batch_begin(b, {})
                if per == "step":
                    lr_used = engine.learning_rate
                try:
                    r = step(xb, yb)  # the StepResult already holds the loss: no extra sync
                except _errors.NonFiniteError as e:
                    if engine._graph.counted != 0:
                        raise _in_batch(e, where(b)) from e
                    # every label is ignore_index: torch's step sees a NaN loss and zero gradients;
                    # nothing was changed (a failed step changes nothing), and the batch is skipped (its
                    # batch-begin callbacks have run)
                    void += 1
                    continue
                except _errors.Error as e:
                    raise _in_batch(e, where(b)) from e
                trained = True
                n = r.batch_size
                seen += n
                c = engine._graph.counted   # under ignore_index, the labels that counted, as staging counted them
                c = n if c < 0 else c
                counted += c   # loss and accuracy: means over the labels that count, as val_loss's and evaluate's
                loss_sum += r.loss * c
                if r.accuracy is not None:
                    acc_sum += r.accuracy * c
                    has_acc = True
                done = b + 1
                if per == "step":
                    _step_schedule(schedule, sched_metric, {"loss": r.loss}, "loss")
                if verbose == 1:
                    progress.step(done, loss_sum / counted, acc_sum / counted if has_acc else None)
                if cbs.batch_end:
                    blogs = {"loss": loss_sum / counted, "accuracy": acc_sum / counted if has_acc else None,
                             "batch_size": n}
                    for cb in cbs.batch_end:
                        cb.on_train_batch_end(b, blogs)
                if engine.stop_training:
                    break
            if void:
                warn_user(f"epoch {epoch + 1}: {void} training batch{'es' if void > 1 else ''} whose every label is "
                          f"the loss's ignore_index {engine.loss.ignore_index} skipped (no update: torch's step "
                          "would see a NaN loss and zero gradients)")
            if seen == 0:
                raise InvalidArgumentError("the training data yielded no batch" if not void else
                                           "every training batch's labels are all the loss's ignore_index")
            engine.epoch += 1  # its steps are applied: counted before anything below can fail
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
                _step_schedule(schedule, sched_metric, logs, engine._schedule_monitor)
            cbs.call("on_epoch_end", epoch, logs)
            progress.end(done, logs)
            if engine.stop_training:
                break
        cbs.call("on_train_end", {})
    except BaseException:
        if not trained:
            engine.history, engine.stop_training = previous
        raise
    finally:
        progress.close()
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
    data does not end a run that has already applied its steps."""
    try:
        return metric(y_true, outputs, loss)
    except InvalidArgumentError as e:
        warnings.warn(f"{key} is undefined on this data, logged as NaN: {e}", RuntimeWarning, stacklevel=3)
        return math.nan


def _metric_source(source):
    return source.arrays() if isinstance(source, _Arrays) else source.loader
