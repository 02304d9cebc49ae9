"""mpscy.onnx: exported files pass onnx.checker's full check (IR 10, explicit opset, dynamic
batch "N") and onnxruntime's predictions match engine.predict to 1e-5; files written by
torch.onnx.export import and predict like the torch model to 1e-5, and fine-tune."""
import json
import sys
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim
from layer_refs import rel_err

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-5, 1e-6


def _export_checked(engine, path, **kw):
    """The engine exported to path (export's keyword arguments), loaded back and passed by onnx's
    full checker."""
    mpscy.onnx.export(engine, path, **kw)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    return m


def _ort(path_or_proto, feeds):
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _all_activations_mlp():
    return mpscy.Sequential([
        layers.Flatten(), layers.Dense(48), layers.GELU(), layers.Dense(40), layers.GELU(approximate="tanh"),
        layers.Swish(), layers.LeakyReLU(0.2), layers.ELU(0.7), layers.Tanh(), layers.Dense(24, bias=False),
        layers.Sigmoid(), layers.Dense(16), layers.ReLU(), layers.Dense(10), layers.Softmax()], input_shape=(1, 8, 8))


@pytest.mark.parametrize("opset", [17, 20])
def test_export_checks_and_matches_onnxruntime(device, tmp_path, opset):
    engine = mpscy.Engine(_all_activations_mlp(), loss="categorical_cross_entropy", batch_size=16, device=device,
                          seed=3)
    x, y = mpscy.datasets.load_digits(images=True)
    engine.fit(x[:256], np.eye(10, dtype=np.float32)[y[:256]], epochs=1, verbose=0)  # trained weights
    path = str(tmp_path / "mlp.onnx")
    proto = mpscy.onnx.export(engine, path, opset=opset)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 10 and [(o.domain, o.version) for o in m.opset_import] == [("", opset)]
    for vi in (m.graph.input[0], m.graph.output[0]):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "N"
    assert all(t.raw_data for t in m.graph.initializer if t.dims)
    ops = [n.op_type for n in m.graph.node]
    assert ("Gelu" in ops, "Erf" in ops) == ((True, False) if opset >= 20 else (False, True))
    for n in (1, 7, 37):
        xs = x[300:300 + n]
        np.testing.assert_allclose(_ort(path, {"input": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)
    assert proto.graph.output[0].name == "output"


def test_export_import_round_trip(device, tmp_path):
    engine = mpscy.Engine(_all_activations_mlp(), loss="categorical_cross_entropy", batch_size=16, device=device,
                          seed=5)
    path = str(tmp_path / "m.onnx")
    mpscy.onnx.export(engine, path)
    back = mpscy.onnx.load(path, batch_size=8, device=device)
    kinds = [type(n.layer).__name__ for n in back.model.nodes[1:]]
    assert kinds == [type(n.layer).__name__ for n in engine.model.nodes[1:]]
    assert back.model.nodes[5].layer.approximate == "tanh"
    xs = np.random.default_rng(0).normal(size=(19, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(back.predict(xs), engine.predict(xs), rtol=1e-6, atol=1e-7)


def test_functional_model_export(device):
    a = mpscy.Input((5,), name="features")
    model = mpscy.Model(a, layers.Dense(2, name="head")(layers.ReLU()(layers.Dense(4)(a))))
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device=device)
    proto = mpscy.onnx.export(engine, output_name="scores")
    assert [i.name for i in proto.graph.input] == ["features"] and proto.graph.output[0].name == "scores"
    xs = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_allclose(_ort(proto, {"features": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- from PyTorch
torch = None


@pytest.fixture(scope="module")
def tt():
    global torch
    torch = pytest.importorskip("torch")
    return torch


def _torch_export(model, example, path, opset, dynamic=True):
    """torch's TorchScript exporter, input "x" and output "y", their batch dynamic unless not dynamic"""
    import warnings
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None, opset_version=opset)


@pytest.mark.parametrize("opset", [17, 20])
def test_import_torch_mlp(tt, device, tmp_path, opset):
    nn, F = tt.nn, tt.nn.functional

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(64, 48), nn.Linear(48, 32, bias=False)
            self.l3, self.l4, self.l5 = nn.Linear(32, 32), nn.Linear(32, 24), nn.Linear(24, 10)

        def forward(self, x):
            x = x.view(x.size(0), -1)                           # Shape/Gather/Concat/Reshape
            x = F.gelu(self.l1(x))
            x = F.silu(F.gelu(self.l2(x), approximate="tanh"))  # MatMul (no bias)
            x = F.elu(F.leaky_relu(self.l3(x), 0.1), 0.5)
            x = torch.sigmoid(torch.tanh(self.l4(x)))
            return torch.softmax(self.l5(torch.relu(x)), dim=-1)

    tt.manual_seed(0)
    net = MLP()
    path = str(tmp_path / "torch_mlp.onnx")
    _torch_export(net, tt.randn(2, 1, 8, 8), path, opset)
    engine = mpscy.onnx.load(path, device=device, batch_size=32)
    kinds = [type(n.layer).__name__ for n in engine.model.nodes[1:]]
    assert kinds == ["Flatten", "Dense", "GELU", "Dense", "GELU", "Swish", "Dense", "LeakyReLU", "ELU",
                     "Dense", "Tanh", "Sigmoid", "ReLU", "Dense", "Softmax"]
    x = mpscy.datasets.load_digits(images=True)[0][:50]
    with tt.no_grad():
        ref = net(tt.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine.predict(x), ref, rtol=RTOL, atol=ATOL)


def test_import_matmul_add_and_finetune(device):
    """The MatMul + Add form of a linear layer (what exporters write for 3-D inputs)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(size=(64, 20)).astype(np.float32) * 0.2, rng.normal(size=20).astype(np.float32)
    w2, b2 = rng.normal(size=(20, 10)).astype(np.float32) * 0.2, rng.normal(size=10).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["o"]),
             helper.make_node("Add", ["b2", "o"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    engine = mpscy.onnx.load(proto, optimizer=optim.Adam(3e-3), batch_size=64, device=device)
    assert [type(n.layer).__name__ for n in engine.model.nodes[1:]] == ["Dense", "ReLU", "Dense"]
    x, y = mpscy.datasets.load_digits()
    np.testing.assert_allclose(engine.predict(x[:40]), _ort(proto, {"x": x[:40]}), rtol=RTOL, atol=ATOL)
    h = engine.fit(x, y, epochs=3, verbose=0)          # fine-tuning the imported weights
    assert h.history["loss"][-1] < 0.7 * h.history["loss"][0]


needs_layers = pytest.mark.skipif(not all(hasattr(layers, n) for n in (
    "Conv2D", "BatchNorm", "Dropout", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "LayerNorm", "Add", "Concatenate")),
    reason="needs the layers of issue 3")


def readme_cnn(input_shape=(1, 8, 8)):
    return mpscy.Sequential([
        layers.Conv2D(32, 3, stride=1, padding=1), layers.ReLU(), layers.Conv2D(32, 3, stride=2, padding=1), layers.ReLU(),
        layers.Conv2D(64, 3, stride=1, padding=1), layers.ReLU(), layers.Conv2D(64, 3, stride=2, padding=1), layers.ReLU(),
        layers.Dense(128), layers.ReLU(), layers.Dropout(0.5), layers.Dense(10)], input_shape=input_shape)


def residual_model():
    """Two conv-bn-relu-conv-bn + skip blocks, both pools, a channel Concatenate, global
    pooling, LayerNorm and a non-affine BatchNorm over features."""
    x = mpscy.Input((1, 8, 8))
    h = layers.ReLU()(layers.BatchNorm()(layers.Conv2D(16, 3, padding=1)(x)))
    for _ in range(2):
        r = layers.ReLU()(layers.BatchNorm()(layers.Conv2D(16, 3, padding=1)(h)))
        r = layers.BatchNorm()(layers.Conv2D(16, 3, padding=1, bias=False)(r))
        h = layers.ReLU()(layers.Add()([h, r]))
    c = layers.Concatenate(axis=1)([layers.MaxPool2D(2)(h), layers.AvgPool2D(3, stride=2, padding=1)(h)])
    g = layers.GlobalAvgPool2D()(c)
    g = layers.BatchNorm(affine=False)(layers.Dense(24)(g))
    return mpscy.Model(x, layers.Dense(10)(layers.LayerNorm(24)(layers.GELU()(g))))


def _close_to_scale(out, ref):
    """Equal to 1e-5 relative to the outputs' scale (elementwise relative error is meaningless
    for outputs near zero)."""
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max(), (np.abs(out - ref).max(), np.abs(ref).max())


@needs_layers
@pytest.mark.parametrize("make", [readme_cnn, residual_model], ids=["readme-cnn", "residual"])
def test_cnn_and_residual_export(device, tmp_path, make):
    x, y = mpscy.datasets.load_digits(images=True)
    engine = mpscy.Engine(make(), optimizer=optim.Adam(2e-3), batch_size=32, device=device, seed=1)
    engine.fit(x[:640], y[:640], epochs=2, verbose=0)          # BatchNorm statistics move away from 0/1
    path = str(tmp_path / "m.onnx")
    m = _export_checked(engine, path)
    ops = {n.op_type for n in m.graph.node}
    expected = {"Conv", "Relu", "Gemm", "Dropout"} if make is readme_cnn else {
        "Conv", "BatchNormalization", "Add", "MaxPool", "AveragePool", "Concat", "GlobalAveragePool",
        "LayerNormalization", "Erf"}
    assert expected <= ops
    for n in (1, 5, 64):
        xs = x[700:700 + n]
        _close_to_scale(_ort(path, {"input": xs}), engine.predict(xs))
    back = mpscy.onnx.load(path, device=device)                # and back, BatchNorm statistics included
    np.testing.assert_allclose(back.predict(x[700:764]), engine.predict(x[700:764]), rtol=1e-6, atol=1e-6)
    if make is residual_model:
        with pytest.raises(mpscy.UnsupportedError, match="opset >= 17"):
            mpscy.onnx.export(engine, opset=16)                # LayerNormalization is opset 17


def _torch_models(tt):
    nn = tt.nn

    class CNN(nn.Module):       # the README CNN
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(),
                                   nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))

        def forward(self, x):
            return self.f(x)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return tt.relu(x + self.b2(self.c2(tt.relu(self.b1(self.c1(x))))))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(Block(16), Block(16))
            self.mp, self.ap, self.gap = nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1)
            self.fc, self.bn, self.ln, self.out = nn.Linear(32, 24), nn.BatchNorm1d(24), nn.LayerNorm(24), nn.Linear(24, 10)

        def forward(self, x):
            h = self.blocks(self.stem(x))
            g = tt.flatten(self.gap(tt.cat([self.mp(h), self.ap(h)], dim=1)), 1)
            return self.out(self.ln(tt.relu(self.bn(self.fc(g)))))

    return {"readme-cnn": CNN, "residual": Residual}


@needs_layers
@pytest.mark.parametrize("name", ["readme-cnn", "residual"])
def test_import_torch_cnn_and_residual(tt, device, tmp_path, name):
    x, y = mpscy.datasets.load_digits(images=True)
    tt.manual_seed(0)
    net = _torch_models(tt)[name]()
    net.train()
    with tt.no_grad():                                         # BatchNorm statistics that are not 0/1
        for i in range(4):
            net(tt.from_numpy(x[i * 64:(i + 1) * 64]))
    path = str(tmp_path / f"{name}.onnx")
    _torch_export(net, tt.from_numpy(x[:2]), path, 17)
    engine = mpscy.onnx.load(path, optimizer=optim.Adam(1e-3), batch_size=64, device=device)
    kinds = {type(n.layer).__name__ for n in engine.model.nodes[1:]}
    assert ({"Conv2D", "Dense"} if name == "readme-cnn" else
            {"Conv2D", "Add", "MaxPool2D", "AvgPool2D", "Concatenate", "GlobalAvgPool2D", "BatchNorm", "LayerNorm"}) <= kinds
    with tt.no_grad():
        ref = net(tt.from_numpy(x[:300])).numpy()
    _close_to_scale(engine.predict(x[:300]), ref)
    before = engine.evaluate(x[300:], y[300:])["loss"]
    engine.fit(x[300:], y[300:], epochs=2, verbose=0)          # fine-tuning works from the imported weights
    assert engine.evaluate(x[300:], y[300:])["loss"] < before


def test_a_sum_and_concats_of_more_than_eight_inputs(device):
    """An ONNX Sum of 9 operands and a Concat of 9 after two Concats: joins chained by 8, their
    heads' made-up names passing over the names the import gave (they clashed: "two layers are
    named 'add_0'"); the values against NumPy."""
    from onnx import TensorProto, helper

    def model(nodes, width):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    e = mpscy.onnx.load(model([helper.make_node("Sum", ["x"] * 9, ["y"])], 4), device=device)
    assert [n.name for n in e.model.nodes] == ["x", "add_0_1", "add_0"]
    assert np.abs(e.predict(x) - 9 * x.astype(np.float64)).max() < 1e-5
    cats = [helper.make_node("Concat", ["x", "x"], ["c0"], axis=1), helper.make_node("Concat", ["x", "x"], ["c1"], axis=1),
            helper.make_node("Concat", ["c0", "c1"] + ["x"] * 7, ["y"], axis=1)]
    e = mpscy.onnx.load(model(cats, 44), device=device)
    assert np.array_equal(e.predict(x), np.concatenate([x] * 11, 1))


def test_unsupported_graphs_say_why(device):
    from onnx import TensorProto, helper, numpy_helper

    def model(nodes, inits=(), out_shape=("N", 4)):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    with pytest.raises(mpscy.UnsupportedError, match="operator Cos"):
        mpscy.onnx.load(model([helper.make_node("Cos", ["x"], ["y"], name="c1")]), device=device)
    with pytest.raises(mpscy.UnsupportedError, match="fixes the batch size"):
        mpscy.onnx.load(model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("s", [2, 4])]), device=device)
    with pytest.raises(mpscy.UnsupportedError, match="no mpscy layer"):
        mpscy.onnx.load(model([helper.make_node("Mul", ["x", "k"], ["y"])], [("k", 3.0)]), device=device)
    # each refusal names the node it is reading: by name, or by its output where it has none
    with pytest.raises(mpscy.UnsupportedError, match=r"operator Cos \(unnamed node, output 'y'\) is not supported"):
        mpscy.onnx.load(model([helper.make_node("Cos", ["x"], ["y"])]), device=device)
    # an operator's own refusals too (they quoted an empty name: "Clip '' to ...")
    with pytest.raises(mpscy.UnsupportedError, match=r"Clip \(unnamed, output 'y'\) to \[-1.0, 1.0\]: only \[0, 6\]"):
        mpscy.onnx.load(model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], [("lo", -1.0), ("hi", 1.0)]),
                        device=device)
    with pytest.raises(mpscy.UnsupportedError, match=r"Clip 'clamp' to \[-1.0, 1.0\]"):
        mpscy.onnx.load(model([helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clamp")],
                              [("lo", -1.0), ("hi", 1.0)]), device=device)
    with pytest.raises(mpscy.UnsupportedError, match=r"^ONNX import: Mul node 'scale': multiplication by a non-scalar "
                                                     r"constant \(a per-channel scale, say\) has no mpscy layer"):
        mpscy.onnx.load(model([helper.make_node("Mul", ["x", "k"], ["y"], name="scale")], [("k", [1, 2, 3, 4])]),
                        device=device)
    # a layer that refuses its options (an AveragePool padded past half its window): UnsupportedError
    # naming the ONNX node, not InvalidArgumentError naming the layer's made-up name
    g = helper.make_graph([helper.make_node("AveragePool", ["x"], ["y"], name="pool1", kernel_shape=[2, 2],
                                            pads=[2, 2, 2, 2])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 11, 11])])
    with pytest.raises(mpscy.UnsupportedError, match=r"^ONNX import: AveragePool node 'pool1': AvgPool2D cannot take "
                                                     r"it: AvgPool2D padding \(2, 2\) must be at most half"):
        mpscy.onnx.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), device=device)
    relu = helper.make_node("Relu", ["x"], ["r"], name="relu")
    with pytest.raises(mpscy.UnsupportedError, match=r"^ONNX import: Conv node 'conv': a constant or shape value is "
                                                     r"used where a tensor is needed"):
        mpscy.onnx.load(model([relu, helper.make_node("Conv", ["w", "w"], ["y"], name="conv")],
                              [("w", np.ones((4, 4, 1, 1)))]), device=device)
    # a GELU-like formula whose sum holds a non-scalar constant: refused (it raised NameError)
    gelu_like = [helper.make_node("Mul", ["x", "half"], ["h"], name="m1"), helper.make_node("Tanh", ["x"], ["t"]),
                 helper.make_node("Add", ["t", "k"], ["s"], name="plus"), helper.make_node("Mul", ["h", "s"], ["y"])]
    with pytest.raises(mpscy.UnsupportedError, match="a non-scalar constant in an elementwise formula"):
        mpscy.onnx.load(model(gelu_like, [("half", 0.5), ("k", [1, 2, 3, 4])]), device=device)
    # a product of two branches is told that no layer multiplies them, not sent to the data pipeline
    gate = [helper.make_node("Gemm", ["x", "a", "ab"], ["h"], name="fa", transB=1),
            helper.make_node("Sigmoid", ["h"], ["g"], name="sig"),
            helper.make_node("Gemm", ["x", "b", "ab"], ["v"], name="fb", transB=1),
            helper.make_node("Mul", ["g", "v"], ["y"], name="gate")]
    with pytest.raises(mpscy.UnsupportedError, match=r"node 'gate' computes mul\(.*no layer multiplies or adds two "
                                                     r"branches but Add"):
        mpscy.onnx.load(model(gate, [("a", np.eye(4)), ("b", np.eye(4)), ("ab", np.zeros(4))]), device=device)
    with pytest.raises(mpscy.UnsupportedError, match=r"const=\[1.0, 2.0, 3.0, \.\.\.\] \(4 values\)\), which no mpscy layer "
                                                     r"computes \(a scale or an offset of the input"):
        mpscy.onnx.load(model([helper.make_node("Add", ["x", "k"], ["y"], name="shift")], [("k", [1, 2, 3, 4])]),
                        device=device)


def test_missing_onnx_is_a_clear_error(device, monkeypatch):
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(3,)), batch_size=2, device=device)
    monkeypatch.setitem(sys.modules, "onnx", None)      # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"mpscy\[onnx\]"):
        mpscy.onnx.export(engine)
    with pytest.raises(ImportError, match=r"mpscy\[onnx\]"):
        mpscy.onnx.load(b"not read")
    with pytest.raises(mpscy.InvalidArgumentError, match="opset"):
        mpscy.onnx.export(engine, opset=9)


def _sum_graph(tail, const):
    """Two one-unit products of x, a constant `c`, and `tail` nodes (onnx.helper) giving y."""
    from onnx import TensorProto as TP, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(1, 3)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1),
             helper.make_node("MatMul", ["x", "w2t"], ["m"])] + tail
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.T.copy(), "w2t"),
                           numpy_helper.from_array(np.asarray(const, np.float32), "c")])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_import_keeps_each_constant_of_a_sum():
    """A sum of layers with a constant inside (a bias of a one-unit MatMul, or a shift): the
    bias becomes that Dense's (predictions match onnxruntime to 1e-5), and a shift that no
    mpscy layer adds is refused by name; neither is dropped from the sum (it was: outputs off
    by the constant)."""
    from onnx import helper
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    biased = _sum_graph([helper.make_node("Add", ["m", "c"], ["mb"]), helper.make_node("Add", ["mb", "a"], ["y"])],
                        [2.5])
    eng = mpscy.onnx.load(biased, loss="mse", device="cpu")
    ref = _ort(biased, {"x": x})
    assert np.abs(eng.predict(x) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert [type(n.layer).__name__ for n in eng.model.nodes[1:]] == ["Dense", "Dense", "Add"]
    shifted = _sum_graph([helper.make_node("Add", ["a", "c"], ["ac"]), helper.make_node("Add", ["ac", "m"], ["y"])],
                         1.0)
    with pytest.raises(mpscy.UnsupportedError,
                       match=r"an expression, add\(tensor\(1,\), const=\[1\.0\]\), which no mpscy layer computes"):
        mpscy.onnx.load(shifted, loss="mse", device="cpu")


def test_export_names_never_clash():
    """A layer named like an exporter's constant ("const_0", before a GELU that opset 17 writes
    with constants) exports and matches onnxruntime; a layer or input named like the graph's
    output is refused by name (it made an invalid graph: not in SSA form), and exports with
    another output_name."""
    x = np.ones((2, 3), np.float32)
    eng = mpscy.Engine(mpscy.Sequential([layers.Dense(4, name="const_0"), layers.GELU(), layers.Dense(2)],
                                        input_shape=(3,)), loss="mse", device="cpu", batch_size=4)
    m = mpscy.onnx.export(eng, opset=17)
    assert np.abs(_ort(m, {m.graph.input[0].name: x}) - eng.predict(x)).max() <= 1e-6
    hidden = mpscy.Sequential([layers.Dense(4, name="output"), layers.ReLU(), layers.Dense(2)], input_shape=(3,))
    i = mpscy.Input((3,), name="output")
    for model, what in ((hidden, "a layer"), (mpscy.Model(i, layers.Dense(2)(i)), "an input")):
        e = mpscy.Engine(model, loss="mse", device="cpu", batch_size=4)
        with pytest.raises(mpscy.InvalidArgumentError, match=f"{what} is named 'output'.*another output_name"):
            mpscy.onnx.export(e)
        m = mpscy.onnx.export(e, output_name="y")
        assert np.abs(_ort(m, {m.graph.input[0].name: x}) - e.predict(x)).max() <= 1e-6


def test_import_same_auto_pad():
    """auto_pad SAME_UPPER / SAME_LOWER (what torch writes for padding="same") on Conv and
    MaxPool: the spec's padding for an output of ceil(in / stride), taken where both sides get
    the same (a 3x3 at stride 1 and 2 on 5 x 5); predictions match onnxruntime. An odd total
    (a 2x2 at stride 1) is refused by name: mpscy's layers pad both sides alike."""
    from onnx import TensorProto as TP, helper, numpy_helper
    rng = np.random.default_rng(2)

    def graph(k, stride, auto, pool):
        w = rng.normal(size=(4, 2, k, k)).astype(np.float32)
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[k, k], strides=[stride, stride],
                                  auto_pad=auto)]
        if pool:
            nodes.append(helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], auto_pad="SAME_UPPER"))
        nodes.append(helper.make_node("Flatten", [nodes[-1].output[0]], ["y"]))
        n = -(-5 // stride)
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4 * n * n])],
                              [numpy_helper.from_array(w, "w")])
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)

    x = rng.normal(size=(3, 2, 5, 5)).astype(np.float32)
    for k, stride, auto, pool in ((3, 1, "SAME_UPPER", True), (3, 2, "SAME_LOWER", False)):
        m = graph(k, stride, auto, pool)
        eng = mpscy.onnx.load(m, loss="mse", device="cpu")
        ref = _ort(m, {"x": x})
        assert eng.predict(x).shape == ref.shape and np.abs(eng.predict(x) - ref).max() <= 1e-5
    with pytest.raises(mpscy.UnsupportedError, match="SAME_UPPER pads one side of a 5-wide axis more"):
        mpscy.onnx.load(graph(2, 1, "SAME_UPPER", False), loss="mse", device="cpu")


def test_a_corrupt_file_is_an_mpscy_error(tmp_path):
    """A file that is not an ONNX model (garbage, a truncated export, an empty file, a broken
    text format) raises InvalidArgumentError naming it; it had raised protobuf's DecodeError or
    ParseError (and an empty file, an UnsupportedError about an opset None)."""
    eng = mpscy.Engine(mpscy.Sequential([layers.Dense(4), layers.ReLU(), layers.Dense(2)], input_shape=(3,)),
                       loss="mse", batch_size=4, device="cpu")
    good = mpscy.onnx.export(eng).SerializeToString()
    for name, raw in (("garbage.onnx", b"this is not an onnx model\x00\xff\x13" * 4),
                      ("truncated.onnx", good[:len(good) // 2]), ("empty.onnx", b""),
                      ("garbage.textproto", b"garbage {{{ ")):      # onnx.load reads the format from the suffix
        path = tmp_path / name
        path.write_bytes(raw)
        for fn in (mpscy.onnx.read, mpscy.onnx.load):
            with pytest.raises(mpscy.InvalidArgumentError, match=rf"{name}' is not a valid ONNX model"):
                fn(str(path))
        with pytest.raises(mpscy.InvalidArgumentError, match=r"the bytes given are not a valid ONNX model"):
            mpscy.onnx.read(raw)
    assert mpscy.onnx.read(good)[0].output_shape == (2,)
    # an mpscy checkpoint (safetensors) given to the ONNX import is pointed to mpscy.load, as
    # mpscy.load points an ONNX file to mpscy.onnx.load; garbage gets no such hint
    eng.save(tmp_path / "model.mpscy")
    hint = r"; it looks like a safetensors file \(an mpscy checkpoint\?\): read it with mpscy.load$"
    for source in (tmp_path / "model.mpscy", str(tmp_path / "model.mpscy"), (tmp_path / "model.mpscy").read_bytes()):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"not a valid ONNX model .*" + hint):
            mpscy.onnx.load(source)
    with pytest.raises(mpscy.InvalidArgumentError) as info:
        mpscy.onnx.read(str(tmp_path / "garbage.onnx"))
    assert "safetensors" not in str(info.value)
    # neither a path, a file, bytes nor a model: an int was read as a file descriptor, None a TypeError
    for source, kind in ((None, "NoneType"), (5, "int"), (2.5, "float")):
        for fn in (mpscy.onnx.read, mpscy.onnx.load):
            with pytest.raises(mpscy.InvalidArgumentError, match=rf"takes a path, a file object, bytes or a "
                                                                 rf"ModelProto, got {kind}$"):
                fn(source)


def test_a_linear_over_the_last_axis_of_a_3d_input_is_refused():
    """torch's nn.Linear on an (N, 3, 4) input is a MatMul over the last axis, (N, 3, 5) out; it
    had been read as a flattening Dense and failed at set_parameters ("parameter
    'dense_0.weight' has shape (5, 12), got (5, 4)"; `read` returned it). It is refused by node
    name, and a Gemm (whose input must be 2-D) on such a tensor likewise."""
    from onnx import TensorProto as TP, helper, numpy_helper
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)

    def model(node, out_shape):
        g = helper.make_graph([node, helper.make_node("Relu", ["h"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 4])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, out_shape)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    matmul = model(helper.make_node("MatMul", ["x", "w"], ["h"], name="/fc/MatMul"), ["N", 3, 5])
    onnx.checker.check_model(matmul, full_check=True)
    assert _ort(matmul, {"x": np.ones((2, 3, 4), np.float32)}).shape == (2, 3, 5)
    gemm = model(helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc_gemm"), ["N", 5])
    for proto, what in ((matmul, "MatMul '/fc/MatMul'"), (gemm, "Gemm 'fc_gemm'")):
        for fn in (mpscy.onnx.read, mpscy.onnx.load):
            with pytest.raises(mpscy.UnsupportedError, match=rf"{what}: its input 'x' has rank 3 \(N, 3, 4\)"):
                fn(proto)


# ----------------------------------------------------------------------------- review fixes
def _randomize(engine, seed=0):
    """Random parameters and BatchNorm statistics (variances positive), so that predictions
    depend on every value."""
    rng = np.random.default_rng(seed)
    params = {k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var") else rng.normal(0, 0.5, v.shape))
              .astype(np.float32) for k, v in engine.get_parameters().items()}
    engine.set_parameters(params)
    return params


def _feeds(proto, *xs):
    return {vi.name: x for vi, x in zip(proto.graph.input, xs)}


def _renamed_input_engine(name, tail):
    """An engine whose input node is named `name` after the model was built (a name Input may
    refuse, such as "dense_0.weight": the exporter must not depend on that check)."""
    x = mpscy.Input((3,))
    t = x
    for layer in tail:
        t = layer(t)
    engine = mpscy.Engine(mpscy.Model(x, t), loss="mse", device="cpu", batch_size=4)
    engine.model.nodes[0].name = name
    return engine


@pytest.mark.parametrize("name", ["dense_0.weight", "dense_0.bias", "const.0", "gelu_1/erf"])
def test_export_input_named_like_an_initializer(name, tmp_path):
    """An input named like a parameter's initializer or a constant: the export had fed the input
    as the Gemm's weight (onnxruntime: "Gemm: Invalid bias shape"; load: "the ONNX graph has no
    data input"), or failed in onnx's shape inference. Initializers get other names; the input
    keeps its own, onnxruntime and the re-imported model predict like the engine."""
    engine = _renamed_input_engine(name, [layers.Dense(3), layers.GELU(), layers.Dense(2)])
    _randomize(engine)
    path = str(tmp_path / "m.onnx")
    proto = mpscy.onnx.export(engine, path, opset=17)       # opset 17: GELU's formula has constants
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert [vi.name for vi in proto.graph.input] == [name]
    names = [t.name for t in proto.graph.initializer] + [o for n in proto.graph.node for o in n.output]
    assert len(names) == len(set(names)) and name not in names
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(_ort(path, {name: x}), engine.predict(x), rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(path, loss="mse", device="cpu")
    assert set(back.get_parameters()) == set(engine.get_parameters())
    np.testing.assert_allclose(back.predict(x), engine.predict(x), rtol=1e-6, atol=1e-7)


def test_export_layer_named_like_an_intermediate_value(tmp_path):
    """A layer named "d/flat" before a Dense "d" on an image input, whose Flatten value the
    exporter had also named "d/flat" (onnx's ValidationError: not in SSA form); an output_name
    spelled like an initializer or like that Flatten value of the output layer. All export,
    check and predict alike, and import with the same parameter names."""
    x = mpscy.Input((2, 3, 3))
    hidden = mpscy.Model(x, layers.Dense(2)(layers.Dense(4, name="d")(layers.ReLU(name="d/flat")(x))))
    y = mpscy.Input((2, 3, 3))
    last = mpscy.Model(y, layers.Dense(4, name="d")(y))
    xs = np.random.default_rng(2).normal(size=(3, 2, 3, 3)).astype(np.float32)
    for k, (model, output_name) in enumerate(((hidden, "output"), (hidden, "d.weight"), (hidden, "d/flat_1"),
                                              (last, "d/flat"), (last, "d.bias"))):
        engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=4)
        _randomize(engine)
        path = str(tmp_path / f"m{k}.onnx")
        proto = mpscy.onnx.export(engine, path, output_name=output_name)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        assert proto.graph.output[0].name == output_name
        assert len({n.name for n in proto.graph.node}) == len(proto.graph.node)
        np.testing.assert_allclose(_ort(path, {"input": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)
        back = mpscy.onnx.load(path, device="cpu")
        assert set(back.get_parameters()) == set(engine.get_parameters())
        np.testing.assert_allclose(back.predict(xs), engine.predict(xs), rtol=1e-6, atol=1e-7)


def test_a_failed_export_writes_no_file(tmp_path, monkeypatch):
    """An export refused before writing leaves no file; a write that fails half-way (a full
    disk, say) leaves neither a partial file at the path nor a temporary one (it had written
    straight to the path)."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(4, name="output"), layers.Dense(2)], input_shape=(3,)),
                          loss="mse", device="cpu", batch_size=4)
    path = tmp_path / "m.onnx"
    with pytest.raises(mpscy.InvalidArgumentError, match="a layer is named 'output'"):
        mpscy.onnx.export(engine, str(path))
    assert list(tmp_path.iterdir()) == []
    real_save = onnx.save

    def failing_save(proto, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(proto.SerializeToString()[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save", failing_save)
    with pytest.raises(OSError, match="No space left") as info:
        mpscy.onnx.export(engine, str(path), output_name="y")
    assert info.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(onnx, "save", real_save)
    path.write_bytes(b"old")                                    # an existing file is replaced whole
    mpscy.onnx.export(engine, str(path), output_name="y")
    assert onnx.load(str(path)).graph.output[0].name == "y" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def _every_layer_model():
    """Every layer kind the exporter writes, with default (position) names and a few given
    ones, options off their defaults: BatchNorm and LayerNorm with and without affine, a Dense
    on an image (the export flattens it), a three-input Add (Sum) and a two-input one."""
    x = mpscy.Input((2, 8, 8), name="image")
    c = layers.Conv2D(4, 3, padding=1)(x)
    r = layers.ReLU()(layers.BatchNorm(momentum=0.01, eps=1e-3)(c))
    c2 = layers.BatchNorm(affine=False, momentum=0.3)(layers.Conv2D(4, 3, padding=1, bias=False, name="conv_b")(r))
    s = layers.Add()([r, c2, c])
    m = layers.MaxPool2D(2)(s)
    a = layers.AvgPool2D(3, stride=2, padding=1, count_include_pad=False)(s)
    cat = layers.Concatenate(axis=1)([m, a])
    g = layers.GlobalAvgPool2D()(layers.LayerNorm((4, 4), elementwise_affine=False, eps=1e-4)(cat))
    h = layers.Add()([layers.Dense(12)(layers.Flatten()(m)), layers.Dense(12, bias=False)(a)])
    h = layers.GELU(approximate="tanh")(layers.GELU()(h))
    h = layers.ELU(0.7)(layers.LeakyReLU(0.2)(layers.Swish()(h)))
    h = layers.Dropout(0.3)(layers.Sigmoid()(layers.Tanh()(h)))
    h = layers.BatchNorm(affine=False)(layers.Dense(12, name="mix")(layers.Concatenate()([h, g])))
    h = layers.LayerNorm(12, elementwise_affine=False)(layers.LayerNorm(12, eps=1e-6)(h))
    return mpscy.Model(x, layers.Softmax(axis=1)(layers.Dense(5)(h)))


@needs_layers
@pytest.mark.parametrize("opset", [17, 20])
def test_round_trip_keeps_layer_names_and_options(tmp_path, opset):
    """export -> load gives back every layer under its name (the importer had numbered them per
    kind: dense_2 became dense_1), so the parameter names are the same and set_parameters
    takes the original engine's; non-affine BatchNorm and LayerNorm come back non-affine (they
    had come back with a trainable weight and bias), and float options come back as given
    (momentum 0.3, not 0.30000001192...)."""
    engine = mpscy.Engine(_every_layer_model(), loss="categorical_cross_entropy", device="cpu", batch_size=8)
    params = _randomize(engine, 3)
    path = str(tmp_path / "all.onnx")
    proto = mpscy.onnx.export(engine, path, opset=opset)
    props = {p.key: p.value for p in proto.metadata_props}
    non_affine = [n.name for n in engine.model.nodes if type(n.layer).__name__ in ("BatchNorm", "LayerNorm")
                  and not (getattr(n.layer, "affine", True) and getattr(n.layer, "elementwise_affine", True))]
    assert len(non_affine) == 4 and sorted(json.loads(props["mpscy.non_affine"])) == sorted(non_affine)
    back = mpscy.onnx.load(path, device="cpu", batch_size=8)
    assert set(back.get_parameters()) == set(params)
    back.set_parameters(params, strict=True)
    original = {n.name: n.layer for n in engine.model.nodes if n.layer is not None}
    imported = {n.name: n.layer for n in back.model.nodes if n.layer is not None}
    for name, layer in original.items():
        assert type(imported[name]) is type(layer) and imported[name].config() == layer.config(), name
    extra = {name: type(layer).__name__ for name, layer in imported.items() if name not in original}
    assert list(extra.values()) == ["Flatten"]                  # the Dense on an image: flattened first
    xs = np.random.default_rng(4).normal(size=(11, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(back.predict(xs), engine.predict(xs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_ort(path, {"image": xs}), engine.predict(xs), rtol=1e-5, atol=1e-6)
    again = mpscy.onnx.export(back, opset=opset)                # and the re-export is the same graph
    assert [(n.op_type, n.name) for n in again.graph.node] == [(n.op_type, n.name) for n in proto.graph.node]


def test_non_affine_metadata_is_mpscy_s_own():
    """The "mpscy.non_affine" metadata is what makes a layer non-affine on import: the same file
    without it (as another tool may write it) imports affine, with the identity weight and zero
    bias; a listed node whose scale was edited since keeps it, affine. Malformed metadata is an
    InvalidArgumentError."""
    model = mpscy.Sequential([layers.Dense(6), layers.BatchNorm(affine=False),
                              layers.LayerNorm(6, elementwise_affine=False), layers.Dense(3)], input_shape=(4,))
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=4)
    _randomize(engine)
    proto = mpscy.onnx.export(engine)
    x = np.random.default_rng(5).normal(size=(7, 4)).astype(np.float32)
    kept = mpscy.onnx.load(proto, device="cpu")
    assert not kept.model.nodes[2].layer.affine and not kept.model.nodes[3].layer.elementwise_affine
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    del plain.metadata_props[:]
    foreign = mpscy.onnx.load(plain, device="cpu")
    assert foreign.model.nodes[2].layer.affine and foreign.model.nodes[3].layer.elementwise_affine
    assert set(foreign.get_parameters()) - set(kept.get_parameters()) == {
        "batchnorm_1.weight", "batchnorm_1.bias", "layernorm_2.weight", "layernorm_2.bias"}
    edited = onnx.ModelProto()
    edited.CopyFrom(proto)
    scale = next(t for t in edited.graph.initializer if t.name == "batchnorm_1.weight")
    scale.CopyFrom(onnx.numpy_helper.from_array(np.full(6, 2.0, np.float32), scale.name))
    changed = mpscy.onnx.load(edited, device="cpu")
    assert changed.model.nodes[2].layer.affine and not changed.model.nodes[3].layer.elementwise_affine
    for e, ref in ((kept, proto), (foreign, plain), (changed, edited)):
        np.testing.assert_allclose(e.predict(x), _ort(ref, _feeds(ref, x)), rtol=RTOL, atol=ATOL)
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    bad.metadata_props[0].value = "batchnorm_1"
    with pytest.raises(mpscy.InvalidArgumentError, match="mpscy.non_affine"):
        mpscy.onnx.read(bad)


def test_import_names_layers_after_nodes():
    """In a file mpscy wrote (producer_name "mpscy"), a node with a valid, free name names its
    layer; an empty, invalid ("a.b") or already taken name falls back to the numbering, which
    skips the names nodes of the graph hold ("dense_0" is a Relu's). A file from another tool is
    numbered throughout, its node names (torch's module paths) not kept."""
    from onnx import TensorProto as TP, helper, numpy_helper
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.normal(size=(4, 4)).astype(np.float32) for _ in range(3))
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1),
             helper.make_node("Relu", ["a"], ["b"], name="dense_0"),
             helper.make_node("Gemm", ["b", "w2"], ["c"], name="a.b", transB=1),
             helper.make_node("Gemm", ["c", "w3"], ["d"], name="x", transB=1),
             helper.make_node("Sigmoid", ["d"], ["y"], name="/head/Sigmoid")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    xs = rng.normal(size=(3, 4)).astype(np.float32)
    for producer, names in (("pytorch", ["x", "dense_0", "relu_0", "dense_1", "dense_2", "sigmoid_0"]),
                            ("mpscy", ["x_1", "dense_1", "dense_0", "dense_2", "x", "/head/Sigmoid"])):
        m.producer_name = producer
        engine = mpscy.onnx.load(m, device="cpu")
        assert [n.name for n in engine.model.nodes] == names, producer
        np.testing.assert_allclose(engine.predict(xs), _ort(m, {"x": xs}), rtol=RTOL, atol=ATOL)


def test_load_picks_a_loss_that_fits_the_output():
    """load's default loss fits the model's output, so any model loads for predict (it had
    raised "SparseCrossEntropy needs a (classes,) output" for a Conv output): cross-entropy for
    a (classes,) output of 2+ classes, else mean squared error. An explicit loss is used as
    given, and refused where it does not fit, as before."""
    cases = [(mpscy.Sequential([layers.Conv2D(2, 3)], input_shape=(1, 5, 5)), (1, 5, 5), "MSE"),
             (mpscy.Sequential([layers.Dense(1)], input_shape=(3,)), (3,), "MSE"),
             (mpscy.Sequential([layers.Dense(4)], input_shape=(3,)), (3,), "SparseCrossEntropy")]
    for model, shape, loss in cases:
        engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=4)
        proto = mpscy.onnx.export(engine)
        back = mpscy.onnx.load(proto, device="cpu")
        assert type(back.loss).__name__ == loss
        x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
        np.testing.assert_allclose(back.predict(x), engine.predict(x), rtol=1e-6, atol=1e-7)
        assert type(mpscy.onnx.load(proto, loss="mae", device="cpu").loss).__name__ == "MAE"
    with pytest.raises(mpscy.ShapeError, match=r"needs a \(classes,\) output"):
        mpscy.onnx.load(mpscy.onnx.export(mpscy.Engine(cases[0][0], loss="mse", device="cpu")),
                        loss="categorical_cross_entropy", device="cpu")


# ----------------------------------------------------------------------------- attributes, both ways
def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _export_check_and_read_back(engine, x, opset=17):
    """Exports `engine`, checks the file, compares onnxruntime and the re-imported engine with
    engine.predict(x); returns the proto."""
    proto = mpscy.onnx.export(engine, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    ref = engine.predict(x)
    np.testing.assert_allclose(_ort(proto, {proto.graph.input[0].name: x}), ref, rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(proto, loss="mse", device="cpu", batch_size=8)
    np.testing.assert_allclose(back.predict(x), ref, rtol=1e-6, atol=1e-7)
    return proto


def test_conv_export_writes_pads_as_begins_then_ends():
    """A Conv2D with padding (1, 2), a 3x5 kernel and stride (1, 2): ONNX's pads are
    [h_begin, w_begin, h_end, w_end] = [1, 2, 1, 2] (written [1, 1, 2, 2] the output is
    8 x 5, not 7 x 5), and the importer reads them back as padding (1, 2), not (2, 1)."""
    x_in = mpscy.Input((2, 7, 9))
    conv = layers.Conv2D(3, (3, 5), stride=(1, 2), padding=(1, 2), name="conv")
    model = mpscy.Model(x_in, layers.Dense(4)(layers.ReLU()(conv(x_in))))
    assert model.nodes[1].shape == (3, 7, 5)
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=8)
    _randomize(engine)
    x = np.random.default_rng(1).normal(size=(5, 2, 7, 9)).astype(np.float32)
    proto = _export_check_and_read_back(engine, x)
    node = next(n for n in proto.graph.node if n.op_type == "Conv")
    a = _attrs(node)
    assert a["pads"] == [1, 2, 1, 2] and a["kernel_shape"] == [3, 5] and a["strides"] == [1, 2]
    back = mpscy.onnx.load(proto, loss="mse", device="cpu")
    assert back.model.nodes[1].layer.config() == conv.config()


def test_grouped_conv_exports_its_group():
    """Conv2D(groups=2) over 4 channels: the Conv node has group=2 (with group 1 its
    (6, 2, 3, 3) weight does not fit the 4 input channels), predictions match onnxruntime and
    the re-imported engine, which is grouped again."""
    model = mpscy.Sequential([layers.Conv2D(6, 3, padding=1, groups=2), layers.ReLU(), layers.Dense(3)],
                             input_shape=(4, 5, 5))
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=8)
    _randomize(engine, 2)
    x = np.random.default_rng(3).normal(size=(6, 4, 5, 5)).astype(np.float32)
    proto = _export_check_and_read_back(engine, x)
    assert _attrs(next(n for n in proto.graph.node if n.op_type == "Conv"))["group"] == 2
    back = mpscy.onnx.load(proto, loss="mse", device="cpu")
    assert back.model.nodes[1].layer.groups == 2


def test_dense_on_a_two_axis_sample_is_flattened_in_the_export():
    """A Dense on (3, 4) samples flattens them to 12 features first: ONNX's Gemm takes rank 2
    only, so the export writes Flatten (axis 1) before it for any sample of more than one
    axis, not only for images."""
    model = mpscy.Sequential([layers.Dense(5), layers.Tanh(), layers.Dense(2)], input_shape=(3, 4))
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=8)
    _randomize(engine, 4)
    x = np.random.default_rng(5).normal(size=(7, 3, 4)).astype(np.float32)
    proto = _export_check_and_read_back(engine, x)
    assert [n.op_type for n in proto.graph.node] == ["Flatten", "Gemm", "Tanh", "Gemm"]
    assert _attrs(proto.graph.node[0])["axis"] == 1


def test_channel_softmax_exports_its_axis():
    """Softmax(axis=1) on (C, H, W) samples is a softmax over the channels: the ONNX node's
    axis is 1 (over the last axis the outputs would differ), and it imports with axis 1."""
    x_in = mpscy.Input((3, 4, 5))
    model = mpscy.Model(x_in, layers.Softmax(axis=1)(layers.Conv2D(4, 1)(x_in)))
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=8)
    _randomize(engine, 6)
    x = np.random.default_rng(7).normal(size=(3, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(engine.predict(x).sum(axis=1), 1.0, rtol=1e-6)
    proto = _export_check_and_read_back(engine, x)
    assert _attrs(next(n for n in proto.graph.node if n.op_type == "Softmax"))["axis"] == 1
    back = mpscy.onnx.load(proto, loss="mse", device="cpu")
    assert back.model.nodes[-1].layer.axis == 1


def test_non_affine_layernorm_writes_the_normalized_shape():
    """LayerNorm((4, 5), elementwise_affine=False): the identity scale and zero bias the export
    writes have the normalized shape (4, 5), as an affine LayerNorm's weight and bias, not a
    (5,) that only broadcasts to it."""
    model = mpscy.Sequential([layers.LayerNorm((4, 5), elementwise_affine=False, name="ln"), layers.Dense(2)],
                             input_shape=(3, 4, 5))
    engine = mpscy.Engine(model, loss="mse", device="cpu", batch_size=8)
    _randomize(engine, 8)
    x = np.random.default_rng(9).normal(size=(4, 3, 4, 5)).astype(np.float32)
    proto = _export_check_and_read_back(engine, x)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(inits["ln.weight"], np.ones((4, 5), np.float32))
    np.testing.assert_array_equal(inits["ln.bias"], np.zeros((4, 5), np.float32))
    assert _attrs(next(n for n in proto.graph.node if n.op_type == "LayerNormalization"))["axis"] == -2


def _graph(nodes, in_shape, out_shape, inits=()):
    from onnx import TensorProto as TP, helper, numpy_helper
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", *out_shape])],
                          [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_import_pooling_in_ceil_mode_where_every_window_fits():
    """ceil_mode=1 (torch's MaxPool2d(ceil_mode=True)) is taken where it changes nothing (8x8,
    kernel 2, stride 2: 4x4 either way) and predicts as onnxruntime; where it adds a partial
    window (7x7: 4x4 against floor's 3x3) it is refused, saying so."""
    from onnx import helper
    x = np.random.default_rng(11).normal(size=(3, 2, 8, 8)).astype(np.float32)
    for op in ("MaxPool", "AveragePool"):
        m = _graph([helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
                   (2, 8, 8), (2, 4, 4))
        engine = mpscy.onnx.load(m, loss="mse", device="cpu")
        np.testing.assert_allclose(engine.predict(x), _ort(m, {"x": x}), rtol=RTOL, atol=ATOL)
    m = _graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                 name="pool")], (2, 7, 7), (2, 4, 4))
    with pytest.raises(mpscy.UnsupportedError, match=r"MaxPool 'pool' with ceil_mode=1 over \(7, 7\) .*adds a partial "
                                                     r"window"):
        mpscy.onnx.load(m, loss="mse", device="cpu")


def test_import_gemm_alpha_and_beta():
    """Gemm computes alpha A B + beta C: with alpha 0.5, beta 2 and B stored (in, out)
    (transB=0), the Dense gets weight 0.5 B^T and bias 2 C, and predicts as onnxruntime."""
    from onnx import helper
    rng = np.random.default_rng(10)
    b, c = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    m = _graph([helper.make_node("Gemm", ["x", "b", "c"], ["y"], alpha=0.5, beta=2.0)], (6,), (3,),
               [("b", b), ("c", c)])
    engine = mpscy.onnx.load(m, loss="mse", device="cpu")
    p = engine.get_parameters()
    np.testing.assert_allclose(p["dense_0.weight"], 0.5 * b.T, rtol=1e-7)
    np.testing.assert_allclose(p["dense_0.bias"], 2.0 * c, rtol=1e-7)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(engine.predict(x), _ort(m, {"x": x}), rtol=RTOL, atol=ATOL)


def test_import_takes_the_spec_defaults_of_omitted_attributes():
    """Attributes a file leaves out take the ONNX specification's defaults: LeakyRelu's alpha
    0.01 and AveragePool's count_include_pad 0 (padded cells not counted); predictions match
    onnxruntime on inputs with negative values and padded borders."""
    from onnx import helper
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("LeakyRelu", ["p"], ["l"]), helper.make_node("Flatten", ["l"], ["y"])]
    m = _graph(nodes, (2, 5, 5), (18,))
    engine = mpscy.onnx.load(m, loss="mse", device="cpu")
    pool, leaky = engine.model.nodes[1].layer, engine.model.nodes[2].layer
    assert pool.count_include_pad is False and leaky.negative_slope == 0.01
    x = np.random.default_rng(11).normal(size=(4, 2, 5, 5)).astype(np.float32) - 1.0
    np.testing.assert_allclose(engine.predict(x), _ort(m, {"x": x}), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("opset,keepdims", [(17, 0), (17, 1), (18, 0), (18, 1)])
def test_import_reduce_mean_over_the_image_axes_as_global_average_pooling(opset, keepdims):
    """torch's x.mean((2, 3)) exports ReduceMean over axes (2, 3): axes an attribute up to opset
    17, an input from 18; keepdims 1 keeps (N, C, 1, 1), which a Flatten then takes to (N, C).
    It imports as GlobalAvgPool2D, and predicts as onnxruntime (rtol 1e-5); other axes are
    refused by name."""
    from onnx import TensorProto as TP, helper, numpy_helper
    rng = np.random.default_rng(20)
    w, b = rng.normal(size=(5, 3, 3, 3)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    gw, gb = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [("w", w), ("b", b), ("gw", gw), ("gb", gb)]]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([-2, -1], np.int64), "axes"))
        mean = helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=keepdims)
    else:
        mean = helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=keepdims)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), mean]
    nodes += [helper.make_node("Flatten", ["m"], ["f"])] if keepdims else []
    nodes.append(helper.make_node("Gemm", ["f" if keepdims else "m", "gw", "gb"], ["y"], transB=1))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    engine = mpscy.onnx.load(m, loss="mse", device="cpu")
    assert [type(n.layer).__name__ for n in engine.model.nodes[1:]] == ["Conv2D", "GlobalAvgPool2D", "Dense"]
    x = rng.normal(size=(7, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(engine.predict(x), _ort(m, {"x": x}), rtol=RTOL, atol=ATOL)
    m.graph.node[1].CopyFrom(helper.make_node("ReduceMean", ["c"], ["m"], axes=[1], keepdims=keepdims) if opset < 18 else
                       helper.make_node("ReduceMean", ["c"], ["m"], keepdims=keepdims))
    with pytest.raises(mpscy.UnsupportedError, match=r"ReduceMean .* over axes (\[1\]|None) of a rank-4 value"):
        mpscy.onnx.load(m, loss="mse", device="cpu")


def test_load_warns_only_about_a_loss_it_was_given(tmp_path):
    """A model ending in Softmax loads without a warning under the guessed placeholder loss
    (sparse_cross_entropy, for predict); the same loss passed explicitly warns, as Engine does,
    that the softmax would be applied twice, and categorical_cross_entropy does not."""
    engine = mpscy.Engine(_all_activations_mlp(), loss="categorical_cross_entropy", batch_size=4, device="cpu")
    path = str(tmp_path / "m.onnx")
    mpscy.onnx.export(engine, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mpscy.onnx.load(path, device="cpu")
        mpscy.onnx.load(path, loss="categorical_cross_entropy", device="cpu")
        assert [str(w.message) for w in caught] == []
        mpscy.onnx.load(path, loss="sparse_cross_entropy", device="cpu")
    assert len(caught) == 1 and "would be applied twice" in str(caught[0].message)



def test_import_torch_training_mode_export_keeps_batchnorm_and_dropout(tt, device, tmp_path):
    """torch's default (eval) export folds a BatchNorm into the convolution before it and drops
    Dropout, which predicts the same but fine-tunes another model; training=TrainingMode.TRAINING
    with do_constant_folding=False keeps both, its BatchNormalization nodes in training mode (with
    running-statistics outputs nothing reads), which load as BatchNorm layers whose mode is the
    engine's: the running statistics, momentum and eval predictions are torch's."""
    import warnings
    nn = tt.nn
    tt.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=0.2), nn.ReLU(),
                        nn.Dropout(0.3), nn.Flatten(), nn.Linear(256, 3))
    x = tt.randn(5, 2, 8, 8)
    net.train()
    net(x)  # running statistics away from their initial values
    path = str(tmp_path / "train_mode.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tt.onnx.export(net, (x,), path, dynamo=False, training=tt.onnx.TrainingMode.TRAINING,
                       do_constant_folding=False, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    engine = mpscy.onnx.load(path, device=device, batch_size=8)
    kinds = [type(n.layer).__name__ for n in engine.model.nodes[1:]]
    assert kinds == ["Conv2D", "BatchNorm", "ReLU", "Dropout", "Flatten", "Dense"]
    bn = engine.model.nodes[2].layer
    assert bn.momentum == pytest.approx(0.2) and engine.model.nodes[4].layer.rate == pytest.approx(0.3)
    p = engine.get_parameters()
    np.testing.assert_allclose(p["batchnorm_0.running_mean"], net[1].running_mean.numpy(), rtol=1e-6)
    net.eval()
    with tt.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(engine.predict(x.numpy()), ref, rtol=RTOL, atol=ATOL)


def test_import_refusals_name_the_node_and_the_way_out(tt, tmp_path):
    """A constant scale of the input (x / 255 in forward) is refused naming its node and where it
    belongs; a LayerNorm exported at opset 13 (ReduceMean, Sub, Pow, ...) is refused with the
    opset that exports it as one node."""
    nn = tt.nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 3)

        def forward(self, x):
            return self.a(x / 255.0)

    path = str(tmp_path / "scaled.onnx")
    _torch_export(Scaled(), tt.randn(2, 8), path, 17)
    with pytest.raises(mpscy.UnsupportedError, match=r"node '/Div' computes mul\(tensor\(8,\), const=.*which no mpscy "
                                                     r"layer computes \(a scale or an offset of the input, such as "
                                                     r"x / 255, belongs in the data pipeline\)"):
        mpscy.onnx.load(path, device="cpu")
    path = str(tmp_path / "ln13.onnx")
    _torch_export(nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 3)), tt.randn(2, 8), path, 13)
    with pytest.raises(mpscy.UnsupportedError, match=r"a LayerNorm exported below opset 17 arrives as such "
                                                     r"ReduceMeans: export it with opset_version=17 or later"):
        mpscy.onnx.load(path, device="cpu")


def test_import_torch_non_affine_norms_stay_non_affine(tt, tmp_path):
    """torch.onnx.export writes BatchNorm1d(affine=False)'s and LayerNorm(elementwise_affine=False)'s
    identity scale and zero bias as Constant nodes, a model's parameters as initializers: those
    layers import non-affine (they had come with a trainable weight and bias, and fine-tuning
    drifted from torch's by 1e-3 in 3 steps), an affine BatchNorm (initializers of 1 and 0
    included, as a fresh one exports) stays affine, and SGD steps match torch's."""
    import warnings
    nn = tt.nn
    tt.manual_seed(0)
    cases = [(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(), nn.Linear(6, 3)), False),
             (nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 3)), False),
             (nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)), True)]
    x = tt.randn(16, 8)
    y = tt.randint(0, 3, (16,))
    for k, (net, affine) in enumerate(cases):
        net.eval()
        path = str(tmp_path / f"norm{k}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tt.onnx.export(net, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "N"}})
        engine = mpscy.onnx.load(path, optimizer=mpscy.optim.SGD(0.1), batch_size=16, device="cpu")
        norm = engine.model.nodes[2]
        assert getattr(norm.layer, "affine", getattr(norm.layer, "elementwise_affine", None)) is affine, k
        assert (f"{norm.name}.weight" in engine.get_parameters()) is affine
        net.train()
        opt = tt.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            engine.step(x.numpy(), y.numpy().astype(np.int32))
            opt.zero_grad()
            tt.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        net.eval()
        with tt.no_grad():
            ref = net(x).numpy()
        np.testing.assert_allclose(engine.predict(x.numpy()), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- ReLU6, Hardsigmoid, ...
def _mobile_activations_mlp():
    """Each activation after a Dense, then Softplus(beta)s right after activations written as
    formulas (a Mish, a Swish, another Softplus(beta)): their products must not be taken apart."""
    return mpscy.Sequential([
        layers.Dense(32), layers.ReLU6(), layers.Dense(32), layers.Hardswish(), layers.Dense(32),
        layers.Hardsigmoid(), layers.Dense(32), layers.Mish(), layers.Dense(32), layers.Softplus(),
        layers.Dense(32), layers.Softplus(beta=2.0), layers.Dense(16), layers.Mish(), layers.Softplus(beta=2.0),
        layers.Swish(), layers.Softplus(beta=3.0), layers.Softplus(beta=0.5), layers.Hardswish(),
        layers.Softplus(beta=2.0), layers.Dense(5)], input_shape=(12,))


@pytest.mark.parametrize("opset", [13, 17, 18, 20])
def test_mobile_activations_export_import_and_onnxruntime(device, tmp_path, opset):
    """Each exports as ONNX writes it at that opset (HardSwish from 14, Mish from 18, else their
    formulas; ReLU6 as Clip; Softplus(beta) as Softplus(beta x) / beta), runs in onnxruntime as
    in mpscy, and imports back as the same layers. Inputs scaled by 4 reach every kink."""
    engine = mpscy.Engine(_mobile_activations_mlp(), loss="mse", batch_size=8, device=device, seed=2)
    _randomize(engine, 7)
    path = str(tmp_path / "mobile.onnx")
    proto = mpscy.onnx.export(engine, path, opset=opset)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ("HardSwish" in ops, "Mish" in ops) == (opset >= 14, opset >= 18)
    assert "Clip" in ops and "HardSigmoid" in ops
    xs = (4 * np.random.default_rng(1).normal(size=(23, 12))).astype(np.float32)
    _close_to_scale(_ort(path, {"input": xs}), engine.predict(xs))  # outputs up to ~70 after 20 layers
    back = mpscy.onnx.load(path, loss="mse", batch_size=8, device=device)
    assert [type(n.layer).__name__ for n in back.model.nodes[1:]] == [type(n.layer).__name__
                                                                       for n in engine.model.nodes[1:]]
    assert [n.layer.beta for n in back.model.nodes if isinstance(n.layer, layers.Softplus)] == [1.0, 2.0, 2.0, 3.0,
                                                                                                0.5, 2.0]
    np.testing.assert_allclose(back.predict(xs), engine.predict(xs), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_import_torch_mobile_activations(tt, device, tmp_path, opset):
    nn = tt.nn
    tt.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU6(), nn.Linear(32, 32), nn.Hardswish(), nn.Linear(32, 32),
                        nn.Hardsigmoid(), nn.Linear(32, 32), nn.Mish(), nn.Linear(32, 32), nn.Softplus(),
                        nn.Linear(32, 32), nn.Softplus(beta=2.0), nn.Linear(32, 5), nn.Mish(), nn.Softplus(beta=2.0),
                        nn.SiLU(), nn.Softplus(beta=3.0))
    path = str(tmp_path / "torch_mobile.onnx")
    _torch_export(net, tt.randn(2, 12), path, opset)
    engine = mpscy.onnx.load(path, loss="mse", device=device, batch_size=16)
    kinds = [type(n.layer).__name__ for n in engine.model.nodes[1:]]
    assert kinds == ["Dense", "ReLU6", "Dense", "Hardswish", "Dense", "Hardsigmoid", "Dense", "Mish", "Dense",
                     "Softplus", "Dense", "Softplus", "Dense", "Mish", "Softplus", "Swish", "Softplus"]
    assert engine.model.nodes[12].layer.beta == 2.0
    x = (4 * np.random.default_rng(3).normal(size=(40, 12))).astype(np.float32)
    with tt.no_grad():
        ref = net(tt.from_numpy(x)).numpy()
    _close_to_scale(engine.predict(x), ref)


def test_softplus_with_another_threshold_is_not_exported():
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(3), layers.Softplus(threshold=3.0)], input_shape=(2,)),
                          loss="mse", device="cpu")
    with pytest.raises(mpscy.UnsupportedError, match="Softplus 'softplus_1' with threshold=3: ONNX's Softplus has "
                                                     "no threshold"):
        mpscy.onnx.export(engine)


def test_import_refuses_other_clips_and_hard_sigmoids():
    from onnx import TensorProto, helper
    for node, inits in (
            (helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="clamp"),
             [helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0]), helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0])]),
            (helper.make_node("HardSigmoid", ["x"], ["y"], name="keras_hs", alpha=0.2, beta=0.5), [])):
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        with pytest.raises(mpscy.UnsupportedError, match=f"{node.op_type} '{node.name}'"):
            mpscy.onnx.read(model)


# ----------------------------------------------------------------------------- Upsample (Resize)
def _decoder():
    return mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.ReLU(), layers.Upsample(scale_factor=2),
                             layers.Conv2D(3, 3, padding=1), layers.UpSampling2D((1, 3)), layers.Flatten(),
                             layers.Dense(5)], input_shape=(2, 5, 4))


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_upsample_exports_as_resize_and_round_trips(device, tmp_path, opset):
    """Upsample as torch exports nn.Upsample(mode="nearest"): Resize with scales [1, 1, sh, sw],
    asymmetric coordinates, floor; onnxruntime's predictions within 1e-5, and back in as Upsample
    layers with their factors."""
    engine = mpscy.Engine(_decoder(), batch_size=8, device=device, seed=4)
    path = str(tmp_path / "up.onnx")
    m = _export_checked(engine, path, opset=opset)
    resize = [n for n in m.graph.node if n.op_type == "Resize"]
    assert len(resize) == 2
    attrs = {a.name: a.s.decode() for a in resize[0].attribute}
    assert attrs == {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    xs = np.random.default_rng(1).normal(size=(11, 2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_ort(path, {"input": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(path, batch_size=4, device=device)
    ups = [n.layer for n in back.model.nodes if isinstance(n.layer, layers.Upsample)]
    assert [u.scale_factor for u in ups] == [(2, 2), (1, 3)]
    np.testing.assert_array_equal(back.predict(xs), engine.predict(xs))


def _check_upsampled_import(tt, model, path, device, shape):
    """The file imports with Upsample layers of factors (2, 2) then (2, 3), predicting as the torch
    model does to 1e-5."""
    engine = mpscy.onnx.load(path, batch_size=shape[0], device=device, loss="mse")
    ups = [n.layer.scale_factor for n in engine.model.nodes if isinstance(n.layer, layers.Upsample)]
    assert ups == [(2, 2), (2, 3)]
    xs = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    with tt.no_grad():
        want = model(tt.from_numpy(xs)).numpy()
    np.testing.assert_allclose(engine.predict(xs), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_import_torch_upsample(tt, device, tmp_path, opset):
    """torch's nn.Upsample(scale_factor=2 and (2, 3), mode="nearest") and F.interpolate(...,
    scale_factor=2.0) import as Upsample and predict as torch does; a bilinear one is refused by
    name."""
    nn, F = tt.nn, tt.nn.functional

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
            self.up = nn.Upsample(scale_factor=(2, 3), mode="nearest")
            self.head = nn.Linear(3 * 20 * 24, 5)

        def forward(self, x):
            x = F.interpolate(tt.relu(self.c1(x)), scale_factor=2.0, mode="nearest")
            return self.head(self.up(self.c2(x)).flatten(1))

    tt.manual_seed(0)
    model = Decoder()
    path = str(tmp_path / "dec.onnx")
    _torch_export(model, tt.zeros(1, 2, 5, 4), path, opset)
    _check_upsampled_import(tt, model, path, device, (6, 2, 5, 4))

    class Bicubic(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2.0, mode="bicubic").flatten(1)
    path = str(tmp_path / "bicubic.onnx")
    _torch_export(Bicubic(), tt.zeros(1, 2, 5, 4), path, opset)
    with pytest.raises(mpscy.UnsupportedError, match="Resize .* with mode='cubic' is not supported: only 'nearest' "
                                                     "and 'linear'"):
        mpscy.onnx.load(path, batch_size=4, device=device)


def _bilinear_decoder():
    return mpscy.Sequential([layers.Conv2D(4, 3, padding=1), layers.ReLU(),
                             layers.Upsample(scale_factor=2, mode="bilinear"),
                             layers.Conv2D(3, 3, padding=1), layers.Upsample((13, 7), mode="bilinear", align_corners=True),
                             layers.Upsample((6, 5), mode="bilinear"), layers.Flatten(), layers.Dense(5)],
                            input_shape=(2, 5, 4))


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_bilinear_upsample_exports_as_linear_resize_and_round_trips(device, tmp_path, opset):
    """Bilinear Upsample as Resize(mode="linear"): half_pixel for align_corners=False and
    align_corners for True; by scales for whole factors, and by sizes (Shape -> Slice -> Concat, the
    batch dynamic) otherwise; onnxruntime's predictions within 1e-5 at another batch size, and back
    in as the same layers, predicting to the bit."""
    engine = mpscy.Engine(_bilinear_decoder(), batch_size=8, device=device, seed=4)
    path = str(tmp_path / "bilinear.onnx")
    m = _export_checked(engine, path, opset=opset)
    resize = [n for n in m.graph.node if n.op_type == "Resize"]
    assert [{a.name: a.s.decode() for a in n.attribute} for n in resize] == [
        {"mode": "linear", "coordinate_transformation_mode": c} for c in ("half_pixel", "align_corners", "half_pixel")]
    assert [[i != "" for i in n.input] for n in resize] == [[True, False, True]] + [[True, False, False, True]] * 2
    xs = np.random.default_rng(1).normal(size=(11, 2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_ort(path, {"input": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(path, batch_size=4, device=device)
    ups = [n.layer.config() for n in back.model.nodes if isinstance(n.layer, layers.Upsample)]
    assert ups == [{"size": (10, 8), "mode": "bilinear", "align_corners": False},
                   {"size": (13, 7), "mode": "bilinear", "align_corners": True},
                   {"size": (6, 5), "mode": "bilinear", "align_corners": False}]
    np.testing.assert_array_equal(back.predict(xs), engine.predict(xs))


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_import_torch_bilinear(tt, device, tmp_path, opset):
    """torch's bilinear idioms: nn.Upsample(scale_factor=2, mode="bilinear"), align_corners=True,
    F.interpolate to a skip connection's size and to a fixed size smaller than the input (a
    U-Net's and a segmentation head's), and by 1.5 with recompute_scale_factor=True (its size
    computed in the graph), with a dynamic batch: imported as bilinear Upsample layers, predicting
    as torch does to 1e-5, the input's and every convolution's gradients within 1e-4."""
    nn, F = tt.nn, tt.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.mid = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")
            self.up_ac = nn.Upsample(scale_factor=(3, 2), mode="bilinear", align_corners=True)
            self.out = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            skip = tt.relu(self.down(x))                                     # (4, 9, 10)
            y = self.up(tt.relu(self.mid(F.max_pool2d(skip, 2))))           # (4, 8, 10)
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear")      # (4, 9, 10)
            y = self.up_ac(self.out(tt.cat([y, skip], 1)))                   # (1, 27, 20)
            y = F.interpolate(y, size=(7, 6), mode="bilinear", align_corners=False)
            # torch writes the recomputed size as Shape -> Gather -> Cast -> Mul -> Cast -> Floor
            return F.interpolate(y, scale_factor=1.5, mode="bilinear", recompute_scale_factor=True).flatten(1)

    tt.manual_seed(2)
    model = Net().eval()
    path = str(tmp_path / "net.onnx")
    _torch_export(model, tt.zeros(2, 2, 9, 10), path, opset)
    engine = mpscy.onnx.load(path, batch_size=3, device=device, loss="mse", input_gradients=True)
    ups = [n.layer.config() for n in engine.model.nodes if isinstance(n.layer, layers.Upsample)]
    assert ups == [{"size": s, "mode": "bilinear", "align_corners": a}
                   for s, a in (((8, 10), False), ((9, 10), False), ((27, 20), True), ((7, 6), False),
                                ((10, 9), False))]
    xs = np.random.default_rng(3).normal(size=(3, 2, 9, 10)).astype(np.float32)
    t = np.random.default_rng(4).normal(size=(3, 90)).astype(np.float32)
    x = tt.from_numpy(xs).requires_grad_()
    y = model(x)
    tt.nn.functional.mse_loss(y, tt.from_numpy(t)).backward()
    np.testing.assert_allclose(engine.predict(xs), y.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = engine.gradients(xs, t)
    assert rel_err(g["input"], x.grad.numpy()) < 1e-4
    convs = [n.name for n in engine.model.nodes if isinstance(n.layer, layers.Conv2D)]
    for name, conv in zip(convs, (model.down, model.mid, model.out), strict=True):
        assert rel_err(g[f"{name}.weight"], conv.weight.grad.numpy()) < 1e-4, name
        assert rel_err(g[f"{name}.bias"], conv.bias.grad.numpy()) < 1e-4, name


def test_resize_that_does_not_repeat_pixels_is_refused(tmp_path):
    """A Resize by a fraction, or one whose coordinate mode samples other pixels (align_corners),
    is refused naming the node and what is supported, before any engine is built."""
    helper, tp = onnx.helper, onnx.TensorProto

    def model(scales, **attrs):
        x = helper.make_tensor_value_info("x", tp.FLOAT, ["N", 2, 4, 4])
        y = helper.make_tensor_value_info("y", tp.FLOAT, None)
        s = helper.make_tensor("s", tp.FLOAT, [4], scales)
        node = helper.make_node("Resize", ["x", "", "s"], ["y"], name="up", mode="nearest", **attrs)
        g = helper.make_graph([node], "g", [x], [y], [s])
        path = str(tmp_path / "r.onnx")
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
        return path
    with pytest.raises(mpscy.UnsupportedError, match=r"Resize 'up' by \[1.0, 1.0, 1.5, 2.0\]: only whole factors"):
        mpscy.onnx.load(model([1, 1, 1.5, 2]), batch_size=2, device="cpu")
    with pytest.raises(mpscy.UnsupportedError, match="coordinate_transformation_mode='align_corners' with "
                                                     "nearest_mode='round_prefer_floor' does not repeat each pixel"):
        mpscy.onnx.load(model([1, 1, 2, 2], coordinate_transformation_mode="align_corners"), batch_size=2,
                        device="cpu")
    # opset 18's axes and keep_aspect_ratio_policy, which change what the scales or sizes mean
    with pytest.raises(mpscy.UnsupportedError, match=r"Resize 'up' with axes=\[0, 1, 3, 2\] is not supported"):
        mpscy.onnx.load(model([1, 1, 3, 2], axes=[0, 1, 3, 2]), batch_size=2, device="cpu")
    with pytest.raises(mpscy.UnsupportedError, match="keep_aspect_ratio_policy='not_larger' is not supported"):
        mpscy.onnx.load(model([1, 1, 2, 2], keep_aspect_ratio_policy="not_larger"), batch_size=2, device="cpu")
    # torch's other spelling (half_pixel with rounding) repeats pixels and is taken
    e = mpscy.onnx.load(model([1, 1, 2, 2], coordinate_transformation_mode="half_pixel"), batch_size=2, device="cpu")
    xs = np.arange(2 * 2 * 4 * 4, dtype=np.float32).reshape(2, 2, 4, 4)
    np.testing.assert_array_equal(e.predict(xs), xs.repeat(2, axis=2).repeat(2, axis=3))
    np.testing.assert_array_equal(_ort(model([1, 1, 2, 2], coordinate_transformation_mode="half_pixel"), {"x": xs}),
                                  e.predict(xs))


def test_linear_resize_that_is_not_torch_s_bilinear_is_refused(tmp_path):
    """A linear Resize is taken where it is torch's bilinear; each other form is refused naming the
    node and what differs: scales that do not take the sides to whole sizes (ONNX then interpolates
    by 1 / scale), asymmetric coordinates, pytorch_half_pixel to a side of 1, and antialiased
    downsampling. A scale of 1.5 on a side of 4 (6) is taken, and 0.4 on 5 (0.4 in float32 a little over,
    so 2 by ONNX's floor and 1 / scale within float32 rounding of 5 / 2), as onnxruntime computes them."""
    helper, tp = onnx.helper, onnx.TensorProto

    def model(scales, opset=17, **attrs):
        x = helper.make_tensor_value_info("x", tp.FLOAT, ["N", 2, 4, 5])
        y = helper.make_tensor_value_info("y", tp.FLOAT, None)
        s = helper.make_tensor("s", tp.FLOAT, [4], scales)
        node = helper.make_node("Resize", ["x", "", "s"], ["y"], name="lin", mode="linear", **attrs)
        g = helper.make_graph([node], "g", [x], [y], [s])
        path = str(tmp_path / "r.onnx")
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10), path)
        return path
    load = lambda path: mpscy.onnx.load(path, batch_size=2, device="cpu")
    with pytest.raises(mpscy.UnsupportedError, match=r"Resize 'lin' by \[1.0, 1.0, 1.5, 1.5\]: a linear resize whose "
                                                     r"scales are not the ratio of the output's sides \(6, 7\) to the "
                                                     r"input's \(4, 5\)"):
        load(model([1, 1, 1.5, 1.5]))
    with pytest.raises(mpscy.UnsupportedError, match=r"the output's sides \(2, 0\)"):
        load(model([1, 1, 0.5, 0.1]))
    with pytest.raises(mpscy.UnsupportedError, match="mode='linear' with coordinate_transformation_mode='asymmetric' "
                                                     "is not supported"):
        load(model([1, 1, 2, 2], coordinate_transformation_mode="asymmetric"))
    with pytest.raises(mpscy.UnsupportedError, match="pytorch_half_pixel to an output side of 1"):
        load(model([1, 1, 0.25, 2], coordinate_transformation_mode="pytorch_half_pixel"))
    with pytest.raises(mpscy.UnsupportedError, match=r"antialias=1 shrinks \(H, W\) = \(4, 5\) to \(2, 10\)"):
        load(model([1, 1, 0.5, 2], opset=18, antialias=1))
    with pytest.raises(mpscy.UnsupportedError, match=r"Resize 'lin' by \[1.0, 2.0, 2.0, 2.0\]: only the two spatial"):
        load(model([1, 2, 2, 2]))
    xs = np.random.default_rng(0).normal(size=(2, 2, 4, 5)).astype(np.float32)
    for scales, attrs in (([1, 1, 1.5, 2], {}), ([1, 1, 0.5, 0.4], {}),
                          ([1, 1, 0.5, 3], dict(coordinate_transformation_mode="align_corners")),
                          # align_corners interpolates from the sides whatever the scale: 1.5 of 5 is taken
                          ([1, 1, 1.5, 1.5], dict(coordinate_transformation_mode="align_corners")),
                          ([1, 1, 2, 2], dict(coordinate_transformation_mode="pytorch_half_pixel"))):
        path = model(scales, **attrs)
        np.testing.assert_allclose(load(path).predict(xs), _ort(path, {"x": xs}), rtol=1e-5, atol=1e-6,
                                   err_msg=str((scales, attrs)))


@pytest.mark.parametrize("dynamic", [True, False])
def test_import_torch_interpolate_to_a_size(tt, device, tmp_path, dynamic):
    """F.interpolate(size=...), the U-Net idiom (to a fixed size, and to a skip connection's
    size), which torch writes as Shape -> Slice -> Concat -> Resize(sizes), with or without a
    dynamic batch: imported as Upsample by the whole factors, predicting as torch does."""
    nn, F = tt.nn, tt.nn.functional

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.mid = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.out = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            skip = tt.relu(self.down(x))
            y = tt.relu(self.mid(F.max_pool2d(skip, 2)))
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = self.out(tt.cat([y, skip], 1))
            return F.interpolate(y, size=(16, 24)).flatten(1)

    tt.manual_seed(1)
    model = UNet().eval()
    path = str(tmp_path / "unet.onnx")
    _torch_export(model, tt.zeros(2, 2, 8, 8), path, 17, dynamic)
    assert "Slice" in [n.op_type for n in onnx.load(path).graph.node]
    _check_upsampled_import(tt, model, path, device, (2, 2, 8, 8))


# ----------------------------------------------------------------------------- ConvTranspose2D
def _convt_decoder():
    return mpscy.Sequential([layers.Conv2D(6, 3, stride=2, padding=1), layers.ReLU(),
                             layers.ConvTranspose2D(4, 3, stride=2, padding=1, output_padding=1), layers.Tanh(),
                             layers.ConvTranspose2D(4, 2, stride=2, groups=2, bias=False, dilation=(1, 2)),
                             layers.Flatten(), layers.Dense(5)], input_shape=(3, 6, 5))


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_convtranspose_exports_and_round_trips(device, tmp_path, opset):
    """ConvTranspose2D as ONNX ConvTranspose (kernel_shape, strides, symmetric pads, dilations,
    group, output_padding; weight (C, OC / groups, kh, kw) as is): onnxruntime's predictions within
    1e-5 at another batch size, and back in as the same layers, predicting within 1e-6."""
    engine = mpscy.Engine(_convt_decoder(), batch_size=8, device=device, seed=4)
    path = str(tmp_path / "convt.onnx")
    m = _export_checked(engine, path, opset=opset)
    ct = [n for n in m.graph.node if n.op_type == "ConvTranspose"]
    assert [{a.name: list(a.ints) if a.ints else a.i for a in n.attribute} for n in ct] == [
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1,
         "output_padding": [1, 1]},
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0], "dilations": [1, 2], "group": 2,
         "output_padding": [0, 0]}]
    xs = np.random.default_rng(1).normal(size=(11, 3, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(_ort(path, {"input": xs}), engine.predict(xs), rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(path, batch_size=4, device=device)
    cts = [n.layer.config() for n in back.model.nodes if isinstance(n.layer, layers.ConvTranspose2D)]
    assert cts == [n.layer.config() for n in engine.model.nodes if isinstance(n.layer, layers.ConvTranspose2D)]
    # the same parameters; built for another batch, the products' chunks (and so their rounding) differ
    np.testing.assert_allclose(back.predict(xs), engine.predict(xs), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opset", [13, 17])
def test_import_torch_convtranspose(tt, device, tmp_path, opset):
    """A torch decoder of ConvTranspose2d layers (stride 2 with output_padding, groups, dilation, no
    bias) imports and trains as torch does: outputs within 1e-5, the input's and every weight's
    gradient within 1e-4."""
    nn = tt.nn

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
            self.b = nn.ConvTranspose2d(6, 4, (2, 3), stride=(2, 1), padding=(0, 1), groups=2, bias=False,
                                        dilation=(1, 2))
            self.head = nn.Linear(4 * 12 * 12, 3)

        def forward(self, x):
            return self.head(self.b(tt.relu(self.a(x))).flatten(1))

    tt.manual_seed(3)
    model = Decoder()
    path = str(tmp_path / "dec.onnx")
    _torch_export(model, tt.zeros(1, 4, 3, 5), path, opset)
    engine = mpscy.onnx.load(path, batch_size=5, device=device, loss="mse", input_gradients=True)
    assert [type(n.layer).__name__ for n in engine.model.nodes if n.layer is not None][:3] == [
        "ConvTranspose2D", "ReLU", "ConvTranspose2D"]
    xs = np.random.default_rng(5).normal(size=(5, 4, 3, 5)).astype(np.float32)
    t = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    x = tt.from_numpy(xs).requires_grad_()
    model.train()
    y = model(x)
    tt.nn.functional.mse_loss(y, tt.from_numpy(t)).backward()
    np.testing.assert_allclose(engine.predict(xs), y.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = engine.gradients(xs, t)
    assert rel_err(g["input"], x.grad.numpy()) < 1e-4
    names = [n.name for n in engine.model.nodes if isinstance(n.layer, layers.ConvTranspose2D)]
    assert rel_err(g[f"{names[0]}.weight"], model.a.weight.grad.numpy()) < 1e-4
    assert rel_err(g[f"{names[0]}.bias"], model.a.bias.grad.numpy()) < 1e-4
    assert rel_err(g[f"{names[1]}.weight"], model.b.weight.grad.numpy()) < 1e-4
    (head,) = [n.name for n in engine.model.nodes if isinstance(n.layer, layers.Dense)]
    assert rel_err(g[f"{head}.weight"], model.head.weight.grad.numpy()) < 1e-4
    assert rel_err(g[f"{head}.bias"], model.head.bias.grad.numpy()) < 1e-4


def test_convtranspose_with_output_padding_past_the_stride_is_not_exported(tmp_path):
    """output_padding at or above the stride (below the dilation, as torch allows) is refused at
    export naming the layer: onnxruntime cannot run such a ConvTranspose (nor torch's export of it)."""
    model = mpscy.Sequential([layers.ConvTranspose2D(3, 3, output_padding=(1, 0), dilation=(2, 3), name="up")],
                             input_shape=(2, 4, 3))
    engine = mpscy.Engine(model, loss="mse", batch_size=2, device="cpu")
    with pytest.raises(mpscy.UnsupportedError, match=r"ConvTranspose2D up has output_padding \[1, 0\] at or above "
                                                     r"its stride \[1, 1\]"):
        mpscy.onnx.export(engine, str(tmp_path / "up.onnx"))
    assert not (tmp_path / "up.onnx").exists()


def test_convtranspose_pads_map_onto_torch_s_padding(tmp_path):
    """Asymmetric pads (b, e) with output padding q are torch's padding b and output_padding
    b - e + q where that is below the stride (predicting as onnxruntime does); beyond it, and
    output_shape and auto_pad SAME_UPPER, are refused naming the node."""
    helper, tp = onnx.helper, onnx.TensorProto
    wt = np.random.default_rng(0).normal(size=(2, 3, 3, 3)).astype(np.float32)

    def model(**attrs):
        x = helper.make_tensor_value_info("x", tp.FLOAT, ["N", 2, 4, 5])
        y = helper.make_tensor_value_info("y", tp.FLOAT, None)
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", kernel_shape=[3, 3], **attrs)
        g = helper.make_graph([node], "g", [x], [y], [onnx.numpy_helper.from_array(wt, "w")])
        path = str(tmp_path / "ct.onnx")
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
        return path
    load = lambda path: mpscy.onnx.load(path, batch_size=2, device="cpu")
    xs = np.random.default_rng(1).normal(size=(2, 2, 4, 5)).astype(np.float32)
    path = model(strides=[2, 3], pads=[1, 2, 0, 1], output_padding=[0, 1])
    e = load(path)
    (ct,) = [n.layer for n in e.model.nodes if isinstance(n.layer, layers.ConvTranspose2D)]
    assert (ct.padding, ct.output_padding) == ((1, 2), (1, 2))
    np.testing.assert_allclose(e.predict(xs), _ort(path, {"x": xs}), rtol=1e-5, atol=1e-6)
    with pytest.raises(mpscy.UnsupportedError, match=r"ConvTranspose 'up': pads \[0, 0, 1, 0\] with output_padding "
                                                     r"\[0, 0\] crop the end .* \(output_padding \(-1, 0\)"):
        load(model(strides=[2, 2], pads=[0, 0, 1, 0]))
    with pytest.raises(mpscy.UnsupportedError, match="ConvTranspose 'up' with output_shape is not supported"):
        load(model(strides=[2, 2], output_shape=[8, 10]))
    with pytest.raises(mpscy.UnsupportedError, match="ConvTranspose 'up': auto_pad 'SAME_UPPER' is not supported"):
        load(model(strides=[2, 2], auto_pad="SAME_UPPER"))


# ----------------------------------------------------------------------------- Reshape
@pytest.mark.parametrize("opset", [13, 17])
def test_reshape_generator_round_trips_and_imports_from_torch(tt, device, tmp_path, opset):
    """A generator's Linear -> x.view(n, C, H, W) -> ConvTranspose2d, exported by torch (Reshape to
    a shape computed from the batch, or to [-1, C, H, W]), imports as Dense -> Reshape ->
    ConvTranspose2D predicting as torch does to 1e-5; mpscy's own export writes Reshape with a
    0 for the batch, which onnxruntime runs at another batch size, and reads back as Reshape."""
    nn = tt.nn

    class Gen(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.up = nn.Linear(6, 8 * 3 * 3), nn.ConvTranspose2d(8, 2, 4, 2, 1)

        def forward(self, z):
            return tt.tanh(self.up(tt.relu(self.fc(z)).view(z.shape[0], 8, 3, 3))).flatten(1)

    class GenUnflatten(Gen):
        def forward(self, z):
            return tt.tanh(self.up(tt.relu(self.fc(z)).reshape(-1, 8, 3, 3))).flatten(1)

    for cls in (Gen, GenUnflatten):
        tt.manual_seed(0)
        model = cls().eval()
        path = str(tmp_path / "gen.onnx")
        _torch_export(model, tt.zeros(2, 6), path, opset)
        engine = mpscy.onnx.load(path, batch_size=4, device=device)
        assert [type(n.layer).__name__ for n in engine.model.nodes if n.layer is not None][:4] == [
            "Dense", "ReLU", "Reshape", "ConvTranspose2D"], cls
        zs = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
        with tt.no_grad():
            want = model(tt.from_numpy(zs)).numpy()
        np.testing.assert_allclose(engine.predict(zs), want, rtol=1e-5, atol=1e-6)
    out = str(tmp_path / "back.onnx")
    mpscy.onnx.export(engine, out, opset=opset)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    (node,) = [n for n in m.graph.node if n.op_type == "Reshape"]
    shape = [i for i in m.graph.initializer if i.name == node.input[1]][0]
    assert onnx.numpy_helper.to_array(shape).tolist() == [0, 8, 3, 3]
    zs = np.random.default_rng(3).normal(size=(7, 6)).astype(np.float32)
    np.testing.assert_allclose(_ort(out, {m.graph.input[0].name: zs}), engine.predict(zs), rtol=RTOL, atol=ATOL)
    back = mpscy.onnx.load(out, batch_size=4, device=device)
    assert [n.layer.config() for n in back.model.nodes if isinstance(n.layer, layers.Reshape)] == [
        {"target_shape": (8, 3, 3)}]


def test_import_pads_are_refused_naming_the_pad(tt, tmp_path):
    """torch exports nn.ZeroPad2d and a Conv2d's padding_mode="reflect" as a Pad whose pads come
    from ConstantOfShape, Concat, Reshape, Slice and Transpose of constants: those fold at import,
    and the Pad is refused by name with its mode and the way out (the error named
    ConstantOfShape, the first node on the way)."""
    nn = tt.nn
    cases = [(nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3)), r"Pad '.*' \(mode 'constant'\) has no mpscy layer: "
              r"a convolution after it can take these zeros as its own padding= \(torch's padding=, not "
              r"nn\.ZeroPad2d\); a pool's padding is not zeros"),
             (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
              r"Pad '.*' \(mode 'reflect'\) has no mpscy layer: reflect padding is not supported"),
             (nn.Sequential(nn.ConstantPad2d(1, 3.0), nn.Conv2d(3, 4, 3)),
              r"Pad '.*' \(mode 'constant'\) has no mpscy layer: padding with 3, not 0, is not supported"),
             (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")),
              r"Slice '.*' on tensors is not supported \(torch's padding_mode=\"circular\""),
             (nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3)),
              r"Pad '.*' \(mode 'constant'\) has no mpscy layer: pads \[0, 0, 0, 0, 0, 0, 1, 1\] differ between "
              r"the two sides of an axis")]
    for k, (net, match) in enumerate(cases):
        path = str(tmp_path / f"pad{k}.onnx")
        _torch_export(net, tt.randn(2, 3, 8, 8), path, 17)
        with pytest.raises(mpscy.UnsupportedError, match=match):
            mpscy.onnx.load(path, device="cpu")
