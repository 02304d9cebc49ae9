"""Losses, as torch.nn.functional defines them, always with reduction="mean" (the mean over all
elements; over rows for the cross-entropies, or over every position's row for one over (C, d1, ...)
outputs, or over the labels' weights under class weights). Each is computed natively together with its
gradient; these classes carry the options and say which targets and accuracy they use.
Pass an instance or its name: ``Engine(model, loss="mse")`` or ``loss=losses.Huber(delta=0.5)``."""

import numpy as np

from ._checks import integer, number
from .errors import InvalidArgumentError, ShapeError

__all__ = ["Loss", "SparseCrossEntropy", "CrossEntropy", "BinaryCrossEntropy", "BCEWithLogits",
           "CategoricalCrossEntropy", "MSE", "MAE", "Huber", "get"]


class Loss:
    """Base class. `target` is "index" (integer labels, shape (n,), or (n, d1, ...) for a cross
    entropy over (C, d1, ...) outputs) or "dense" (float32 shaped like the output)."""

    kind = None
    target = "dense"

    def spec(self, output_shape):
        """Native loss descriptor for a model whose per-sample output shape is given; raises
        ShapeError or InvalidArgumentError when this loss cannot apply to that output."""
        self.check(tuple(output_shape))
        return {"kind": self.kind, "accuracy": self.accuracy(output_shape)}

    def check(self, output_shape):
        """Raises when the loss does not fit a per-sample output shape (nothing by default)."""

    def accuracy(self, output_shape):
        """How a step counts correct predictions for this output: "argmax", "threshold" or
        "none" (the StepResult's accuracy is then None)."""
        return "none"

    def config(self):
        """Constructor arguments, for repr and checkpoints."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


def _smoothing(value):
    v = number(value, "label_smoothing")
    if not 0.0 <= v <= 1.0:
        raise InvalidArgumentError(f"label_smoothing must be in [0, 1], got {value!r}")
    return v


def _weights(value, name, least, what, scalar=False):
    """A 1-D sequence of at least `least` numbers >= 0 that float32 holds, as a tuple of floats
    (None stays); with `scalar`, a single number (a 0-d array or tensor too) is one of them."""
    if value is None:
        return None
    try:
        raw = np.asarray(value)
        if raw.dtype.kind not in "iuf":  # bools, strings, None and other objects are no weights
            raise TypeError
        arr = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a sequence of numbers ({what}), got {value!r}") from None
    if scalar and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size < least:
        raise InvalidArgumentError(f"{name} must be {what} (a 1-D sequence of {least} or more), got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise InvalidArgumentError(f"{name} must be finite and >= 0, got {arr.tolist()}")
    with np.errstate(over="ignore"):
        f32 = arr.astype(np.float32)  # the native loss reads float32
    if not np.isfinite(f32).all():
        raise InvalidArgumentError(f"{name} must fit float32 (at most {float(np.finfo(np.float32).max):.4g}), got "
                                   f"{arr.tolist()}")
    return tuple(float(v) for v in arr)


def _class_weight(value):
    """torch's `weight=`: one finite weight >= 0 per class, some above 0 in float32; or Keras's
    class_weight dict {class: weight}, which must name every class 0..C-1 (as Keras requires)."""
    if isinstance(value, dict):
        keys = list(value)
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in keys):
            raise InvalidArgumentError(f"weight as a dict maps class indices (integers) to weights, got keys {keys}")
        missing = sorted(set(range(max(keys) + 1 if keys else 0)) - {int(k) for k in keys})
        if not keys or min(keys) < 0 or missing or len(keys) < 2:   # 2 or more classes
            raise InvalidArgumentError(f"weight as a dict must give every class 0..C-1 (C >= 2) a weight (as "
                                       f"Keras's class_weight), got classes {sorted(int(k) for k in keys)}"
                                       + (f", without {missing}" if missing else ""))
        value = [value[k] for k in sorted(value, key=int)]
    w = _weights(value, "weight", 2, "one number per class")
    if w is not None and not (np.asarray(w, np.float32) > 0).any():
        raise InvalidArgumentError(f"weight must have a class weighted above 0 in float32, got {list(w)}")
    return w


class SparseCrossEntropy(Loss):
    """Softmax cross-entropy of logits (n, classes) against integer labels (n,): F.cross_entropy.
    Over an output (classes, d1, ...) (e.g. a segmentation head's (C, H, W)), torch's
    F.cross_entropy over (n, C, d1, ...): labels (n, d1, ...), a softmax over the classes at each
    position, the loss the mean over the batch's positions and the accuracy the fraction of
    positions whose largest logit is the label's.

    ignore_index: None (every label must be a class), or torch's ignore_index, an int: labels
    equal to it are left out (no loss, no gradient, not in the mean's divisor nor in the
    accuracy), e.g. -100 (torch's default) or 255 for a segmentation mask's void pixels; a batch
    whose labels are all left out has a NaN loss (torch's 0/0) and its step raises
    NonFiniteError (fit skips such a batch, warning).

    weight: None, or one weight >= 0 per class (torch's `weight=`, e.g. inverse class
    frequencies for imbalanced data; or a dict {class: weight} naming every class, as Keras's
    class_weight, though the mean differs from Keras's, below): each row's loss is scaled by its label's weight and the
    mean divides by the sum of the batch's label weights, as torch's; with label smoothing the
    smoothed terms are weighted by their classes too. A batch whose labels all weigh 0 has a NaN
    loss (torch's 0/0), and its step raises NonFiniteError. Accuracy stays unweighted."""

    kind = "sparse_cross_entropy"
    target = "index"

    def __init__(self, label_smoothing=0.0, weight=None, ignore_index=None):
        self.label_smoothing = _smoothing(label_smoothing)
        self.weight = _class_weight(weight)
        self.ignore_index = None
        if ignore_index is not None:
            v = integer(ignore_index, "ignore_index")
            if not -2**31 <= v < 2**31:
                raise InvalidArgumentError(f"ignore_index must fit int32 (the staged labels), got {ignore_index!r}")
            self.ignore_index = v

    def spec(self, output_shape):
        out = {**super().spec(output_shape), "label_smoothing": self.label_smoothing}
        if self.weight is not None:
            out["class_weight"] = list(self.weight)
        if self.ignore_index is not None:
            out["ignore_index"] = self.ignore_index
        return out

    def accuracy(self, output_shape):
        return "argmax"

    per_position = True   # (classes, d1, ...) outputs: a softmax over the classes at each position

    def check(self, output_shape):
        name = type(self).__name__
        if len(output_shape) != 1 and not self.per_position:
            raise ShapeError(f"{name} needs a (classes,) output per sample, got {output_shape}; add Flatten or Dense "
                             "before the loss, or for a softmax over the first dimension at each position "
                             "(segmentation) end the model on its logits under 'sparse_cross_entropy' (labels) or "
                             "'cross_entropy' (probabilities)")
        if len(output_shape) < 1:
            raise ShapeError(f"{name} needs a (classes,) or (classes, d1, ...) output per sample, got {output_shape}")
        if output_shape[0] < 2:
            if len(output_shape) > 1:
                raise InvalidArgumentError(
                    f"{name} over an output of shape {output_shape} takes its first dimension as the classes "
                    f"(torch's (n, C, d1, ...)), and {output_shape[0]} is fewer than 2; a channels-last output "
                    "(..., C) needs its classes moved first, and one channel of logits trains under BCEWithLogits")
            raise InvalidArgumentError(f"{name} needs at least 2 classes, got an output of shape {output_shape}; "
                                       "for a single-output binary head use BCEWithLogits (logits) or "
                                       "BinaryCrossEntropy (probabilities)")
        weight = self.weight
        if weight is not None and len(weight) != output_shape[0]:
            raise ShapeError(f"{name} has {len(weight)} class weights for an output of {output_shape[0]} classes")

    def config(self):
        out = {"label_smoothing": self.label_smoothing}
        if self.weight is not None:
            out["weight"] = list(self.weight)
        if self.ignore_index is not None:
            out["ignore_index"] = self.ignore_index
        return out


class CrossEntropy(SparseCrossEntropy):
    """Softmax cross-entropy of logits against class probabilities (n, classes), float32:
    F.cross_entropy with probability targets (smoothing mixes them with the uniform). Over an
    output (classes, d1, ...), targets shaped like it: the mean over the batch's positions.
    weight: as SparseCrossEntropy's, torch's `weight=` with probability targets: each class's
    term scaled by its weight, the mean over rows, or positions (torch's divisor for probability
    targets)."""

    kind = "cross_entropy"
    target = "dense"

    def __init__(self, label_smoothing=0.0, weight=None, ignore_index=None):
        if ignore_index is not None:
            raise InvalidArgumentError("ignore_index applies to integer labels (SparseCrossEntropy); probability "
                                       "targets have none to ignore (torch ignores it there too)")
        super().__init__(label_smoothing, weight)


class CategoricalCrossEntropy(SparseCrossEntropy):
    """Cross-entropy of probabilities (e.g. after Softmax) against one-hot float targets:
    -sum(t * log(clamp(p, 1e-7))), averaged over rows."""

    kind = "categorical_cross_entropy"
    target = "dense"
    per_position = False

    def __init__(self, label_smoothing=0.0):
        super().__init__(label_smoothing)


class BinaryCrossEntropy(Loss):
    """F.binary_cross_entropy on probabilities in [0, 1] (logs clamped at -100, as PyTorch).
    Accuracy thresholds the output at 0.5."""

    kind = "binary_cross_entropy"

    def accuracy(self, output_shape):
        return "threshold"

    def spec(self, output_shape):
        return {**super().spec(output_shape), "threshold": 0.5}


class BCEWithLogits(BinaryCrossEntropy):
    """F.binary_cross_entropy_with_logits. Accuracy thresholds the logit at 0.

    pos_weight: None, or torch's pos_weight: weights >= 0 of the positive term, one per element
    of the output's last axis (one per label of a multi-label head), or a single one for all
    (a number or one-element sequence); -[pw z log sigmoid(x) + (1 - z) log(1 - sigmoid(x))],
    averaged over all elements. pos_weight = negatives / positives balances an imbalanced label."""

    kind = "bce_with_logits"

    def __init__(self, pos_weight=None):
        self.pos_weight = _weights(pos_weight, "pos_weight", 1, "one number per element of the output's last axis, "
                                   "or one for all", scalar=True)

    def spec(self, output_shape):
        out = {**super().spec(output_shape), "threshold": 0.0}
        if self.pos_weight is not None:
            last = output_shape[-1] if len(output_shape) else 1
            out["pos_weight"] = list(self.pos_weight) * (last if len(self.pos_weight) == 1 else 1)
        return out

    def check(self, output_shape):
        pw = getattr(self, "pos_weight", None)
        last = output_shape[-1] if len(output_shape) else 1
        if pw is not None and len(pw) not in (1, last):
            raise ShapeError(f"BCEWithLogits has {len(pw)} pos_weight values for an output whose last axis has "
                             f"{last} elements (give {last}, or one for all)")

    def config(self):
        return {} if self.pos_weight is None else {"pos_weight": list(self.pos_weight)}


class MSE(Loss):
    """Mean squared error, F.mse_loss."""
    kind = "mse"


class MAE(Loss):
    """Mean absolute error, F.l1_loss."""
    kind = "mae"


class Huber(Loss):
    """F.huber_loss: 0.5 d^2 where |d| < delta, else delta (|d| - delta / 2)."""

    kind = "huber"

    def __init__(self, delta=1.0):
        self.delta = number(delta, "huber delta")
        if not self.delta > 0:
            raise InvalidArgumentError(f"huber delta must be > 0, got {delta!r}")

    def spec(self, output_shape):
        return {**super().spec(output_shape), "delta": self.delta}

    def config(self):
        return {"delta": self.delta}


_NAMES = {
    "sparse_cross_entropy": SparseCrossEntropy, "sparse_categorical_crossentropy": SparseCrossEntropy,
    "cross_entropy": CrossEntropy, "binary_cross_entropy": BinaryCrossEntropy, "bce": BinaryCrossEntropy,
    "binary_crossentropy": BinaryCrossEntropy,
    "bce_with_logits": BCEWithLogits, "categorical_cross_entropy": CategoricalCrossEntropy,
    "categorical_crossentropy": CategoricalCrossEntropy, "mse": MSE, "mean_squared_error": MSE,
    "mae": MAE, "mean_absolute_error": MAE, "huber": Huber,
    # PyTorch's names (F.<name> and nn.<Name> lowercased): SmoothL1Loss at its default beta=1 is
    # HuberLoss at delta=1, which Huber() is
    "mse_loss": MSE, "mseloss": MSE, "l1": MAE, "l1_loss": MAE, "l1loss": MAE, "huber_loss": Huber,
    "huberloss": Huber, "smooth_l1": Huber, "smooth_l1_loss": Huber, "smoothl1loss": Huber,
    "bceloss": BinaryCrossEntropy, "bcewithlogitsloss": BCEWithLogits,
    "binary_cross_entropy_with_logits": BCEWithLogits,
}


_KINDS = {cls.kind for cls in _NAMES.values()}


def get(loss):
    """A Loss instance from an instance, a class or a name. The base class Loss (and a
    subclass of it with no native `kind`) is refused: the loss is computed natively."""
    if isinstance(loss, Loss) or (isinstance(loss, type) and issubclass(loss, Loss)):
        if loss.kind not in _KINDS:
            name = loss.__name__ if isinstance(loss, type) else type(loss).__name__
            raise InvalidArgumentError(f"loss {name} has no native kind ({loss.kind!r}); choose one of the "
                                       f"mpscy.losses classes {sorted(c.__name__ for c in set(_NAMES.values()))} "
                                       "or a name")
        return loss if isinstance(loss, Loss) else loss()
    if isinstance(loss, str) and loss.lower() in _NAMES:
        made = _NAMES[loss.lower()]()
        if loss.lower() == "sparse_categorical_crossentropy":
            made._keras_name = loss.lower()  # Keras's takes probabilities: a Softmax output is refused (Engine)
        return made
    raise InvalidArgumentError(f"unknown loss {loss!r}; choose one of {sorted(set(_NAMES))} or a mpscy.losses class")


# The probability losses take a Sigmoid's, Hardsigmoid's or Softmax's output; the logit losses apply that
# squashing themselves. Layers that keep values within [0, 1] between such an output and the
# model's (shapes and pools; a Concatenate of such outputs) count as its output.
_PROBABILITIES = {"binary_cross_entropy": "Sigmoid", "categorical_cross_entropy": "Softmax"}
_LOGITS = {"sparse_cross_entropy": "softmax", "cross_entropy": "softmax", "bce_with_logits": "sigmoid"}
_KEEPS_RANGE = {"flatten", "maxpool2d", "avgpool2d", "globalavgpool2d", "upsample2d"}


def output_mismatch(loss, model):
    """A sentence saying why the model's output does not fit what `loss` takes, else None:
    a probability loss on an output that is not squashed into [0, 1] (torch's
    F.binary_cross_entropy raises on such values; here steps would train on them), or a logit
    loss on a Softmax's or Sigmoid's output (the squashing applied twice, as tf.keras warns)."""
    nodes = model.nodes

    def squashed(i):
        layer = nodes[i].layer
        if layer is None:
            return False
        if layer.kind in ("sigmoid", "softmax", "hardsigmoid"):
            return True
        if layer.kind in _KEEPS_RANGE or layer.kind == "concat":
            return all(squashed(j) for j in nodes[i].inputs)
        return False

    out = nodes[model.output]
    what = "an Input" if out.layer is None else f"{type(out.layer).__name__} {out.name!r}"
    if loss.kind in _PROBABILITIES and not squashed(model.output):
        last = _PROBABILITIES[loss.kind]
        other = "bce_with_logits" if loss.kind == "binary_cross_entropy" else "cross_entropy"
        return (f"loss {loss.kind} takes probabilities, but the model's output comes from {what}, which is "
                f"not squashed into [0, 1]: end the model with a {last}, or train on the logits with "
                f"{other!r}")
    i = model.output
    while nodes[i].layer is not None and nodes[i].layer.kind == "flatten":
        i = nodes[i].inputs[0]
    layer = nodes[i].layer
    if loss.kind in _LOGITS and layer is not None and layer.kind == _LOGITS[loss.kind]:
        name = type(layer).__name__
        other = "binary_cross_entropy" if loss.kind == "bce_with_logits" else "categorical_cross_entropy"
        fix = f"remove the {name}, or use {other!r}"
        if other == "categorical_cross_entropy" and len(model.output_shape) > 1:
            fix = f"remove the {name}: {other!r} takes (classes,) outputs only"   # not per position
        return (f"loss {loss.kind} takes logits and applies the {name.lower()} itself, but the model's output is "
                f"{name} {nodes[i].name!r}: it would be applied twice ({fix})")
    return None
