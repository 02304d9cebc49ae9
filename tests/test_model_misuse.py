"""A Model called on tensors (Keras's nesting) and onnx.export given a Model instead
of an Engine are refused with messages that say what to do, not Python's bare TypeError or
AttributeError."""

import pytest

import mpscy
from mpscy import layers


def _model():
    x = mpscy.Input((4,))
    return mpscy.Model(x, layers.Dense(3)(x))


def test_model_called_on_tensor_is_refused_by_name():
    inner = _model()
    with pytest.raises(mpscy.InvalidArgumentError, match="models do not nest"):
        inner(mpscy.Input((4,)))
    seq = mpscy.Sequential([layers.Dense(2)], input_shape=(4,))
    with pytest.raises(mpscy.InvalidArgumentError, match="Sequential cannot be called"):
        seq(mpscy.Input((4,)))


def test_onnx_export_of_a_model_names_the_engine(tmp_path):
    pytest.importorskip("onnx")
    model = _model()
    path = tmp_path / "m.onnx"
    with pytest.raises(mpscy.InvalidArgumentError, match=r"takes an mpscy Engine, got Model: build one"):
        mpscy.onnx.export(model, path)
    with pytest.raises(mpscy.InvalidArgumentError, match="takes an mpscy Engine, got str"):
        mpscy.onnx.export("model", path)
    assert not path.exists()
    engine = mpscy.Engine(model, loss="mse", batch_size=2, device="cpu")
    mpscy.onnx.export(engine, path)
    assert path.exists()
