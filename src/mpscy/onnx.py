"""ONNX interchange: `export(engine, path, opset=17)` writes a model (IR 10, a dynamic batch
dimension "N", checked with onnx.checker's full check) and `load(path, ...)` builds an Engine
from what torch.onnx.export (or mpscy) wrote, for inference or fine-tuning. Needs the optional
`onnx` package (``pip install 'mpscy[onnx]'``); onnxruntime runs the exported files. This
module is mpscy's facade; the work is in mpscy.onnx_io, which imports the real `onnx`."""

from ._checks import LOSS_WARNING, quiet_build_warnings

__all__ = ["export", "load", "read"]


def export(engine, path=None, opset=17, output_name="output"):
    """Writes `engine`'s model and current parameters to `path` as ONNX; returns the ModelProto.
    opset: 13..21 (LayerNorm needs 17+; GELU is one Gelu node from 20, else its formula)."""
    from .onnx_io.exporter import export as _export
    return _export(engine, path, opset=opset, output_name=output_name)


def read(source):
    """(Model, {parameter name: float32 array}) from an ONNX path, bytes or ModelProto. Data
    that is not an ONNX model raises InvalidArgumentError; a graph mpscy cannot build,
    UnsupportedError naming the node."""
    from .onnx_io.importer import read_onnx
    return read_onnx(source)


def load(source, loss=None, optimizer=None, batch_size=32, device="auto", seed=0, **engine_kwargs):
    """An Engine holding the ONNX model and its weights (BatchNorm statistics included), ready
    for `predict` or for fine-tuning with `step`/`fit` under `loss` and `optimizer`.

    loss: as Engine's. None (the default) picks one that fits the model's output, so any model
    loads for `predict`: "sparse_cross_entropy" for a (classes,) output of 2 or more classes,
    else "mse". It is only a guess at how the model was trained: pass `loss=` explicitly to
    fine-tune or `evaluate` (a one-unit binary head wants "bce_with_logits", say; a model ending
    in Softmax "categorical_cross_entropy", or its Softmax removed). An explicit loss that does not
    fit the output warns as Engine does."""
    from .engine import Engine
    model, params = read(source)
    guessed = loss is None
    if guessed:
        shape = tuple(model.output_shape)
        loss = "sparse_cross_entropy" if len(shape) == 1 and shape[0] >= 2 else "mse"
    # a guessed loss is a placeholder for predict, not a claim about the output: no warning that it does not fit
    with quiet_build_warnings((LOSS_WARNING,) if guessed else ()):
        engine = Engine(model, loss=loss, optimizer=optimizer, batch_size=batch_size, device=device, seed=seed,
                        **engine_kwargs)
    engine.set_parameters(params, strict=True)
    return engine
