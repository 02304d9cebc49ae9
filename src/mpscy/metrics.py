"""Evaluation metrics on NumPy arrays, with scikit-learn's definitions and argument order
(`y_true` first): classification (accuracy, top-k, precision/recall/F1, confusion matrix,
ROC AUC, average precision and their curves) and regression (MAE, MSE, RMSE, R²). Pure NumPy,
float64 arithmetic. `get()` turns a name or callable into a metric that `Engine.fit(metrics=)`
evaluates on model outputs at the end of each epoch; nothing here touches the engine."""

import inspect
import numbers

import numpy as np

from ._checks import choice, host_array
from .errors import InvalidArgumentError, ShapeError

__all__ = [
    "accuracy", "top_k_accuracy", "precision", "recall", "f1", "precision_recall_f1",
    "confusion_matrix", "roc_curve", "roc_auc", "precision_recall_curve", "pr_auc",
    "mae", "mse", "rmse", "r2", "Metric", "get", "classify_outputs",
]

_AVERAGES = ("binary", "macro", "micro", "weighted", None)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


# ----------------------------------------------------------------------------- helpers
def _finite(a, what):
    """a, refused by name where it holds NaN or Inf, as scikit-learn's "Input y_true contains
    NaN" (integer and string labels cannot hold either)."""
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
        row = int(np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))[0])
        raise InvalidArgumentError(f"{what} contains NaN or Inf at row {row}")
    return a


def _array(a, what, dtype=None):
    """np.asarray(a, dtype), or an mpscy error naming `what` (a ragged list, strings as numbers,
    complex values: numpy's ValueError or TypeError, or a silent complex result)."""
    try:
        out = np.asarray(a)
        if out.dtype.kind == "c":  # a cast to float64 would drop the imaginary part with a warning
            raise TypeError(f"complex values ({out.dtype})")
        return out if dtype is None else out.astype(dtype, copy=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} must be an array of {'numbers' if dtype else 'labels'}: {e}") from None


def _floats(a, what):
    return _array(a, what, np.float64)


def _vector(a, what):
    a = _array(a, what)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ShapeError(f"{what} must be 1-D (n,), got shape {a.shape}")
    if a.size == 0:
        raise ShapeError(f"{what} is empty")
    return _finite(a, what)


def _pair(y_true, y_pred, what="y_pred"):
    y_true = _vector(y_true, "y_true")
    y_pred = _vector(y_pred, what)
    if len(y_true) != len(y_pred):
        raise ShapeError(f"y_true has {len(y_true)} rows, {what} has {len(y_pred)}")
    return y_true, y_pred


def _labels_pair(y_true, y_pred):
    """Two label vectors of one kind, as scikit-learn's "mix of label input types" and "mix of
    binary and continuous targets": strings against numbers, or scores where labels go (a float
    that is not a whole number), are refused rather than counted as mismatches."""
    y_true, y_pred = _pair(y_true, y_pred)
    if (y_true.dtype.kind in "US") != (y_pred.dtype.kind in "US"):
        raise InvalidArgumentError(f"y_true and y_pred mix label types ({y_true.dtype} and {y_pred.dtype})")
    for a, what in ((y_true, "y_true"), (y_pred, "y_pred")):
        if a.dtype.kind == "f" and not np.all(a == np.round(a)):
            raise InvalidArgumentError(f"{what} holds values that are not whole numbers: classification metrics take "
                                       "labels (for scores or probabilities, take their argmax first)")
    return y_true, y_pred


def _scores_2d(y_true, scores):
    y_true = _vector(y_true, "y_true")
    scores = _floats(scores, "scores")
    if scores.ndim != 2 or len(scores) != len(y_true):
        raise ShapeError(f"scores must be shaped (n, classes) with n = {len(y_true)}, got {scores.shape}")
    return y_true, _finite(scores, "scores")


def _class_labels(y_true, n_classes):
    """Integer class indices in [0, n_classes) from labels (checked)."""
    if not np.issubdtype(y_true.dtype, np.integer):
        if np.issubdtype(y_true.dtype, np.floating) and np.all(y_true == np.round(y_true)):
            y_true = y_true.astype(np.int64)
        else:
            raise InvalidArgumentError("with a score matrix, y_true must hold integer class indices")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise InvalidArgumentError(f"class indices in y_true must lie in [0, {n_classes}), "
                                   f"got [{y_true.min()}, {y_true.max()}]")
    return y_true.astype(np.int64)


# ----------------------------------------------------------------------------- classification
def accuracy(y_true, y_pred):
    """Fraction of rows where the predicted label equals the true one (accuracy_score)."""
    y_true, y_pred = _labels_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def top_k_accuracy(y_true, scores, k=5):
    """Fraction of rows whose true class is among the k highest scores, k an integer >= 1
    (top_k_accuracy_score with labels 0..classes-1; among equal scores the higher class index
    ranks first, as there)."""
    y_true, scores = _scores_2d(y_true, scores)
    n_classes = scores.shape[1]
    y_true = _class_labels(y_true, n_classes)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InvalidArgumentError(f"k must be an integer >= 1, got {k!r}")
    k = int(k)
    if k >= n_classes:
        return 1.0
    order = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float(np.mean((order == y_true[:, None]).any(axis=1)))


def confusion_matrix(y_true, y_pred, labels=None):
    """Counts C[i, j] of rows with true label labels[i] and predicted labels[j]; labels default
    to the sorted union of both arrays (confusion_matrix)."""
    y_true, y_pred = _labels_pair(y_true, y_pred)
    given = labels is not None
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else _array(labels, "labels")
    if labels.ndim != 1 or labels.size == 0:
        raise InvalidArgumentError("labels must be a non-empty 1-D sequence")
    index = {v: i for i, v in enumerate(labels.tolist())}
    if len(index) != len(labels):
        raise InvalidArgumentError("labels contain duplicates")
    n = len(labels)
    ti = np.array([index.get(v, -1) for v in y_true.tolist()], dtype=np.int64)
    pi = np.array([index.get(v, -1) for v in y_pred.tolist()], dtype=np.int64)
    if given and len(ti) and not (ti >= 0).any():
        raise InvalidArgumentError(f"none of labels {labels.tolist()} is in y_true (as scikit-learn, at least one must be)")
    keep = (ti >= 0) & (pi >= 0)
    return np.bincount(ti[keep] * n + pi[keep], minlength=n * n).reshape(n, n).astype(np.int64)


def _prf_counts(y_true, y_pred, labels, average, pos_label):
    y_true, y_pred = _labels_pair(y_true, y_pred)
    choice(average, _AVERAGES, "average")
    present = np.unique(np.concatenate([y_true, y_pred]))
    strings = present.dtype.kind in "US"
    if average == "binary":
        if len(present) > 2:
            raise InvalidArgumentError(
                f"average='binary' needs at most two classes, found {len(present)}; "
                "choose average='macro', 'micro', 'weighted' or None")
        _check_pos_label(present, pos_label)
        wanted = [pos_label]  # with one class present, pos_label may be absent: its scores are 0/0
    elif labels is None:
        wanted = present.tolist()
    else:
        lab = _array(labels, "labels")
        if lab.ndim != 1 or lab.size == 0:
            raise InvalidArgumentError(f"labels must be a non-empty 1-D sequence, got shape {lab.shape}")
        if (lab.dtype.kind in "US") != strings:
            raise InvalidArgumentError(f"labels ({lab.dtype}) are not of the labels' type ({present.dtype})")
        wanted = lab.tolist()
    # the labels present, then those wanted that are not, each kept as the Python value it is
    # (a numpy array of both would cut strings to the shorter width, or cast 1.5 to 1)
    known = present.tolist()
    seen = set(known)
    cm_labels = known + [v for v in dict.fromkeys(wanted) if v not in seen]
    cm = confusion_matrix(y_true, y_pred, labels=np.array(cm_labels + [None], dtype=object)[:-1])
    pos = [cm_labels.index(v) for v in wanted]
    tp = np.diag(cm)[pos].astype(np.float64)
    fp = cm.sum(axis=0)[pos] - tp
    fn = cm.sum(axis=1)[pos] - tp
    return tp, fp, fn


def _divide(num, den, zero_division):
    if isinstance(zero_division, str) and zero_division == "warn":
        zero_division = 0.0  # scikit-learn's default: 0, with a warning
    if isinstance(zero_division, bool) or not isinstance(zero_division, numbers.Real) or not (
            zero_division in (0, 1) or np.isnan(zero_division)):
        raise InvalidArgumentError(f"zero_division must be 0, 1, np.nan or 'warn', got {zero_division!r}")
    out = np.full(np.shape(num), float(zero_division), dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def precision_recall_f1(y_true, y_pred, average="binary", pos_label=1, labels=None, zero_division=0.0):
    """(precision, recall, f1) as precision_recall_fscore_support; average is "binary" (the
    class pos_label), "macro", "micro", "weighted" (by true counts) or None (per class, in
    the order of `labels`, default the sorted labels present). A 0/0 ratio is zero_division."""
    tp, fp, fn = _prf_counts(y_true, y_pred, labels, average, pos_label)
    if average == "micro":
        tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
    p = _divide(tp, tp + fp, zero_division)
    r = _divide(tp, tp + fn, zero_division)
    f = _divide(2 * tp, 2 * tp + fp + fn, zero_division)
    if average is None:
        return p, r, f
    if average == "weighted":
        # no true sample of any label: _nan_average takes the plain mean, as scikit-learn's
        return tuple(_nan_average(v, tp + fn) for v in (p, r, f))
    return tuple(_nan_average(v, np.ones_like(v)) for v in (p, r, f))


def _nan_average(v, weights):
    """The weighted mean of v over its entries that are not NaN (zero_division=np.nan: those
    classes are left out of the average, as scikit-learn does); NaN when every entry is."""
    ok = ~np.isnan(v)
    if not ok.any():
        return float("nan")
    w = weights[ok]
    return float(np.average(v[ok], weights=w)) if w.sum() > 0 else float(np.mean(v[ok]))


def precision(y_true, y_pred, average="binary", pos_label=1, labels=None, zero_division=0.0):
    """tp / (tp + fp), averaged as `precision_recall_f1` says (precision_score)."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, labels, zero_division)[0]


def recall(y_true, y_pred, average="binary", pos_label=1, labels=None, zero_division=0.0):
    """tp / (tp + fn), averaged as `precision_recall_f1` says (recall_score)."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, labels, zero_division)[1]


def f1(y_true, y_pred, average="binary", pos_label=1, labels=None, zero_division=0.0):
    """2 tp / (2 tp + fp + fn), averaged as `precision_recall_f1` says (f1_score)."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, labels, zero_division)[2]


def _check_pos_label(present, pos_label):
    """As scikit-learn: where two labels are present, pos_label must be one of them."""
    if len(present) == 2 and pos_label not in present.tolist():
        raise InvalidArgumentError(f"pos_label={pos_label!r} is not one of the labels {present.tolist()}")


def _binary_targets(y_true, pos_label):
    """y_true == pos_label; without pos_label, y_true must be {0, 1} or {-1, 1} (or one class
    of those), as scikit-learn's curves: {-1, 0} or {1, 2} name no positive class."""
    y_true = _vector(y_true, "y_true")
    if pos_label is None:
        classes = np.unique(y_true)
        values = set(classes.tolist()) if classes.dtype.kind not in "OSU" else None
        if values is None or not (values <= {0, 1} or values <= {-1, 1}):
            raise InvalidArgumentError(f"y_true takes the values {classes.tolist()}; without pos_label it must be "
                                       "{0, 1} or {-1, 1}: pass pos_label")
        pos_label = 1
    return y_true == pos_label


def _greater_label(y_true):
    """Binary targets as roc_auc_score reads them: of the two labels, the greater is positive
    ({0, 1}, {-1, 1}, {1, 2}, ...)."""
    y_true = _vector(y_true, "y_true")
    classes = np.unique(y_true)
    if len(classes) > 2:
        raise InvalidArgumentError(f"y_true holds {len(classes)} classes {classes.tolist()}; binary scores need two")
    return y_true == classes[-1]


def _binary_curve(pos, scores):
    """Cumulative (fps, tps) at each distinct score, highest score first, and those scores."""
    scores = _vector(_floats(scores, "scores"), "scores")
    if len(scores) != len(pos):
        raise ShapeError(f"y_true has {len(pos)} rows, scores has {len(scores)}")
    order = np.argsort(scores, kind="mergesort")[::-1]
    s, t = scores[order], pos[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each run of equal scores
    tps = np.cumsum(t)[last]
    fps = (last + 1) - tps
    return fps, tps, s[last]


def roc_curve(y_true, scores, pos_label=None):
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf
    (roc_curve with drop_intermediate=False)."""
    pos = _binary_targets(y_true, pos_label)
    fps, tps, thr = _binary_curve(pos, scores)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def _auc_binary(pos, scores):
    if pos.all() or not pos.any():
        raise InvalidArgumentError("ROC AUC is undefined when y_true holds only one class")
    fpr, tpr, _ = roc_curve(pos.astype(np.int64), scores, pos_label=1)
    return float(_trapezoid(tpr, fpr))


def roc_auc(y_true, scores, multi_class="ovr", average="macro"):
    """Area under the ROC curve (roc_auc_score). Binary: scores (n,) for the positive class
    (or (n, 2), column 1). Multi-class: scores (n, classes) with integer labels, one-vs-rest
    ("ovr": per class, averaged "macro" or "weighted" by prevalence) or one-vs-one ("ovo",
    Hand & Till, "macro")."""
    s = _floats(scores, "scores")
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1):
        return _auc_binary(_greater_label(y_true), s.reshape(-1))
    y_true, s = _scores_2d(y_true, s)
    n_classes = s.shape[1]
    if n_classes == 2:
        return _auc_binary(_greater_label(y_true), s[:, 1])
    y = _class_labels(y_true, n_classes)
    present = np.unique(y)
    if len(present) != n_classes:
        raise InvalidArgumentError(f"y_true holds {len(present)} of the {n_classes} classes in scores; "
                                   "the multi-class ROC AUC needs every class present")
    if multi_class == "ovr":
        aucs = np.array([_auc_binary(y == c, s[:, c]) for c in range(n_classes)])
        if average == "macro":
            return float(aucs.mean())
        if average == "weighted":
            return float(np.average(aucs, weights=np.bincount(y, minlength=n_classes)))
        if average is None:
            return aucs
        raise InvalidArgumentError(f"average must be 'macro', 'weighted' or None, got {average!r}")
    if multi_class == "ovo":
        if average != "macro":
            raise InvalidArgumentError("multi_class='ovo' supports average='macro' only")
        pairs = []
        for a in range(n_classes):
            for b in range(a + 1, n_classes):
                m = (y == a) | (y == b)
                pairs.append((_auc_binary(y[m] == a, s[m, a]) + _auc_binary(y[m] == b, s[m, b])) / 2)
        return float(np.mean(pairs))
    raise InvalidArgumentError(f"multi_class must be 'ovr' or 'ovo', got {multi_class!r}")


def precision_recall_curve(y_true, scores, pos_label=None):
    """(precision, recall, thresholds) with recall decreasing and a final (1, 0) point
    (precision_recall_curve)."""
    pos = _binary_targets(y_true, pos_label)
    fps, tps, thr = _binary_curve(pos, scores)
    prec = _divide(tps, tps + fps, 0.0)
    rec = tps / tps[-1] if tps[-1] > 0 else np.ones_like(tps)
    return np.r_[prec[::-1], 1.0], np.r_[rec[::-1], 0.0], thr[::-1]


def _average_precision_binary(pos, scores):
    if not pos.any():
        return 0.0
    p, r, _ = precision_recall_curve(pos.astype(np.int64), scores, pos_label=1)
    return float(-np.sum(np.diff(r) * p[:-1]))


def pr_auc(y_true, scores, average="macro", pos_label=1):
    """Average precision, sum over thresholds of (R_n - R_{n-1}) P_n (average_precision_score).
    Binary: scores (n,) for the class pos_label, which must be one of two labels present.
    Multi-class: scores (n, classes) with integer labels, one-vs-rest, averaged "macro",
    "weighted" (by prevalence), "micro" (all cells pooled) or None."""
    s = _floats(scores, "scores")
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1):
        present = np.unique(_vector(y_true, "y_true"))
        if len(present) > 2:
            raise InvalidArgumentError(f"y_true holds {len(present)} classes {present.tolist()}; binary scores (n,) "
                                       "need two; pass scores (n, classes)")
        _check_pos_label(present, pos_label)
        return _average_precision_binary(_binary_targets(y_true, pos_label), s.reshape(-1))
    y_true, s = _scores_2d(y_true, s)
    n_classes = s.shape[1]
    y = _class_labels(y_true, n_classes)
    onehot = np.eye(n_classes, dtype=bool)[y]
    if average == "micro":
        return _average_precision_binary(onehot.ravel(), s.ravel())
    aps = np.array([_average_precision_binary(onehot[:, c], s[:, c]) for c in range(n_classes)])
    if average is None:
        return aps
    if average == "macro":
        return float(aps.mean())
    if average == "weighted":
        return float(np.average(aps, weights=onehot.sum(axis=0)))
    raise InvalidArgumentError(f"average must be 'macro', 'micro', 'weighted' or None, got {average!r}")


# ----------------------------------------------------------------------------- regression
def _regression(y_true, y_pred):
    y_true = _floats(y_true, "y_true")
    y_pred = _floats(y_pred, "y_pred")
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_pred.ndim == 1:
        y_pred = y_pred[:, None]
    if y_true.shape != y_pred.shape or len(y_true) == 0:
        raise ShapeError(f"y_true {np.shape(y_true)} and y_pred {np.shape(y_pred)} must have the same "
                         "non-empty (n,), (n, outputs) or (n, *shape) shape")
    if y_true.ndim > 2:  # (n, *shape), as a model's image outputs: each element one output
        y_true, y_pred = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
    return _finite(y_true, "y_true"), _finite(y_pred, "y_pred")


def mae(y_true, y_pred):
    """Mean absolute error, averaged over outputs (mean_absolute_error)."""
    t, p = _regression(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def mse(y_true, y_pred):
    """Mean squared error, averaged over outputs (mean_squared_error)."""
    t, p = _regression(y_true, y_pred)
    return float(np.mean((t - p) ** 2))


def rmse(y_true, y_pred):
    """Root mean squared error per output, then averaged (root_mean_squared_error)."""
    t, p = _regression(y_true, y_pred)
    return float(np.mean(np.sqrt(np.mean((t - p) ** 2, axis=0))))


def r2(y_true, y_pred):
    """Coefficient of determination per output, then averaged (r2_score). A constant target
    scores 1.0 when predicted exactly, else 0.0, as scikit-learn's force_finite; one sample
    scores NaN (not defined, as scikit-learn)."""
    t, p = _regression(y_true, y_pred)
    if len(t) < 2:
        return float("nan")
    ss_res = np.sum((t - p) ** 2, axis=0)
    ss_tot = np.sum((t - t.mean(axis=0)) ** 2, axis=0)
    score = np.ones_like(ss_res)
    ok = ss_tot != 0
    score[ok] = 1.0 - ss_res[ok] / ss_tot[ok]
    score[~ok & (ss_res != 0)] = 0.0
    return float(np.mean(score))


# ----------------------------------------------------------------------------- fit(metrics=)
_SOFTMAX_LOSSES = ("sparse_cross_entropy", "cross_entropy")


def classify_outputs(y_true, outputs, loss=None):
    """(true labels, predicted labels, class scores) from model outputs, as fit's metrics and
    mpscy.plot read them: scores are the softmax of logits for the cross-entropy losses, the
    sigmoid of the logit for BCEWithLogits, the outputs otherwise; a single-output head is
    binary (threshold 0.5 on the score, scores shaped (n,)); one-hot targets give their argmax.
    Under a cross entropy over (n, C, d1, ...) outputs (segmentation) every position is a row, as
    the loss reads them: outputs (n d1 ..., C), labels (n d1 ...)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    y_true = np.asarray(y_true)
    kind = getattr(loss, "kind", None)
    if kind in _SOFTMAX_LOSSES and outputs.ndim > 2:
        c = outputs.shape[1]
        if y_true.shape == outputs.shape:   # probability targets shaped like the outputs
            y_true = np.moveaxis(y_true, 1, -1).reshape(-1, c)
        else:
            y_true = y_true.reshape(-1)
        outputs = np.moveaxis(outputs, 1, -1).reshape(-1, c)
    outputs = outputs.reshape(len(outputs), -1)
    ign = getattr(loss, "ignore_index", None)
    if ign is not None and y_true.ndim == 1:   # the loss's ignore_index: those rows are left out, as the loss does
        keep = y_true != ign
        y_true, outputs = y_true[keep], outputs[keep]
    if outputs.shape[1] == 1:
        probs = 1.0 / (1.0 + np.exp(-outputs[:, 0])) if kind == "bce_with_logits" else outputs[:, 0]
        labels = (y_true.reshape(len(y_true), -1)[:, 0] > 0.5).astype(np.int64)
        return labels, (probs > 0.5).astype(np.int64), probs
    if kind in _SOFTMAX_LOSSES:
        e = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    elif kind == "bce_with_logits":   # one independent logit per output, as the loss reads them
        probs = 1.0 / (1.0 + np.exp(-outputs))
    else:
        probs = outputs
    labels = y_true.argmax(axis=1) if y_true.ndim == 2 else y_true.astype(np.int64)
    return labels, probs.argmax(axis=1), probs


class Metric:
    """A metric over model outputs: `metric(y_true, outputs, loss)` -> float. Classification
    metrics see `classify_outputs(y_true, outputs, loss)`; regression metrics the raw outputs."""

    def __init__(self, name, fn, kind):
        self.name, self.fn, self.kind = name, fn, kind

    def __call__(self, y_true, outputs, loss=None):
        return self.scalar(self.compute(y_true, outputs, loss))

    def compute(self, y_true, outputs, loss=None):
        """The metric function's result as it returns it (__call__ checks that it is one number)."""
        if self.kind == "raw":
            return self.fn(y_true, outputs)
        if self.kind == "regression":
            y_true = np.asarray(y_true)
            return self.fn(y_true.reshape(len(y_true), -1), np.asarray(outputs).reshape(len(outputs), -1))
        return self.fn(*classify_outputs(y_true, outputs, loss))

    def scalar(self, value):
        """value as a float, or InvalidArgumentError naming this metric where it is not one real
        number (an array of per-output values, None, a str): a log holds one number a key."""
        if isinstance(value, numbers.Real):
            return float(value)
        try:   # numpy's or torch's 0-d values too (one that requires grad, a bfloat16 one)
            array = None if isinstance(value, (str, bytes)) else host_array(value)
        except (TypeError, ValueError, RuntimeError):
            array = None
        if array is not None and array.ndim == 0 and array.dtype.kind in "biuf":
            return float(array)
        if array is not None and array.ndim:
            kind = "an array" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            what = f"{kind} of shape {array.shape}"
        else:
            what = f"{value!r:.60}"
        raise InvalidArgumentError(f"metric {self.name!r} returned {what}; a metric function returns one number "
                                   "(reduce per-output values to one, e.g. with np.mean)")

    def __repr__(self):
        return f"Metric({self.name!r})"


def _multi_or_binary(fn):
    def metric(labels, pred, probs):
        average = "binary" if probs.ndim == 1 else "macro"
        return fn(labels, pred, average=average)
    return metric


_NAMED = {
    "accuracy": ("classification", lambda t, p, s: accuracy(t, p)),
    "precision": ("classification", _multi_or_binary(precision)),
    "recall": ("classification", _multi_or_binary(recall)),
    "f1": ("classification", _multi_or_binary(f1)),
    "roc_auc": ("classification", lambda t, p, s: roc_auc(t, s)),
    "pr_auc": ("classification", lambda t, p, s: pr_auc(t, s)),
    "mae": ("regression", mae), "mse": ("regression", mse), "rmse": ("regression", rmse),
    "r2": ("regression", r2),
}


def get(metric):
    """A Metric from a name ("accuracy", "top5" or "top_k_accuracy" (k=5), "precision",
    "recall", "f1" (binary for one output, macro otherwise), "roc_auc", "pr_auc", "mae", "mse",
    "rmse", "r2") or a callable f(y_true, outputs) -> float named by its __name__."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        name = metric.lower()
        digits = name[3:]  # ASCII digits only: "top²" is a str.isdigit() that int() refuses
        if name in ("top_k_accuracy", "top5") or (name.startswith("top") and digits.isascii() and digits.isdigit()):
            k = 5 if name == "top_k_accuracy" else int(name[3:])
            if k < 1:
                raise InvalidArgumentError(f"metric {metric!r}: top-k accuracy needs k >= 1")
            return Metric(name, lambda t, p, s: top_k_accuracy(t, s, k), "classification")
        if name in _NAMED:
            kind, fn = _NAMED[name]
            return Metric(name, fn, kind)
        raise InvalidArgumentError(f"unknown metric {metric!r}; choose one of {sorted(_NAMED)} + ['top5'], "
                                   "or pass a callable f(y_true, outputs)")
    if callable(metric):
        name = getattr(metric, "__name__", type(metric).__name__)
        try:
            signature = inspect.signature(metric)
        except (TypeError, ValueError):  # a builtin without one: called as it is
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None)
            except TypeError as e:
                raise InvalidArgumentError(f"metric {name!r} must take (y_true, outputs) and return a float: "
                                           f"its signature {signature} does not ({e})") from None
        return Metric(name, metric, "raw")
    raise InvalidArgumentError(f"a metric is a name or a callable, got {type(metric).__name__}")
