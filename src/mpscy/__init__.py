"""mpscy: train neural networks with the whole training step (forward, loss, backward,
optimizer update) executed as one native call over device buffers allocated once.

    import mpscy
    from mpscy import layers, optim
    model = mpscy.Sequential([layers.Dense(128), layers.ReLU(), layers.Dense(10)], input_shape=(784,))
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=1e-3),
                          batch_size=32, device="cpu", seed=0)
    result = engine.step(x, y)
"""

try:
    from . import _native
except ImportError as e:  # a source checkout without a build, or a broken install
    raise ImportError(
        "mpscy's native extension is not built or cannot be loaded "
        f"({e}). Install the package with `pip install .` (or `pip install -e .` for development)."
    ) from e

if _native.ABI_VERSION != _native.LIBRARY_ABI_VERSION:
    raise ImportError(f"mpscy: the extension was compiled against ABI {_native.ABI_VERSION} "
                      f"but the native library reports {_native.LIBRARY_ABI_VERSION}; rebuild mpscy")

from . import callbacks, data, datasets, layers, losses, metrics, onnx, optim
from .checkpoint import CheckpointError, load
from .engine import Engine, backends
from .errors import (DeviceError, DTypeError, Error, InvalidArgumentError, NonFiniteError,
                     OutOfMemoryError, ShapeError, StateError, UnsupportedError)
from ._native import StepResult
from .model import Input, Model, Sequential

__version__ = "0.1.0"

__all__ = [
    "Engine", "Sequential", "Model", "Input", "StepResult", "backends", "layers", "losses", "optim",
    "datasets", "Error", "ShapeError", "DTypeError", "DeviceError", "OutOfMemoryError",
    "UnsupportedError", "NonFiniteError", "InvalidArgumentError", "StateError", "__version__",
    "callbacks", "data", "metrics", "onnx", "load", "CheckpointError",
]
