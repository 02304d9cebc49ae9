"""The batch sources of `Engine.fit` and `Engine.evaluate`: arrays shuffled per epoch, a
DataLoader or any re-iterable of (x, y) batches, a Sequence-like object or a Dataset of batches;
each batch converted as a step takes it, and an mpscy error in making or stepping it named by its
batch. Validation and evaluate over such a source (means over all its rows or counted labels)."""

import itertools

import numpy as np

from . import _checks, errors as _errors
from .errors import InvalidArgumentError, ShapeError


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

    def epoch(self, epoch, where=None, start=0):
        """The epoch's batches from batch `start` on (slices of the arrays: nothing here raises, so
        `where`, which names a batch in a loader's errors, is not needed)."""
        x, y = self.x, self.y
        if self.shuffle:
            order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n)
            x = [a[order] for a in x]
            y = y[order]
        b = self.batch_size
        one = self.n_inputs == 1
        stop = self.stop
        return ((x[0][i:min(i + b, stop)] if one else [a[i:min(i + b, stop)] for a in x], y[i:min(i + b, stop)])
                for i in range(start * b, stop, b))

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
        rows, b = self._rows(), getattr(self.loader, "batch_size", None)
        if (self.skip_single and isinstance(b, int) and not getattr(self.loader, "drop_last", False)
                and rows is not None and rows % b == 1):
            n -= 1  # its last batch is one row
        return n

    def _rows(self):
        """The rows an epoch draws: a torch DataLoader's sampler's count (a SubsetRandomSampler's
        subset), else the dataset's length; None where neither has one."""
        for part in (getattr(self.loader, "sampler", None), getattr(self.loader, "dataset", None)):
            if part is not None:
                try:
                    return len(part)
                except TypeError:   # an IterableDataset's sampler has no length; its dataset may
                    continue
        return None

    def exact_len(self):
        """len(self) where it is the count of batches an epoch yields, else None: without a length,
        or under BatchNorm where a batch of one row (left out) may come other than last."""
        b = getattr(self.loader, "batch_size", None)
        counted = isinstance(b, int) and b > 1 and self._rows() is not None
        return self.__len__() if counted or not self.skip_single else None

    def epoch(self, epoch, where, start=0):
        """The epoch's batches from batch `start` on (the ones before it are made and passed over:
        a loader's order is its own)."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        # each batch converted as fit converts arrays (float64 x, uint8 labels): no copy when it
        # already is what a step takes; an mpscy error in making it is said to be batch k's,
        # where(k), as a step's error is
        batches = _named(((_batch_inputs(self.engine, xb), _as_target(self.engine, yb))
                          for xb, yb in (_pair(batch) for batch in self.loader)), where)
        if self.skip_single:
            batches = (batch for batch in batches if len(batch[1]) != 1)
        return itertools.islice(batches, start, None) if start else batches


def _float32(a, what):
    """A float array as float32 in C order, a finite value past its range named with its row."""
    return _checks.cast_floats(a, np.float32, what, rows=True)


def _converted(a, what="x"):
    """One input as fit, evaluate and predict take it: a CPU tensor of another library (a torch
    DataLoader's batches) as an array, float arrays of another precision as float32 (once, as
    Keras converts them), strided ones in C order; anything else as it is, for the checks to name."""
    if not isinstance(a, (np.ndarray, list, tuple)) and hasattr(a, "__array__"):
        a = _checks.host_array(a)
    if isinstance(a, np.ndarray):
        a = _float32(a, what) if np.issubdtype(a.dtype, np.floating) else np.ascontiguousarray(a)
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
    return [_converted(a, what) for a in arrays]


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
    y = _checks.host_array(y)
    if engine.loss.target == "dense" and np.issubdtype(y.dtype, np.number):
        return _float32(y, "y") if np.issubdtype(y.dtype, np.floating) else np.ascontiguousarray(y, dtype=np.float32)
    if (engine.loss.target != "dense" and y.ndim == 2 and y.shape[1] == 1 and len(engine.model.output_shape) == 1
            and np.issubdtype(y.dtype, np.integer)):
        y = y[:, 0]  # (n, 1) class labels (Keras's datasets): as (n,), which a step takes them as, for the metrics
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

    def __init__(self, dataset, what, engine):
        self.dataset, self.what = dataset, what
        self.source = dataset if hasattr(dataset, "__iter__") else _Listed(dataset)
        self.rank = len(engine.model.input_shapes[0])   # one sample's, of the first input

    def __len__(self):
        return len(self.source)

    def __iter__(self):
        for k, item in enumerate(self.source):
            x = item[0] if k == 0 and isinstance(item, (tuple, list)) and len(item) == 2 else None
            x = x[0] if isinstance(x, (tuple, list)) and x else x   # a model of several inputs: the first
            if len(getattr(x, "shape", ())) == self.rank:
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
        return _DatasetBatches(x, "x", engine)
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


def _inputs_first(data, n_inputs):
    """Whether a list or tuple starts with a model's inputs (an array, or a list of n_inputs
    arrays), as (x_val, y_val) does; a list of (x, y) batches starts with a batch, a pair."""
    first = data[0] if len(data) else None
    if n_inputs == 1:
        return not isinstance(first, (list, tuple))
    return (isinstance(first, (list, tuple)) and len(first) == n_inputs
            and not any(isinstance(a, (list, tuple)) for a in first))


def _validation_source(engine, validation_data, epochs):
    """validation_data as fit reads it: (x_val, y_val) as arrays, checked whole; or what evaluate
    takes, a DataLoader, a Dataset or Sequence of batches, or a list of (x, y) batches (a list or
    tuple whose first item is not the model's inputs, _inputs_first), read as they come."""
    if validation_data is None:
        return None
    if _is_dataset(validation_data):
        validation_data = _DatasetBatches(validation_data, "validation_data", engine)
    elif isinstance(validation_data, (list, tuple)) and not _inputs_first(validation_data,
                                                                         len(engine.model.input_shapes)):
        validation_data = _batches_of(validation_data, None, engine)   # a list of (x, y) pairs: _Listed
    elif not isinstance(validation_data, (list, tuple)):
        validation_data = _batches_of(validation_data, None, engine)   # a Sequence-like object
    if _is_loader(validation_data):
        if hasattr(validation_data, "__len__") and len(validation_data) == 0:
            raise InvalidArgumentError("the validation DataLoader has no batch (drop_last with fewer rows than "
                                       "its batch_size?)")
        _check_passes(validation_data, "validation_data", epochs)
        return validation_data
    if not isinstance(validation_data, (list, tuple)) or len(validation_data) != 2:
        raise InvalidArgumentError(f"validation_data must be (x_val, y_val), a list of (x, y) batches or a "
                                   f"DataLoader, got {_describe(validation_data)}")
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
    """(y_true, outputs) over arrays or a loader, for metrics and plots. Dense targets of shape
    (n,) for a model of one output, which a step takes as the output's (n, 1) (the native target
    rule), come in that shape: a metric function would broadcast (n,) against the outputs' (n, 1)
    into an (n, n) table."""
    if isinstance(source, tuple):
        y_true, outputs = source[1], engine.predict(source[0])
    else:
        ys, outs = [], []
        for xb, yb in source:
            ys.append(_as_target(engine, yb))
            outs.append(engine.predict(_batch_inputs(engine, xb)))
        y_true, outputs = np.concatenate(ys), np.concatenate(outs)
    if (engine.loss.target == "dense" and getattr(y_true, "ndim", 0) == 1 and outputs.ndim > 1
            and int(np.prod(outputs.shape[1:])) == 1 and len(y_true) == len(outputs)):
        y_true = y_true.reshape(outputs.shape)
    return y_true, outputs
