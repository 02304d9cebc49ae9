"""An ONNX graph that convolves the (N, C, 1, 1) output of a GlobalAveragePool (or of a
ReduceMean over the image axes with keepdims), as NiN's and SqueezeNet's heads do, imports: the
pooled (C,) value is reshaped to (C, 1, 1) for the convolution; onnxruntime is the reference."""

import numpy as np
import pytest

import mpscy

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _head(pool):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    w3 = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1")]
    if pool == "gap":
        nodes.append(helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="p"))
    else:
        nodes.append(helper.make_node("ReduceMean", ["r1"], ["p"], name="p", axes=[2, 3], keepdims=1))
    nodes += [helper.make_node("Conv", ["p", "w2", "b2"], ["c2"], name="c2"),
              helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
              helper.make_node("Conv", ["r2", "w3"], ["c3"], name="c3", kernel_shape=[1, 1]),
              helper.make_node("Flatten", ["c3"], ["y"], name="f")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("w2", w2), ("b2", b2), ("w3", w3))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("pool", ["gap", "reduce_mean"])
def test_conv_after_global_pool_imports(pool):
    proto = _head(pool)
    x = np.random.default_rng(1).standard_normal((5, 3, 7, 7)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    engine = mpscy.onnx.load(proto, batch_size=4, device="cpu")
    out = engine.predict(x)
    assert out.shape == (5, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    kinds = [type(layer).__name__ for layer in engine.model.layers]
    assert kinds == ["Conv2D", "ReLU", "GlobalAvgPool2D", "Reshape", "Conv2D", "ReLU", "Conv2D", "Flatten"]


@pytest.mark.parametrize("act", ["Relu", "Sigmoid"])
def test_conv_after_global_pool_and_an_activation_imports(act):
    """A global pool, an activation, then a 1x1 convolution (a squeeze-and-excitation branch's
    first half, NiN's head with a ReLU between): the pooled value keeps ONNX's (N, C, 1, 1)
    through the activation, so the convolution reads it; onnxruntime is the reference."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["p"], name="p"),
             helper.make_node(act, ["p"], ["a"], name="a"),
             helper.make_node("Conv", ["a", "w2"], ["c2"], name="c2"),
             helper.make_node("Flatten", ["c2"], ["y"], name="f")]
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    x = rng.standard_normal((5, 3, 7, 7)).astype(np.float32)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    out = mpscy.onnx.load(proto, batch_size=4, device="cpu").predict(x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
