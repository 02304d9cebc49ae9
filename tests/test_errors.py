"""Bad input gets a clear mpscy.Error naming the problem, raised before anything is modified:
after every failed call the parameters and the optimizer state are bit-for-bit what they were."""
import os

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

BATCH, FEATURES, CLASSES = 8, 6, 4


def make(device, loss="sparse_cross_entropy"):
    model = mpscy.Sequential([layers.Dense(10), layers.ReLU(), layers.Dense(CLASSES)], input_shape=(FEATURES,))
    engine = mpscy.Engine(model, loss=loss, optimizer=optim.Adam(lr=0.01), batch_size=BATCH, device=device, seed=0)
    rng = np.random.default_rng(0)
    # a few real steps so the optimizer state is not all zeros
    for _ in range(3):
        x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
        y = (rng.integers(0, CLASSES, BATCH) if loss == "sparse_cross_entropy"
             else rng.standard_normal((BATCH, CLASSES)).astype(np.float32))
        engine.step(x, y)
    return engine


def snapshot(engine):
    params = {k: v.copy() for k, v in engine.get_parameters().items()}
    state = engine.get_optimizer_state()
    return params, state


def assert_unchanged(engine, snap):
    params, state = snap
    now_p, now_s = snapshot(engine)
    for k in params:
        assert params[k].tobytes() == now_p[k].tobytes(), k
    assert now_s["step"] == state["step"]
    for slot, per_param in state.items():
        if isinstance(per_param, dict):
            for k in per_param:
                assert per_param[k].tobytes() == now_s[slot][k].tobytes(), (slot, k)


GOOD_X = np.ones((BATCH, FEATURES), np.float32)
GOOD_Y = np.zeros(BATCH, np.int32)
wide = np.ones((BATCH, 2 * FEATURES), np.float32)
nan_x = GOOD_X.copy()
nan_x[3, 2] = np.nan
inf_x = GOOD_X.copy()
inf_x[5, 0] = -np.inf

STEP_CASES = [
    ("float64 x", GOOD_X.astype(np.float64), GOOD_Y, mpscy.DTypeError, "float32, got float64"),
    ("int x", GOOD_X.astype(np.int32), GOOD_Y, mpscy.DTypeError, "float32, got int32"),
    ("big-endian x", GOOD_X.astype(">f4"), GOOD_Y, mpscy.DTypeError, "float32"),
    ("float labels", GOOD_X, GOOD_Y.astype(np.float32), mpscy.DTypeError,
     "int32 or int64 class labels, got float32 (whole-number floats: y.astype(np.int64))"),
    ("uint8 labels", GOOD_X, GOOD_Y.astype(np.uint8), mpscy.DTypeError, "int32 or int64 class labels, got uint8"),
    ("rank 1 x", np.ones(FEATURES, np.float32), GOOD_Y, mpscy.ShapeError, "expected (n, 6)"),
    ("rank 3 x", np.ones((BATCH, FEATURES, 1), np.float32), GOOD_Y, mpscy.ShapeError, "expected (n, 6)"),
    ("feature count", np.ones((BATCH, FEATURES + 1), np.float32), GOOD_Y, mpscy.ShapeError, "(8, 7), expected (n, 6)"),
    ("non-contiguous x", wide[:, ::2], GOOD_Y, mpscy.ShapeError, "C-contiguous"),
    ("fortran x", np.asfortranarray(np.ones((BATCH, FEATURES), np.float32)), GOOD_Y, mpscy.ShapeError, "C-contiguous"),
    ("non-contiguous y", GOOD_X, np.zeros(2 * BATCH, np.int64)[::2], mpscy.ShapeError, "C-contiguous"),
    ("batch too large", np.ones((BATCH + 1, FEATURES), np.float32), np.zeros(BATCH + 1, np.int32),
     mpscy.ShapeError, "more than the built batch size 8"),
    ("label too large", GOOD_X, np.array([0, 1, 2, 3, 4, 0, 0, 0], np.int32), mpscy.InvalidArgumentError,
     "label 4 at row 4 is outside [0, 4): the model's output has 4 classes, one fewer than such labels need"),
    ("label past the classes", GOOD_X, np.array([0, 1, 2, 3, 9, 0, 0, 0], np.int32), mpscy.InvalidArgumentError,
     "label 9 at row 4 is outside [0, 4)"),
    ("negative label", GOOD_X, np.array([0, 0, -1, 0, 0, 0, 0, 0], np.int64), mpscy.InvalidArgumentError,
     "label -1 at row 2"),
    ("int64 label beyond int32", GOOD_X, np.array([0] * 7 + [2 ** 33], np.int64), mpscy.InvalidArgumentError,
     f"label {2 ** 33} at row 7"),
    ("empty batch", np.ones((0, FEATURES), np.float32), np.zeros(0, np.int32), mpscy.ShapeError, "empty batch"),
    ("label count", GOOD_X, np.zeros(BATCH - 1, np.int32), mpscy.ShapeError, "7 labels for 8 rows"),
    ("labels 2-d", GOOD_X, np.zeros((BATCH, 2), np.int32), mpscy.ShapeError, "shaped (n,)"),
    ("NaN in x", nan_x, GOOD_Y, mpscy.NonFiniteError, "NaN or Inf at row 3"),
    ("Inf in x", inf_x, GOOD_Y, mpscy.NonFiniteError, "NaN or Inf at row 5"),
    ("None x", None, GOOD_Y, mpscy.DTypeError, "x is None"),
    ("None y", GOOD_X, None, mpscy.DTypeError, "y is None"),
    ("list x", GOOD_X.tolist(), GOOD_Y, mpscy.DTypeError, "numpy array, got list"),
    ("string x", "abc", GOOD_Y, mpscy.DTypeError, "x must be"),
    ("bytes x", b"\x00" * 32, GOOD_Y, mpscy.DTypeError, "x must be float32"),
    ("object x", np.array([None] * BATCH, dtype=object), GOOD_Y, mpscy.DTypeError, "x must be"),
    ("0-d x", np.float32(1.0), GOOD_Y, mpscy.ShapeError, f"x has shape (), expected (n, {FEATURES})"),
]


@pytest.mark.parametrize("case,x,y,error,message", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_bad_step_input_is_rejected_and_changes_nothing(device, case, x, y, error, message):
    engine = make(device)
    snap = snapshot(engine)
    steps = engine.stats()["steps"]
    with pytest.raises(error) as info:
        engine.step(x, y)
    assert message in str(info.value)
    assert isinstance(info.value, mpscy.Error)
    assert_unchanged(engine, snap)
    assert engine.stats()["steps"] == steps  # rejected before the native step was entered


DENSE_CASES = [
    ("int targets", GOOD_X, np.zeros((BATCH, CLASSES), np.int32), mpscy.DTypeError, "float32 targets"),
    ("target shape", GOOD_X, np.zeros((BATCH, CLASSES + 1), np.float32), mpscy.ShapeError, "expected (n, 4)"),
    ("target rows", GOOD_X, np.zeros((BATCH - 2, CLASSES), np.float32), mpscy.ShapeError, "for 8 rows"),
    ("NaN target", GOOD_X, np.full((BATCH, CLASSES), np.nan, np.float32), mpscy.NonFiniteError, "y contains NaN"),
]


@pytest.mark.parametrize("case,x,y,error,message", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_bad_targets_for_regression(device, case, x, y, error, message):
    engine = make(device, loss="mse")
    snap = snapshot(engine)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.step(x, y)
    assert_unchanged(engine, snap)


def test_non_finite_loss_applies_no_update(device):
    """Weights that overflow the forward pass: the native step raises NonFiniteError and leaves
    parameters, optimizer state and step count exactly as they were."""
    engine = make(device)
    params = engine.get_parameters()
    params["dense_2.weight"] = np.full_like(params["dense_2.weight"], 3e38)
    engine.set_parameters(params)
    snap = snapshot(engine)
    x = np.random.default_rng(1).standard_normal((BATCH, FEATURES)).astype(np.float32) + 5
    with pytest.raises(mpscy.NonFiniteError, match="not finite, update skipped"):
        engine.step(x, GOOD_Y)
    assert_unchanged(engine, snap)
    assert engine.stats()["steps"] == 4  # the step did reach the native code


def test_non_finite_gradients_call_has_no_update_to_skip(device):
    """gradients() never updates, so its NonFiniteError does not say an update was skipped; a
    training step's does."""
    engine = make(device)
    params = engine.get_parameters()
    params["dense_2.weight"] = np.full_like(params["dense_2.weight"], 3e38)
    engine.set_parameters(params)
    x = np.random.default_rng(1).standard_normal((BATCH, FEATURES)).astype(np.float32) + 5
    with pytest.raises(mpscy.NonFiniteError, match=r"not finite \(") as info:
        engine.gradients(x, GOOD_Y)
    assert "update skipped" not in str(info.value)
    with pytest.raises(mpscy.NonFiniteError, match="not finite, update skipped"):
        engine.step(x, GOOD_Y)


def test_native_error_messages_name_the_function():
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    native = mpscy._native
    dev = native.Device("cpu")
    bad = {"output": 1, "batch": 4, "target": "index", "loss": {"kind": "sparse_cross_entropy"},
           "optim": {"kind": "sgd", "lr": 0.1}}
    nodes = model.native_layers()
    nodes[1]["shape"] = [4]  # wrong resolved shape
    with pytest.raises(mpscy.ShapeError, match=r"^\[cpu::mpscy_plan_node\] node 1 \(dense_0\).*\(plan_node\.c:\d+\)$"):
        native.Graph(dev, nodes, bad)
    nodes[1]["shape"] = [3]
    with pytest.raises(mpscy.InvalidArgumentError, match="batch size 0 must be >= 1"):
        native.Graph(dev, nodes, {**bad, "batch": 0})


def test_layer_descriptor_with_too_many_options_is_refused():
    """A layer descriptor holds 12 ints and 4 reals: longer lists are refused, not written past
    the end of the fixed arrays (into the next field or the next descriptor)."""
    native = mpscy._native
    dev = native.Device("cpu")
    spec = {"output": 1, "batch": 4, "target": "index", "loss": {"kind": "sparse_cross_entropy"},
            "optim": {"kind": "sgd", "lr": 0.1}}
    for key, n in (("ints", 13), ("reals", 5)):
        nodes = mpscy.Sequential([layers.Dense(3)], input_shape=(2,)).native_layers()
        nodes[1][key] = list(nodes[1].get(key, [])) + [0] * (n - len(nodes[1].get(key, [])))
        with pytest.raises(mpscy.InvalidArgumentError, match=f"dense_0.*{n} {key}"):
            native.Graph(dev, nodes, spec)


@pytest.mark.parametrize("case", ["unknown name", "missing", "shape", "nan", "dtype", "shape of a subset"])
def test_set_parameters_validates_everything_first(device, case):
    """Each fault refused, nothing written; a subset under strict=True whose one array has the
    wrong shape is told the shape (what was given), not only the names left out."""
    engine = make(device)
    snap = snapshot(engine)
    params = engine.get_parameters()
    params["dense_0.bias"] = params["dense_0.bias"] + 1  # a valid change that must not land
    error = mpscy.InvalidArgumentError
    if case == "unknown name":
        params["dense_9.weight"] = np.zeros(3, np.float32)
    elif case == "missing":
        del params["dense_2.bias"]
    elif case == "shape":
        params["dense_2.weight"] = params["dense_2.weight"].T
        error = mpscy.ShapeError
    elif case == "nan":
        params["dense_2.weight"] = np.full_like(params["dense_2.weight"], np.nan)
    elif case == "shape of a subset":
        params = {"dense_2.weight": params["dense_2.weight"].T}
        with pytest.raises(mpscy.ShapeError, match=r"'dense_2.weight' has shape \(\d+, \d+\), got"):
            engine.set_parameters(params)
        assert_unchanged(engine, snap)
        return
    else:
        params["dense_2.weight"] = params["dense_2.weight"].astype(str)
        error = mpscy.DTypeError
    with pytest.raises(error):
        engine.set_parameters(params)
    assert_unchanged(engine, snap)


def test_a_0d_value_is_not_taken_for_a_one_element_parameter(device):
    """A 0-d value given for a parameter of shape (1,) is refused as torch's load_state_dict
    refuses it (a size mismatch), not reshaped (NumPy's ascontiguousarray made it (1,)), and
    the message says the shape given, (), not (1,); a 0-d x is named as such."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(3,)), loss="mse", batch_size=4,
                          device=device)
    before = engine.get_parameters()
    for value in (np.float32(5.0), np.array(5.0)):
        with pytest.raises(mpscy.ShapeError, match=r"^parameter 'dense_0.bias' has shape \(1,\), got \(\)$"):
            engine.set_parameters({"dense_0.bias": value}, strict=False)
    assert all(np.array_equal(v, before[k]) for k, v in engine.get_parameters().items())
    engine.set_parameters({"dense_0.bias": np.array([5.0])}, strict=False)
    assert engine.get_parameters()["dense_0.bias"].tolist() == [5.0]
    with pytest.raises(mpscy.DTypeError, match=r"x must be a numpy array with a batch dimension, got a 0-d array"):
        engine.predict(np.float32(1.0))


def test_float64_values_past_float32_s_range_are_named_as_such(device):
    """1e300 in a float64 x or y is finite: the float32 cast would make it an Inf, reported as
    "NaN or Inf" after NumPy's overflow warning. It is refused as a value past float32's range,
    with its row, without the warning, before any step; an Inf given is still a NonFiniteError."""
    import warnings
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), loss="mse", batch_size=8,
                          device=device)
    x, y = np.zeros((5, 4)), np.zeros((5, 3))
    x[3, 1] = 1e300
    past = r"x holds 1e\+300 at row 3, past float32's range \(largest 3.403e\+38\)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(mpscy.InvalidArgumentError, match="^" + past):
            engine.predict(x)
        with pytest.raises(mpscy.InvalidArgumentError, match="^" + past):
            engine.fit(x, y, verbose=0)
        with pytest.raises(mpscy.InvalidArgumentError, match="^y" + past[1:]):
            engine.fit(y[:, :1] * np.zeros((1, 4)), x[:, :3], verbose=0)
        one = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(4,)), loss="mse", batch_size=8,
                           device=device)
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^y holds 1e\+300, past float32's range"):
            one.fit(np.zeros((1, 4)), np.float64(1e300), verbose=0)   # 0-d: no row (it raised IndexError)
    assert engine.iterations == 0
    x[3, 1] = np.inf
    with pytest.raises(mpscy.NonFiniteError, match="x contains NaN or Inf at row 3"):
        engine.predict(x)
    params = {k: v.astype(np.float64) for k, v in engine.get_parameters().items()}
    params["dense_0.bias"][1] = -1e40
    before = engine.get_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^parameter 'dense_0.bias' holds -1e\+40, past "
                                                             r"float32's range$"):
            engine.set_parameters(params)
    assert all(np.array_equal(v, before[k]) for k, v in engine.get_parameters().items())


def test_set_parameters_refuses_a_negative_running_variance(device):
    """A BatchNorm's running_var below 0 (torch takes it; its eval-mode output is then NaN): refused
    naming the buffer and its value, nothing written, 0 and positive values taken."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(4), layers.BatchNorm(name="bn"), layers.Dense(2)],
                                           input_shape=(3,)), batch_size=4, device=device)
    params = engine.get_parameters()
    params["bn.running_mean"] = params["bn.running_mean"] + 1.0
    params["bn.running_var"] = np.array([1.0, 0.0, -0.5, 2.0], np.float32)
    before = engine.get_parameters()
    with pytest.raises(mpscy.InvalidArgumentError, match=r"'bn.running_var' \(a BatchNorm's running variance\) "
                                                         r"holds a negative value, -0.5"):
        engine.set_parameters(params)
    assert all(np.array_equal(v, before[k]) for k, v in engine.get_parameters().items())
    params["bn.running_var"][2] = 0.0
    engine.set_parameters(params)
    assert np.array_equal(engine.get_parameters()["bn.running_var"], [1.0, 0.0, 0.0, 2.0])


def test_predict_and_evaluate_errors(device):
    engine = make(device)
    snap = snapshot(engine)
    with pytest.raises(mpscy.DTypeError):
        engine.predict(None)
    empty = engine.predict(np.ones((0, FEATURES), np.float32))  # as torch: no rows, no outputs
    assert empty.shape == (0,) + tuple(engine.model.output_shape) and empty.dtype == np.float32
    with pytest.raises(mpscy.ShapeError, match=r"x has shape \(0, 3\)"):
        engine.predict(np.ones((0, 3), np.float32))
    with pytest.raises(mpscy.ShapeError, match="empty batch"):
        engine.evaluate(np.ones((0, FEATURES), np.float32), np.zeros(0, np.int32))
    # float64 (and strided) inputs are converted, as fit converts them; integer inputs are refused
    x64 = np.random.default_rng(0).normal(size=(6, 2 * FEATURES))[:, ::2]
    np.testing.assert_array_equal(engine.predict(x64), engine.predict(np.ascontiguousarray(x64, np.float32)))
    assert engine.evaluate(x64, np.zeros(6, np.uint8)) == engine.evaluate(x64.astype(np.float32), np.zeros(6, np.int32))
    with pytest.raises(mpscy.DTypeError, match="float32"):
        engine.predict(np.ones((3, FEATURES), np.int64))
    with pytest.raises(mpscy.DTypeError, match="float32"):
        engine.step(np.ones((BATCH, FEATURES)), np.zeros(BATCH, np.int32))
    with pytest.raises(mpscy.ShapeError, match="rows"):
        engine.evaluate(np.ones((10, FEATURES), np.float32), np.zeros(9, np.int32))
    with pytest.raises(mpscy.InvalidArgumentError, match="label 9"):
        engine.evaluate(np.ones((10, FEATURES), np.float32), np.full(10, 9, np.int32))
    assert_unchanged(engine, snap)


def test_predict_and_evaluate_errors_name_the_row_of_the_callers_array(device):
    """predict and evaluate run batch_size rows a native call: a bad row is named by its index
    in the array the caller passed, not by its index in the piece."""
    rows, bad = 3 * BATCH + 2, 2 * BATCH + 1
    x, y = np.ones((rows, FEATURES), np.float32), np.zeros(rows, np.int32)
    xn = x.copy()
    xn[bad, 2] = np.nan
    yb = y.copy()
    yb[bad] = CLASSES
    engine = make(device)
    with pytest.raises(mpscy.NonFiniteError, match=f"x contains NaN or Inf at row {bad}$"):
        engine.predict(xn)
    with pytest.raises(mpscy.NonFiniteError, match=f"x contains NaN or Inf at row {bad}$"):
        engine.evaluate(xn, y)
    with pytest.raises(mpscy.InvalidArgumentError, match=f"label {CLASSES} at row {bad} "):
        engine.evaluate(x, yb)
    yd = np.zeros((rows, CLASSES), np.float32)
    yd[bad, 1] = np.inf
    with pytest.raises(mpscy.NonFiniteError, match=f"y contains NaN or Inf at row {bad}$"):
        make(device, loss="mse").evaluate(x, yd)
    with pytest.raises(mpscy.NonFiniteError, match="x contains NaN or Inf at row 1$"):
        engine.step(xn[2 * BATCH:3 * BATCH], y[:BATCH])   # a step after them counts from 0 again


def test_bad_construction_arguments():
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    with pytest.raises(mpscy.InvalidArgumentError, match="batch_size"):
        mpscy.Engine(model, batch_size=0)
    with pytest.raises(mpscy.InvalidArgumentError, match="unknown loss"):
        mpscy.Engine(model, loss="hinge")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"unknown optimizer 'adamax'; choose one of \['adadelta', "):
        mpscy.Engine(model, optimizer="adamax")
    with pytest.raises(mpscy.InvalidArgumentError, match="optimizer must be an mpscy.optim optimizer, got dict"):
        mpscy.Engine(model, optimizer={"lr": 1e-3})
    # Keras's optimizer names, with torch's defaults
    assert repr(mpscy.Engine(model, optimizer="Adam").optimizer) == repr(optim.Adam())
    assert repr(mpscy.Engine(model, optimizer="sgd").optimizer) == repr(optim.SGD())
    with pytest.raises(mpscy.InvalidArgumentError, match="lr must be finite and >= 0"):
        optim.SGD(lr=-1)
    for kw in ({"lr": float("inf")}, {"momentum": float("inf")}, {"weight_decay": float("inf")}):
        with pytest.raises(mpscy.InvalidArgumentError, match="must be finite and >= 0, got inf"):
            optim.SGD(**kw)
    with pytest.raises(mpscy.InvalidArgumentError, match="betas"):
        optim.Adam(betas=(1.0, 0.9))
    with pytest.raises(mpscy.InvalidArgumentError, match="Nesterov"):
        optim.SGD(momentum=0, nesterov=True)
    with pytest.raises(mpscy.InvalidArgumentError, match="positive integer"):
        layers.Dense(0)
    with pytest.raises(mpscy.ShapeError, match="input_shape"):
        mpscy.Sequential([layers.Dense(3)], input_shape=(0,))
    with pytest.raises(mpscy.InvalidArgumentError, match="not an mpscy layer"):
        mpscy.Sequential([layers.Dense(3), "relu"], input_shape=(2,))
    with pytest.raises(mpscy.InvalidArgumentError, match="named 'a'"):
        mpscy.Sequential([layers.Dense(3, name="a"), layers.Dense(3, name="a")], input_shape=(2,))
    with pytest.raises(mpscy.InvalidArgumentError, match="learning rate"):
        mpscy.Engine(model).learning_rate = float("nan")


def test_construction_integers_out_of_range_are_named():
    """batch_size, seed and threads travel as int32 / uint64: a value out of range is an
    InvalidArgumentError naming the argument (it was a bare OverflowError such as "value too
    large to convert to int32_t"); a negative thread count is refused, not taken as 0."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    for kw in ({"batch_size": 2**31}, {"seed": 2**64}, {"threads": 2**31}, {"threads": -1}, {"threads": "4"}):
        name = next(iter(kw))
        with pytest.raises(mpscy.InvalidArgumentError, match=name):
            mpscy.Engine(model, device="cpu", **kw)
    assert mpscy.Engine(model, device="cpu", seed=2**64 - 1, threads=1).step(
        np.ones((2, 2), np.float32), np.zeros(2, np.int32)).loss > 0


def test_errors_are_picklable_and_typed():
    import pickle
    e = pickle.loads(pickle.dumps(mpscy.ShapeError("x has shape (1,)")))
    assert isinstance(e, mpscy.ShapeError) and isinstance(e, ValueError) and str(e) == "x has shape (1,)"
    assert issubclass(mpscy.DTypeError, TypeError)
    assert issubclass(mpscy.OutOfMemoryError, MemoryError)
    assert issubclass(mpscy.DeviceError, RuntimeError)
    assert issubclass(mpscy.NonFiniteError, ValueError)
    assert issubclass(mpscy.UnsupportedError, RuntimeError)


def test_arrays_whose_dtype_has_no_buffer_are_named_by_their_dtype(device):
    """datetime64 and timedelta64 arrays export no buffer: the error names the dtype (it used to
    say "x must be a numpy array, got ndarray")."""
    engine = make(device)
    snap = snapshot(engine)
    x, y = np.ones((BATCH, FEATURES), np.float32), np.zeros(BATCH, np.int64)
    with pytest.raises(mpscy.DTypeError, match=r"x .*got dtype datetime64\[ns\]"):
        engine.step(np.zeros((BATCH, FEATURES), "datetime64[ns]"), y)
    with pytest.raises(mpscy.DTypeError, match=r"y .*got dtype timedelta64\[s\]"):
        engine.step(x, np.zeros(BATCH, "timedelta64[s]"))
    with pytest.raises(mpscy.DTypeError, match="got dtype datetime64"):
        engine.predict(np.zeros((3, FEATURES), "datetime64[ns]"))
    assert_unchanged(engine, snap)


def test_concurrent_use_from_two_threads_is_refused_not_corrupted(device):
    """The native call releases the GIL; a second thread entering the same engine meanwhile gets
    a StateError instead of racing on the staging buffers."""
    import threading
    model = mpscy.Sequential([layers.Dense(512), layers.ReLU(), layers.Dense(10)], input_shape=(256,))
    engine = mpscy.Engine(model, batch_size=256, device=device)
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    y = np.zeros(256, np.int32)
    errors = []

    def worker():
        for _ in range(150):
            try:
                engine.step(x, y)
            except mpscy.Error as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors, "the two threads never overlapped"
    assert all(isinstance(e, mpscy.StateError) and "another thread" in str(e) for e in errors)
    assert engine.stats()["steps"] == 300 - len(errors)
    assert all(np.isfinite(v).all() for v in engine.get_parameters().values())


def test_learning_rate_must_be_a_number():
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(2,)), batch_size=2)
    with pytest.raises(mpscy.InvalidArgumentError, match="learning rate"):
        engine.learning_rate = "fast"
    with pytest.raises(mpscy.InvalidArgumentError, match="learning rate"):
        engine.learning_rate = -0.1


def test_native_buffer_needs_a_device():
    """Buffer(None, n) is a TypeError; it used to read a device handle out of None's memory."""
    with pytest.raises(TypeError):
        mpscy._native.Buffer(None, 16)
    buf = mpscy._native.Buffer(mpscy._native.Device("cpu"), 16)
    buf.write(b"0123456789abcdef")
    assert buf.read(4, 2) == b"2345"


def test_per_step_values_and_optimizer_state_are_checked_before_anything_changes():
    """An infinite learning rate, momentum or weight decay is refused (the step would report
    its update applied with every parameter non-finite), and so is an optimizer state with a
    NaN or Inf, a negative running sum of squares, or a fractional step count: each before
    anything is written."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    e = mpscy.Engine(model, optimizer=optim.Adam(1e-2, amsgrad=True), batch_size=4, device="cpu")
    e.step(np.ones((4, 2), np.float32), np.array([0, 1, 2, 0], np.int32))
    for attr in ("learning_rate", "momentum", "weight_decay"):
        before = getattr(e, attr)
        with pytest.raises(mpscy.InvalidArgumentError, match="must be finite and >= 0, got inf"):
            setattr(e, attr, float("inf"))
        assert getattr(e, attr) == before
    good = e.get_optimizer_state()
    p = "dense_0.weight"
    cases = [("exp_avg", np.nan, "'exp_avg' for 'dense_0.weight' contains NaN or Inf"),
             ("exp_avg_sq", np.nan, "contains NaN or Inf"),   # +Inf there is taken (an overflowed square)
             ("exp_avg_sq", -np.inf, "contains NaN or Inf"),
             ("exp_avg_sq", -1.0, "'exp_avg_sq' for 'dense_0.weight' holds sums of squares"),
             ("max_exp_avg_sq", -1e-30, "holds sums of squares"),
             ("step", 2.7, "'step' is a count: a whole number, got 2.7")]
    for slot, value, match in cases:
        state = {k: ({q: a.copy() for q, a in v.items()} if isinstance(v, dict) else v) for k, v in good.items()}
        if slot == "step":
            state[slot] = value
        else:
            state[slot][p][1, 0] = value
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            e.set_optimizer_state(state)
        now = e.get_optimizer_state()
        assert now["step"] == good["step"] == 1
        assert all(np.array_equal(now[k][q], good[k][q]) for k in good if isinstance(good[k], dict) for q in good[k])
    state = dict(good, step=3.0)  # a whole float is a count
    e.set_optimizer_state(state)
    assert e.get_optimizer_state()["step"] == 3


def test_step_count_beyond_2_53_is_refused_not_corrupted(device):
    """The step count is kept natively as a double: a count it cannot hold exactly (above 2**53)
    is refused before anything is written; 2**63 - 1 used to come back as -2**63."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    e = mpscy.Engine(model, optimizer=optim.Adam(1e-2), batch_size=4, device=device)
    e.step(np.ones((4, 2), np.float32), np.array([0, 1, 2, 0], np.int32))
    good = e.get_optimizer_state()
    for step in (2**53 + 1, 2**63 - 1):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"2\*\*53"):
            e.set_optimizer_state(dict(good, step=step))
        assert e.get_optimizer_state()["step"] == 1
    i, dtype, shape = e._optim_tensor("step")
    with pytest.raises(mpscy.InvalidArgumentError, match="2\\^53"):
        e._graph.write_tensor(i, np.array([2**63 - 1], np.int64))
    assert e.get_optimizer_state()["step"] == 1
    e.set_optimizer_state(dict(good, step=2**53))
    assert e.get_optimizer_state()["step"] == 2**53


def test_clip_thresholds_must_be_positive_finite_numbers():
    """clip_grad_norm and clip_grad_value are None or a positive finite number; anything else is
    an InvalidArgumentError naming the argument ("abc" was a bare ValueError from float(), a
    list a bare TypeError, inf and True were accepted)."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    for name in ("clip_grad_norm", "clip_grad_value"):
        for bad in ("abc", [1.0], float("nan"), float("inf"), -1.0, 0, True, 10**400):
            with pytest.raises(mpscy.InvalidArgumentError, match=f"{name} must be None or a positive finite number"):
                mpscy.Engine(model, device="cpu", **{name: bad})
        e = mpscy.Engine(model, device="cpu", **{name: np.float32(0.5)})
        assert getattr(e, name) == 0.5 and type(getattr(e, name)) is float  # JSON-serializable in checkpoints


def test_layer_and_optimizer_options_that_are_not_numbers_are_named():
    """The shared option helpers of layers and optimizers raise InvalidArgumentError naming the
    option: ELU("x"), LeakyReLU("x") and SGD(dampening="x") were bare ValueErrors from float(),
    a NaN alpha or dampening was accepted, Softmax("x") was a bare ValueError from int()."""
    cases = [(lambda: layers.ELU("x"), "ELU alpha must be a number, got 'x'"),
             (lambda: layers.ELU(float("nan")), "ELU alpha must be a finite number"),
             (lambda: layers.LeakyReLU("x"), "LeakyReLU negative_slope must be a number"),
             (lambda: layers.LeakyReLU(float("inf")), "LeakyReLU negative_slope must be a finite number"),
             (lambda: layers.Softmax("x"), "Softmax axis must be an integer, got 'x'"),
             (lambda: layers.Softmax(1.5), "Softmax axis must be an integer"),
             (lambda: layers.Dropout(10**400), "Dropout rate must be a number"),
             (lambda: optim.SGD(dampening="x"), "dampening must be a number, got 'x'"),
             (lambda: optim.SGD(dampening=float("nan")), "dampening must be a finite number"),
             (lambda: optim.SGD(momentum=10**400), "momentum must be a number"),
             (lambda: optim.Adam(betas=(10**400, 0.9)), "betas must be a pair of floats")]
    for make_it, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            make_it()
    assert layers.ELU(-0.5).alpha == -0.5 and layers.Softmax(np.int64(1)).axis == 1
    assert optim.SGD(dampening=0.5).dampening == 0.5


def test_strings_bools_and_misplaced_numbers_are_not_taken_for_options():
    """A number option refuses a string and a bool (float("0.5") and float(True) converted them:
    engine.learning_rate = "0.5" read back 0.5), and an on/off option refuses anything but a bool:
    Dense(16, 10), torch's nn.Linear(16, 10) habit, built a 16-unit layer with a bias, silently.
    Found by a user trial."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), optimizer=optim.SGD(0.01),
                          batch_size=2, device="cpu")
    for bad in ("0.5", True, b"1"):
        with pytest.raises(mpscy.InvalidArgumentError, match="learning rate must be a number"):
            engine.learning_rate = bad
    assert engine.learning_rate == pytest.approx(0.01)
    engine.learning_rate = np.float32(0.5)
    assert engine.learning_rate == 0.5
    cases = [(lambda: layers.Dense(16, 10), r"Dense bias must be True or False, got 10 \(Dense\(16, 10\) reads as "
                                            r"torch's nn.Linear\(in, out\): the input size is inferred, so "
                                            r"nn.Linear\(in, 10\) is Dense\(10\)\)"),
             (lambda: layers.Dense(16, "no"), "Dense bias must be True or False, got 'no'$"),
             (lambda: layers.Conv2D(8, 3, bias="no"), "Conv2D bias must be True or False, got .no."),
             (lambda: layers.BatchNorm(affine="yes"), "affine must be True or False"),
             (lambda: optim.SGD(0.1, momentum=0.9, nesterov=1), "nesterov must be True or False, got 1"),
             (lambda: optim.Adam(amsgrad="False"), "amsgrad must be True or False, got 'False'"),
             (lambda: optim.Adam(betas=("0.9", 0.999)), "betas must be a pair of floats"),
             (lambda: optim.SGD("0.1"), "lr must be a number, got '0.1'"),
             (lambda: layers.Dropout(True), "Dropout rate must be a number, got True")]
    for make_it, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            make_it()
    assert layers.Dense(4, np.bool_(False)).bias is False and optim.SGD(0.1, momentum=0.9, nesterov=True).nesterov


def test_options_the_native_code_reads_as_float32_must_fit_it():
    """A learning rate, momentum or weight decay above float32's largest (3.4028235e+38) became inf
    in the native update, and an applied step wrote inf and NaN into every parameter; LeakyReLU's
    slope and ELU's alpha became inf in the layer. Each is refused where it is given, the engine
    unchanged. Found by a user trial."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(3,)), loss="mse",
                          optimizer=optim.SGD(0.1, momentum=0.5), batch_size=4, device="cpu")
    for name in ("learning_rate", "momentum", "weight_decay"):
        before = getattr(engine, name)
        with pytest.raises(mpscy.InvalidArgumentError, match=r"must fit float32 \(\|value\| <= 3.4028235e\+38\), "
                                                             r"got 1e\+39"):
            setattr(engine, name, 1e39)
        assert getattr(engine, name) == before
    engine.learning_rate = float(np.finfo(np.float32).max)   # the largest is taken
    cases = [(lambda: optim.SGD(1e39), "lr must fit float32"),
             (lambda: optim.Adam(eps=3.5e38), "eps must fit float32"),
             (lambda: optim.SGD(0.1, momentum=0.5, dampening=-1e39), "dampening must fit float32"),
             (lambda: layers.LeakyReLU(1e39), "LeakyReLU negative_slope must fit float32"),
             (lambda: layers.ELU(-1e39), "ELU alpha must fit float32")]
    for make_it, match in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=match):
            make_it()


def test_a_nan_loss_is_written_nan_not_minus_nan(device):
    """The non-finite step's message prints a NaN without its sign (C's printf wrote '-nan')."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(3,)), loss="mse", batch_size=2,
                          device=device)
    engine.set_parameters({"dense_0.weight": np.full((2, 3), 3e38, np.float32)}, strict=False)
    x = np.array([[1, -1, 1], [1, 1, -1]], np.float32) * 3e38
    with pytest.raises(mpscy.NonFiniteError) as info:
        engine.step(x, np.zeros((2, 2), np.float32))
    assert "-nan" not in str(info.value) and ("nan" in str(info.value) or "inf" in str(info.value))


def test_layer_and_optimizer_sizes_past_int32_are_refused_at_construction():
    """The native descriptor holds layer options and L-BFGS's sizes as int32: Dense(2**31) used to
    construct and then fail the engine's build with a bare OverflowError ("value too large to
    convert to int32_t"); now each is refused by its constructor, naming the option."""
    big = 2**31
    cases = [(lambda: layers.Dense(big), "Dense units"), (lambda: layers.Conv2D(big, 3), "Conv2D filters"),
             (lambda: layers.Conv2D(4, 3, stride=big), "Conv2D stride"),
             (lambda: layers.Conv2D(4, 3, padding=big), "padding"),
             (lambda: layers.Conv2D(4, 3, groups=big), "Conv2D groups"),
             (lambda: layers.MaxPool2D(2, stride=big), "MaxPool2D stride"),
             (lambda: optim.LBFGS(max_iter=big), "max_iter"), (lambda: optim.LBFGS(history_size=big), "history_size")]
    for make_it, name in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=rf"{name} .*below 2\*\*31.*, got {big}"):
            make_it()
    assert layers.Dense(big - 1).units == big - 1 and optim.LBFGS(max_iter=big - 1).max_iter == big - 1


def test_optimizer_state_entries_that_are_not_numbers_are_named_and_change_nothing():
    """A slot holding strings was a bare ValueError, step=np.array([3]) a bare TypeError, and
    step="3" was silently taken as 3; L-BFGS entries (ro, d, old_dirs) of strings or of the
    wrong shape were bare ValueErrors. Each is now a DTypeError or InvalidArgumentError naming
    the entry, raised before anything is written."""
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(2,))
    x, y = np.ones((4, 2), np.float32), np.array([0, 1, 2, 0], np.int32)
    e = mpscy.Engine(model, optimizer=optim.Adam(1e-2), batch_size=4, device="cpu")
    e.step(x, y)
    e.step(x, y)
    snap = snapshot(e)
    good = snap[1]
    p = "dense_0.weight"

    def with_slot(slot, value):
        return dict(good, **{slot: dict(good[slot], **{p: value})})

    cases = [(with_slot("exp_avg_sq", np.full((3, 2), "a")), mpscy.DTypeError,
              "optimizer slot 'exp_avg_sq' for 'dense_0.weight' must be a numeric array, got dtype <U1"),
             (with_slot("exp_avg", [[1, 2], [3]]), mpscy.DTypeError, "'exp_avg' for 'dense_0.weight' must be a numeric"),
             (with_slot("exp_avg", np.ones((3, 2), bool)), mpscy.DTypeError, "got dtype bool"),
             (dict(good, step=np.array([3])), mpscy.InvalidArgumentError, r"'step' must be a single number, got array\(\[3\]\)"),
             (dict(good, step="3"), mpscy.InvalidArgumentError, "'step' must be a number, got '3'"),
             (dict(good, step=None), mpscy.InvalidArgumentError, "'step' must be a number, got None")]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            e.set_optimizer_state(state)
        assert_unchanged(e, snap)
    e.set_optimizer_state(dict(good, step=np.array(5)))  # a 0-d array (torch keeps step as one) is a number
    assert e.get_optimizer_state()["step"] == 5

    lb = mpscy.Engine(model, optimizer=optim.LBFGS(max_iter=3, history_size=4), batch_size=4, device="cpu")
    lb.step(x, y)
    before = lb.get_optimizer_state()
    assert len(before["ro"]) >= 1
    k = len(before["ro"])
    cases = [(dict(before, ro=["x"] * k), mpscy.InvalidArgumentError, r"LBFGS state 'ro\[0\]' must be a number, got 'x'"),
             (dict(before, ro=[np.ones(2)] * k), mpscy.InvalidArgumentError, r"'ro\[0\]' must be a single number"),
             (dict(before, d=np.full(before["d"].shape, "x")), mpscy.DTypeError, "LBFGS state 'd' must be a numeric array"),
             (dict(before, old_dirs=[np.full(before["d"].shape, "x")] * k), mpscy.DTypeError,
              r"LBFGS state 'old_dirs\[0\]' must be a numeric array")]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            lb.set_optimizer_state(state)
        now = lb.get_optimizer_state()
        assert now.keys() == before.keys() and all(_same(now[key], before[key]) for key in before)


def _same(a, b):
    """Bit-for-bit equality of L-BFGS state entries: arrays, lists of them, numbers or None."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if a is None or b is None:
        return a is b
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_binary_cross_entropy_targets_must_be_in_unit_range(device):
    """torch's binary_cross_entropy refuses targets outside [0, 1]; so does every call that
    stages them, and fit before its first step (BCEWithLogits takes any target, as torch's)."""
    model = lambda: mpscy.Sequential([layers.Dense(3), layers.Sigmoid()], input_shape=(2,))
    engine = mpscy.Engine(model(), loss="binary_cross_entropy", optimizer=optim.SGD(0.1), batch_size=4,
                          device=device, seed=0)
    x = np.ones((4, 2), np.float32)
    y = np.full((4, 3), 0.5, np.float32)
    y[2, 1] = 1.5
    before = engine.get_parameters()
    for call in (engine.step, engine.gradients, engine.evaluate):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"y holds 1\.5 at row 2; BinaryCrossEntropy targets"):
            call(x, y)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^y holds 1\.5 at row 2; BinaryCrossEntropy"):
        engine.fit(x, y, verbose=0)
    assert engine.iterations == 0
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])
    logits = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(2,)), loss="bce_with_logits",
                          batch_size=4, device=device, seed=0)
    assert np.isfinite(logits.step(x, y).loss)


def test_options_torch_takes_and_mpscy_refuses_are_named():
    with pytest.raises(mpscy.InvalidArgumentError, match=r"momentum=None \(torch's cumulative moving average\)"):
        layers.BatchNorm(momentum=None)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"BatchNorm eps must be in \(0\.0, inf\)"):
        layers.BatchNorm(eps=0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Dropout rate must be in \[0\.0, 1\.0\)"):
        layers.Dropout(1.0)


def test_predict_and_evaluate_name_the_callers_array_not_a_batch_slice(device):
    """A layout error names the array the caller passed (its whole shape), not the first batch
    sliced from it; 0 rows predict no outputs, as torch's model(x[:0])."""
    engine = make(device)
    with pytest.raises(mpscy.ShapeError, match=r"^x has shape \(100, 7\), expected \(n, 6\)$"):
        engine.predict(np.zeros((100, 7), np.float32))
    with pytest.raises(mpscy.ShapeError, match=r"^x has shape \(64,\), expected \(n, 6\)$"):
        engine.predict(np.zeros(64, np.float32))
    with pytest.raises(mpscy.ShapeError, match=r"^x has shape \(6,\), expected \(n, 6\)$"):
        engine.evaluate(np.zeros((64, FEATURES), np.float32)[0], np.zeros(1, np.int32))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^label 7 at row 40 of y is outside \[0, 4\)$"):
        y = np.zeros(64, np.int32)
        y[40] = 7
        engine.evaluate(np.zeros((64, FEATURES), np.float32), y)


def test_an_object_that_is_not_an_array_is_named_with_a_hint():
    """A torch tensor (anything with __array__ and no buffer) is named by its type, with how to
    convert it, not as a dtype the engine refuses."""
    engine = make("cpu")

    class Tensor:  # stands in for torch.Tensor: a shape, a dtype, __array__, no buffer protocol
        shape, dtype = (3, FEATURES), "torch.float32"

        def __array__(self, dtype=None, copy=None):
            return np.zeros(self.shape, np.float32)

    Tensor.__module__, Tensor.__qualname__ = "torch", "Tensor"
    with pytest.raises(mpscy.DTypeError,
                       match=r"^x must be a numpy array, got torch\.Tensor \(convert it with \.numpy\(\)"):
        engine.step(Tensor(), np.zeros(3, np.int32))
    # predict converts it, as fit does
    np.testing.assert_array_equal(engine.predict(Tensor()), engine.predict(np.zeros((3, FEATURES), np.float32)))
    with pytest.raises(mpscy.DTypeError, match=r"^y must be a numpy array, got list$"):
        engine.step(np.zeros((3, FEATURES), np.float32), [0, 1, 2])


def test_engines_refuse_pickling_and_copying():
    """An engine owns native memory: pickling and copying raise a TypeError that names save and
    mpscy.load (copy.copy used to share the native graph between two Python objects)."""
    import copy
    import pickle
    engine = make("cpu")
    for call in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied: save it with engine\.save\(path\)"):
            call(engine)
    copy.deepcopy(engine.model)  # a model is a description: copies are fine


def test_threads_are_bounded_and_reported():
    model = lambda: mpscy.Sequential([layers.Dense(CLASSES)], input_shape=(FEATURES,))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"threads must be an integer in \[0, 64\]"):
        mpscy.Engine(model(), device="cpu", threads=65)
    assert mpscy.Engine(model(), device="cpu", threads=1).device_info()["threads"] == 1
    assert mpscy.Engine(model(), device="cpu", threads=3).device_info()["threads"] == 3
    default = mpscy.Engine(model(), device="cpu").device_info()["threads"]
    assert default == min(os.cpu_count() or 1, 64)


def test_a_finite_loss_with_an_overflowing_gradient_is_refused(device):
    """The step's finiteness decision covers the gradient norm, not only the loss: weight and x
    of 1e19 give an output of 1e38 (finite in float32) and a weight gradient of 2e38 * 1e19
    (inf in float32). gradients() and step() raise NonFiniteError; nothing is updated."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(1,)), loss="mse",
                          optimizer=optim.SGD(lr=0.1), batch_size=1, device=device, seed=0)
    engine.set_parameters({"dense_0.weight": np.full((1, 1), 1e19, np.float32),
                           "dense_0.bias": np.zeros(1, np.float32)})
    before = engine.get_parameters()
    x, t = np.full((1, 1), 1e19, np.float32), np.zeros((1, 1), np.float32)
    with pytest.raises(mpscy.NonFiniteError, match=r"gradient norm (inf|nan): not finite \("):
        engine.gradients(x, t)
    with pytest.raises(mpscy.NonFiniteError, match=r"gradient norm (inf|nan): not finite, update skipped"):
        engine.step(x, t)
    for k, v in engine.get_parameters().items():
        np.testing.assert_array_equal(v, before[k])


def _deep_concat(levels):
    """(1, 1, 4) samples concatenated 8-fold along W `levels` times: 4 * 8**levels per sample."""
    x = mpscy.Input((1, 1, 4))
    h = x
    for _ in range(levels):
        h = layers.Concatenate(axis=3)([h] * 8)
    return mpscy.Model(x, layers.GlobalAvgPool2D()(h))


@pytest.mark.parametrize("case,model,error,message", [
    # 4 * 8**20 = 2**62 floats a sample: once planned into a 4-byte slab and written past it
    ("dimension", lambda: _deep_concat(20), mpscy.ShapeError, r"dimension 2 is 1125899906842624, more than 2\^48"),
    ("activations", lambda: mpscy.Sequential([layers.ReLU()], input_shape=(2 ** 47, 2 ** 8)),
     mpscy.OutOfMemoryError, r"more than 2\^56 floats of activations at batch 2"),
    ("parameters", lambda: mpscy.Sequential([layers.Dense(2 ** 30), layers.Dense(2 ** 30)], input_shape=(4,)),
     mpscy.OutOfMemoryError, r"more than 2\^56 floats of parameters"),
    ("dense-k", lambda: mpscy.Sequential([layers.Flatten(), layers.Dense(2)], input_shape=(2 ** 16, 2 ** 16)),
     mpscy.UnsupportedError, r"a Dense of 4294967296 input features; at most 2\^31 - 1"),
    ("conv-k", lambda: mpscy.Sequential([layers.Conv2D(2, 3)], input_shape=(2 ** 31, 5, 5)),
     mpscy.UnsupportedError, r"a Conv2D of 2147483648 x 3 x 3 taps and 3 x 3 positions"),
    ("conv-positions", lambda: mpscy.Sequential([layers.Conv2D(2, 1)], input_shape=(1, 2 ** 16, 2 ** 16)),
     mpscy.UnsupportedError, r"65536 x 65536 positions; each product at most 2\^31 - 1"),
])
def test_a_model_too_large_for_its_sizes_is_refused_at_build(device, case, model, error, message):
    """Sizes past what int64 offsets and the 32-bit BLAS dimensions hold are refused when the
    plan is built (every backend shares it), where they once wrapped into a slab too small for
    its writes: the "dimension" model built a 4-byte slab and crashed at its first predict."""
    with pytest.raises(error, match=message):
        mpscy.Engine(model(), loss="mse", batch_size=2, device=device)


def test_the_largest_deep_concatenation_that_fits_builds_and_predicts():
    """8**5 * 4 = 131,072 floats a sample, below every bound: built and exact (a mean of ones)."""
    engine = mpscy.Engine(_deep_concat(5), loss="mse", batch_size=2, device="cpu")
    np.testing.assert_array_equal(engine.predict(np.ones((2, 1, 1, 4), np.float32)), np.ones((2, 1), np.float32))


def test_a_cpu_graph_larger_than_the_machine_is_refused_not_killed():
    """A graph needing twice the machine's physical memory raises OutOfMemoryError naming both
    sizes when it is built: its zeroed slabs, touched as they are made, once had the process
    killed by the kernel instead."""
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n = -(-2 * have // (8 * 4 * 3))  # input, ReLU output and its gradient: 3 x 8 rows x n floats
    model = mpscy.Sequential([layers.ReLU()], input_shape=(n,))
    with pytest.raises(mpscy.OutOfMemoryError, match=r"the graph needs [\d.]+ GB at batch 8, more than this "
                                                      r"machine's [\d.]+ GB of memory"):
        mpscy.Engine(model, loss="mse", batch_size=8, device="cpu")


def test_set_parameters_and_optimizer_state_name_odd_keys_and_ragged_values():
    """Keys of mixed types, a ragged list and a ragged step count are named as mpscy errors (they
    were a TypeError from sorting the names and numpy's ValueError), nothing written."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), device="cpu")
    p = engine.get_parameters()
    st = engine.get_optimizer_state()
    with pytest.raises(mpscy.InvalidArgumentError, match=r"unknown parameter name\(s\): \['zz', 5\]"):
        engine.set_parameters({**p, 5: p["dense_0.bias"], "zz": p["dense_0.bias"]})
    with pytest.raises(mpscy.DTypeError, match="parameter 'dense_0.bias' must be a numeric array, got a ragged"):
        engine.set_parameters({**p, "dense_0.bias": [[1.0, 2.0], [3.0]]})
    with pytest.raises(mpscy.InvalidArgumentError, match=r"'step' must be a number, got \[\[1\], \[1, 2\]\]"):
        engine.set_optimizer_state({**st, "step": [[1], [1, 2]]})
    with pytest.raises(mpscy.InvalidArgumentError, match=r"unexpected \['x', 7\]"):
        engine.set_optimizer_state({**st, 7: 1, "x": 2})
    after = engine.get_parameters()
    assert all(np.array_equal(after[k], v) for k, v in p.items())


def test_keras_s_predict_and_evaluate_arguments_change_nothing():
    """predict(x, batch_size=, verbose=) and evaluate(...) as Keras calls them: the same results,
    nothing printed; a bad value is still refused by name."""
    engine = make("cpu")
    x = np.random.default_rng(1).normal(size=(13, FEATURES)).astype(np.float32)
    y = np.arange(13) % CLASSES
    np.testing.assert_array_equal(engine.predict(x, batch_size=5, verbose=0), engine.predict(x))
    assert engine.evaluate(x, y, batch_size=64, verbose=2) == engine.evaluate(x, y)
    with pytest.raises(mpscy.InvalidArgumentError, match="batch_size must be a positive integer or None, got 0"):
        engine.predict(x, batch_size=0)
    with pytest.raises(mpscy.InvalidArgumentError, match="verbose must be 0, 1, 2 or 'auto', got 'loud'"):
        engine.evaluate(x, y, verbose="loud")


def test_one_hot_labels_under_sparse_cross_entropy_name_argmax():
    """Keras's to_categorical rows given to the default loss (integer labels): both the float and
    the integer one-hot forms say how to get labels, and the float form names the dense loss."""
    e = mpscy.Engine(mpscy.Sequential([layers.Dense(3)], input_shape=(4,)), batch_size=2, device="cpu")
    x = np.ones((2, 4), np.float32)
    with pytest.raises(mpscy.DTypeError, match=r"y looks one-hot, a row of 3 class scores .*y\.argmax\(1\).*"
                                               r"loss=\"cross_entropy\""):
        e.step(x, np.eye(3, dtype=np.float32)[[0, 1]])
    with pytest.raises(mpscy.ShapeError, match=r"shape \(2, 3\); labels must be shaped \(n,\) \(one-hot rows: "
                                               r"y\.argmax\(1\)\)"):
        e.step(x, np.eye(3, dtype=np.int64)[[0, 1]])
    with pytest.raises(mpscy.DTypeError, match=r"got float64 \(whole-number floats: y\.astype\(np\.int64\)\)$"):
        e.step(x, np.array([0.0, 1.0]))
    assert e.iterations == 0
