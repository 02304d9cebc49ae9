"""The Engine: a model, its loss and optimizer, built once on a device. `step` is one native call
(forward, loss, backward, update); `predict` and `evaluate` run in eval mode, one native call per
batch. Parameters move in and out in PyTorch layouts. The engine owns its native device and
graph; `close()` (or leaving a `with` block) frees them."""

import math
import time

import numpy as np

from . import _native, _sources, losses as _losses, optim as _optim
from .optim.lbfgs import LBFGSDriver
from ._checks import choice, warn_user
from .errors import DTypeError, InvalidArgumentError, NonFiniteError, ShapeError, StateError
from ._optim_state import OptimizerState
from .model import Model

__all__ = ["Engine", "backends"]

_BACKENDS = None

_MAX_THREADS = _native.MAX_THREADS  # the most worker threads an engine's pool runs (mpscy.h)


def backends():
    """Backends built into this mpscy whose device is present, in `device="auto"` order."""
    global _BACKENDS
    if _BACKENDS is None:
        found = []
        for name in ("cuda", "metal", "cpu"):
            try:
                _native.Device(name)
            except Exception:
                continue
            found.append(name)
        _BACKENDS = found
    return list(_BACKENDS)


def _resolve_device(device):
    if device is None or (isinstance(device, str) and device == "auto"):
        return backends()[0]
    if not isinstance(device, str) or device not in ("cpu", "cuda", "metal"):
        raise InvalidArgumentError(f"unknown device {device!r}; choose 'auto', 'cpu', 'cuda' or 'metal'")
    return device


class _Text(str):
    """A string that shows itself as text in a REPL."""

    def __repr__(self):
        return str(self)


def _rows(x, n_inputs, what="x"):
    """Row count of x (an array, or a list of arrays for multi-input models)."""
    arrays = x if n_inputs > 1 and isinstance(x, (list, tuple)) else [x]
    shapes = []
    for a in arrays:
        shape = getattr(a, "shape", None)
        if shape is None or not isinstance(shape, tuple) or not shape:
            got = "a 0-d array (a single value)" if isinstance(shape, tuple) else type(a).__name__
            raise DTypeError(f"{what} must be a numpy array with a batch dimension, got {got}")
        shapes.append(shape[0])
    if len(set(shapes)) != 1:
        raise ShapeError(f"the inputs of {what} have different row counts: {shapes}")
    return shapes[0]


def _keras_eval_args(batch_size, verbose):
    """predict's and evaluate's Keras arguments: checked, changing nothing (see predict)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if verbose not in (0, 1, 2, "auto", True, False):
        raise InvalidArgumentError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")


def _clip_arg(value, name):
    """None, or a positive finite float: a clipping threshold."""
    if value is None:
        return None
    try:
        v = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        v = None
    if v is None or not 0.0 < v < math.inf:
        raise InvalidArgumentError(f"{name} must be None or a positive finite number, got {value!r}")
    return v


def _rows_slice(x, n_inputs, i, j):
    if n_inputs > 1 and isinstance(x, (list, tuple)):
        return [a[i:j] for a in x]
    return x[i:j]


class Engine(OptimizerState):
    """Trains `model` with one native call per step.

    Args:
        model: a `Sequential` or `Model`.
        loss: a name ("sparse_cross_entropy", "mse", ...) or a `mpscy.losses` instance.
        optimizer: a `mpscy.optim` instance (default Adam(lr=1e-3)).
        batch_size: the largest batch a step takes; memory is planned for it once.
        device: "auto" (cuda, then metal, then cpu), "cpu", "cuda" or "metal".
        seed: seeds parameter initialization (PyTorch's defaults) and dropout masks.
        clip_grad_norm, clip_grad_value: gradient clipping inside the native step.
        precision: "fp32" (default) or "tf32" (TensorFloat-32 matrix products on cuda).
        threads: the cpu backend's worker threads for this engine (0, the default: one per
            core, at most 64); the other backends ignore it.
        input_gradients: also compute d(loss)/d(inputs), returned by `gradients()`.

    Example::

        engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(1e-3),
                              batch_size=32, device="cpu", seed=0)
        r = engine.step(x, y)    # StepResult(loss, accuracy, batch_size, step_time_ns, applied, grad_norm)
    """

    def __init__(self, model, loss="sparse_cross_entropy", optimizer=None, batch_size=32,
                 device="auto", seed=0, clip_grad_norm=None, clip_grad_value=None,
                 precision="fp32", threads=0, input_gradients=False):
        self._graph = None
        if not isinstance(model, Model):
            raise InvalidArgumentError(f"model must be an mpscy Sequential or Model, got {type(model).__name__}")
        # the native descriptor holds batch_size and threads as int32, the seed as uint64
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size < 2**31:
            raise InvalidArgumentError(f"batch_size must be a positive integer below 2**31, got {batch_size!r}")
        choice(precision, ("fp32", "tf32"), "precision")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise InvalidArgumentError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 0 <= threads <= _MAX_THREADS:
            raise InvalidArgumentError(f"threads must be an integer in [0, {_MAX_THREADS}] (0: the device's default), "
                                       f"got {threads!r}")
        optimizer = _optim.Adam() if optimizer is None else optimizer
        if isinstance(optimizer, str):  # Keras's optimizer="adam": torch's defaults
            optimizer = _optim.get(optimizer)
        if not isinstance(optimizer, _optim.Optimizer):
            raise InvalidArgumentError(f"optimizer must be an mpscy.optim optimizer, got {type(optimizer).__name__}")
        clip_grad_norm = _clip_arg(clip_grad_norm, "clip_grad_norm")
        clip_grad_value = _clip_arg(clip_grad_value, "clip_grad_value")
        self.model = model
        self.loss = _losses.get(loss)
        self.optimizer = optimizer
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.device = _resolve_device(device)

        optim_spec = dict(optimizer.spec())
        optim_spec["clip_grad_norm"] = float(clip_grad_norm or 0.0)
        optim_spec["clip_grad_value"] = float(clip_grad_value or 0.0)
        spec = {"output": model.output, "batch": self.batch_size, "target": self.loss.target,
                "loss": self.loss.spec(model.output_shape), "optim": optim_spec,
                "precision": precision, "threads": int(threads), "seed": self.seed,
                "input_grad": bool(input_gradients)}
        mismatch = _losses.output_mismatch(self.loss, model)  # once the loss took the output's shape
        if mismatch and getattr(self.loss, "_keras_name", None):
            # the name says Keras, whose loss of that name takes probabilities (from_logits=False):
            # a Softmax before it is what a Keras model has, and here would be applied twice
            named = mismatch.replace(f"loss {self.loss.kind} ",  # the name the caller gave, first
                                     f"loss {self.loss._keras_name!r} (mpscy's {self.loss.kind}) ", 1)
            raise InvalidArgumentError(f"{named}. Keras's {self.loss._keras_name!r} takes probabilities by "
                                       f"default; mpscy's, as torch's CrossEntropyLoss, takes logits (Keras's "
                                       f"from_logits=True)")
        if mismatch:
            warn_user(mismatch)
        self.input_gradients = bool(input_gradients)
        self._threads = int(threads)
        self._device = _native.Device(self.device)
        self._graph = _native.Graph(self._device, model.native_layers(), spec)
        self._tensors = self._graph.tensors()
        self._index = {t[0]: i for i, t in enumerate(self._tensors)}
        # a frozen layer's parameters (Layer.trainable) have no ".grad" tensor and no optimizer state
        self._frozen = frozenset(t[0] for t in self._tensors if t[1] == "param" and t[0] + ".grad" not in self._index)
        # each layer with parameters and its trainable as built (Layer.trainable warns on a change)
        owners = {t[0].rsplit(".", 1)[0] for t in self._tensors if t[1] == "param"}
        self._trainable_flags = {id(n.layer): (n.name, n.layer.trainable) for n in model.nodes
                                 if n.layer is not None and n.name in owners}
        for n in model.nodes:
            if n.layer is not None and n.name in owners:
                n.layer._built_into(self)
        if self._frozen and all(t[0] in self._frozen for t in self._tensors if t[1] == "param"):
            warn_user("every layer with parameters is frozen (trainable=False): steps compute the loss "
                      "and update BatchNorm statistics, but no parameter")
        self._n_inputs = len(model.input_shapes)
        self._batch_stats = model.batch_statistics_nodes()
        if self._batch_stats:
            self._graph.set_min_train_rows(2, f"BatchNorm layer {self._batch_stats[0]!r} needs more than 1 value "
                                              "per channel in train mode: pass at least 2 rows")
        self._lbfgs = LBFGSDriver(optimizer) if isinstance(optimizer, _optim.LBFGS) else None
        self.set_parameters(model.init_parameters(self.seed))

    # ---------------------------------------------------------------- lifecycle
    def _g(self):
        g = self._graph
        if g is None:
            raise StateError("this engine is closed")
        return g

    def close(self):
        """Frees the native graph and device. Further calls raise StateError."""
        if self._graph is not None:
            self._graph._settle_owed()  # the last StepResult's grad_norm, if still to come (cuda)
        self._graph = None
        self._device = None

    @property
    def closed(self):
        """Whether close() was called (every further call raises StateError)."""
        return self._graph is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        g = getattr(self, "_graph", None)
        if g is not None:
            g._settle_owed()
        self._graph = None

    def _not_copyable(self, *args):
        raise TypeError("an Engine holds native device memory and cannot be pickled or copied: save it with "
                        "engine.save(path) and rebuild it with mpscy.load(path)")

    __reduce__ = __reduce_ex__ = __copy__ = __deepcopy__ = _not_copyable

    # ---------------------------------------------------------------- training
    def step(self, x, y):
        """One training step: forward, loss, backward and update in one native call.

        x: float32 (n, *input_shape) with 1 <= n <= batch_size (a list for multi-input models);
        y: int32/int64 labels (n,) for sparse losses ((n, d1, ...) over a (C, d1, ...) output), else
        float32 shaped like the output.
        Returns StepResult(loss, accuracy, batch_size, step_time_ns, applied, grad_norm).
        Raises NonFiniteError, with nothing updated, when the loss or a gradient is not finite.

        With optim.LBFGS this is one torch.optim.LBFGS.step on (x, y): several native calls,
        one per loss evaluation; the result reports the loss and gradient norm at the start
        (what torch's step returns) and whether the parameters moved."""
        g = self._graph
        if g is None:
            raise StateError("this engine is closed")
        if self._lbfgs is not None:
            t0 = time.perf_counter_ns()
            loss, correct, rows, grad_norm, moved = self._lbfgs.step(g, x, y)
            return _native._make_result(loss, g.accuracy_of(correct, rows), rows,
                                        time.perf_counter_ns() - t0, moved, grad_norm)
        try:
            return g.train_step(x, y)
        except NonFiniteError as e:
            raise self._weightless(e, y) from None

    def predict(self, x, *, batch_size=None, verbose=0):
        """Eval-mode outputs for any number of rows, float32 (n, *output_shape): the model's own
        outputs (logits for a model ending in Dense under a cross-entropy loss, as torch's). Float
        inputs of another precision are converted to float32, as fit converts them. batch_size and
        verbose are Keras's, taken so that its calls run: rows always go through in the engine's
        built batch size (eval-mode outputs do not depend on it), and nothing is printed."""
        _keras_eval_args(batch_size, verbose)
        g = self._g()
        if _sources._is_loader(x):
            raise DTypeError(f"x must be a numpy array with a batch dimension, got {type(x).__name__} (predict takes "
                             "arrays, not a loader's batches: np.concatenate([engine.predict(xb) for xb, _ in loader]))")
        x = _sources._converted_inputs(x, self._n_inputs)  # as fit converts it
        n = _rows(x, self._n_inputs)
        self._check_layout(g, x)
        out = np.empty((n,) + tuple(self.model.output_shape), dtype=np.float32)
        for i in range(0, n, self.batch_size):
            g.predict_batch(_rows_slice(x, self._n_inputs, i, i + self.batch_size), out, i)
        return out

    def evaluate(self, x, y=None, *, batch_size=None, verbose=0):
        """Eval-mode mean loss and accuracy over any number of rows: dict(loss=, accuracy=).
        batch_size and verbose are taken as predict takes them.
        The loss is the mean over all rows, whatever the batch size (under class weights with
        integer labels, torch's weighted mean over all of them: sum w l / sum w).
        x may also be a DataLoader (or another re-iterable) of (x, y) batches, y then None; the
        means are over its rows, as fit's validation over a loader."""
        _keras_eval_args(batch_size, verbose)
        x = _sources._batches_of(x, y, self)
        if _sources._is_loader(x):
            if y is not None:
                raise InvalidArgumentError("pass y inside the DataLoader, not separately")
            self._g()
            return _sources._evaluate(self, x, "batch", "the DataLoader")
        if y is None:
            raise InvalidArgumentError("evaluate needs y, or x a DataLoader of (x, y) batches")
        return self._eval_arrays(x, y)[0]

    def _eval_arrays(self, x, y):
        """evaluate over arrays: (its dict, the labels that counted under the loss's ignore_index as
        the batches' staging counted them, or -1 without one)."""
        g = self._g()
        x, y = _sources._converted_inputs(x, self._n_inputs), _sources._as_target(self, y)  # as fit converts them
        n = _rows(x, self._n_inputs)
        self._check_layout(g, x)
        ny = _rows(y, 1, "y")
        if n == 0:
            raise ShapeError("x is an empty batch (0 rows)")
        if ny != n:
            raise ShapeError(f"y has {ny} rows for {n} rows of x")
        g.check_target(y, "y", n)
        total, weight, correct, counted = 0.0, 0.0, 0, 0
        for i in range(0, n, self.batch_size):
            loss, c, rows = g.eval_batch(_rows_slice(x, self._n_inputs, i, i + self.batch_size),
                                         y[i:i + self.batch_size], i)
            k = g.counted   # this batch's labels that count (ignore_index), as its staging counted them
            s, w = self._mean_share(loss, y[i:i + self.batch_size], rows,
                                    lambda: _rows_slice(x, self._n_inputs, i, i + self.batch_size), k)
            total += s
            weight += w
            correct += c
            counted = -1 if k < 0 else counted + k
        return ({"loss": total / weight if weight > 0 else float("nan"),
                 "accuracy": g.accuracy_of(correct, n, counted)}, counted)

    def _ignored(self, y):
        """Under the loss's ignore_index: the mask of y's labels that count, else None."""
        ign = getattr(self.loss, "ignore_index", None)
        if ign is None or self.loss.target != "index":
            return None
        return np.asarray(y) != ign

    def _check_layout(self, g, x):
        """x's dtype, shape and contiguity as a whole array (each batch's call checks its values),
        so that an error names the caller's array, not a batch's slice of it."""
        xs = list(x) if self._n_inputs > 1 and isinstance(x, (list, tuple)) else [x]
        if len(xs) == self._n_inputs:  # else each batch's call says how many inputs to pass
            for k, a in enumerate(xs):
                g.check_input(a, k, "x" if len(xs) == 1 else f"x[{k}]", False)

    def gradients(self, x, y):
        """Train-mode gradients of the mean loss on one batch, without updating anything:
        {"<param>": array, ...} plus {"input": d loss / d x} (a list for several inputs) when
        the engine was built with input_gradients=True. Also returns the loss under "loss"."""
        g = self._g()
        try:
            loss, _, rows = g.grad_batch(x, y)
        except NonFiniteError as e:
            raise self._weightless(e, y) from None
        out = {"loss": loss}
        for i, (name, role, dtype, shape, _) in enumerate(self._tensors):
            if role == "grad":
                out[name[:-len(".grad")]] = g.read_tensor(i, dtype, shape)
        if self.input_gradients:
            grads = [g.read_input_grad(k, rows, tuple(s)) for k, s in enumerate(self.model.input_shapes)]
            out["input"] = grads[0] if len(grads) == 1 else grads
        return out

    # ---------------------------------------------------------------- per-step values
    @property
    def learning_rate(self):
        """The learning rate the next step uses; setting it takes effect without a rebuild."""
        return self._g().lr

    @learning_rate.setter
    def learning_rate(self, value):
        self._g().lr = _optim._nonneg(value, "learning rate")

    def _has(self, name):
        # as torch's param_groups, which hold only the optimizer's own options (Adam's has no
        # 'momentum'): the native step reads momentum and betas only for optimizers that have them
        return hasattr(self.optimizer, name)

    def _require(self, name):
        if not self._has(name):
            raise InvalidArgumentError(f"{type(self.optimizer).__name__} has no {name}; no step would use it")

    @property
    def momentum(self):
        """The momentum the next step uses (SGD, RMSprop; None for other optimizers); a
        per-step value like the learning rate (OneCycleLR cycles it). Setting it on an
        optimizer without momentum raises InvalidArgumentError."""
        g = self._g()
        return g.momentum if self._has("momentum") else None

    @momentum.setter
    def momentum(self, value):
        g = self._g()
        value = _optim._nonneg(value, "momentum")
        self._require("momentum")
        g.momentum = value

    @property
    def betas(self):
        """(beta1, beta2) the next step uses (Adam, AdamW, NAdam; None for other optimizers);
        per-step values. Setting them on an optimizer without betas raises
        InvalidArgumentError."""
        g = self._g()
        return (g.beta1, g.beta2) if self._has("betas") else None

    @betas.setter
    def betas(self, value):
        g = self._g()
        b1, b2 = _optim._betas(value)
        self._require("betas")
        g.beta1, g.beta2 = b1, b2

    @property
    def weight_decay(self):
        """The weight decay the next step uses; a per-step value."""
        return self._g().weight_decay

    @weight_decay.setter
    def weight_decay(self, value):
        self._g().weight_decay = _optim._nonneg(value, "weight_decay")

    # ---------------------------------------------------------------- parameters
    def get_parameters(self):
        """{name: float32 array} copies of every parameter and buffer, PyTorch layouts."""
        g = self._g()
        return {name: g.read_tensor(i, dtype, shape)
                for i, (name, role, dtype, shape, _) in enumerate(self._tensors) if role in ("param", "buffer")}

    def set_parameters(self, params, strict=True):
        """Writes parameters (and buffers) by name. Every array is checked first; nothing is
        written unless all are valid. With strict=True every parameter must be given. A torch
        state_dict's "<bn>.num_batches_tracked" of a BatchNorm here (torch's step counter, which
        mpscy's BatchNorm, always with a momentum, has no use for) is passed over, so
        set_parameters(torch_model.state_dict()) takes a model whose names match."""
        g = self._g()
        if not isinstance(params, dict):
            raise DTypeError(f"parameters must be a dict of name -> array, got {type(params).__name__}")
        known = {t[0]: (i, t) for i, t in enumerate(self._tensors) if t[1] in ("param", "buffer")}
        params = {k: v for k, v in params.items()
                  if not (isinstance(k, str) and k.endswith(".num_batches_tracked")
                          and k[:-len("num_batches_tracked")] + "running_mean" in known)}
        unknown = sorted(set(params) - set(known), key=repr)  # names of any type, told apart
        if unknown:
            raise InvalidArgumentError(f"unknown parameter name(s): {unknown}")
        staged = []
        for name, value in params.items():  # what was given, first: its own fault is the more specific
            i, (_, _, dtype, shape, _) = known[name]
            arr = self._numeric(f"parameter {name!r}", value, np.float32)
            if arr.shape != tuple(shape):
                raise ShapeError(f"parameter {name!r} has shape {tuple(shape)}, got {arr.shape}")
            arr = np.ascontiguousarray(arr)
            if not np.isfinite(arr).all():
                raise InvalidArgumentError(f"parameter {name!r} contains NaN or Inf")
            if known[name][1][1] == "buffer" and name.endswith(".running_var") and (arr < 0).any():
                raise InvalidArgumentError(f"parameter {name!r} (a BatchNorm's running variance) holds a negative "
                                           f"value, {float(arr.min())!r}: prediction would take its square root")
            staged.append((i, arr))
        if strict:
            missing = sorted(set(known) - set(params))
            if missing:
                raise InvalidArgumentError(f"missing parameter(s): {missing} (pass strict=False for a subset)")
        for i, arr in staged:
            g.write_tensor(i, arr)

    def _mean_share(self, loss, y, rows, x_of, counted=-1):
        """(sum, weight) of one batch's mean loss in a mean over several batches: loss * its
        weight (_batch_weight), or where every label weighs 0 (the batch's mean is 0/0) label
        smoothing's terms alone, of the rows x_of() gives, with weight 0."""
        w = self._batch_weight(y, rows, counted)
        return (loss * w, w) if w > 0 else (self._smoothing_sum(x_of(), y), 0.0)

    def _batch_weight(self, y, rows, counted=-1):
        """A batch's share of a mean over several batches: its rows (under ignore_index its labels
        that count, `counted`, as its staging counted them), or under class weights with integer
        labels those labels' summed weights (the divisor of its weighted mean, as torch's mean over
        the whole set needs)."""
        w = getattr(self.loss, "weight", None)
        if w is None or self.loss.target != "index":
            return rows if counted < 0 else counted
        labels = np.asarray(y, np.int64)
        keep = self._ignored(y)
        if keep is not None:   # torch's ignore_index: those labels are not in the divisor
            labels = labels[keep]
        return float(np.asarray(w, np.float32).astype(np.float64)[labels].sum())

    def _smoothing_sum(self, x, y):
        """The summed loss terms of rows whose labels all weigh 0, which only label smoothing
        gives (eps / C sum_c w_c (-log p_c) a row, torch's numerator): a batch of them has the
        mean 0/0 or x/0, so a mean over several batches adds this sum instead."""
        eps = getattr(self.loss, "label_smoothing", 0.0)
        if not eps:
            return 0.0
        z = self.predict(x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        w = getattr(self.loss, "weight", None)
        w = np.ones(z.shape[1]) if w is None else np.asarray(w, np.float32).astype(np.float64)
        w = w.reshape((1, -1) + (1,) * (z.ndim - 2))   # along the classes, axis 1 (of (n, C, d1, ...) too)
        terms = (logp * w).sum(axis=1)                  # (n, d1, ...): a position's
        keep = self._ignored(y)
        if keep is not None:                            # ignored labels add nothing
            terms = terms * keep.reshape(terms.shape)
        return float(eps / z.shape[1] * -terms.sum())

    def _weightless(self, error, y):
        """The NonFiniteError of a step, saying so when every label of the batch weighs 0."""
        try:
            keep = self._ignored(y)
            if keep is not None and not keep.any():
                return NonFiniteError(f"{error}: every label of this batch is the loss's ignore_index "
                                      f"{self.loss.ignore_index}, so its mean is 0/0 (NaN, as torch's)")
            zero = self.loss.weight is not None and self.loss.target == "index" and self._batch_weight(y, 1) == 0
        except (AttributeError, TypeError, ValueError, IndexError):
            zero = False
        if not zero:
            return error
        which = "every label of this batch" if keep is None else "every label of this batch not ignore_index"
        return NonFiniteError(f"{error}: {which} has class weight 0, so its weighted mean is 0/0 "
                              "(NaN, as torch's); give such a class a small weight, or batches that each hold a "
                              "weighted label")

    def _frozen_layers(self):
        """ids of the layers with parameters this engine was built with trainable=False."""
        return {k for k, (_, was) in self._trainable_flags.items() if not was}

    def _built_trainable(self, layer):
        """The layer's trainable when this open engine was built with it, else None."""
        entry = self._trainable_flags.get(id(layer)) if self._graph is not None else None
        return None if entry is None else entry[1]

    def _layer_name(self, layer):
        return self._trainable_flags[id(layer)][0]

    # ---------------------------------------------------------------- introspection
    def stats(self):
        """Native counters of this engine's device: allocations, frees, bytes_in_use, peak_bytes;
        steps (native step calls of every kind: training steps, and evaluate's and gradients'
        batches too; `iterations` counts training steps alone), predicts (predict's batches) and
        calls (every ABI call but this one)."""
        self._g()
        return self._device.stats()

    def device_info(self):
        """The device: backend, name, memory, and `threads`: on cpu this engine's worker threads
        (Engine(threads=N), else one per core, at most 64), on a GPU its multiprocessors."""
        self._g()
        info = self._device.info()
        if self.device == "cpu" and self._threads:
            info["threads"] = self._threads
        return info

    def synchronize(self):
        """Waits until the device has finished this engine's last step, like
        ``torch.cuda.synchronize()``, and raises what that work failed with. On cuda a training
        step returns as soon as its loss and its decision (update applied or not) are known,
        while the optimizer's update may still run; every other call (parameters, checkpoints,
        predict, evaluation) waits for it first, so this matters only when timing steps or
        handing the device to other code. On cpu and metal it returns at once."""
        self._g()
        self._device.synchronize()

    def summary(self, print_fn=None):
        """A Keras-like table: layer, type, output shape, parameter count, and totals. Returns
        it as text (shown as a table in a REPL); with print_fn (e.g. print, as Keras's
        summary) the table is passed to it instead and None is returned."""
        rows = self.model.summary_rows()
        head = ("Layer", "Type", "Output shape", "Params")
        frozen_layers = {name.rsplit(".", 1)[0] for name in self._frozen}
        cells = [(n, t + (" (frozen)" if n in frozen_layers else ""),
                  "(" + ", ".join("None" if d is None else str(d) for d in s) + ")", f"{c:,}")
                 for n, t, s, c in rows]
        links = self.model.connections()  # a model that is not a plain chain: what feeds each layer
        if links is not None:
            head += ("Connected to",)
            cells = [c + (", ".join(ins),) for c, ins in zip(cells, links)]
        widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(head)]
        fmt = ["{:<%d}" % w for w in widths]
        fmt[3] = "{:>%d}" % widths[3]  # the count right-aligned
        line = "  ".join(fmt)
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        shapes = self.model.parameter_shapes()
        params = sum(int(np.prod(t[3])) for t in self._tensors if t[1] == "param")
        frozen = sum(int(np.prod(t[3])) for t in self._tensors if t[0] in self._frozen)
        total = sum(int(np.prod(s)) for s in shapes.values())
        counts = f"trainable {params - frozen:,}, " + (f"frozen {frozen:,}, " if frozen else "")
        out = [rule, line.format(*head).rstrip(), rule, *(line.format(*r).rstrip() for r in cells), rule,
               f"Total parameters: {total:,} ({counts}buffers {total - params:,})",
               f"Loss: {self.loss!r}   Optimizer: {self.optimizer!r}   Device: {self.device}   "
               f"Batch size: {self.batch_size}", rule]
        text = _Text("\n".join(out))
        if print_fn is None:
            return text
        print_fn(text)
        return None

    # ---------------------------------------------------------------- workflow: fit, schedules, checkpoints
    # Thin entry points; the work is in training.py and checkpoint.py.
    epoch = 0              # epochs completed by fit (restored by mpscy.load)
    stop_training = False  # a callback sets it to end fit after the current batch
    history = None         # the History of the last fit
    _schedule = _schedule_per = _schedule_monitor = None

    @property
    def iterations(self):
        """Native training evaluations so far: the dropout generator's counter, which advances
        once per step (once per loss evaluation for L-BFGS) and is saved in checkpoints."""
        return int(self._g().counter)

    def fit(self, x=None, y=None, epochs=1, batch_size=None, validation_data=None, validation_split=0.0,
            shuffle=True, callbacks=(), verbose="auto", metrics=(), initial_epoch=0, plot_to=None, **keras):
        """Trains for epochs initial_epoch..epochs-1 (Keras conventions) and returns a History.

        x, y: arrays (float inputs are converted to float32 once), or x a `mpscy.data.DataLoader`
        yielding (x, y) batches. batch_size defaults to (and may not exceed) the engine's.
        Arrays are shuffled each epoch in an order seeded by (engine seed, engine.epoch), the
        count of epochs this engine has trained (restored from checkpoints).
        validation_data: (x_val, y_val), a DataLoader, or a list of (x, y) batches (what evaluate
        takes); validation_split: the last fraction of the arrays. verbose: 0 silent, 1 progress
        bar (tqdm when installed), 2 a line per epoch.
        metrics: names or callables from `mpscy.metrics.get`, computed at each epoch's end on
        the validation data ("val_<name>") or, without it, on the training data ("<name>").
        History.history holds per-epoch loss, accuracy, val_loss, val_accuracy, metrics and lr.
        engine.history becomes this History once a step has been applied: a fit that fails before
        its first step leaves the previous one (and stop_training) as they were; one that fails
        later leaves its partial History, as Keras does. Every option and the data are checked
        before the first step.
        plot_to: a folder that receives the training curves (and, for classifiers, confusion
        matrix, ROC and PR curves) as PNG files at the end (needs matplotlib).
        Keras's other fit arguments (class_weight, sample_weight, steps_per_epoch, ...) are
        refused with a TypeError that says what takes their place here."""
        from . import training
        if keras:
            raise TypeError(training.keras_fit_argument(keras))
        return training.fit(self, x, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                            validation_split=validation_split, shuffle=shuffle, callbacks=callbacks,
                            verbose=verbose, metrics=metrics, initial_epoch=initial_epoch, plot_to=plot_to)

    def set_schedule(self, schedule, per="epoch", monitor="val_loss"):
        """Attaches a learning-rate schedule (built on this engine) that fit steps after every
        batch (per="step") or epoch (per="epoch"); saved and restored with checkpoints.
        None detaches it."""
        from . import _attached
        _attached.set_schedule(self, schedule, per, monitor)

    @property
    def schedule(self):
        """The schedule attached with set_schedule, or None."""
        return self._schedule

    def save(self, path, meta=None):
        """Writes a checkpoint (safetensors): model description, parameters and buffers,
        optimizer state, generator state, counters, the attached schedule and `meta` (a
        JSON-serializable dict). `mpscy.load(path)` rebuilds the engine."""
        from . import checkpoint
        checkpoint.save(self, path, meta=meta)

    def __repr__(self):
        state = "closed" if self.closed else self.device
        return f"Engine({type(self.model).__name__}, loss={self.loss!r}, optimizer={self.optimizer!r}, {state})"
