"""Plots with matplotlib (an optional extra: ``pip install 'mpscy[plot]'``): training curves
from a History, confusion matrix, ROC and precision-recall curves. Each function returns a
matplotlib Figure and writes a PNG when given `path`; figures are drawn on the Agg canvas
without pyplot, so nothing global changes and no display is needed. `fit_report` writes all
of them after `Engine.fit(..., plot_to=dir)`. The numbers come from `mpscy.metrics`."""

import numbers
import os

import numpy as np

from . import metrics as _metrics
from ._checks import path as _path
from .errors import InvalidArgumentError

__all__ = ["plot_history", "plot_confusion_matrix", "plot_roc", "plot_pr", "fit_report"]

_SIZE = (6.4, 4.8)
_DPI = 100


def _figure(size=_SIZE, ncols=1):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'mpscy[plot]'") from None
    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, k + 1) for k in range(ncols)]
    return fig, axes


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        path = _path(path, "plot path")
        if os.path.isdir(path):
            raise InvalidArgumentError(f"plot path {path!r} is a folder: give a file name, such as {path}/plot.png")
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(path, format="png", dpi=_DPI)
    return fig


def _history_dict(history):
    h = getattr(history, "history", history)
    if not isinstance(h, dict) or not h:
        raise InvalidArgumentError("plot_history needs a History (or its .history dict) with at least one epoch")
    return h


def plot_history(history, path=None, size=(10.0, 4.0)):
    """Loss (left) and accuracy or the other metrics (right) per epoch, training and
    validation. A History's epochs are numbered as it recorded them (from initial_epoch + 1 for
    a resumed fit); a bare dict's from 1."""
    h = _history_dict(history)
    others = sorted({k[4:] if k.startswith("val_") else k for k in h} - {"loss", "lr"})
    fig, axes = _figure(size, 2 if others else 1)
    recorded = getattr(history, "epoch", None)
    if recorded is not None and "loss" in h and len(recorded) == len(h["loss"]):
        epochs = np.asarray(recorded, dtype=np.int64) + 1
    else:
        epochs = np.arange(1, len(h["loss"]) + 1) if "loss" in h else None
    panels = [("loss", ["loss"])] + ([("metrics", others)] if others else [])
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            for key, style in ((name, "-o"), ("val_" + name, "--s")):
                if key in h:
                    values = np.asarray(h[key], dtype=np.float64)
                    ax.plot(np.arange(1, len(values) + 1) if epochs is None else epochs[:len(values)],
                            values, style, markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, path)


def _class_names(classes, labels):
    """(order for confusion_matrix or None, tick names) of the sorted classes under `labels`."""
    if labels is None:
        return None, [str(c) for c in classes]
    labels = list(labels)
    if len(labels) == len(classes) and set(labels) == set(classes):
        return labels, [str(c) for c in labels]      # the classes themselves, in the order to show
    if all(isinstance(c, numbers.Real) and float(c).is_integer() and 0 <= c < len(labels) for c in classes):
        return None, [str(labels[int(c)]) for c in classes]
    if len(labels) == len(classes):
        return None, [str(v) for v in labels]
    raise InvalidArgumentError(f"labels has {len(labels)} names for the {len(classes)} classes {classes}: give one "
                               "per class in sorted order, or, for class indices, one per index")


def plot_confusion_matrix(y_true, y_pred, labels=None, normalize=False, path=None, size=_SIZE):
    """Confusion matrix (rows: true class, columns: predicted), counts or row-normalized.
    labels names the classes (the sorted union of y_true and y_pred): for class indices 0, 1,
    ... a list indexed by class; otherwise one name per class in sorted order, as
    scikit-learn's display_labels; the classes themselves, in any order, give that order."""
    y_true, y_pred = _metrics._pair(y_true, y_pred)      # shapes checked, NaN refused by name
    classes = np.unique(np.concatenate([y_true, y_pred])).tolist()
    order, names = _class_names(classes, labels)
    cm = _metrics.confusion_matrix(y_true, y_pred, labels=order)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, (ax,) = _figure(size)
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 3 else 0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        top = shown.max() if shown.size else 0
        for i in range(shown.shape[0]):
            for j in range(shown.shape[1]):
                text = f"{shown[i, j]:.2f}" if normalize else str(int(shown[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.6 * top else "black")
    ax.set_title("confusion matrix" + (" (row-normalized)" if normalize else ""))
    return _finish(fig, path)


def _per_class(y_true, scores):
    """[(name, binary targets, scores)]: one curve for binary scores, one per class otherwise.
    The binary positive class is metrics.roc_auc's, the greater of two labels (1 for {0, 1}
    and {-1, 1}; with one label present, 1), and is named where it is not 1."""
    s = np.asarray(scores, dtype=np.float64)
    y = _metrics._vector(y_true, "y_true")
    if s.ndim == 1 or (s.ndim == 2 and s.shape[1] in (1, 2)):
        classes = np.unique(y)
        if len(classes) > 2:
            raise InvalidArgumentError(f"y_true holds {len(classes)} classes {classes.tolist()}; binary scores need "
                                       "two; pass scores (n, classes)")
        pos = classes[-1] if len(classes) == 2 else 1
        name = "positive" if pos == 1 else f"positive: {pos}"
        return [(name, (y == pos).astype(np.int64), s[:, -1] if s.ndim == 2 else s)]
    y, s = _metrics._scores_2d(y, s)  # column c scores class c, as metrics.roc_auc reads it
    y = _metrics._class_labels(y, s.shape[1])
    return [(str(c), (y == c).astype(np.int64), s[:, c]) for c in range(s.shape[1]) if (y == c).any()]


def plot_roc(y_true, scores, path=None, size=_SIZE):
    """ROC curve(s) with their AUC: binary scores (n,) or (n, 2), positive class as
    metrics.roc_auc (so the legend's AUC is its value), or one-vs-rest per class for (n, C)."""
    fig, (ax,) = _figure(size)
    for name, t, s in _per_class(y_true, scores):
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = _metrics.roc_curve(t, s, pos_label=1)
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} (AUC {float(_metrics._trapezoid(tpr, fpr)):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _finish(fig, path)


def plot_pr(y_true, scores, path=None, size=_SIZE):
    """Precision-recall curve(s) with average precision: binary (the positive class of
    plot_roc; the legend's AP is metrics.pr_auc with that pos_label) or one-vs-rest per class."""
    fig, (ax,) = _figure(size)
    for name, t, s in _per_class(y_true, scores):
        if not t.any():
            continue
        p, r, _ = _metrics.precision_recall_curve(t, s, pos_label=1)
        ap = _metrics.pr_auc(t, s)
        ax.step(r, p, where="post", lw=1.2, label=f"{name} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.05)
    ax.set_title("precision-recall")
    ax.legend(fontsize=7, loc="lower left")
    return _finish(fig, path)


def fit_report(folder, history, y_true, outputs, loss=None, labels=None):
    """Writes history.png and, for classifiers (a loss with an accuracy and one label per row),
    confusion_matrix.png, roc.png and pr.png from model outputs on (validation) data; a
    multi-label head (BCE over several outputs) gets history.png alone. Returns the written
    paths."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "history.png")]
    plot_history(history, paths[0])
    kind = loss.accuracy(np.shape(outputs)[1:]) if loss is not None else "none"
    if kind == "none" or (kind == "threshold" and int(np.prod(np.shape(outputs)[1:])) > 1):
        return paths
    t, p, s = _metrics.classify_outputs(np.asarray(y_true), outputs, loss)   # rows as the loss reads them
    for name, fn, args in (("confusion_matrix.png", plot_confusion_matrix, (t, p)),
                           ("roc.png", plot_roc, (t, s)), ("pr.png", plot_pr, (t, s))):
        path = os.path.join(folder, name)
        kwargs = {"labels": labels} if fn is plot_confusion_matrix and labels is not None else {}
        fn(*args, path=path, **kwargs)
        paths.append(path)
    return paths
