"""A Model is not callable (models do not nest), and onnx.export given a Model instead of an
Engine says what to do, not an AttributeError."""

import numpy as np
import pytest

import mpscy
from mpscy import layers


def _model():
    x = mpscy.Input((4,))
    return mpscy.Model(x, layers.Dense(3)(x))


def test_a_model_is_not_callable(tmp_path):
    """Models do not nest (each layer is called once): a Model is not callable, so fit(metrics=model)
    and other places that take a callable refuse it up front (a __call__ that raised made it
    callable, and fit logged NaN for it every epoch)."""
    model = _model()
    assert not callable(model)
    engine = mpscy.Engine(model, loss="mse", batch_size=2, device="cpu")
    x = np.zeros((4, 4), np.float32)
    with pytest.raises(mpscy.InvalidArgumentError, match="metrics must be a metric name, a callable or a list"):
        engine.fit(x, np.zeros((4, 3), np.float32), epochs=1, metrics=model, verbose=0)
    assert engine.iterations == 0


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
