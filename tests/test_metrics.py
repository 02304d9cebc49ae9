"""mpscy.metrics against scikit-learn's implementations (a test-only dependency) on random
labels and scores, including ties, absent classes, multi-output regression and bad input."""
import numpy as np
import pytest

import mpscy
from mpscy import metrics as M

skm = pytest.importorskip("sklearn.metrics")

TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    return request.param


def _labels(rng, n, classes):
    return rng.integers(0, classes, size=n)


def test_accuracy_and_confusion_matrix(seed):
    rng = np.random.default_rng(seed)
    t, p = _labels(rng, 200, 5), _labels(rng, 200, 5)
    assert M.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p), abs=1e-15)
    np.testing.assert_array_equal(M.confusion_matrix(t, p), skm.confusion_matrix(t, p))
    # a class predicted but never true, and explicit labels (one missing from the data)
    p2 = p.copy()
    p2[:3] = 7
    np.testing.assert_array_equal(M.confusion_matrix(t, p2), skm.confusion_matrix(t, p2))
    labels = [4, 0, 2, 9]
    np.testing.assert_array_equal(M.confusion_matrix(t, p, labels=labels),
                                  skm.confusion_matrix(t, p, labels=labels))


@pytest.mark.parametrize("average", ["macro", "micro", "weighted", None])
def test_precision_recall_f1_multiclass(seed, average):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 150, 6)
    p = np.where(rng.random(150) < 0.6, t, _labels(rng, 150, 6))
    p[p == 5] = 4  # class 5 is never predicted: a 0/0 precision
    for ours, theirs in ((M.precision, skm.precision_score), (M.recall, skm.recall_score),
                         (M.f1, skm.f1_score)):
        np.testing.assert_allclose(ours(t, p, average=average),
                                   theirs(t, p, average=average, zero_division=0), **TOL)


def test_precision_recall_f1_binary(seed):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 100, 2)
    p = np.where(rng.random(100) < 0.7, t, 1 - t)
    for ours, theirs in ((M.precision, skm.precision_score), (M.recall, skm.recall_score),
                         (M.f1, skm.f1_score)):
        assert ours(t, p) == pytest.approx(theirs(t, p), abs=1e-12)
        assert ours(t, p, pos_label=0) == pytest.approx(theirs(t, p, pos_label=0), abs=1e-12)
    # nothing predicted positive: precision 0/0 -> zero_division
    zeros = np.zeros_like(t)
    assert M.precision(t, zeros) == skm.precision_score(t, zeros, zero_division=0) == 0.0
    assert M.precision(t, zeros, zero_division=1.0) == skm.precision_score(t, zeros, zero_division=1.0)
    with pytest.raises(mpscy.InvalidArgumentError, match="binary"):
        M.f1([0, 1, 2], [0, 1, 2])


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")  # k=7 of 7, asked on purpose
def test_top_k_accuracy_with_ties(seed):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 120, 7)
    scores = rng.integers(0, 4, size=(120, 7)).astype(np.float64)  # many ties
    for k in (1, 2, 3, 6, 7):
        assert M.top_k_accuracy(t, scores, k) == pytest.approx(
            skm.top_k_accuracy_score(t, scores, k=k, labels=np.arange(7)), abs=1e-15), k


def test_roc_auc_binary_and_curve(seed):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 300, 2)
    s = np.round(rng.normal(size=300) + t, 1)  # rounding makes ties
    assert M.roc_auc(t, s) == pytest.approx(skm.roc_auc_score(t, s), abs=1e-12)
    fpr, tpr, thr = M.roc_curve(t, s)
    f2, t2, th2 = skm.roc_curve(t, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2, **TOL)
    np.testing.assert_allclose(tpr, t2, **TOL)
    np.testing.assert_array_equal(thr, th2)
    # (n, 2) probability matrix: column 1 is the positive class
    assert M.roc_auc(t, np.c_[1 - s, s]) == pytest.approx(skm.roc_auc_score(t, s), abs=1e-12)
    with pytest.raises(mpscy.InvalidArgumentError, match="one class"):
        M.roc_auc(np.ones(5, int), np.arange(5.0))


@pytest.mark.parametrize("multi_class,average", [("ovr", "macro"), ("ovr", "weighted"), ("ovo", "macro")])
def test_roc_auc_multiclass(seed, multi_class, average):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 250, 4)
    logits = rng.normal(size=(250, 4)) + 1.5 * np.eye(4)[t]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert M.roc_auc(t, probs, multi_class=multi_class, average=average) == pytest.approx(
        skm.roc_auc_score(t, probs, multi_class=multi_class, average=average), abs=1e-12)


def test_pr_curve_and_average_precision(seed):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 300, 2)
    s = np.round(rng.normal(size=300) + 0.8 * t, 1)
    p, r, thr = M.precision_recall_curve(t, s)
    p2, r2, thr2 = skm.precision_recall_curve(t, s)
    np.testing.assert_allclose(p, p2, **TOL)
    np.testing.assert_allclose(r, r2, **TOL)
    np.testing.assert_array_equal(thr, thr2)
    assert M.pr_auc(t, s) == pytest.approx(skm.average_precision_score(t, s), abs=1e-12)


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_average_precision_multiclass(seed, average):
    rng = np.random.default_rng(seed)
    t = _labels(rng, 200, 5)
    s = rng.random((200, 5)) + 0.5 * np.eye(5)[t]
    onehot = np.eye(5)[t]
    assert M.pr_auc(t, s, average=average) == pytest.approx(
        skm.average_precision_score(onehot, s, average=average), abs=1e-12)


def test_regression_metrics(seed):
    rng = np.random.default_rng(seed)
    for shape in ((80,), (80, 3)):
        t = rng.normal(size=shape)
        p = t + 0.3 * rng.normal(size=shape)
        assert M.mae(t, p) == pytest.approx(skm.mean_absolute_error(t, p), rel=1e-13)
        assert M.mse(t, p) == pytest.approx(skm.mean_squared_error(t, p), rel=1e-13)
        assert M.rmse(t, p) == pytest.approx(skm.root_mean_squared_error(t, p), rel=1e-13)
        assert M.r2(t, p) == pytest.approx(skm.r2_score(t, p), rel=1e-13)
    # image outputs (n, C, H, W), as an autoencoder's: each element one output, as flattened for scikit-learn
    t = rng.normal(size=(40, 2, 3, 4))
    p = t + 0.3 * rng.normal(size=t.shape)
    for ours, theirs in ((M.mae, skm.mean_absolute_error), (M.mse, skm.mean_squared_error), (M.r2, skm.r2_score)):
        assert ours(t, p) == pytest.approx(theirs(t.reshape(40, -1), p.reshape(40, -1)), rel=1e-13)
    with pytest.raises(mpscy.ShapeError, match=r"\(40, 2, 3, 4\) and y_pred \(40, 24\) must have the same"):
        M.mse(t, p.reshape(40, -1))
    const = np.full(10, 2.0)
    assert M.r2(const, const) == skm.r2_score(const, const) == 1.0
    assert M.r2(const, const + 1) == skm.r2_score(const, const + 1) == 0.0


def test_bce_with_logits_scores_are_sigmoids_for_every_output():
    """README: class scores are the sigmoid for BCEWithLogits, whose loss reads each output as
    an independent logit. With two outputs they had been the softmax across the row, which ranks
    rows by z1 - z0 instead of z1: here the positive row has the larger logit (4 > 1) but the
    smaller softmax (sigmoid(-1) < sigmoid(6)), so roc_auc read 0.0 instead of 1.0."""
    y = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)      # one-hot targets: row 0 is class 1
    z = np.array([[5.0, 4.0], [-5.0, 1.0]])
    bce = mpscy.losses.BCEWithLogits()
    labels, pred, probs = M.classify_outputs(y, z, bce)
    np.testing.assert_allclose(probs, 1.0 / (1.0 + np.exp(-z)), **TOL)
    assert labels.tolist() == [1, 0] and pred.tolist() == [0, 1]
    assert M.get("roc_auc")(y, z, bce) == skm.roc_auc_score([1, 0], 1.0 / (1.0 + np.exp(-z[:, 1]))) == 1.0


def test_bad_input_is_rejected():
    with pytest.raises(mpscy.ShapeError, match="rows"):
        M.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(mpscy.ShapeError):
        M.top_k_accuracy([0, 1], np.zeros(2), 1)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"\[0, 3\)"):
        M.top_k_accuracy([0, 5], np.zeros((2, 3)), 1)
    with pytest.raises(mpscy.InvalidArgumentError, match="average"):
        M.f1([0, 1], [0, 1], average="samples")
    with pytest.raises(mpscy.ShapeError):
        M.mse(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(mpscy.InvalidArgumentError, match="NaN"):
        M.roc_auc([0, 1], [0.1, np.nan])


def test_get_adapts_model_outputs():
    """Named metrics turn outputs into labels/probabilities the way the loss defines them."""
    rng = np.random.default_rng(0)
    t = _labels(rng, 60, 3)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[t]
    ce = mpscy.losses.SparseCrossEntropy()
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert M.get("accuracy")(t, logits, ce) == skm.accuracy_score(t, logits.argmax(1))
    assert M.get("f1")(t, logits, ce) == pytest.approx(skm.f1_score(t, logits.argmax(1), average="macro"))
    assert M.get("roc_auc")(t, logits, ce) == pytest.approx(skm.roc_auc_score(t, probs, multi_class="ovr"))
    assert M.get("top2")(t, logits, ce) == pytest.approx(skm.top_k_accuracy_score(t, logits, k=2))
    # single-output binary head with logits: sigmoid, threshold 0.5
    tb = _labels(rng, 50, 2).astype(np.float32)
    z = rng.normal(size=(50, 1)) + 2 * (tb[:, None] - 0.5)
    bce = mpscy.losses.BCEWithLogits()
    assert M.get("accuracy")(tb[:, None], z, bce) == skm.accuracy_score(tb, (z[:, 0] > 0).astype(int))
    assert M.get("roc_auc")(tb[:, None], z, bce) == pytest.approx(skm.roc_auc_score(tb, z[:, 0]))
    # regression and a custom callable
    y = rng.normal(size=(40, 2)).astype(np.float32)
    out = y + 0.1
    assert M.get("rmse")(y, out) == pytest.approx(0.1, rel=1e-5)

    def max_error(y_true, outputs):
        return float(np.max(np.abs(y_true - outputs)))

    m = M.get(max_error)
    assert m.name == "max_error" and m(y, out) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(mpscy.InvalidArgumentError, match="unknown metric"):
        M.get("bogus")


def test_a_callable_metric_must_take_two_arguments():
    """A callable metric is called as f(y_true, outputs): one that cannot take that is refused
    when it is named (fit: before the first step), not with a bare TypeError at the first
    epoch's end. Defaults, *args, callable objects and builtins without a signature pass."""
    with pytest.raises(mpscy.InvalidArgumentError,
                       match=r"metric '<lambda>' must take \(y_true, outputs\) and return a float: its signature "
                             r"\(a\) does not \(too many positional arguments\)"):
        M.get(lambda a: 1.0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"metric 'three'.*\(a, b, c\).*missing a required"):
        def three(a, b, c):
            return 0.0
        M.get(three)

    class Scorer:
        def __call__(self, y_true, outputs, scale=1.0):
            return scale

    assert M.get(Scorer()).name == "Scorer" and M.get(Scorer())(0, 0) == 1.0
    assert M.get(lambda *a: 2.0)(0, 0) == 2.0
    assert M.get(max).name == "max"  # no signature to read: called as it is


def test_weighted_average_without_true_samples_follows_scikit_learn():
    """average="weighted" where none of the given labels occurs in y_true (every weight 0):
    scikit-learn's _nanaverage falls back to the plain mean of the per-class values; it had
    returned zero_division for all three (1.0 where scikit-learn gives precision 0.5)."""
    cases = [([1], [0], [0, 2]), ([0, 1, 0], [2, 2, 1], [2]), ([3, 0, 3], [3, 3, 1], [1, 2, 4])]
    for yt, yp, labels in cases:
        for zd in (0.0, 1.0, np.nan):
            got = M.precision_recall_f1(yt, yp, average="weighted", labels=labels, zero_division=zd)
            want = skm.precision_recall_fscore_support(yt, yp, average="weighted", labels=labels,
                                                       zero_division=zd)[:3]
            np.testing.assert_allclose(got, want, equal_nan=True, **TOL)


def test_scikit_learn_edge_cases():
    """Four cases where the definitions follow scikit-learn's (numbers from sklearn 1.9):
    zero_division=np.nan leaves the undefined classes out of a macro or weighted average (class 2
    is never predicted: precision (1 + 0.5) / 2); a binary roc_auc takes the greater of any two
    labels as positive ({1, 2} and {-1, 0} as {0, 1}); r2 of one sample is NaN; and a
    confusion matrix needs at least one of its labels in y_true."""
    yt, yp = [0, 1, 2], [0, 1, 1]
    for average in ("macro", "weighted"):
        assert mpscy.metrics.precision(yt, yp, average=average, zero_division=np.nan) == 0.75
    assert np.isnan(mpscy.metrics.precision(yt, yp, average=None, zero_division=np.nan)[2])
    assert np.isnan(mpscy.metrics.precision([0, 1], [1, 1], average="macro", labels=[0], zero_division=np.nan))
    for labels in ([1, 2, 2, 1], [-1, 0, 0, -1], [0, 1, 1, 0]):
        assert mpscy.metrics.roc_auc(labels, [0.1, 0.8, 0.4, 0.3]) == 1.0
    assert mpscy.metrics.roc_auc([2, 1, 1, 2], [0.1, 0.8, 0.4, 0.3]) == 0.0
    with pytest.raises(mpscy.InvalidArgumentError, match="only one class"):
        mpscy.metrics.roc_auc([3, 3, 3], [0.1, 0.2, 0.3])
    with pytest.raises(mpscy.InvalidArgumentError, match="holds 3 classes"):
        mpscy.metrics.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    assert np.isnan(mpscy.metrics.r2([1.0], [2.0])) and mpscy.metrics.r2([1.0, 2.0], [1.0, 2.0]) == 1.0
    with pytest.raises(mpscy.InvalidArgumentError, match=r"none of labels \[5\] is in y_true"):
        mpscy.metrics.confusion_matrix([0, 1], [0, 1], labels=[5])
    assert mpscy.metrics.confusion_matrix([0, 1], [5, 1], labels=[5, 1]).tolist() == [[0, 0], [0, 1]]


def test_binary_label_rules_follow_scikit_learn():
    """Without pos_label, roc_curve and precision_recall_curve take y_true in {0, 1} or
    {-1, 1} only (a single class of those too), as scikit-learn's _check_pos_label_consistency:
    {-1, 0} had passed the check and given a NaN tpr (nothing equals 1). pr_auc's pos_label (1)
    must be one of two labels present, as average_precision_score's ({0, 2} had scored 0.0), and
    its 1-D scores need binary y_true; roc_auc takes the greater of any two labels, as there."""
    import warnings
    s = [0.2, 0.6, 0.7, 0.4]
    for y in ([-1, 0, 0, -1], [1, 2, 2, 1], ["a", "b", "b", "a"], [2, 2, 2, 2]):
        for ours, theirs in ((M.roc_curve, skm.roc_curve), (M.precision_recall_curve, skm.precision_recall_curve)):
            with pytest.raises(ValueError, match="pos_label"):
                theirs(y, s)
            with pytest.raises(mpscy.InvalidArgumentError, match=r"\{0, 1\} or \{-1, 1\}.*pass pos_label"):
                ours(y, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # sklearn's UndefinedMetricWarning for one class
        for y in ([0, 1, 1, 0], [-1, 1, 1, -1], [False, True, True, False], [0.0, 1.0, 0.0, 0.0],
                  [0, 0, 0, 0], [1, 1, 1, 1], [-1, -1, -1, -1]):
            for got, want in zip(M.roc_curve(y, s), skm.roc_curve(y, s, drop_intermediate=False)):
                np.testing.assert_allclose(got, want, equal_nan=True, **TOL)
            for got, want in zip(M.precision_recall_curve(y, s), skm.precision_recall_curve(y, s)):
                np.testing.assert_allclose(got, want, equal_nan=True, **TOL)
    for got, want in zip(M.roc_curve([1, 2, 2, 1], s, pos_label=2),
                         skm.roc_curve([1, 2, 2, 1], s, pos_label=2, drop_intermediate=False)):
        np.testing.assert_allclose(got, want, **TOL)
    for y in ([-1, 0, 0, -1], [0, 2, 2, 0]):
        with pytest.raises(ValueError, match="pos_label=1 is not a valid label"):
            skm.average_precision_score(y, s)
        for fn in (M.pr_auc, M.f1):
            with pytest.raises(mpscy.InvalidArgumentError, match=r"pos_label=1 is not one of the labels"):
                fn(y, s if fn is M.pr_auc else y[::-1])
    assert M.pr_auc([1, 2, 2, 1], s) == pytest.approx(skm.average_precision_score([1, 2, 2, 1], s), abs=1e-15)
    assert M.pr_auc([2, 0, 0, 2], s, pos_label=2) == pytest.approx(
        skm.average_precision_score([2, 0, 0, 2], s, pos_label=2), abs=1e-15)
    with pytest.raises(mpscy.InvalidArgumentError, match="3 classes"):
        M.pr_auc([0, 1, 2, 1], s)
    assert M.roc_auc([-1, 0, 0, -1], s) == skm.roc_auc_score([-1, 0, 0, -1], s) == 1.0


def test_top_k_needs_an_integer_k_of_at_least_one():
    """k=1.7 had run as k=1 (int(k)), and get("top0") had been accepted, failing only at the
    first evaluation. scikit-learn's top_k_accuracy_score refuses a float k or one below 1."""
    t, s = np.array([0, 1, 2, 0]), np.random.default_rng(0).random((4, 3))
    for k in (1.7, 2.0, 0, -1, True, "2"):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"k must be an integer >= 1"):
            M.top_k_accuracy(t, s, k=k)
    with pytest.raises(ValueError):
        skm.top_k_accuracy_score(t, s, k=1.7)
    assert M.top_k_accuracy(t, s, k=np.int64(2)) == skm.top_k_accuracy_score(t, s, k=2)
    for name in ("top0", "top00"):
        with pytest.raises(mpscy.InvalidArgumentError, match=f"{name!r}.*k >= 1"):
            M.get(name)
    assert M.get("top2")(t, s) == skm.top_k_accuracy_score(t, s, k=2)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # scikit-learn's, on Inf
def test_nan_and_inf_inputs_are_refused_by_name():
    """NaN or Inf in y_true, y_pred or scores is refused naming the argument, as scikit-learn's
    "Input y_true contains NaN": mae had returned NaN and accuracy 0.5 (NaN != NaN)."""
    t, p, s = np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.1, 0.9, 0.4, 0.3])
    s2 = np.c_[1 - s, s]
    cases = [  # (ours, scikit-learn's, the names of the two arguments; each in turn gets the bad value)
        (M.accuracy, skm.accuracy_score, ("y_true", "y_pred")),
        (M.confusion_matrix, skm.confusion_matrix, ("y_true", "y_pred")),
        (M.f1, skm.f1_score, ("y_true", "y_pred")),
        (M.precision, skm.precision_score, ("y_true", "y_pred")),
        (M.mae, skm.mean_absolute_error, ("y_true", "y_pred")),
        (M.mse, skm.mean_squared_error, ("y_true", "y_pred")),
        (M.rmse, skm.root_mean_squared_error, ("y_true", "y_pred")),
        (M.r2, skm.r2_score, ("y_true", "y_pred")),
        (M.roc_auc, skm.roc_auc_score, ("y_true", "scores")),
        (M.pr_auc, skm.average_precision_score, ("y_true", "scores")),
        (M.roc_curve, skm.roc_curve, ("y_true", "scores")),
        (M.precision_recall_curve, skm.precision_recall_curve, ("y_true", "scores")),
    ]
    for bad in (np.nan, np.inf, -np.inf):
        for ours, theirs, names in cases:
            for k, name in enumerate(names):
                args = [t.copy(), (s if names[1] == "scores" else p).copy()]
                args[k][1] = bad
                with pytest.raises(ValueError, match="contains"):
                    theirs(*args)
                with pytest.raises(mpscy.InvalidArgumentError, match=rf"^{name} contains NaN or Inf at row 1$"):
                    ours(*args)
        bad_t = t.copy()
        bad_t[2] = bad
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^y_true contains NaN or Inf at row 2$"):
            M.top_k_accuracy(bad_t, s2, k=1)
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^y_true contains NaN or Inf at row 2$"):
            M.roc_auc(bad_t, s2)
        bad_s = s2.copy()
        bad_s[1, 0] = bad
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^scores contains NaN or Inf at row 1$"):
            M.top_k_accuracy(t.astype(int), bad_s, k=1)
    wide = np.zeros((4, 3))
    wide[2, 1] = np.nan
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^y_pred contains NaN or Inf at row 2$"):
        M.mae(np.zeros((4, 3)), wide)
    assert M.accuracy(["a", "b"], ["a", "a"]) == 0.5      # string labels hold no NaN


def test_metric_names_and_averages_that_int_or_a_comparison_cannot_take():
    """"top²" passed str.isdigit() and then int() raised a raw ValueError; an array `average`
    was compared with the names: NumPy's ambiguous truth value."""
    for name in ("top²", "top٣", "top 2"):
        with pytest.raises(mpscy.InvalidArgumentError, match=f"^unknown metric {name!r}"):
            M.get(name)
    t = np.array([0, 1, 1, 0])
    with pytest.raises(mpscy.InvalidArgumentError,
                       match=r"^average must be 'binary', 'macro', 'micro', 'weighted' or None, got array"):
        M.precision_recall_f1(t, t, average=np.array(["macro", "micro"]))
    assert M.precision_recall_f1(t, t, average="macro") == (1.0, 1.0, 1.0)


def test_labels_of_other_widths_and_kinds_are_counted_as_scikit_learn_does():
    """labels longer than the data's strings, a float label among integers and one string class
    under the default pos_label: scikit-learn's 0.6667, 0.3333 and 0.0 (a numpy array of both
    had cut 'zz' to 'z' and 1.5 to 1, and each ended in an IndexError)."""
    assert M.f1(["a", "b"], ["a", "b"], average="macro", labels=["a", "b", "zz"]) == pytest.approx(2 / 3)
    assert M.f1([0, 1, 1], [0, 1, 0], average="macro", labels=[0, 1.5]) == pytest.approx(1 / 3)
    assert M.f1(["a", "a"], ["a", "a"]) == 0.0
    assert M.f1([0, 0, 1], [0, 0, 0], zero_division="warn") == 0.0  # scikit-learn's default, as 0


@pytest.mark.parametrize("call,message", [
    (lambda: M.confusion_matrix(["a", "b"], [0, 1]), r"mix label types \(<U1 and int64\)"),
    (lambda: M.accuracy(["a", "b"], [0, 1]), "mix label types"),
    (lambda: M.accuracy([0, 1], [0.2, 0.9]), "y_pred holds values that are not whole numbers"),
    (lambda: M.accuracy([[1, 2], [3]], [1, 2]), "y_true must be an array of labels"),
    (lambda: M.roc_auc([0, 1], ["a", "b"]), "scores must be an array of numbers"),
    (lambda: M.mse(["a"], [1.0]), "y_true must be an array of numbers"),
    (lambda: M.r2(np.array([1j, 2]), [1.0, 2.0]), "y_true must be an array of numbers"),
    (lambda: M.f1([0, 1], [0, 1], average="macro", labels=["a"]), r"labels \(<U1\) are not of the labels' type"),
    (lambda: M.f1([0, 1], [0, 1], average="macro", labels=[[0, 1]]), r"labels must be a non-empty 1-D"),
    (lambda: M.f1([0, 1], [1, 1], zero_division=2), "zero_division must be 0, 1, np.nan or 'warn', got 2"),
])
def test_labels_of_mixed_kinds_and_non_arrays_are_named(call, message):
    """Strings against numbers and scores where labels go are refused, as scikit-learn's "mix of
    label input types" (they had counted as mismatches: a matrix of zeros, an accuracy of 0);
    ragged, string and complex arrays are mpscy errors, not numpy's."""
    with pytest.raises(mpscy.InvalidArgumentError, match=message):
        call()


@pytest.mark.parametrize("value, shown", [
    (np.array([0.1, 0.2, 0.3]), r"an array of shape \(3,\)"),
    ([0.1, 0.2], r"a list of shape \(2,\)"),
    (None, "None"),
    ("0.5", "'0.5'"),
    (1j, "1j"),
])
def test_a_metric_function_returning_no_single_number_is_named(value, shown):
    """float() of a metric function's array result raised an unnamed TypeError ("only
    0-dimensional arrays can be converted to Python scalars"); it is now refused naming the
    metric and what it returned. Python, NumPy and 0-d values are one number."""
    def per_output(t, p):
        return value

    with pytest.raises(mpscy.InvalidArgumentError, match=rf"^metric 'per_output' returned {shown}; a metric function "
                                                         r"returns one number \(reduce per-output values to one, "
                                                         r"e\.g\. with np\.mean\)$"):
        M.get(per_output)(np.zeros(3), np.zeros((3, 1)))
    for ok in (1, 0.5, np.float32(0.25), np.int64(2), np.array(0.75), np.bool_(True)):
        assert M.get(lambda t, p: ok)(np.zeros(3), np.zeros((3, 1))) == float(ok)


def test_a_metric_function_may_return_a_torch_scalar():
    """A 0-d torch tensor that requires grad or is bfloat16 is one number (float() took them;
    np.asarray refuses the first and has no dtype for the second)."""
    torch = pytest.importorskip("torch")
    for value, want in ((torch.tensor(0.5, requires_grad=True) * 1, 0.5), (torch.tensor(0.25).bfloat16(), 0.25)):
        assert M.get(lambda t, p: value)(np.zeros(3), np.zeros((3, 1))) == want


def test_fit_names_a_metric_function_that_returns_an_array():
    """In fit, at the metric's first evaluation (the first epoch's end), the same error ends the
    run, naming the metric; it is not taken for a metric the data leave undefined (logged NaN)."""
    from mpscy import layers, optim
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 5)).astype(np.float32), rng.standard_normal((64, 3)).astype(np.float32)
    e = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(5,)), loss="mse", optimizer=optim.SGD(0.1),
                     batch_size=16, device="cpu")

    def per_output_mae(t, p):
        return np.abs(t - p).mean(axis=0)

    with pytest.raises(mpscy.InvalidArgumentError, match=r"^metric 'per_output_mae' returned an array of shape "
                                                         r"\(3,\); a metric function returns one number"):
        e.fit(x, y, epochs=3, metrics=["mae", per_output_mae], verbose=0)
    assert e.epoch == 1
