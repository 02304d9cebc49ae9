"""mpscy.plot: each plot returns a Figure holding the metrics' numbers and writes a non-empty
PNG of the expected pixel size; fit(plot_to=...) writes the whole report."""
import builtins
import struct

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

pytest.importorskip("matplotlib")
from mpscy import plot  # noqa: E402


def _png_size(path):
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) > 5000
    return struct.unpack(">II", raw[16:24])


@pytest.fixture
def classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = rng.random((200, 4)) + np.eye(4)[y]
    return y, scores / scores.sum(1, keepdims=True)


def test_history_plot(tmp_path):
    hist = {"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.5, 0.8, 0.9],
            "val_accuracy": [0.4, 0.7, 0.8], "lr": [1e-3] * 3}
    fig = plot.plot_history(hist, tmp_path / "h.png")
    assert _png_size(tmp_path / "h.png") == (1000, 400)
    loss_ax, metric_ax = fig.axes
    assert [l.get_label() for l in loss_ax.lines] == ["loss", "val_loss"]
    np.testing.assert_array_equal(loss_ax.lines[1].get_ydata(), hist["val_loss"])
    assert [l.get_label() for l in metric_ax.lines] == ["accuracy", "val_accuracy"]
    with pytest.raises(mpscy.InvalidArgumentError):
        plot.plot_history({})


def test_history_of_a_resumed_fit_keeps_its_epoch_numbers(device):
    """fit(initial_epoch=3, epochs=6) records epochs [3, 4, 5]: its plot's x axis reads 4, 5, 6
    (Keras's 1-based display), not 1, 2, 3."""
    x, y = mpscy.datasets.load_digits()
    engine = mpscy.Engine(mpscy.Sequential([mpscy.layers.Dense(10)], input_shape=(64,)), batch_size=64,
                          device=device)
    history = engine.fit(x[:256], y[:256], epochs=6, initial_epoch=3, verbose=0)
    assert history.epoch == [3, 4, 5]
    for ax in plot.plot_history(history).axes:   # loss, and accuracy
        np.testing.assert_array_equal(ax.lines[0].get_xdata(), [4, 5, 6])


def test_plots_refuse_labels_that_are_not_score_columns():
    """With scores (n, C), column c scores class c, as metrics.roc_auc reads them: labels 1..3
    against three columns are refused, as roc_auc refuses them (the plots had paired the wrong
    columns and left class 3 out)."""
    rng = np.random.default_rng(0)
    y = np.array([1, 2, 3] * 40)
    s = np.eye(3)[y - 1] * 2 + rng.random((120, 3))
    for fn in (plot.plot_roc, plot.plot_pr, lambda t, p: mpscy.metrics.roc_auc(t, p)):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"class indices in y_true must lie in \[0, 3\), "
                                                             r"got \[1, 3\]"):
            fn(y, s)
    with pytest.raises(mpscy.ShapeError, match="scores must be shaped"):
        plot.plot_roc(y[:10], s)


def test_confusion_roc_pr(tmp_path, classes):
    y, s = classes
    # s.argmax(1) is y for every sample (each true class gets +1 on scores below 1): a diagonal
    # matrix, which no transposition or normalization error changes. Every 5th prediction wrong:
    pred = np.where(np.arange(len(y)) % 5 == 0, (y + 1 + np.arange(len(y)) % 3) % 4, s.argmax(1))
    cm = mpscy.metrics.confusion_matrix(y, pred).astype(np.float64)
    assert (cm != cm.T).any() and (cm.sum(0) != cm.sum(1)).any()
    fig = plot.plot_confusion_matrix(y, pred, labels=["a", "b", "c", "d"], path=tmp_path / "cm.png")
    assert _png_size(tmp_path / "cm.png") == (640, 480)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), mpscy.metrics.confusion_matrix(y, pred))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c", "d"]
    norm = plot.plot_confusion_matrix(y, pred, normalize=True)
    np.testing.assert_allclose(norm.axes[0].images[0].get_array(), cm / cm.sum(1, keepdims=True), rtol=1e-12)

    fig = plot.plot_roc(y, s, path=tmp_path / "roc.png")
    assert _png_size(tmp_path / "roc.png") == (640, 480)
    fpr, tpr, _ = mpscy.metrics.roc_curve((y == 2).astype(int), s[:, 2])
    np.testing.assert_array_equal(fig.axes[0].lines[2].get_xdata(), fpr)
    np.testing.assert_array_equal(fig.axes[0].lines[2].get_ydata(), tpr)
    assert len(fig.axes[0].lines) == 5      # 4 classes + the diagonal

    fig = plot.plot_pr(y == 1, s[:, 1], path=tmp_path / "pr.png")
    assert _png_size(tmp_path / "pr.png") == (640, 480)
    ap = mpscy.metrics.pr_auc((y == 1).astype(int), s[:, 1])
    assert fig.axes[0].lines[0].get_label() == f"positive (AP {ap:.3f})"


def test_fit_writes_the_report(device, tmp_path):
    x, y = mpscy.datasets.load_digits()
    model = mpscy.Sequential([layers.Dense(16), layers.ReLU(), layers.Dense(10)], input_shape=(64,))
    engine = mpscy.Engine(model, optimizer=optim.Adam(3e-3), batch_size=64, device=device)
    engine.fit(x[:1400], y[:1400], epochs=2, verbose=0, validation_data=(x[1400:], y[1400:]),
               plot_to=tmp_path / "report")
    for name, size in (("history.png", (1000, 400)), ("confusion_matrix.png", (640, 480)),
                       ("roc.png", (640, 480)), ("pr.png", (640, 480))):
        assert _png_size(tmp_path / "report" / name) == size
    reg = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(64,)), loss="mse",
                       batch_size=64, device=device)
    reg.fit(x[:256], y[:256].astype(np.float32)[:, None], epochs=1, verbose=0, plot_to=tmp_path / "reg")
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["history.png"]


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("absent")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ImportError, match=r"mpscy\[plot\]"):
        plot.plot_history({"loss": [1.0]})


def test_a_multi_label_report_has_no_single_label_plots(device, tmp_path):
    """BCE over several outputs is multi-label: a confusion matrix or ROC of the argmax of
    multi-hot targets would mean nothing, so its report is the history alone; a single-output
    BCE head is binary and gets all four."""
    x, y = mpscy.datasets.load_digits()
    multi = np.stack([y % 2, (y > 4), (y % 3 == 0)], axis=1).astype(np.float32)
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(64,)), loss="bce_with_logits",
                          batch_size=64, device=device)
    engine.fit(x[:256], multi[:256], epochs=1, verbose=0, plot_to=tmp_path / "multi")
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == ["history.png"]
    binary = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(64,)), loss="bce_with_logits",
                          batch_size=64, device=device)
    binary.fit(x[:256], multi[:256, :1], epochs=1, verbose=0, plot_to=tmp_path / "binary")
    assert sorted(p.name for p in (tmp_path / "binary").iterdir()) == ["confusion_matrix.png", "history.png",
                                                                       "pr.png", "roc.png"]


def test_binary_plots_take_the_positive_class_of_the_metrics():
    """For labels {1, 2} metrics.roc_auc takes the greater label, 2, as positive (as
    scikit-learn's roc_auc_score); the plots had taken 1, and the ROC legend read
    "positive (AUC 0.111)" where roc_auc gives 0.889. Both plots now draw the class roc_auc
    reads as positive, named where it is not 1; for {0, 1} the legends keep their numbers."""
    y = np.array([1, 2, 2, 1, 2, 1])
    s = np.array([0.1, 0.8, 0.4, 0.35, 0.3, 0.2])
    auc = mpscy.metrics.roc_auc(y, s)
    assert auc == pytest.approx(8 / 9)                    # 1 - 8/9 with 1 as the positive class
    for scores in (s, np.c_[1 - s, s]):                     # (n,) or (n, 2): column 1 is the greater label
        roc = plot.plot_roc(y, scores)
        assert roc.axes[0].lines[0].get_label() == f"positive: 2 (AUC {auc:.3f})"
        fpr, tpr, _ = mpscy.metrics.roc_curve(y, s, pos_label=2)
        np.testing.assert_array_equal(roc.axes[0].lines[0].get_xdata(), fpr)
        np.testing.assert_array_equal(roc.axes[0].lines[0].get_ydata(), tpr)
        pr = plot.plot_pr(y, scores)
        assert pr.axes[0].lines[0].get_label() == f"positive: 2 (AP {mpscy.metrics.pr_auc(y, s, pos_label=2):.3f})"
    y01 = (y == 2).astype(int)
    assert plot.plot_roc(y01, s).axes[0].lines[0].get_label() == f"positive (AUC {mpscy.metrics.roc_auc(y01, s):.3f})"
    assert plot.plot_pr(y01, s).axes[0].lines[0].get_label() == f"positive (AP {mpscy.metrics.pr_auc(y01, s):.3f})"
    with pytest.raises(mpscy.InvalidArgumentError, match="holds 3 classes"):
        plot.plot_roc([0, 1, 2], [0.1, 0.2, 0.3])


def test_confusion_matrix_of_string_labels():
    """Class labels that are strings: `labels` had been read as names indexed by int(label), so
    they raised ValueError (invalid literal for int()). `labels` names the classes as
    scikit-learn's display_labels (one per class, in sorted order); labels that are the classes
    themselves give their order; integer class indices still index a list of names."""
    y = np.array(["cat", "dog", "bird", "dog", "cat", "cat"])
    p = np.array(["cat", "cat", "bird", "dog", "dog", "cat"])

    def shown(fig):
        ax = fig.axes[0]
        return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()], \
            ax.images[0].get_array()

    names, rows, cm = shown(plot.plot_confusion_matrix(y, p))
    assert names == rows == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(cm, mpscy.metrics.confusion_matrix(y, p))
    names, rows, cm = shown(plot.plot_confusion_matrix(y, p, labels=["Bird", "Cat", "Dog"]))
    assert names == rows == ["Bird", "Cat", "Dog"]
    np.testing.assert_array_equal(cm, mpscy.metrics.confusion_matrix(y, p))
    order = ["dog", "cat", "bird"]
    names, rows, cm = shown(plot.plot_confusion_matrix(y, p, labels=order))
    assert names == rows == order
    np.testing.assert_array_equal(cm, mpscy.metrics.confusion_matrix(y, p, labels=order))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"2 names for the 3 classes \['bird', 'cat', 'dog'\]"):
        plot.plot_confusion_matrix(y, p, labels=["a", "b"])
    # {1, 2} with a name per class; class indices 0..3 with a longer list of names
    assert shown(plot.plot_confusion_matrix([1, 2, 2], [1, 1, 2], labels=["one", "two"]))[0] == ["one", "two"]
    assert shown(plot.plot_confusion_matrix([0, 3], [3, 3], labels="abcdef"))[0] == ["a", "d"]


def test_a_plot_path_that_is_a_folder_or_no_path_is_named(tmp_path):
    """A folder where the file name goes, or None-like junk, is an mpscy error (savefig raised
    IsADirectoryError, os.fspath a TypeError)."""
    with pytest.raises(mpscy.InvalidArgumentError, match=r"plot path '.*' is a folder: give a file name, such as"):
        plot.plot_roc([0, 1], [0.1, 0.9], path=tmp_path)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"plot path must be a path .* got 5"):
        plot.plot_roc([0, 1], [0.1, 0.9], path=5)
