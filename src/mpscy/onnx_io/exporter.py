"""mpscy model -> ONNX file. Each node is written from its native descriptor (the ints/reals
listed in objc/mpscy.h), so every layer kind the ABI knows is covered without depending on
Python class names. The file has an explicit IR version and opset, a dynamic batch dimension
"N" on inputs and output, initializers in raw_data, and passes onnx.checker's full check.
Dropout is written as an inference-mode Dropout node (the identity) that keeps its ratio.

Names: the graph's inputs are the model's input names and its output `output_name`; every other
value, initializer and node name is given out by _Writer, which makes it unique whatever the
model's names are (an input named like a parameter, a layer named like another layer's
intermediate value): a name already taken gets a suffix "_1", "_2", .... A layer's output value
and the node that the importer makes that layer from carry the layer's name, so an export then
import gives back the same layer and parameter names. Facts ONNX cannot hold are recorded in
the model's metadata_props under "mpscy." keys (see METADATA_NON_AFFINE), which other tools
ignore."""

import json
import math
import os

import numpy as np

from .. import __version__
from .._atomic import replaced
from ..errors import InvalidArgumentError, UnsupportedError
from . import IR_VERSION, check_opset, onnx_modules

# metadata_props key: a JSON list of the BatchNormalization / LayerNormalization node names whose
# mpscy layer has no weight and bias (ONNX's operators need a scale and bias, written as ones and
# zeros); the importer makes those layers non-affine again. Files from elsewhere lack it.
METADATA_NON_AFFINE = "mpscy.non_affine"


class _Own(str):
    """The output value name of the layer being written (reserved for it, used as given), apart
    from an intermediate's that happens to be spelled alike (output_name="d/flat" for a Dense
    "d" that flattens its input first)."""


class _Names:
    """One namespace of unique names: `take(base)` gives `base`, or `base_1`, `base_2`, ...
    when taken; `reserve` claims names given out later by `take_reserved`."""

    def __init__(self):
        self.used, self.reserved = set(), set()

    def reserve(self, name):
        self.reserved.add(name)

    def take_reserved(self, name):
        self.used.add(name)
        return name

    def take(self, base):
        name, k = base, 0
        while name in self.used or name in self.reserved:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


class _Writer:
    def __init__(self, opset):
        self.onnx, self.helper, self.numpy_helper, self.tp = onnx_modules()
        self.opset = opset
        self.nodes, self.inits, self._consts = [], [], {}
        self.values, self.node_names = _Names(), _Names()   # ONNX keeps the two apart
        self.own_node = None             # the node name of the layer being written
        self.non_affine = []             # BatchNorm / LayerNorm node names without weight and bias

    def init(self, name, array):
        """A float32 initializer named `name` (or a unique variant); returns its name."""
        array = np.array(array, dtype=np.float32, order="C")   # (ascontiguousarray would make 0-d 1-d)
        name = self.values.take(name)
        self.inits.append(self.numpy_helper.from_array(array, name))
        return name

    def init_int64(self, name, values):
        """An int64 initializer (a shape's or a slice's) named `name` (or a unique variant)."""
        name = self.values.take(name)
        self.inits.append(self.numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def const(self, value):
        """A shared float32 scalar initializer."""
        key = float(np.float32(value))
        if key not in self._consts:
            self._consts[key] = self.init(f"const.{len(self._consts)}", np.array(key, np.float32))
        return self._consts[key]

    def node(self, op, inputs, output, name, **attrs):
        """A node named `name` writing value `output`; returns the output's name. The current
        layer's own output value (an _Own) and node name (reserved up front for it) are used as
        given; any other name (an intermediate's, such as "<layer>/flat") gets a unique variant,
        so it cannot take a name that an input, the output or another layer has."""
        output = self.values.take_reserved(str(output)) if isinstance(output, _Own) else self.values.take(output)
        if name == self.own_node and name not in self.node_names.used:
            name = self.node_names.take_reserved(name)
        else:
            name = self.node_names.take(name)
        self.nodes.append(self.helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output


def _pairs(v, i):
    return [int(v[i]), int(v[i + 1])]


def _gelu(w, x, out, name, tanh):
    if w.opset >= 20:
        return w.node("Gelu", [x], out, name, approximate="tanh" if tanh else "none")
    if tanh:   # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x2 = w.node("Mul", [x, x], f"{name}/x2", f"{name}/mul_x2")
        x3 = w.node("Mul", [x2, x], f"{name}/x3", f"{name}/mul_x3")
        c = w.node("Mul", [x3, w.const(0.044715)], f"{name}/cx3", f"{name}/mul_c")
        s = w.node("Add", [x, c], f"{name}/sum", f"{name}/add_x")
        inner = w.node("Mul", [s, w.const(math.sqrt(2.0 / math.pi))], f"{name}/inner", f"{name}/mul_k")
        t = w.node("Tanh", [inner], f"{name}/tanh", f"{name}/tanh")
    else:      # 0.5 x (1 + erf(x / sqrt(2)))
        d = w.node("Div", [x, w.const(math.sqrt(2.0))], f"{name}/div", f"{name}/div")
        t = w.node("Erf", [d], f"{name}/erf", f"{name}/erf")
    one = w.node("Add", [t, w.const(1.0)], f"{name}/one_plus", f"{name}/add_one")
    xm = w.node("Mul", [x, one], f"{name}/x_times", f"{name}/mul_x")
    return w.node("Mul", [xm, w.const(0.5)], out, name)    # the layer's node: the last one


def _emit(w, n, desc, in_shapes, ins, out, params):
    """Writes the ONNX nodes of one mpscy node (descriptor `desc`) producing value `out`."""
    kind, name = desc["kind"], n.name
    ints, reals, flags = desc.get("ints", []), desc.get("reals", []), desc.get("flags", [])
    x = ins[0] if ins else None

    def p(suffix):
        return w.init(f"{name}.{suffix}", params[f"{name}.{suffix}"])

    if kind == "dense":
        if len(in_shapes[0]) > 1:
            x = w.node("Flatten", [x], f"{name}/flat", f"{name}/flatten", axis=1)
        inputs = [x, p("weight")] + ([p("bias")] if "bias" in flags else [])
        return w.node("Gemm", inputs, out, name, transB=1)
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    if kind in simple:
        return w.node(simple[kind], [x], out, name)
    if kind == "leakyrelu":
        return w.node("LeakyRelu", [x], out, name, alpha=float(reals[0]))
    if kind == "elu":
        return w.node("Elu", [x], out, name, alpha=float(reals[0]))
    if kind == "swish":
        s = w.node("Sigmoid", [x], f"{name}/sigmoid", f"{name}/sigmoid")
        return w.node("Mul", [x, s], out, name)
    if kind == "gelu":
        return _gelu(w, x, out, name, bool(ints and ints[0]))
    if kind == "relu6":
        return w.node("Clip", [x, w.const(0.0), w.const(6.0)], out, name)
    if kind == "hardsigmoid":
        return w.node("HardSigmoid", [x], out, name, alpha=1.0 / 6.0, beta=0.5)
    if kind == "hardswish":
        if w.opset >= 14:
            return w.node("HardSwish", [x], out, name)
        h = w.node("HardSigmoid", [x], f"{name}/hardsigmoid", f"{name}/hardsigmoid", alpha=1.0 / 6.0, beta=0.5)
        return w.node("Mul", [x, h], out, name)
    if kind == "softplus":   # ONNX's Softplus has no threshold: past 20 the two differ by < 2e-9 of x
        beta = float(reals[0])
        if float(reals[1]) != 20.0:
            raise UnsupportedError(f"Softplus {name!r} with threshold={reals[1]:g}: ONNX's Softplus has no threshold "
                                   "(torch's export drops it); only the default 20, where the difference is below "
                                   "2e-9 of x, exports")
        if beta == 1.0:
            return w.node("Softplus", [x], out, name)
        bx = w.node("Mul", [x, w.const(beta)], f"{name}/beta_x", f"{name}/mul_beta")
        s = w.node("Softplus", [bx], f"{name}/softplus", f"{name}/softplus")
        return w.node("Mul", [s, w.const(1.0 / beta)], out, name)
    if kind == "mish":
        if w.opset >= 18:
            return w.node("Mish", [x], out, name)
        s = w.node("Softplus", [x], f"{name}/softplus", f"{name}/softplus")
        t = w.node("Tanh", [s], f"{name}/tanh", f"{name}/tanh")
        return w.node("Mul", [x, t], out, name)
    if kind == "softmax":
        return w.node("Softmax", [x], out, name, axis=int(ints[0]) + 1)
    if kind == "flatten" and ints and ints[0] > 0:   # Reshape: 0 keeps the (dynamic) batch
        shape = w.init_int64(f"{name}.shape", [0, *[int(v) for v in ints[1:1 + int(ints[0])]]])
        return w.node("Reshape", [x, shape], out, name)
    if kind == "flatten":
        return w.node("Flatten", [x], out, name, axis=1)
    if kind == "conv2d":
        inputs = [x, p("weight")] + ([p("bias")] if "bias" in flags else [])
        return w.node("Conv", inputs, out, name, kernel_shape=_pairs(ints, 1), strides=_pairs(ints, 3),
                      pads=_pairs(ints, 5) * 2, dilations=_pairs(ints, 7), group=int(ints[9]))
    if kind == "convtranspose2d":   # ints: out_c, kh, kw, sh, sw, ph, pw, dh, dw, groups, oph, opw
        if ints[10] >= ints[3] or ints[11] >= ints[4]:
            raise UnsupportedError(f"ConvTranspose2D {name} has output_padding {_pairs(ints, 10)} at or above its "
                                   f"stride {_pairs(ints, 3)}, which onnxruntime (and torch's exporter) refuse")
        inputs = [x, p("weight")] + ([p("bias")] if "bias" in flags else [])
        return w.node("ConvTranspose", inputs, out, name, kernel_shape=_pairs(ints, 1), strides=_pairs(ints, 3),
                      pads=_pairs(ints, 5) * 2, dilations=_pairs(ints, 7), group=int(ints[9]),
                      output_padding=_pairs(ints, 10))
    if kind in ("maxpool2d", "avgpool2d"):
        attrs = dict(kernel_shape=_pairs(ints, 0), strides=_pairs(ints, 2), pads=_pairs(ints, 4) * 2)
        if kind == "maxpool2d":
            return w.node("MaxPool", [x], out, name, **attrs)
        return w.node("AveragePool", [x], out, name, count_include_pad=int(ints[6]), **attrs)
    if kind == "globalavgpool2d":   # ONNX keeps (N, C, 1, 1); mpscy's output is (N, C)
        g = w.node("GlobalAveragePool", [x], f"{name}/pooled", name)   # the node the importer makes the layer of
        return w.node("Flatten", [g], out, f"{name}/flatten", axis=1)
    if kind == "upsample2d" and ints[2] == 0:   # torch's export of Upsample(mode="nearest"): x_in = floor(x_out / scale)
        scales = w.init(f"{name}.scales", np.array([1.0, 1.0, float(ints[0]), float(ints[1])], np.float32))
        return w.node("Resize", [x, "", scales], out, name, mode="nearest", coordinate_transformation_mode="asymmetric",
                      nearest_mode="floor")
    if kind == "upsample2d":   # bilinear: half_pixel is torch's align_corners=False
        (h, wd), (oh, ow) = in_shapes[0][1:], (int(ints[4]), int(ints[5]))
        attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if ints[3] else "half_pixel")
        if oh % h == 0 and ow % wd == 0:   # whole factors: exact scales, whose 1 / scale is the sides' ratio
            scales = w.init(f"{name}.scales", np.array([1.0, 1.0, oh // h, ow // wd], np.float32))
            return w.node("Resize", [x, "", scales], out, name, **attrs)
        # any other size: (N, C) of x's shape joined to (OH, OW), so the batch stays dynamic
        shape = w.node("Shape", [x], f"{name}/shape", f"{name}/shape")
        nc = w.node("Slice", [shape, w.init_int64(f"{name}.starts", [0]), w.init_int64(f"{name}.ends", [2])],
                    f"{name}/nc", f"{name}/slice")
        sizes = w.node("Concat", [nc, w.init_int64(f"{name}.hw", [oh, ow])], f"{name}/sizes", f"{name}/sizes", axis=0)
        return w.node("Resize", [x, "", "", sizes], out, name, **attrs)
    if kind in ("batchnorm", "layernorm"):
        if "affine" in flags:
            scale, bias = p("weight"), p("bias")
        else:
            w.non_affine.append(name)
            c = in_shapes[0][0] if kind == "batchnorm" else None
            shape = (c,) if kind == "batchnorm" else tuple(in_shapes[0][len(in_shapes[0]) - int(ints[0]):])
            scale = w.init(f"{name}.weight", np.ones(shape, np.float32))
            bias = w.init(f"{name}.bias", np.zeros(shape, np.float32))
        if kind == "batchnorm":
            return w.node("BatchNormalization", [x, scale, bias, p("running_mean"), p("running_var")], out, name,
                          epsilon=float(reals[1]), momentum=float(1.0 - reals[0]))
        if w.opset < 17:
            raise UnsupportedError(f"LayerNorm {name} needs opset >= 17 (LayerNormalization)")
        return w.node("LayerNormalization", [x, scale, bias], out, name, axis=-int(ints[0]), epsilon=float(reals[1]))
    if kind == "dropout":
        ratio = w.init(f"{name}.ratio", np.array(reals[0], np.float32))
        return w.node("Dropout", [x, ratio], out, name)
    if kind == "add":
        return w.node("Sum" if len(ins) > 2 else "Add", ins, out, name)
    if kind == "concat":
        return w.node("Concat", ins, out, name, axis=int(ints[0]) + 1)
    raise UnsupportedError(f"layer {name} of kind {kind!r} has no ONNX export")


def export(engine, path=None, opset=17, output_name="output", check=True):
    """Writes `engine`'s model with its current parameters (and BatchNorm statistics) as ONNX;
    returns the onnx.ModelProto. Input names are the model's input names, the output is
    `output_name`; every tensor has the dynamic batch dimension "N". Everything is checked
    before `path` is written, and the file is written to a temporary name and renamed, so an
    error leaves no file (and no partial one)."""
    from ..engine import Engine
    from ..model import Model
    if not isinstance(engine, Engine):  # the parameters live in an engine, not in a model
        hint = (": build one, mpscy.Engine(model, ...), and export it (the parameters live in the engine)"
                if isinstance(engine, Model) else "")
        raise InvalidArgumentError(f"ONNX export takes an mpscy Engine, got {type(engine).__name__}{hint}")
    check_opset(opset)
    if not isinstance(output_name, str) or not output_name:
        raise InvalidArgumentError(f"output_name must be a non-empty string, got {output_name!r}")
    w = _Writer(opset)
    onnx, helper, tp = w.onnx, w.helper, w.tp
    model, params = engine.model, engine.get_parameters()
    for k, n in enumerate(model.nodes):  # names are valid and distinct: Input, Layer and Model check them
        if n.name == output_name and k != model.output:
            raise InvalidArgumentError(f"{'an input' if n.layer is None else 'a layer'} is named {output_name!r}, "
                                       f"the name of the model's output in the ONNX graph: pass another output_name")
    # the graph's inputs, its output and each layer's output value and node keep their names;
    # everything else (initializers, intermediates, constants) is made unique around them
    for k, n in enumerate(model.nodes):
        w.values.reserve(output_name if k == model.output else n.name)
        w.node_names.reserve(n.name)
    values, inputs = {}, []
    for k, n in enumerate(model.nodes):
        out = _Own(output_name if k == model.output else n.name)
        if n.layer is None:
            values[k] = w.values.take_reserved(n.name)
            inputs.append(helper.make_tensor_value_info(n.name, tp.FLOAT, ["N", *n.shape]))
            continue
        in_shapes = model._in_shapes(n)
        desc = {"kind": n.layer.kind, **n.layer.native(in_shapes)}
        w.own_node = n.name
        values[k] = _emit(w, n, desc, in_shapes, [values[i] for i in n.inputs], out, params)
    outputs = [helper.make_tensor_value_info(output_name, tp.FLOAT, ["N", *model.output_shape])]
    graph = helper.make_graph(w.nodes, "mpscy_model", inputs, outputs, initializer=w.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                              producer_name="mpscy", producer_version=__version__,
                              doc_string=f"exported by mpscy {__version__} from {type(model).__name__}")
    if w.non_affine:
        helper.set_model_props(proto, {METADATA_NON_AFFINE: json.dumps(w.non_affine)})
    if check:
        onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        _save(onnx, proto, path)
    return proto


def _save(onnx, proto, path):
    """onnx.save, written whole or not at all (as engine.save): the temporary name ends in
    `path`'s suffix, by which onnx.save picks the format. A file object is written directly."""
    if not isinstance(path, (str, os.PathLike)):
        onnx.save(proto, path)
        return
    path = os.fspath(path)
    with replaced(path, os.path.splitext(path)[1]) as tmp:
        onnx.save(proto, tmp)
