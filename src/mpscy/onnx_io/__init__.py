"""ONNX export and import (`mpscy.onnx.export` / `mpscy.onnx.load`). The `onnx` package (and
`onnxruntime` to run the files) are optional extras: ``pip install 'mpscy[onnx]'``. Modules here
import the real `onnx` package absolutely; `mpscy.onnx` is only the public facade."""

import importlib

from ..errors import InvalidArgumentError

IR_VERSION = 10          # onnxruntime >= 1.17 reads IR 10; onnx's own default (IR 11+) is refused by some
MIN_OPSET, MAX_OPSET = 13, 21


def onnx_modules():
    """(onnx, helper, numpy_helper, TensorProto), with a readable error when onnx is absent."""
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        raise ImportError("ONNX support needs the onnx package: pip install 'mpscy[onnx]'") from None
    return onnx, onnx.helper, onnx.numpy_helper, onnx.TensorProto


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidArgumentError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    return opset
