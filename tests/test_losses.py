"""Every loss of issue 3: value and gradient against the float64 references of layer_refs.py
(their gradients checked by central finite differences), against torch.nn.functional where it
is installed, label smoothing, single-output binary heads, accuracy kinds, and option errors.
The model under test is the identity (Dropout(0.0)), so d loss / d input is d loss / d output."""
import os
import re
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import layers, losses, optim

import layer_refs as R

# The identity model hands the loss its inputs: the probability losses' inputs are probabilities
# here, though no Sigmoid or Softmax made them (what Engine warns about; tested below).
pytestmark = pytest.mark.filterwarnings("ignore:loss .* takes probabilities:UserWarning")


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def make_case(kind, rng, smoothing=0.0, single=False, edges=False):
    """(outputs, targets) for one loss: logits, probabilities or values, shaped for the loss."""
    if kind in ("sparse_cross_entropy", "cross_entropy", "categorical_cross_entropy"):
        out = rng.standard_normal((6, 5)) * 2
        labels = rng.integers(0, 5, 6)
        if kind == "sparse_cross_entropy":
            return out, labels
        target = softmax(rng.standard_normal((6, 5))) if not edges else np.eye(5)[labels]
        if kind == "categorical_cross_entropy":
            out = softmax(out)
            if edges:
                out[0, 1], out[2, 3] = 1e-9, 0.0  # below the 1e-7 clamp: no gradient there
        return out, target
    shape = (7, 1) if single else (4, 3, 2)
    if kind == "binary_cross_entropy":
        out = 1 / (1 + np.exp(-rng.standard_normal(shape) * 2))
        if edges:
            out.flat[0], out.flat[1] = 0.0, 1.0  # logs clamped at -100, gradient by max(p(1-p), 1e-12)
        return out, rng.uniform(0, 1, shape) if not single else rng.integers(0, 2, shape).astype(float)
    if kind == "bce_with_logits":
        return rng.standard_normal(shape) * 3, rng.uniform(0, 1, shape) if not single else \
            rng.integers(0, 2, shape).astype(float)
    out, target = rng.standard_normal(shape) * 2, rng.standard_normal(shape) * 2
    if edges:
        target.flat[0] = out.flat[0]  # a zero difference: MAE's gradient is sign(0) = 0
    return out, target


LOSSES = {
    "sparse_cross_entropy": lambda s, d: losses.SparseCrossEntropy(label_smoothing=s),
    "cross_entropy": lambda s, d: losses.CrossEntropy(label_smoothing=s),
    "categorical_cross_entropy": lambda s, d: losses.CategoricalCrossEntropy(label_smoothing=s),
    "binary_cross_entropy": lambda s, d: losses.BinaryCrossEntropy(),
    "bce_with_logits": lambda s, d: losses.BCEWithLogits(),
    "mse": lambda s, d: losses.MSE(),
    "mae": lambda s, d: losses.MAE(),
    "huber": lambda s, d: losses.Huber(delta=d),
}

CASES = [
    ("sparse_cross_entropy", 0.0, 1.0, False), ("sparse_cross_entropy", 0.1, 1.0, False),
    ("sparse_cross_entropy", 1.0, 1.0, False),
    ("cross_entropy", 0.0, 1.0, False), ("cross_entropy", 0.2, 1.0, False), ("cross_entropy", 0.2, 1.0, True),
    ("categorical_cross_entropy", 0.0, 1.0, False), ("categorical_cross_entropy", 0.1, 1.0, True),
    ("binary_cross_entropy", 0.0, 1.0, False), ("binary_cross_entropy", 0.0, 1.0, True),
    ("bce_with_logits", 0.0, 1.0, False),
    ("mse", 0.0, 1.0, False), ("mae", 0.0, 1.0, False), ("mae", 0.0, 1.0, True),
    ("huber", 0.0, 1.0, False), ("huber", 0.0, 0.4, False), ("huber", 0.0, 3.0, False),
]
IDS = [f"{k}-s{s}-d{d}{'-edges' if e else ''}" for k, s, d, e in CASES]


def identity_engine(device, loss, shape, batch):
    model = mpscy.Sequential([layers.Dropout(0.0)], input_shape=shape)
    return mpscy.Engine(model, loss=loss, optimizer=optim.SGD(lr=0.0), batch_size=batch, device=device,
                        input_gradients=True)


def native(device, kind, out, target, smoothing=0.0, delta=1.0, label_dtype=np.int64):
    engine = identity_engine(device, LOSSES[kind](smoothing, delta), out.shape[1:], len(out))
    y = target.astype(label_dtype) if kind == "sparse_cross_entropy" else target.astype(np.float32)
    g = engine.gradients(out.astype(np.float32), y)
    return g["loss"], g["input"], engine


@pytest.mark.parametrize("kind,smoothing,delta,edges", [c for c in CASES if not c[3]],
                         ids=[i for i, c in zip(IDS, CASES) if not c[3]])
def test_reference_gradient_matches_finite_differences(rng, kind, smoothing, delta, edges):
    out, target = make_case(kind, rng, smoothing)
    _, grad = R.loss_ref(kind, out, target, smoothing, delta)
    num = R.numeric_grad(lambda: R.loss_ref(kind, out, target, smoothing, delta)[0], out, eps=1e-7)
    assert R.rel_err(grad, num) < 1e-6


@pytest.mark.parametrize("kind,smoothing,delta,edges", CASES, ids=IDS)
def test_loss_and_gradient_match_reference(device, rng, kind, smoothing, delta, edges):
    out, target = make_case(kind, rng, smoothing, edges=edges)
    out = out.astype(np.float32).astype(np.float64)  # the values the native code sees
    ref, grad = R.loss_ref(kind, out, target.astype(np.float32).astype(np.float64) if kind != "sparse_cross_entropy"
                           else target, smoothing, delta)
    value, g, _ = native(device, kind, out, target, smoothing, delta)
    assert abs(value - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert g.shape == out.shape
    assert R.rel_err(g, grad) < 1e-5
    if edges and kind == "categorical_cross_entropy":
        assert g[0, 1] == 0 and g[2, 3] == 0


def test_sparse_labels_int32_and_int64_agree(device, rng):
    out, labels = make_case("sparse_cross_entropy", rng)
    a = native(device, "sparse_cross_entropy", out, labels, 0.1, label_dtype=np.int64)
    b = native(device, "sparse_cross_entropy", out, labels, 0.1, label_dtype=np.int32)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])


def test_label_smoothing_mixes_targets_with_uniform(device, rng):
    """Sparse labels smoothed by s equal one-hot probability targets smoothed by s, and equal the
    closed form (1 - s) * nll + s * mean(-log p)."""
    out, labels = make_case("sparse_cross_entropy", rng)
    s = 0.3
    sparse = native(device, "sparse_cross_entropy", out, labels, s)
    dense = native(device, "cross_entropy", out, np.eye(5)[labels], s)
    assert abs(sparse[0] - dense[0]) < 1e-6 and R.rel_err(sparse[1], dense[1]) < 1e-6
    logp = np.log(softmax(out.astype(np.float32).astype(np.float64)))
    closed = (1 - s) * -logp[np.arange(6), labels].mean() + s * -logp.mean(1).mean()
    assert abs(sparse[0] - closed) < 1e-6


@pytest.mark.parametrize("kind,smoothing,delta,edges", CASES, ids=IDS)
def test_loss_matches_pytorch(device, rng, kind, smoothing, delta, edges):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    out, target = make_case(kind, rng, smoothing, edges=edges)
    o = torch.tensor(out.astype(np.float32).astype(np.float64), requires_grad=True)
    t = torch.tensor(target) if kind == "sparse_cross_entropy" else torch.tensor(target.astype(np.float32).astype(np.float64))
    if kind in ("sparse_cross_entropy", "cross_entropy"):
        loss = F.cross_entropy(o, t, label_smoothing=smoothing)
    elif kind == "categorical_cross_entropy":
        q = (1 - smoothing) * t + smoothing / o.shape[1]
        loss = -(q * torch.log(torch.clamp(o, min=1e-7))).sum(1).mean()
    elif kind == "binary_cross_entropy":
        loss = F.binary_cross_entropy(o, t)
    elif kind == "bce_with_logits":
        loss = F.binary_cross_entropy_with_logits(o, t)
    elif kind == "mse":
        loss = F.mse_loss(o, t)
    elif kind == "mae":
        loss = F.l1_loss(o, t)
    else:
        loss = F.huber_loss(o, t, delta=delta)
    loss.backward()
    value, g, _ = native(device, kind, out, target, smoothing, delta)
    assert abs(value - loss.item()) <= 1e-6 * max(abs(loss.item()), 1.0)
    assert R.rel_err(g, o.grad.numpy()) < 1e-5


# ------------------------------------------------------------------ class weights (torch's weight=)

WEIGHT = np.array([0.5, 2.0, 1.0, 0.0, 3.0])        # a class of weight 0 among them
WEIGHTED = [("sparse_cross_entropy", 0.0), ("sparse_cross_entropy", 0.2), ("cross_entropy", 0.0),
            ("cross_entropy", 0.2)]
WIDS = [f"{k}-s{s}" for k, s in WEIGHTED]


def _weighted_case(kind, rng):
    out, target = make_case(kind, rng)
    out = out.astype(np.float32).astype(np.float64)
    if kind == "sparse_cross_entropy":
        target[:2] = [3, 1]                              # a label of weight 0, and one of weight 2
    else:
        target = target.astype(np.float32).astype(np.float64)
    return out, target


def _weighted_native(device, kind, out, target, smoothing):
    loss = (losses.SparseCrossEntropy if kind == "sparse_cross_entropy" else losses.CrossEntropy)(
        label_smoothing=smoothing, weight=WEIGHT)
    engine = identity_engine(device, loss, out.shape[1:], len(out))
    g = engine.gradients(out.astype(np.float32), target if kind == "sparse_cross_entropy" else target.astype(np.float32))
    return g["loss"], g["input"]


@pytest.mark.parametrize("kind,smoothing", WEIGHTED, ids=WIDS)
def test_weighted_reference_gradient_matches_finite_differences(rng, kind, smoothing):
    out, target = _weighted_case(kind, rng)
    _, grad = R.weighted_ce_ref(kind, out, target, WEIGHT, smoothing)
    num = R.numeric_grad(lambda: R.weighted_ce_ref(kind, out, target, WEIGHT, smoothing)[0], out, eps=1e-7)
    assert R.rel_err(grad, num) < 1e-6


@pytest.mark.parametrize("kind,smoothing", WEIGHTED, ids=WIDS)
def test_weighted_cross_entropy_matches_reference(device, rng, kind, smoothing):
    out, target = _weighted_case(kind, rng)
    ref, grad = R.weighted_ce_ref(kind, out, target, WEIGHT, smoothing)
    value, g = _weighted_native(device, kind, out, target, smoothing)
    assert abs(value - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert R.rel_err(g, grad) < 1e-5
    plain, _ = R.loss_ref(kind, out, target, smoothing)
    assert abs(value - plain) > 1e-2                     # the weights did change it


@pytest.mark.parametrize("kind,smoothing", WEIGHTED, ids=WIDS)
def test_weighted_cross_entropy_matches_pytorch(device, rng, kind, smoothing):
    torch = pytest.importorskip("torch")
    out, target = _weighted_case(kind, rng)
    o = torch.tensor(out, requires_grad=True)
    t = torch.tensor(target)
    loss = torch.nn.functional.cross_entropy(o, t, weight=torch.tensor(WEIGHT), label_smoothing=smoothing)
    loss.backward()
    value, g = _weighted_native(device, kind, out, target, smoothing)
    assert abs(value - loss.item()) <= 1e-6 * max(abs(loss.item()), 1.0)
    assert R.rel_err(g, o.grad.numpy()) < 1e-5


def test_weighted_training_matches_the_reference_over_steps(device):
    """A Dense model trained 20 steps with SGD under weighted sparse cross-entropy: parameters
    against the float64 reference (the loss's gradient through the Dense layer), accuracy unweighted."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.integers(0, 5, 32)
    model = mpscy.Sequential([layers.Dense(5)], input_shape=(6,))
    e = mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=WEIGHT, label_smoothing=0.1),
                     optimizer=optim.SGD(lr=0.5), batch_size=32, device=device, seed=1)
    p = {k: v.astype(np.float64) for k, v in e.get_parameters().items()}
    xd = x.astype(np.float64)
    for _ in range(20):
        out = xd @ p["dense_0.weight"].T + p["dense_0.bias"]
        value, d = R.weighted_ce_ref("sparse_cross_entropy", out, y, WEIGHT, 0.1)
        r = e.step(x, y)
        assert r.loss == pytest.approx(value, rel=1e-5)
        assert r.accuracy == pytest.approx(float((out.argmax(1) == y).mean()))
        p = {"dense_0.weight": p["dense_0.weight"] - 0.5 * d.T @ xd, "dense_0.bias": p["dense_0.bias"] - 0.5 * d.sum(0)}
    got = e.get_parameters()
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=1e-4, atol=1e-5)


def test_labels_that_all_weigh_zero_give_a_nonfinite_step(device):
    """torch's weighted mean is 0/0 there (NaN): the step raises and changes nothing."""
    model = mpscy.Sequential([layers.Dense(5)], input_shape=(3,))
    e = mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=WEIGHT), optimizer=optim.Adam(0.1), batch_size=4,
                     device=device)
    before = e.get_parameters()
    with pytest.raises(mpscy.NonFiniteError):
        e.step(np.ones((4, 3), np.float32), np.array([3, 3, 3, 3]))
    for k, v in e.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    assert e.step(np.ones((4, 3), np.float32), np.array([3, 3, 1, 3])).applied


@pytest.mark.parametrize("weight,error,match", [
    ([1.0, -1.0], mpscy.InvalidArgumentError, r"finite and >= 0, got \[1.0, -1.0\]"),
    ([1.0, float("nan")], mpscy.InvalidArgumentError, "finite and >= 0"),
    ([0.0, 0.0, 0.0], mpscy.InvalidArgumentError, "a class weighted above 0"),
    ([[1.0, 2.0]], mpscy.InvalidArgumentError, r"one number per class .* got shape \(1, 2\)"),
    ([1.0], mpscy.InvalidArgumentError, r"got shape \(1,\)"),
    ("abc", mpscy.InvalidArgumentError, "weight must be a sequence of numbers"),
    ([True, False], mpscy.InvalidArgumentError, "weight must be a sequence of numbers"),
    (["1", "2"], mpscy.InvalidArgumentError, "weight must be a sequence of numbers"),
    ([1.0, None], mpscy.InvalidArgumentError, "weight must be a sequence of numbers"),
    ([1e39, 1.0], mpscy.InvalidArgumentError, r"must fit float32 \(at most 3.403e\+38\), got \[1e\+39, 1.0\]"),
    ([1e-50, 1e-50], mpscy.InvalidArgumentError, "a class weighted above 0 in float32"),
    ({0: 1.0, 2: 3.0}, mpscy.InvalidArgumentError,
     r"weight as a dict must give every class 0..C-1 \(C >= 2\) a weight \(as Keras's class_weight\), got classes "
     r"\[0, 2\], without \[1\]"),
    ({0: 2.0}, mpscy.InvalidArgumentError, r"every class 0..C-1 \(C >= 2\) a weight .*got classes \[0\]$"),
    ({"a": 1.0, "b": 2.0}, mpscy.InvalidArgumentError, r"maps class indices \(integers\) to weights"),
    ({-1: 1.0, 0: 2.0}, mpscy.InvalidArgumentError, r"every class 0..C-1"),
    ({}, mpscy.InvalidArgumentError, r"every class 0..C-1"),
])
def test_bad_class_weights(weight, error, match):
    for cls in (losses.SparseCrossEntropy, losses.CrossEntropy):
        with pytest.raises(error, match=match):
            cls(weight=weight)
    with pytest.raises(TypeError):
        losses.CategoricalCrossEntropy(weight=[1.0, 2.0])


def test_evaluate_takes_the_weighted_mean_over_the_whole_set(rng):
    """evaluate over several batches, and fit's val_loss over a DataLoader, give torch's weighted
    mean over all rows (sum w l / sum w), whatever the batch size; a batch whose labels all weigh
    0 adds nothing to it (torch's mean over the set stays finite)."""
    x = rng.standard_normal((100, 6)).astype(np.float32)
    y = rng.integers(0, 5, 100)
    y[40:48] = 3                                             # one batch of 8 all of weight 0
    model = mpscy.Sequential([layers.Dense(5)], input_shape=(6,))
    loss = losses.SparseCrossEntropy(weight=WEIGHT, label_smoothing=0.1)
    got = {}
    for batch in (8, 32, 100):
        e = mpscy.Engine(model if batch == 8 else mpscy.Sequential([layers.Dense(5)], input_shape=(6,)), loss=loss,
                         batch_size=batch, device="cpu", seed=4)
        got[batch] = e.evaluate(x, y)["loss"]
        if batch == 8:
            loader = mpscy.data.DataLoader(mpscy.data.ArrayDataset(x, y), batch_size=8, shuffle=False)
            from mpscy import _sources
            got["loader"] = _sources._evaluate(e, loader)["loss"]
            p = {k: v.astype(np.float64) for k, v in e.get_parameters().items()}
    out = x.astype(np.float64) @ p["dense_0.weight"].T + p["dense_0.bias"]
    want, _ = R.weighted_ce_ref("sparse_cross_entropy", out, y, WEIGHT.astype(np.float32), 0.1)
    for k, v in got.items():
        assert v == pytest.approx(want, rel=1e-6), k


def test_a_batch_whose_labels_all_weigh_zero_is_named():
    model = mpscy.Sequential([layers.Dense(5)], input_shape=(3,))
    e = mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=WEIGHT), batch_size=4, device="cpu")
    x, y = np.ones((4, 3), np.float32), np.array([3, 3, 3, 3])
    for call in (e.step, e.gradients):
        with pytest.raises(mpscy.NonFiniteError, match="every label of this batch has class weight 0"):
            call(x, y)
    with pytest.raises(mpscy.NonFiniteError, match="epoch 1, batch 0: .*every label of this batch has class weight 0"):
        e.fit(x, y, epochs=1, verbose=0, shuffle=False)
    assert np.isnan(e.evaluate(x, y)["loss"])                # torch's 0/0 for a set of such rows alone
    plain = mpscy.Engine(mpscy.Sequential([layers.Dense(5)], input_shape=(3,)), batch_size=4, device="cpu")
    x[0, 0] = np.nan
    with pytest.raises(mpscy.NonFiniteError) as info:
        plain.step(x, np.array([0, 1, 2, 3]))
    assert "class weight" not in str(info.value)


def test_class_weights_as_keras_s_dict_are_the_same_weights():
    """Keras's class_weight dict {class: weight}, in any key order (numpy keys too), is the list of
    those weights by class."""
    d = {np.int64(2): 0.5, 0: 1.0, 1: 3.0}
    for cls in (losses.SparseCrossEntropy, losses.CrossEntropy):
        assert cls(weight=d).weight == (1.0, 3.0, 0.5)
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(4,))
    x, y = np.ones((4, 4), np.float32), np.array([0, 1, 2, 1])
    a = mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=d), batch_size=4, device="cpu", seed=1)
    b = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)),
                     loss=losses.SparseCrossEntropy(weight=[1.0, 3.0, 0.5]), batch_size=4, device="cpu", seed=1)
    assert a.step(x, y).loss == b.step(x, y).loss


def test_class_weights_must_match_the_classes():
    model = mpscy.Sequential([layers.Dense(4)], input_shape=(3,))
    with pytest.raises(mpscy.ShapeError, match="3 class weights for an output of 4 classes"):
        mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=[1, 2, 3]), device="cpu")


def test_class_weights_survive_a_checkpoint(tmp_path):
    model = mpscy.Sequential([layers.Dense(5)], input_shape=(3,))
    e = mpscy.Engine(model, loss=losses.SparseCrossEntropy(weight=WEIGHT, label_smoothing=0.1), batch_size=4,
                     device="cpu")
    e.save(tmp_path / "w.mpscy")
    loaded = mpscy.load(tmp_path / "w.mpscy", device="cpu")
    assert loaded.loss.weight == tuple(WEIGHT) and repr(loaded.loss) == repr(e.loss)
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 2, 4])
    assert loaded.evaluate(x, y)["loss"] == e.evaluate(x, y)["loss"]


# ------------------------------------------------------------------ pos_weight (BCEWithLogits)

POS_CASES = {  # per-sample output shape, pos_weight
    "per_label": ((3,), [0.5, 4.0, 0.0]),
    "single_output": ((1,), [3.0]),
    "one_for_all": ((4,), [2.5]),
    "last_axis_of_3d": ((3, 2), [1.5, 0.25]),
}


def _pos_case(name, rng):
    shape, pw = POS_CASES[name]
    out = (rng.standard_normal((7,) + shape) * 3).astype(np.float32).astype(np.float64)
    target = rng.uniform(0, 1, (7,) + shape)
    target[:3] = np.round(target[:3])
    return out, target.astype(np.float32).astype(np.float64), pw


@pytest.mark.parametrize("name", sorted(POS_CASES))
def test_pos_weight_reference_gradient_matches_finite_differences(rng, name):
    out, target, pw = _pos_case(name, rng)
    _, grad = R.bce_pos_weight_ref(out, target, pw)
    num = R.numeric_grad(lambda: R.bce_pos_weight_ref(out, target, pw)[0], out, eps=1e-7)
    assert R.rel_err(grad, num) < 1e-6


@pytest.mark.parametrize("name", sorted(POS_CASES))
def test_pos_weight_matches_reference_and_pytorch(device, rng, name):
    out, target, pw = _pos_case(name, rng)
    ref, grad = R.bce_pos_weight_ref(out, target, pw)
    engine = identity_engine(device, losses.BCEWithLogits(pos_weight=pw), out.shape[1:], len(out))
    g = engine.gradients(out.astype(np.float32), target.astype(np.float32))
    assert abs(g["loss"] - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert R.rel_err(g["input"], grad) < 1e-5
    assert abs(g["loss"] - R.loss_ref("bce_with_logits", out, target)[0]) > 1e-2   # the weights did change it
    try:
        import torch
    except ImportError:
        return
    o = torch.tensor(out, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(o, torch.tensor(target),
                                                                pos_weight=torch.tensor(pw, dtype=torch.float64))
    loss.backward()
    assert abs(g["loss"] - loss.item()) <= 1e-6 * max(abs(loss.item()), 1.0)
    assert R.rel_err(g["input"], o.grad.numpy()) < 1e-5


def test_pos_weight_options():
    assert losses.BCEWithLogits(pos_weight=2).pos_weight == (2.0,)
    assert losses.BCEWithLogits(pos_weight=np.array(3.0)).pos_weight == (3.0,)   # a 0-d array, as torch.tensor(3.)
    assert repr(losses.BCEWithLogits(pos_weight=[1, 2])) == "BCEWithLogits(pos_weight=[1.0, 2.0])"
    assert repr(losses.BCEWithLogits()) == "BCEWithLogits()"
    for bad, match in (([1.0, -1.0], "finite and >= 0"), ([float("inf")], "finite and >= 0"),
                       ([[1.0]], r"got shape \(1, 1\)"), ([], r"got shape \(0,\)"), ("x", "sequence of numbers"),
                       (True, "sequence of numbers"), (1e39, "must fit float32")):
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            losses.BCEWithLogits(pos_weight=bad)
    with pytest.raises(TypeError):
        losses.BinaryCrossEntropy(pos_weight=[1.0])
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    with pytest.raises(mpscy.ShapeError, match="2 pos_weight values for an output whose last axis has 3 elements"):
        mpscy.Engine(model, loss=losses.BCEWithLogits(pos_weight=[1.0, 2.0]), device="cpu")


def test_pos_weight_survives_a_checkpoint(tmp_path):
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    e = mpscy.Engine(model, loss=losses.BCEWithLogits(pos_weight=[1.0, 2.0, 0.5]), batch_size=4, device="cpu")
    e.save(tmp_path / "p.mpscy")
    loaded = mpscy.load(tmp_path / "p.mpscy", device="cpu")
    assert loaded.loss.pos_weight == (1.0, 2.0, 0.5)
    x, y = np.ones((4, 2), np.float32), np.eye(4, 3, dtype=np.float32)
    assert loaded.evaluate(x, y)["loss"] == e.evaluate(x, y)["loss"]


# ------------------------------------------------------------------ single-output binary heads


@pytest.mark.parametrize("kind,threshold", [("bce_with_logits", 0.0), ("binary_cross_entropy", 0.5)])
@pytest.mark.parametrize("target_shape", ["(n,)", "(n, 1)"])
def test_single_output_head_loss_and_accuracy(device, rng, kind, threshold, target_shape):
    """One output per sample: no softmax over a single logit, no label inversion; targets (n,) or
    (n, 1); accuracy thresholds the output at 0 (logits) or 0.5 (probabilities)."""
    out, target = make_case(kind, rng, single=True)
    t = target.ravel() if target_shape == "(n,)" else target
    ref, grad = R.loss_ref(kind, out.astype(np.float32).astype(np.float64), target)
    value, g, engine = native(device, kind, out, t)
    assert abs(value - ref) < 1e-6 * max(ref, 1) and R.rel_err(g, grad) < 1e-5
    ev = engine.evaluate(out.astype(np.float32), t.astype(np.float32))
    expect = ((out.ravel().astype(np.float32) > threshold) == (target.ravel() > 0.5)).mean()
    assert ev["accuracy"] == pytest.approx(expect) and abs(ev["loss"] - ref) < 1e-6 * max(ref, 1)


@pytest.mark.parametrize("head", ["logits", "sigmoid"])
def test_single_output_binary_classifier_trains(device, head):
    """Digits 0-4 versus 5-9 with one output unit: train accuracy above 0.9 after 15 epochs, and
    the predicted probability is high for label 1 (labels are not inverted)."""
    x, y = mpscy.datasets.load_digits()
    t = (y >= 5).astype(np.float32)
    stack = [layers.Dense(32), layers.ReLU(), layers.Dense(1)] + ([layers.Sigmoid()] if head == "sigmoid" else [])
    model = mpscy.Sequential(stack, input_shape=(64,))
    loss = "bce_with_logits" if head == "logits" else "binary_cross_entropy"
    engine = mpscy.Engine(model, loss=loss, optimizer=optim.Adam(lr=3e-3), batch_size=64, device=device, seed=0)
    first = None
    for epoch in range(15):
        for i in range(0, len(x), 64):
            r = engine.step(x[i:i + 64], t[i:i + 64])
            first = r.loss if first is None else first
    ev = engine.evaluate(x, t)
    assert ev["accuracy"] > 0.9 and ev["loss"] < 0.5 * first
    p = engine.predict(x)[:, 0]
    if head == "logits":
        p = 1 / (1 + np.exp(-p))
    assert p[t == 1].mean() > 0.7 and p[t == 0].mean() < 0.3


# ------------------------------------------------------------------ accuracy kinds


def test_accuracy_kinds(device, rng):
    out, labels = make_case("sparse_cross_entropy", rng)
    out32 = out.astype(np.float32)
    e = identity_engine(device, "sparse_cross_entropy", (5,), 6)
    assert e.evaluate(out32, labels)["accuracy"] == pytest.approx((out32.argmax(1) == labels).mean())
    probs = softmax(rng.standard_normal((6, 5))).astype(np.float32)
    e = identity_engine(device, "cross_entropy", (5,), 6)
    assert e.evaluate(out32, probs)["accuracy"] == pytest.approx((out32.argmax(1) == probs.argmax(1)).mean())
    e = identity_engine(device, "categorical_cross_entropy", (5,), 6)
    assert e.evaluate(softmax(out).astype(np.float32), probs)["accuracy"] == \
        pytest.approx((out32.argmax(1) == probs.argmax(1)).mean())
    for name in ("mse", "mae", "huber"):
        e = identity_engine(device, name, (5,), 6)
        assert e.evaluate(out32, probs)["accuracy"] is None
        assert e.step(out32, probs).accuracy is None


def _overflow_logits_model(device, classes, batch, w2):
    """x (u, v) -> Dense(3): (1e30 u, -1e30 u, v) -> Dense(classes) with w2 (classes, 3), no
    biases: rows with |u| = 1e10 overflow to +-inf in the hidden layer, so a class whose two
    inf weights have the same sign gets a NaN logit (inf - inf) and the others +-inf."""
    m = mpscy.Sequential([layers.Dense(3), layers.Dense(classes)], input_shape=(2,))
    e = mpscy.Engine(m, loss="sparse_cross_entropy", batch_size=batch, device=device)
    d0, d1 = m.nodes[1].name, m.nodes[2].name
    w1 = np.array([[1e30, 0.0], [-1e30, 0.0], [0.0, 1.0]], np.float32)
    e.set_parameters({f"{d0}.weight": w1, f"{d0}.bias": np.zeros(3, np.float32),
                      f"{d1}.weight": w2, f"{d1}.bias": np.zeros(classes, np.float32)})
    return e, w1


@pytest.mark.parametrize("classes", [10, 40])
def test_accuracy_argmax_takes_the_first_nan_as_numpy_and_torch(device, classes):
    """A NaN logit counts as the row's maximum and the first NaN wins (numpy's and torch's
    argmax), through evaluate (on cuda the loss kernel's warp argmax: 10 classes, a lane a class;
    40, several a lane). Before, the cpu skipped a NaN after class 0 (the row below predicted 0,
    not 3) and cuda's warp reduction kept whichever lane held a NaN. The training kernels' argmax
    (head.cu, the one-kernel step) follows the same rule but cannot be observed here: a NaN logit
    makes the step fail as not finite before its count is read."""
    # class j's weights on (h0, h1, h2): signs (+, -) give +inf for u > 0, (+, +) NaN
    signs = np.array([(1, -1)] * classes, np.float32)
    signs[3], signs[7], signs[classes - 1] = (1, 1), (-1, -1), (1, 1)
    signs[5] = (-1, 1)
    w2 = np.concatenate([signs * (1 + np.arange(classes, dtype=np.float32)[:, None] / 8),
                         np.linspace(-1, 1, classes, dtype=np.float32)[:, None]], 1)
    e, w1 = _overflow_logits_model(device, classes, 8, w2)
    x = np.array([[1e10, 0.5], [-1e10, 0.5], [0.0, 1.0], [0.0, -1.0], [1e10, -2.0], [1e-3, 0.5],
                  [-1e10, 3.0], [0.0, 0.25]], np.float32)
    with np.errstate(all="ignore"):
        h = (x[:, None, :] * w1[None]).sum(-1, dtype=np.float32)
        logits = (h[:, None, :] * w2[None]).sum(-1, dtype=np.float32)
    want = logits.argmax(1)
    assert np.isnan(logits[0, 3]) and logits[0, 0] == np.inf and want[0] == 3  # the case the cpu missed
    assert want[1] == 3 and want[2] == classes - 1 and want[3] == 0
    for shift in range(3):  # every row hit once, then missed: the count is exact, not a rate
        y = want.astype(np.int32) if shift == 0 else (want + shift) % classes
        acc = e.evaluate(x, y.astype(np.int32))["accuracy"]
        assert acc == (1.0 if shift == 0 else 0.0), (shift, acc)


def test_multi_output_threshold_accuracy_counts_elements(device, rng):
    out = rng.standard_normal((6, 3)).astype(np.float32)
    t = rng.integers(0, 2, (6, 3)).astype(np.float32)
    e = identity_engine(device, "bce_with_logits", (3,), 6)
    assert e.evaluate(out, t)["accuracy"] == pytest.approx(((out > 0) == (t > 0.5)).mean())


# ------------------------------------------------------------------ options and errors


def test_loss_names_and_classes():
    expect = {"sparse_cross_entropy": losses.SparseCrossEntropy, "cross_entropy": losses.CrossEntropy,
              "binary_cross_entropy": losses.BinaryCrossEntropy, "bce_with_logits": losses.BCEWithLogits,
              "categorical_cross_entropy": losses.CategoricalCrossEntropy, "mse": losses.MSE,
              "mae": losses.MAE, "huber": losses.Huber}
    for name, cls in expect.items():
        assert type(losses.get(name)) is cls
        assert type(losses.get(cls)) is cls
    assert losses.Huber().delta == 1.0 and losses.CrossEntropy().label_smoothing == 0.0
    assert losses.get("huber").spec((3,)) == {"kind": "huber", "accuracy": "none", "delta": 1.0}
    torch_names = {"mse_loss": losses.MSE, "MSELoss": losses.MSE, "l1": losses.MAE, "l1_loss": losses.MAE,
                   "L1Loss": losses.MAE, "huber_loss": losses.Huber, "HuberLoss": losses.Huber,
                   "smooth_l1_loss": losses.Huber, "SmoothL1Loss": losses.Huber, "BCELoss": losses.BinaryCrossEntropy,
                   "BCEWithLogitsLoss": losses.BCEWithLogits, "binary_cross_entropy_with_logits": losses.BCEWithLogits}
    for name, cls in torch_names.items():
        assert type(losses.get(name)) is cls, name
    assert losses.get("SmoothL1Loss").delta == 1.0
    with pytest.raises(mpscy.InvalidArgumentError, match="unknown loss 'CrossEntropyLoss'"):
        losses.get("CrossEntropyLoss")


def test_smooth_l1_at_beta_1_is_huber_at_delta_1_as_torch_computes_it():
    """torch's SmoothL1Loss(beta=1) and HuberLoss(delta=1) are one function: the name
    "SmoothL1Loss" gives the same loss and gradient as torch's, here against NumPy's formula."""
    rng = np.random.default_rng(0)
    d = rng.standard_normal((6, 3)) * 2
    e = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(3,)), loss="SmoothL1Loss", batch_size=6)
    e.set_parameters({"dense_0.weight": np.eye(3, dtype=np.float32), "dense_0.bias": np.zeros(3, np.float32)})
    x = d.astype(np.float32)
    a = np.abs(d)
    ref = np.where(a < 1, 0.5 * d * d, a - 0.5).mean()
    assert e.evaluate(x, np.zeros((6, 3), np.float32))["loss"] == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: losses.Huber(delta=0), "delta"),
    (lambda: losses.CrossEntropy(label_smoothing=1.5), "label_smoothing"),
    (lambda: losses.SparseCrossEntropy(label_smoothing=-0.1), "label_smoothing"),
    (lambda: losses.get("hinge"), "unknown loss"),
])
def test_bad_loss_options(make, match):
    with pytest.raises(mpscy.InvalidArgumentError, match=match):
        make()


@pytest.mark.parametrize("loss,shape,error,match", [
    ("sparse_cross_entropy", (1,), mpscy.InvalidArgumentError, "BCEWithLogits"),
    ("cross_entropy", (1, 4), mpscy.InvalidArgumentError, "takes its first dimension as the classes"),
    ("categorical_cross_entropy", (2, 2, 2), mpscy.ShapeError, r"\(classes,\) output"),
])
def test_loss_that_cannot_fit_the_output_is_refused(device, loss, shape, error, match):
    model = mpscy.Sequential([layers.Dropout(0.0)], input_shape=shape)
    with pytest.raises(error, match=match):
        mpscy.Engine(model, loss=loss, batch_size=2, device=device)


def test_target_checks(device, rng):
    e = identity_engine(device, "sparse_cross_entropy", (5,), 4)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    with pytest.raises(mpscy.DTypeError):
        e.step(x, np.zeros(4, np.float32))
    with pytest.raises(mpscy.InvalidArgumentError, match="outside"):
        e.step(x, np.array([0, 1, 5, 2]))
    e = identity_engine(device, "mse", (5,), 4)
    with pytest.raises(mpscy.ShapeError):
        e.step(x, np.zeros((4, 4), np.float32))
    with pytest.raises(mpscy.DTypeError):
        e.step(x, np.zeros((4, 5), np.int64))


def test_sparse_cross_entropy_ignores_a_minus_inf_logit_off_the_label(device):
    """F.cross_entropy([[1, 1, -inf]], [0]) is log 2 with gradient (-0.5, 0.5, 0): nll_loss reads
    only the label's log-probability. A logit that overflowed to -inf off the label must not turn
    the loss into NaN (0 * -inf) and skip a step torch takes."""
    model = mpscy.Sequential([layers.Dense(3, bias=False, name="d")], input_shape=(2,))
    engine = mpscy.Engine(model, loss=losses.SparseCrossEntropy(), optimizer=optim.SGD(lr=0.1), batch_size=1,
                          device=device)
    engine.set_parameters({"d.weight": np.array([[1, 0], [0, 1], [-3e38, -3e38]], np.float32)})
    x, y = np.ones((1, 2), np.float32), np.array([0])
    assert engine.predict(x)[0, 2] == -np.inf  # the third logit overflows
    g = engine.gradients(x, y)
    assert abs(g["loss"] - np.log(2.0)) < 1e-6
    assert np.allclose(g["d.weight"], [[-0.5, -0.5], [0.5, 0.5], [0.0, 0.0]])


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_cross_entropy_probability_targets_not_summing_to_one(device, rng, scale):
    """F.cross_entropy with probability targets q whose rows sum to s != 1 (multi-label or
    unnormalized): d loss / d logits = (softmax * s - q) / n, so the row sum of q matters."""
    out = (rng.standard_normal((6, 5)) * 2).astype(np.float32)
    q = rng.uniform(0.0, 1.0, (6, 5))
    q = (scale * q / q.sum(1, keepdims=True)).astype(np.float32)
    model = mpscy.Sequential([layers.Dropout(0.0)], input_shape=(5,))
    engine = mpscy.Engine(model, loss=losses.CrossEntropy(), optimizer=optim.SGD(lr=0.0), batch_size=6,
                          device=device, input_gradients=True)
    g = engine.gradients(out, q)
    ref, grad = R.loss_ref("cross_entropy", out.astype(np.float64), q.astype(np.float64))
    assert abs(g["loss"] - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert R.rel_err(g["input"], grad) < 1e-5


@pytest.mark.parametrize("make, match", [
    (lambda v: losses.Huber(delta=v), "huber delta must be a number, got {v!r}"),
    (lambda v: losses.SparseCrossEntropy(label_smoothing=v), "label_smoothing must be a number, got {v!r}"),
    (lambda v: losses.CrossEntropy(label_smoothing=v), "label_smoothing must be a number, got {v!r}"),
])
@pytest.mark.parametrize("value", ["abc", None, [0.1], 10**400], ids=["str", "None", "list", "10**400"])
def test_loss_options_that_are_no_number_are_named(make, match, value):
    """A bare float() had raised a raw ValueError, TypeError or OverflowError."""
    with pytest.raises(mpscy.InvalidArgumentError) as e:
        make(value)
    assert str(e.value) == match.format(v=value)


def test_base_classes_are_refused_by_the_engine():
    """losses.Loss (the class or an instance) has no native kind: the engine's build failed
    with KeyError 'None'; optim.Optimizer has no native update: NotImplementedError with an
    empty message. Both are refused naming the class and the choices."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(4,))
    for loss in (losses.Loss, losses.Loss()):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^loss Loss has no native kind \(None\); choose one of "
                                                             r"the mpscy.losses classes \['BCEWithLogits', .*'MSE', "
                                                             r"'SparseCrossEntropy'\] or a name$"):
            mpscy.Engine(model, loss=loss, device="cpu")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^Optimizer has no native update .*choose one of \['SGD', "
                                                         r"'Adam', .*'LBFGS'\]$"):
        mpscy.Engine(model, optimizer=optim.Optimizer(0.1), device="cpu")
    assert mpscy.Engine(model, loss=losses.MSE, device="cpu").loss.kind == "mse"


# ----------------------------------------------------------------------------- output and loss
def _model(tail, classes=4):
    x = mpscy.Input((6,))
    h = layers.Dense(classes)(x)
    return mpscy.Model(x, tail(h) if tail else h)


_MISMATCH = [
    # (loss, what ends the model, the warning's words or None)
    ("binary_cross_entropy", None, "binary_cross_entropy takes probabilities, but the model's output comes from "
                                   "Dense 'dense_0', which is not squashed into \\[0, 1\\]: end the model with a "
                                   "Sigmoid, or train on the logits with 'bce_with_logits'"),
    ("bce", lambda h: layers.Tanh()(h), "comes from Tanh 'tanh_1'"),
    ("binary_cross_entropy", lambda h: layers.Sigmoid()(h), None),
    ("binary_cross_entropy", lambda h: layers.Hardsigmoid()(h), None),
    ("binary_cross_entropy", lambda h: layers.Hardswish()(h), "comes from Hardswish 'hardswish_1'"),
    ("binary_cross_entropy", lambda h: layers.Flatten()(layers.Sigmoid()(h)), None),
    ("binary_cross_entropy", lambda h: layers.Concatenate()([layers.Sigmoid()(h), layers.Softmax()(h)]), None),
    ("binary_cross_entropy", lambda h: layers.Concatenate()([layers.Sigmoid()(h), h]), "Concatenate 'concatenate_2'"),
    ("categorical_cross_entropy", None, "categorical_cross_entropy takes probabilities, but the model's output comes "
                                        "from Dense 'dense_0'.*end the model with a Softmax, or train on the logits "
                                        "with 'cross_entropy'"),
    ("categorical_cross_entropy", lambda h: layers.Softmax()(h), None),
    ("sparse_cross_entropy", lambda h: layers.Softmax()(h), "sparse_cross_entropy takes logits and applies the "
                                                            "softmax itself, but the model's output is Softmax "
                                                            "'softmax_1': it would be applied twice \\(remove the "
                                                            "Softmax, or use 'categorical_cross_entropy'\\)"),
    ("cross_entropy", lambda h: layers.Softmax()(h), "cross_entropy takes logits"),
    ("bce_with_logits", lambda h: layers.Sigmoid()(h), "applies the sigmoid itself.*use 'binary_cross_entropy'"),
    ("sparse_cross_entropy", None, None),
    ("sparse_cross_entropy", lambda h: layers.Sigmoid()(h), None),
    ("bce_with_logits", None, None),
    ("mse", lambda h: layers.Softmax()(h), None),
]


@pytest.mark.parametrize("loss, tail, words", _MISMATCH)
def test_an_output_the_loss_does_not_take_is_warned_about(device, loss, tail, words, recwarn):
    """A probability loss on an output no Sigmoid or Softmax squashed (torch's
    binary_cross_entropy raises on values outside [0, 1]; here steps would train on them), and a
    logit loss on a Softmax's or Sigmoid's output (squashed twice; tf.keras warns): one
    UserWarning when the engine is built, naming the layer and the fix; none otherwise."""
    mpscy.Engine(_model(tail), loss=loss, batch_size=4, device=device)
    got = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    if words is None:
        assert got == []
    else:
        assert len(got) == 1 and re.search(words, got[0]), got



def test_keras_s_sparse_categorical_crossentropy_on_a_softmax_is_refused(recwarn):
    """Under Keras's name the loss takes probabilities (from_logits=False); mpscy's takes logits,
    so the Keras model's Softmax output would be squashed twice: refused, saying so; the same loss
    by its own name only warns, and Keras's name on logits builds."""
    with pytest.raises(mpscy.InvalidArgumentError,
                       match=r"^loss 'sparse_categorical_crossentropy' \(mpscy's sparse_cross_entropy\) takes logits "
                             r".*output is Softmax 'softmax_1': it would be applied twice .*Keras's "
                             r"'sparse_categorical_crossentropy' takes probabilities by default; mpscy's, as torch's "
                             r"CrossEntropyLoss, takes logits \(Keras's from_logits=True\)"):
        mpscy.Engine(_model(lambda h: layers.Flatten()(layers.Softmax()(h))), loss="sparse_categorical_crossentropy",
                     batch_size=4, device="cpu")
    mpscy.Engine(_model(None), loss="Sparse_Categorical_Crossentropy", batch_size=4, device="cpu")
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []
    assert isinstance(mpscy.losses.get("binary_crossentropy"), mpscy.losses.BinaryCrossEntropy)


def test_a_loss_the_output_cannot_take_is_refused_without_a_warning_first(recwarn):
    """The loss's own check of the output's shape comes first: a one-unit Softmax under
    sparse_cross_entropy is refused (it needs 2 classes or more), with no warning about the
    Softmax before it."""
    model = mpscy.Sequential([layers.Dense(1), layers.Softmax()], input_shape=(4,))
    with pytest.raises(mpscy.InvalidArgumentError, match="at least 2 classes"):
        mpscy.Engine(model, loss="sparse_cross_entropy", device="cpu")
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []


def test_cross_entropy_outputs_it_cannot_take_are_named():
    """Categorical cross entropy (on probabilities) takes (classes,) outputs only; a cross entropy
    on logits over (1, H, W) is told that the first dimension is the classes, with the
    channels-last hint."""
    seq = mpscy.Sequential([layers.Dense(12), layers.Reshape((3, 4))], input_shape=(5,))
    with pytest.raises(mpscy.ShapeError, match=r"CategoricalCrossEntropy needs a \(classes,\) output per sample, "
                                               r"got \(3, 4\); add Flatten or Dense before the loss"):
        mpscy.Engine(seq, loss="categorical_cross_entropy", batch_size=2, device="cpu")
    one = mpscy.Sequential([layers.Conv2D(1, 1)], input_shape=(2, 5, 4))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"takes its first dimension as the classes .* and 1 is "
                                                         r"fewer than 2; a channels-last output"):
        mpscy.Engine(one, loss="sparse_cross_entropy", batch_size=2, device="cpu")


# ------------------------------------------------------------------ per position: (n, C, d1, ...)

def _positions_ref(kind, out, target, weight, smoothing):
    """torch's F.cross_entropy over (n, C, d1, ...) from the (rows, C) reference: classes moved
    last, every position a row (weighted_ce_ref, checked by finite differences above)."""
    c = out.shape[1]
    rows = np.moveaxis(out, 1, -1).reshape(-1, c)
    t = target.reshape(-1) if kind == "sparse_cross_entropy" else np.moveaxis(target, 1, -1).reshape(-1, c)
    value, grad = R.weighted_ce_ref(kind, rows, t, np.ones(c) if weight is None else weight, smoothing)
    return value, np.moveaxis(grad.reshape((out.shape[0],) + out.shape[2:] + (c,)), -1, 1)


POSITIONS = [("sparse_cross_entropy", (5, 3, 4), 0.0, False), ("sparse_cross_entropy", (5, 3, 4), 0.2, True),
             ("sparse_cross_entropy", (5, 7), 0.0, True), ("cross_entropy", (5, 3, 4), 0.1, True),
             ("cross_entropy", (5, 6), 0.0, False),
             # on cuda a thread a position, 63 a sample (a warp's threads across two samples) ...
             ("cross_entropy", (5, 9, 7), 0.1, True), ("sparse_cross_entropy", (5, 9, 7), 0.0, True),
             # ... and a warp a position (40 classes, 3 positions)
             ("sparse_cross_entropy", (40, 3), 0.1, False)]
PIDS = [f"{k}-{'x'.join(map(str, sh))}-s{s}{'-weighted' if w else ''}" for k, sh, s, w in POSITIONS]


def _positions_case(kind, shape, weighted, rng, n=3):
    out = (rng.standard_normal((n,) + shape) * 2).astype(np.float32).astype(np.float64)
    if kind == "sparse_cross_entropy":
        target = rng.integers(0, shape[0], (n,) + shape[1:])
        target.flat[:2] = [3, 1]                                    # a label of weight 0, one of weight 2
    else:
        target = np.ascontiguousarray(np.moveaxis(softmax(rng.standard_normal((n * int(np.prod(shape[1:])), shape[0])))
                                                  .reshape((n,) + shape[1:] + shape[:1]), -1, 1))
        target = target.astype(np.float32).astype(np.float64)
    return out, target, WEIGHT if weighted else None


@pytest.mark.parametrize("kind,shape,smoothing,weighted", POSITIONS, ids=PIDS)
def test_per_position_reference_gradient_matches_finite_differences(rng, kind, shape, smoothing, weighted):
    out, target, w = _positions_case(kind, shape, weighted, rng)
    _, grad = _positions_ref(kind, out, target, w, smoothing)
    num = R.numeric_grad(lambda: _positions_ref(kind, out, target, w, smoothing)[0], out, eps=1e-7)
    assert R.rel_err(grad, num) < 1e-6


@pytest.mark.parametrize("kind,shape,smoothing,weighted", POSITIONS, ids=PIDS)
def test_per_position_cross_entropy_matches_reference_and_pytorch(device, rng, kind, shape, smoothing, weighted):
    """A (C, H, W) or (C, L) output under a cross entropy on logits is torch's F.cross_entropy
    over (n, C, H, W): loss within 1e-6 and gradient within 1e-5 of the float64 reference, and
    of torch's where it is installed; the accuracy the fraction of positions whose largest logit
    is the label's (or the target's largest)."""
    out, target, w = _positions_case(kind, shape, weighted, rng)
    make = losses.SparseCrossEntropy if kind == "sparse_cross_entropy" else losses.CrossEntropy
    engine = identity_engine(device, make(label_smoothing=smoothing, weight=w), shape, len(out))
    y = target if kind == "sparse_cross_entropy" else target.astype(np.float32)
    g = engine.gradients(out.astype(np.float32), y)
    ref, grad = _positions_ref(kind, out, target, w, smoothing)
    assert abs(g["loss"] - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert g["input"].shape == out.shape and R.rel_err(g["input"], grad) < 1e-5
    want = target if kind == "sparse_cross_entropy" else target.argmax(1)
    r = engine.step(out.astype(np.float32), y)                       # SGD at lr 0: the same loss
    assert r.accuracy == pytest.approx(np.mean(out.argmax(1) == want), abs=1e-12)
    assert r.loss == pytest.approx(g["loss"], rel=1e-12)
    torch = pytest.importorskip("torch")
    o = torch.tensor(out, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(o, torch.tensor(target), label_smoothing=smoothing,
                                           weight=None if w is None else torch.tensor(w))
    tl.backward()
    assert abs(g["loss"] - tl.item()) <= 1e-6 * max(abs(tl.item()), 1.0)
    assert R.rel_err(g["input"], o.grad.numpy()) < 1e-5


def test_per_position_labels_are_checked_naming_the_position():
    """Labels of a (C, H, W) output must be (n, H, W) ints in [0, C): a wrong shape names the one
    expected, a label out of range names its row and position, nothing staged."""
    engine = identity_engine("cpu", "sparse_cross_entropy", (4, 2, 3), 2)
    x = np.zeros((2, 4, 2, 3), np.float32)
    with pytest.raises(mpscy.ShapeError, match=r"labels must be shaped \(n, 2, 3\), a class in \[0, 4\) at each "
                                               r"position of the output's \(4, 2, 3\)"):
        engine.step(x, np.zeros(2, np.int64))
    bad = np.zeros((2, 2, 3), np.int64)
    bad[1, 0, 2] = 4
    with pytest.raises(mpscy.InvalidArgumentError, match=r"label 4 at row 1 at position \(0, 2\) is outside \[0, 4\)"):
        engine.step(x, bad)
    assert engine.step(x, np.zeros((2, 2, 3), np.int32)).loss == pytest.approx(np.log(4), rel=1e-6)


def test_a_segmentation_head_learns_per_pixel_classes(device):
    """1x1 convolutions under per-pixel cross entropy learn which of 3 input channels is the
    largest at each pixel of 6x6 images: 150 Adam steps from a third to at least 97% of pixels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 6, 6)).astype(np.float32)
    y = x.argmax(1).astype(np.int64)
    model = mpscy.Sequential([layers.Conv2D(8, 1), layers.ReLU(), layers.Conv2D(3, 1)], input_shape=(3, 6, 6))
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(0.03), batch_size=32,
                          device=device, seed=1)
    for i in range(150):
        r = engine.step(x[32 * (i % 2):32 * (i % 2) + 32], y[32 * (i % 2):32 * (i % 2) + 32])
    assert engine.evaluate(x, y)["accuracy"] >= 0.97
    assert r.loss < 0.3


def test_fit_metrics_of_a_segmentation_head_are_per_pixel():
    """fit's classification metrics read every pixel as a row, as the loss does: val_f1 (macro)
    and val_top2 equal mpscy.metrics over the flattened pixels of predict's outputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 3, (16, 6, 6))
    engine = mpscy.Engine(mpscy.Sequential([layers.Conv2D(3, 3, padding=1)], input_shape=(3, 6, 6)),
                          loss="sparse_cross_entropy", batch_size=8, device="cpu", seed=0)
    h = engine.fit(x, y, epochs=1, validation_data=(x, y), metrics=["f1", "top2"], verbose=0)
    out = engine.predict(x)
    rows = np.moveaxis(out, 1, -1).reshape(-1, 3)
    assert h.history["val_f1"][0] == pytest.approx(mpscy.metrics.f1(y.ravel(), rows.argmax(1), average="macro"),
                                                   abs=1e-12)
    top2 = np.mean([label in np.argsort(r)[-2:] for r, label in zip(rows, y.ravel())])
    assert h.history["val_top2"][0] == pytest.approx(top2, abs=1e-12)
    assert 0.2 < h.history["val_f1"][0] < 0.6                    # a number, not NaN


def test_segmentation_heads_get_advice_that_fits_them(recwarn):
    """Advice for a (C, H, W) output: a Softmax before a logits loss is told to go (not to take
    categorical cross entropy, which takes (classes,) outputs only); Softmax over axis 0 is told
    that it is the batch axis; a label of -100 is told how to leave it out (ignore_index)."""
    seg = mpscy.Sequential([layers.Conv2D(4, 1), layers.Softmax(axis=1)], input_shape=(3, 5, 5))
    with pytest.warns(UserWarning, match=r"it would be applied twice \(remove the Softmax: "
                                         r"'categorical_cross_entropy' takes \(classes,\) outputs only\)"):
        mpscy.Engine(seg, loss="sparse_cross_entropy", batch_size=2, device="cpu")
    with pytest.raises(mpscy.ShapeError, match=r"got \(4, 5, 5\); add Flatten or Dense before the loss, or for a "
                                               r"softmax over the first dimension at each position"):
        mpscy.Engine(seg, loss="categorical_cross_entropy", batch_size=2, device="cpu")
    with pytest.raises(mpscy.ShapeError, match=r"Softmax axis 0 is the batch axis of input shape \(n, 4, 5, 5\)"):
        mpscy.Sequential([layers.Conv2D(4, 1), layers.Softmax(axis=0)], input_shape=(3, 5, 5))
    engine = identity_engine("cpu", "sparse_cross_entropy", (4, 5, 5), 2)
    labels = np.zeros((2, 5, 5), np.int64)
    labels[0, 1, 2] = -100
    with pytest.raises(mpscy.InvalidArgumentError, match=r"label -100 at row 0 at position \(1, 2\) is outside "
                                                         r"\[0, 4\); to leave such labels out \(torch's default "
                                                         r"ignore_index is -100\), give the loss ignore_index: "
                                                         r"SparseCrossEntropy\(ignore_index=-100\)"):
        engine.step(np.zeros((2, 4, 5, 5), np.float32), labels)


def test_per_position_weighted_smoothed_mean_over_batches_whose_labels_all_weigh_zero():
    """evaluate over a (C, H, W) head under class weights and label smoothing, where one batch's
    labels all weigh 0 (its mean is x/0, so its smoothing terms join the whole set's sum): torch's
    weighted mean over the whole set, within 1e-8 of the float64 reference."""
    net = mpscy.Sequential([layers.Conv2D(3, 1)], input_shape=(2, 4, 5))
    w = np.array([0.0, 1.0, 2.0])
    engine = mpscy.Engine(net, loss=losses.SparseCrossEntropy(label_smoothing=0.1, weight=w), batch_size=2,
                          device="cpu", seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((4, 2, 4, 5), dtype=np.float32)
    y = rng.integers(1, 3, (4, 4, 5))
    y[:2] = 0                                                   # the first batch: every label weighs 0
    z = engine.predict(x).astype(np.float64)
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    q = 0.9 * np.moveaxis(np.eye(3)[y], -1, 1) + 0.1 / 3
    ref = -(q * w[None, :, None, None] * logp).sum() / w[y].sum()
    assert engine.evaluate(x, y)["loss"] == pytest.approx(ref, rel=1e-8)


def test_labels_shaped_n_by_1_are_the_labels_shaped_n(device):
    """Class labels of shape (n, 1) (Keras's datasets give CIFAR's so, and Keras takes them) for an
    (n, C) output: a step, fit (with metrics that read the labels in Python) and evaluate give the
    same bits as with (n,); (n, 2) stays refused."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 4)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.uint8)

    def run(labels):
        e = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), optimizer=optim.SGD(0.1),
                         batch_size=8, device=device, seed=0)
        r = e.step(x[:8], labels[:8].astype(np.int64))
        h = e.fit(x, labels, epochs=2, verbose=0, validation_data=(x, labels), metrics=["f1", "top2"]).history
        return r.loss, h, e.evaluate(x, labels), e.get_parameters()

    flat, col = run(y), run(y[:, None])
    assert flat[0] == col[0] and flat[1] == col[1] and flat[2] == col[2]
    assert all(np.array_equal(flat[3][k], col[3][k]) for k in flat[3])
    assert 0.0 < flat[1]["val_f1"][-1] < 1.0
    e = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), batch_size=8, device=device)
    with pytest.raises(mpscy.ShapeError, match=r"y has shape \(8, 2\); labels must be shaped \(n,\)"):
        e.step(x[:8], np.zeros((8, 2), np.int64))


def test_a_classes_by_one_by_one_output_takes_torch_s_label_shape():
    """(C, 1, 1) under sparse cross entropy is torch's (n, C, 1, 1): labels (n, 1, 1); (n,) is
    refused naming that shape."""
    engine = identity_engine("cpu", "sparse_cross_entropy", (3, 1, 1), 2)
    x = np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32)
    with pytest.raises(mpscy.ShapeError, match=r"labels must be shaped \(n, 1, 1\)"):
        engine.step(x, np.zeros(2, np.int64))
    ref, _ = R.weighted_ce_ref("sparse_cross_entropy", x.reshape(2, 3).astype(np.float64), np.array([2, 0]),
                               np.ones(3))
    assert engine.step(x, np.array([[[2]], [[0]]])).loss == pytest.approx(ref, rel=1e-6)


def test_per_position_weighted_loss_over_many_rows(device, rng):
    """4,608 positions (2 x 48 x 48) under class weights and label smoothing: on cuda, past 4,096
    rows, the labels' summed weights come from a kernel of their own before the loss's. Loss
    within 1e-6 and gradient within 1e-5 of the float64 reference."""
    out = (rng.standard_normal((2, 5, 48, 48)) * 2).astype(np.float32).astype(np.float64)
    target = rng.integers(0, 5, (2, 48, 48))
    engine = identity_engine(device, losses.SparseCrossEntropy(label_smoothing=0.1, weight=WEIGHT), out.shape[1:], 2)
    g = engine.gradients(out.astype(np.float32), target)
    ref, grad = _positions_ref("sparse_cross_entropy", out, target, WEIGHT, 0.1)
    assert abs(g["loss"] - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert R.rel_err(g["input"], grad) < 1e-5



# ------------------------------------------------------------------ ignore_index (torch's)

def _ignore_ref(out, labels, ign, weight, smoothing):
    """torch's F.cross_entropy(..., ignore_index=ign) from the (rows, C) reference: the ignored
    rows dropped (their gradient 0), over (n, C) or (n, C, d1, ...)."""
    c = out.shape[1]
    rows = np.moveaxis(out, 1, -1).reshape(-1, c)
    flat = labels.reshape(-1)
    keep = flat != ign
    value, g = R.weighted_ce_ref("sparse_cross_entropy", rows[keep], flat[keep],
                                 np.ones(c) if weight is None else weight, smoothing)
    grad = np.zeros_like(rows)
    grad[keep] = g
    return value, np.moveaxis(grad.reshape((out.shape[0],) + out.shape[2:] + (c,)), -1, 1)


IGNORE = [((5,), 0.0, False, -100), ((5,), 0.2, True, -100), ((5, 3, 4), 0.0, False, 255),
          ((5, 3, 4), 0.1, True, -100), ((5, 3, 4), 0.0, False, 2), ((5, 6, 7), 0.1, True, 255)]
IIDS = [f"{'x'.join(map(str, sh))}-s{s}{'-weighted' if w else ''}-ignore{i}" for sh, s, w, i in IGNORE]


def _ignore_case(shape, ign, rng, n=4):
    out = (rng.standard_normal((n,) + shape) * 2).astype(np.float32).astype(np.float64)
    labels = rng.integers(0, shape[0], (n,) + shape[1:])
    labels.flat[::3] = ign                                   # a third of them left out
    if ign != 2:
        labels.flat[1] = 3                                   # a label of weight 0 among the rest
    return out, labels


@pytest.mark.parametrize("shape,smoothing,weighted,ign", IGNORE, ids=IIDS)
def test_ignore_index_reference_gradient_matches_finite_differences(rng, shape, smoothing, weighted, ign):
    out, labels = _ignore_case(shape, ign, rng)
    w = WEIGHT if weighted else None
    _, grad = _ignore_ref(out, labels, ign, w, smoothing)
    num = R.numeric_grad(lambda: _ignore_ref(out, labels, ign, w, smoothing)[0], out, eps=1e-7)
    assert R.rel_err(grad, num) < 1e-6


@pytest.mark.parametrize("shape,smoothing,weighted,ign", IGNORE, ids=IIDS)
def test_ignore_index_matches_reference_and_pytorch(device, rng, shape, smoothing, weighted, ign):
    """SparseCrossEntropy(ignore_index=) is torch's: labels equal to it add no loss and no
    gradient and leave the mean's divisor (the rows or the labels' weights), with label smoothing
    too; -100, 255 (a mask's void) or a class (2). Loss within 1e-6 and gradient within 1e-5 of
    the float64 reference and of torch's; the accuracy over the labels that count."""
    out, labels = _ignore_case(shape, ign, rng)
    w = WEIGHT if weighted else None
    engine = identity_engine(device, losses.SparseCrossEntropy(label_smoothing=smoothing, weight=w, ignore_index=ign),
                             shape, len(out))
    g = engine.gradients(out.astype(np.float32), labels)
    ref, grad = _ignore_ref(out, labels, ign, w, smoothing)
    assert abs(g["loss"] - ref) <= 1e-6 * max(abs(ref), 1.0)
    assert R.rel_err(g["input"], grad) < 1e-5
    assert np.all(np.moveaxis(g["input"], 1, -1)[labels == ign] == 0)
    keep = labels != ign
    r = engine.step(out.astype(np.float32), labels)
    assert r.accuracy == pytest.approx(np.mean(out.argmax(1)[keep] == labels[keep]), abs=1e-12)
    assert engine.evaluate(out.astype(np.float32), labels)["accuracy"] == pytest.approx(r.accuracy, abs=1e-12)
    torch = pytest.importorskip("torch")
    o = torch.tensor(out, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(o, torch.tensor(labels), label_smoothing=smoothing, ignore_index=ign,
                                           weight=None if w is None else torch.tensor(w))
    tl.backward()
    assert abs(g["loss"] - tl.item()) <= 1e-6 * max(abs(tl.item()), 1.0)
    assert R.rel_err(g["input"], o.grad.numpy()) < 1e-5


def test_ignore_index_over_batches_and_its_errors(rng):
    """evaluate over several batches is torch's mean over the whole set without the ignored
    labels (one batch all ignored among them); a training batch all ignored raises
    NonFiniteError saying so, nothing changed; fit's metrics leave them out; a label that is
    neither a class nor ignore_index is named; CrossEntropy (probabilities) refuses the option;
    the option survives a checkpoint."""
    model = mpscy.Sequential([layers.Conv2D(3, 1)], input_shape=(2, 4, 4))
    loss = losses.SparseCrossEntropy(ignore_index=255)
    engine = mpscy.Engine(model, loss=loss, optimizer=optim.SGD(0.1), batch_size=2, device="cpu", seed=0)
    x = rng.standard_normal((6, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, (6, 4, 4))
    y[:, 0] = 255
    y[2:4] = 255                                             # the second batch: every label ignored
    z = engine.predict(x).astype(np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    keep = y != 255
    nll = -np.take_along_axis(logp, np.where(keep, y, 0)[:, None], 1)[:, 0]
    ev = engine.evaluate(x, y)
    assert ev["loss"] == pytest.approx(nll[keep].mean(), rel=1e-6)
    assert ev["accuracy"] == pytest.approx(np.mean(z.argmax(1)[keep] == y[keep]), abs=1e-12)
    before = engine.get_parameters()
    with pytest.raises(mpscy.NonFiniteError, match="every label of this batch is the loss's ignore_index 255"):
        engine.step(x[2:4], y[2:4])
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    h = engine.fit(x[:2], y[:2], epochs=1, metrics=["f1"], verbose=0)
    out = np.moveaxis(engine.predict(x[:2]), 1, -1)[keep[:2]]
    assert h.history["f1"][0] == pytest.approx(mpscy.metrics.f1(y[:2][keep[:2]], out.argmax(1), average="macro"),
                                               abs=1e-12)
    bad = y[:2].copy()
    bad[1, 2, 3] = 7
    with pytest.raises(mpscy.InvalidArgumentError, match=r"label 7 at row 1 at position \(2, 3\) is outside "
                                                         r"\[0, 3\) and is not the loss's ignore_index 255"):
        engine.step(x[:2], bad)
    with pytest.raises(mpscy.InvalidArgumentError, match="ignore_index applies to integer labels"):
        losses.CrossEntropy(ignore_index=-100)
    with pytest.raises(mpscy.InvalidArgumentError, match="ignore_index must be an integer"):
        losses.SparseCrossEntropy(ignore_index=1.5)
    assert "ignore_index=255" in repr(engine.loss)



def test_ignore_index_in_fit_evaluate_and_plots(tmp_path, rng):
    """Under ignore_index: evaluate with label smoothing and no class weights, over batches one of
    which is all ignored, is torch's mean over the set (it was NaN); fit's training accuracy
    counts the labels that count, as evaluate does; fit skips a training batch whose labels are
    all ignored, warning (torch's step would see a NaN loss); fit_report plots a (C, H, W)
    head's pixels."""
    torch = pytest.importorskip("torch")
    model = mpscy.Sequential([layers.Conv2D(3, 1)], input_shape=(2, 3, 3))
    engine = mpscy.Engine(model, loss=losses.SparseCrossEntropy(label_smoothing=0.2, ignore_index=255),
                          optimizer=optim.SGD(0.0), batch_size=2, device="cpu", seed=0)
    x = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    y = rng.integers(0, 3, (6, 3, 3))
    y[:, 1] = 255
    y[2:4] = 255
    z = torch.tensor(engine.predict(x).astype(np.float64))
    ref = torch.nn.functional.cross_entropy(z, torch.tensor(y), ignore_index=255, label_smoothing=0.2).item()
    ev = engine.evaluate(x, y)
    assert ev["loss"] == pytest.approx(ref, rel=1e-6)
    with pytest.warns(UserWarning, match=r"epoch 1: 1 training batch whose every label is the loss's ignore_index "
                                         r"255 skipped"):
        h = engine.fit(x, y, epochs=1, shuffle=False, verbose=0)
    assert h.history["accuracy"][0] == pytest.approx(ev["accuracy"], abs=1e-12)      # lr 0: the same model
    pytest.importorskip("matplotlib")
    from mpscy import plot
    paths = plot.fit_report(tmp_path, h, y, engine.predict(x), engine.loss)
    assert len(paths) == 4 and all(os.path.getsize(p) > 0 for p in paths)


def test_ignore_index_fit_loss_is_the_labels_mean_and_a_bad_batch_after_a_void_one_is_named():
    """fit's logged loss under ignore_index is the mean over the labels that count, as val_loss
    (batches of 72 and 12 counted labels: the mean of batch means by rows read 1.446 against
    1.406); and a batch whose x holds a NaN, right after a batch whose every label is ignored, is
    named as bad (its staging failed before its labels: it was skipped as another void one)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, (8, 8, 8))
    y[4:][rng.random((4, 8, 8)) < 0.95] = 255
    model = mpscy.Sequential([layers.Conv2D(3, 1)], input_shape=(3, 8, 8))
    engine = mpscy.Engine(model, loss=losses.SparseCrossEntropy(ignore_index=255), optimizer=optim.SGD(0.0),
                          batch_size=4, device="cpu", seed=0)
    h = engine.fit([(x[:4], y[:4]), (x[4:], y[4:])], epochs=1, validation_data=(x, y), verbose=0)
    assert h.history["loss"][0] == pytest.approx(h.history["val_loss"][0], rel=1e-6)
    assert h.history["loss"][0] == pytest.approx(engine.evaluate(x, y)["loss"], rel=1e-6)
    bad = x[:4].copy()
    bad[1, 0, 0, 0] = np.nan
    void = np.full((4, 8, 8), 255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(mpscy.NonFiniteError, match=r"epoch 1, batch 1: x contains NaN or Inf at row 1"):
            engine.fit([(x[:4], void), (bad, y[:4]), (x[:4], y[:4])], epochs=1, verbose=0)
