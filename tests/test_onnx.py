"""mpscy.onnx: exported files pass onnx.checker's full check (IR 10, explicit opset, dynamic
batch "N") and onnxruntime's predictions match engine.predict to 1e-5; files written by
torch.onnx.export import and predict like the torch model to 1e-5, and fine-tune."""
import sys

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-5, 1e-6


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
    engine = mpscy.Engine(_all_activations_mlp(), batch_size=16, device=device, seed=3)
    x, y = mpscy.datasets.load_digits(images=True)
    engine.fit(x[:256], y[:256], epochs=1, verbose=0)          # trained weights, not the initial ones
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
    engine = mpscy.Engine(_all_activations_mlp(), batch_size=16, device=device, seed=5)
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


def _torch_export(model, example, path, opset):
    import warnings
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=opset)


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


def test_missing_onnx_is_a_clear_error(device, monkeypatch):
    engine = mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(3,)), batch_size=2, device=device)
    monkeypatch.setitem(sys.modules, "onnx", None)      # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"mpscy\[onnx\]"):
        mpscy.onnx.export(engine)
    with pytest.raises(ImportError, match=r"mpscy\[onnx\]"):
        mpscy.onnx.load(b"not read")
    with pytest.raises(mpscy.InvalidArgumentError, match="opset"):
        mpscy.onnx.export(engine, opset=9)
