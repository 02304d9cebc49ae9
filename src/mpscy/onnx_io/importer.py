"""ONNX file -> mpscy Model and parameters, for inference and fine-tuning: what torch.onnx.export
writes for MLPs, CNNs and residual models (Gemm or MatMul+Add over (N, features), Conv,
BatchNormalization, LayerNormalization, activations also in decomposed form, Softmax, pools,
global average pooling also as ReduceMean over the image axes, Flatten/Reshape, Add/Sum, Concat,
Dropout) and what mpscy exports. Anything else raises
UnsupportedError naming the node; data that is not an ONNX model, InvalidArgumentError.
Operator handlers are in ops.py; nothing here touches an engine.

Layer names: in a file mpscy wrote (producer_name "mpscy"), a layer takes the name of the ONNX
node it is made from (for a pending expression, the node that wrote it: the last node of a
decomposed GELU) when that is a valid mpscy layer name not taken yet, so what mpscy exported
comes back with its layer and parameter names; other layers, and every layer of a file from
another tool (torch's node names are module paths such as "/layer1/layer1.0/conv1/Conv"), are
numbered per kind (dense_0, relu_0, ...), skipping every name a node could still claim. The model's metadata_props key "mpscy.non_affine" (written by mpscy's
exporter) lists BatchNormalization / LayerNormalization nodes to import without weight and bias.
Float attributes (float32 in ONNX) are read as the shortest decimal of their float32 value, so
a momentum of 0.1 comes back as 0.1, not 0.10000000149."""

# Nodes are read in order into symbolic values: constants, materialized mpscy tensors, or small
# pending expressions (products, sums, erf/tanh/sigmoid, matmul) that become layers only when a
# consumer needs a tensor, so a decomposed GELU or SiLU is recognised as one layer.

import json
import math
import os

import numpy as np

from .. import layers as L
from .._checks import node_name
from .._safetensors import looks_like_safetensors
from ..errors import InvalidArgumentError, ShapeError, UnsupportedError
from ..model import Input, Model
from . import onnx_modules

# one-input layers that keep their input's shape: a global pool's (N, C, 1, 1) to ONNX passes
# through them
_ELEMENTWISE = (L.ReLU, L.LeakyReLU, L.ELU, L.ReLU6, L.Hardswish, L.Mish, L.GELU, L.Sigmoid, L.Tanh,
                L.Hardsigmoid, L.Softplus, L.Swish)


# ----------------------------------------------------------------------------- symbolic values
class Const:
    def __init__(self, value):
        self.value = np.asarray(value)


class Sym:
    """A materialized mpscy tensor."""

    def __init__(self, tensor):
        self.tensor = tensor


class Expr:
    """A pending expression: op in {"mul", "add", "erf", "tanh", "sigmoid", "hardsigmoid", "softplus",
    "matmul"}."""

    def __init__(self, op, args, const=None):
        self.op, self.args, self.const = op, list(args), const
        self.cached = None
        self.uses = 0        # node inputs that read it: only single-use products are flattened
        self.node_name = None  # the ONNX node that wrote it: the name of the layer it becomes


class ShapeVec:
    """Part of a shape computed at run time: entries are "N" (the batch) or ints."""

    def __init__(self, items, scalar=False):
        self.items, self.scalar = list(items), scalar


def _close(a, b, rel=1e-5):
    return abs(float(a) - float(b)) <= rel * max(1.0, abs(float(b)))


def _f32_decimal(v):
    """The shortest decimal that reads back as float32(v): ONNX's float attributes and float32
    scalars hold 0.1 as 0.100000001490116..., which mpscy's options would keep otherwise."""
    return float(str(np.float32(v)))


def _valid_layer_name(name):
    """Whether `name` is a name an mpscy layer accepts (the layers' own rule)."""
    try:
        node_name(name, "layer")
    except InvalidArgumentError:
        return False
    return True


def _scalar(v):
    if isinstance(v, Const) and v.value.size == 1:
        return float(v.value.reshape(()))
    return None


# ----------------------------------------------------------------------------- the reader
class _Reader:
    def __init__(self, graph, numpy_helper, helper, keep_names):
        self.graph, self.nh, self.helper = graph, numpy_helper, helper
        self.keep_names = keep_names  # layers named after their nodes (a file mpscy wrote)
        self.values, self.params, self.counts = {}, {}, {}
        self.inputs = []
        self.input_tensors = []    # the model's Input tensors (messages tell an input's formula apart)
        self.used = set()          # names given to inputs and layers
        # every node name that could become a layer's: numbered names skip them all
        self.claimable = {n.name for n in graph.node if _valid_layer_name(n.name)} if keep_names else set()
        self.current = None        # the node being read: the default name of a layer made now
        self.reading = None        # ... as messages name it (_node_desc)
        self.non_affine = set()    # node names from the "mpscy.non_affine" metadata
        self.initializers = set()  # the graph's initializer names (a model's weights, in torch's files)
        # every value some node or the graph's output reads
        self.read_names = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}

    # -- layers ----------------------------------------------------------------------
    def _name(self, prefix, wanted=None):
        """`wanted` when it is a valid layer name nothing has taken, else <prefix>_<k> with the
        lowest k of this prefix that neither a layer nor a node of the graph has."""
        if self.keep_names and wanted is not None and wanted not in self.used and _valid_layer_name(wanted):
            self.used.add(wanted)
            return wanted
        k = self.counts.get(prefix, 0)
        while f"{prefix}_{k}" in self.used or f"{prefix}_{k}" in self.claimable:
            k += 1
        self.counts[prefix] = k + 1
        self.used.add(f"{prefix}_{k}")
        return f"{prefix}_{k}"

    def input_name(self, onnx_name):
        """A valid, unused mpscy name for a graph input, kept apart from the node names."""
        base, k, name = _safe(onnx_name), 0, _safe(onnx_name)
        while name in self.used or name in self.claimable:
            k += 1
            name = _fit(base, f"_{k}")
        self.used.add(name)
        return name

    def layer(self, cls, args, params=None, node_name=False, **kwargs):
        """Calls a new layer on the materialized args and records its parameters. The layer is
        named after `node_name` (by default the node being read) where that name is free."""
        tensors = [self.tensor(a) for a in args]     # layers of pending operands first
        name = self._name(cls.prefix, self.current if node_name is False else node_name)
        try:
            out = cls(name=name, **kwargs)(tensors if len(tensors) > 1 else tensors[0])
        except ShapeError as e:
            raise ShapeError(f"ONNX import, {self._at()}{cls.__name__}: {e}") from None
        except InvalidArgumentError as e:  # a graph mpscy cannot build: the node named, not the layer's made-up name
            raise UnsupportedError(f"ONNX import: {self._at()}{cls.__name__} cannot take it: {e}") from None
        for suffix, arr in (params or {}).items():
            self.params[f"{name}.{suffix}"] = np.ascontiguousarray(arr, dtype=np.float32)
        sym = Sym(out)
        if len(args) == 1 and getattr(args[0], "squeezed", False) and cls in _ELEMENTWISE:
            sym.squeezed = True  # still ONNX's (N, C, 1, 1) of a global pool, as a 1x1 Conv after it reads it
        return sym

    def tensor(self, v):
        """The mpscy tensor of a value, turning a pending expression into layers."""
        if isinstance(v, Sym):
            return v.tensor
        if isinstance(v, Expr):
            if v.cached is None:
                v.cached = self._materialize(v)
            return v.cached.tensor
        raise UnsupportedError(f"ONNX import: {self._at()}a constant or shape value is used where a tensor is "
                               "needed (no mpscy layer computes it from constants)")

    def shape(self, v):
        return tuple(self.tensor(v).shape)

    @staticmethod
    def onnx_dims(v):
        """["N", *per-sample dims] as ONNX sees a tensor value, without turning a pending
        expression into layers (an elementwise expression has its first operand's shape);
        None for constants and shape values."""
        while isinstance(v, Expr):
            v = v.args[0]
        if not isinstance(v, Sym):
            return None
        return ["N", *v.tensor.shape, *((1, 1) if getattr(v, "squeezed", False) else ())]

    def check_dense_input(self, node, v):
        """A Dense takes (N, features); a MatMul over the last axis of a higher-rank tensor
        (torch's nn.Linear on (N, ..., features)) is not one, and flattening would be wrong."""
        dims = self.onnx_dims(v)
        if dims is not None and len(dims) != 2:
            raise UnsupportedError(f"{node.op_type} {_shown(node)}: its input {node.input[0]!r} has rank {len(dims)} "
                                   f"({', '.join(map(str, dims))}); mpscy's Dense takes rank 2 (N, features) and no "
                                   "mpscy layer applies a matrix product over the last axis of a higher-rank tensor")

    # -- pattern matching ----------------------------------------------------------------
    def _flat(self, e):
        """(scalar constant, operands) of a product or sum, descending into operands of the
        same kind that nothing else reads (the intermediates of a decomposed formula). A sum
        does not descend into a sum that adds a constant: that one is a term of its own (a
        Dense's bias, or a shift no layer here adds), not part of a sum of layers."""
        const = 1.0 if e.op == "mul" else 0.0
        out = []

        def walk(v):
            nonlocal const
            if v.const is not None:
                c = float(np.asarray(v.const).reshape(-1)[0]) if np.asarray(v.const).size == 1 else None
                if c is None:
                    raise UnsupportedError(f"ONNX import: {self._at()}a non-scalar constant in an elementwise formula")
                const = const * c if e.op == "mul" else const + c
            for a in v.args:
                if (isinstance(a, Expr) and a.op == e.op and a.uses <= 1 and a.cached is None
                        and (e.op == "mul" or a.const is None)):
                    walk(a)
                else:
                    out.append(a)

        walk(e)
        return const, out

    def _materialize(self, e):
        named = {"node_name": e.node_name}
        if e.op in ("sigmoid", "tanh"):
            return self.layer(L.Sigmoid if e.op == "sigmoid" else L.Tanh, [e.args[0]], **named)
        if e.op == "hardsigmoid":
            return self.layer(L.Hardsigmoid, [e.args[0]], **named)
        if e.op == "softplus":
            return self.layer(L.Softplus, [e.args[0]], **named)
        if e.op == "matmul":
            return self._dense(e.args[0], e.const, None, e.node_name)
        if e.op == "add":
            if len(e.args) == 1 and isinstance(e.args[0], Expr) and e.args[0].op == "matmul" and e.const is not None:
                w = e.args[0].const
                if e.const.size in (1, w.shape[1]):
                    return self._dense(e.args[0].args[0], w, np.broadcast_to(e.const.reshape(-1), (w.shape[1],)),
                                       e.node_name)
            if e.const is None:
                c, terms = self._flat(e)
                if len(terms) >= 2 and c == 0.0:
                    return self.layer(L.Add, terms, **named)
        if e.op == "mul" and len(e.args) == 2 and e.const is None:
            a, b = e.args
            for x, s in ((a, b), (b, a)):
                if isinstance(s, Expr) and s.op == "sigmoid" and s.args[0] is x:
                    return self.layer(L.Swish, [x], **named)
                if isinstance(s, Expr) and s.op == "hardsigmoid" and s.args[0] is x:
                    return self.layer(L.Hardswish, [x], **named)
                if (isinstance(s, Expr) and s.op == "tanh" and isinstance(s.args[0], Expr)
                        and s.args[0].op == "softplus" and s.args[0].args[0] is x):
                    return self.layer(L.Mish, [x], **named)
        if e.op == "mul" and len(e.args) == 1 and e.const is not None:   # softplus(beta x) / beta: Softplus(beta)
            s = e.args[0]   # matched as written, not flattened: x may be a product itself (x * tanh(...), a Mish)
            if isinstance(s, Expr) and s.op == "softplus" and isinstance(s.args[0], Expr) and s.args[0].op == "mul" \
                    and len(s.args[0].args) == 1 and s.args[0].const is not None:
                c, beta = float(np.asarray(e.const).reshape(-1)[0]), float(np.asarray(s.args[0].const).reshape(-1)[0])
                if np.asarray(e.const).size == 1 and np.asarray(s.args[0].const).size == 1 and beta > 0 \
                        and _close(c * beta, 1.0):
                    return self.layer(L.Softplus, [s.args[0].args[0]], beta=_f32_decimal(beta), **named)
        if e.op == "mul":
            gelu = self._match_gelu(e)
            if gelu is not None:
                return self.layer(L.GELU, [gelu[0]], approximate=gelu[1], **named)
        where = f"node {e.node_name!r} computes " if e.node_name else "an expression, "
        hint = ("a scale or an offset of the input, such as x / 255, belongs in the data pipeline"
                if self._reads_input(e) else "mpscy's layers compute one operation each: no layer multiplies or "
                "adds two branches but Add, nor scales or shifts a tensor by constants but the layers' own")
        raise UnsupportedError(f"ONNX import: {where}{_describe(e)}, which no mpscy layer computes ({hint})")

    def _at(self):
        """the node being read, as a message's opening words ("" between nodes)"""
        return f"{self.reading}: " if self.reading else ""

    def _reads_input(self, e):
        """whether a pending expression's operands reach a model input directly"""
        if isinstance(e, Expr):
            return any(self._reads_input(a) for a in e.args)
        return isinstance(e, Sym) and any(e.tensor is t for t in self.input_tensors)

    def _dense(self, x, w, bias, node_name):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise UnsupportedError(f"ONNX import: {self._at()}MatMul with a {w.ndim}-D constant is not a Dense layer")
        params = {"weight": w.T}
        if bias is not None:
            params["bias"] = bias
        return self.layer(L.Dense, [x], params, node_name=node_name, units=int(w.shape[1]), bias=bias is not None)

    def _match_gelu(self, e):
        """0.5 x (1 + erf(x / sqrt 2)) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
        c, factors = self._flat(e)
        if len(factors) != 2 or not _close(c, 0.5):
            return None
        for x, s in (factors, factors[::-1]):
            if not (isinstance(s, Expr) and s.op == "add"):
                continue
            one, terms = self._flat(s)
            if not (_close(one, 1.0) and len(terms) == 1 and isinstance(terms[0], Expr)
                    and terms[0].op in ("erf", "tanh") and isinstance(terms[0].args[0], Expr)
                    and terms[0].args[0].op == "mul"):
                continue
            k, inner = self._flat(terms[0].args[0])
            if terms[0].op == "erf" and inner == [x] and _close(k, 1 / math.sqrt(2.0)):
                return x, "none"
            if terms[0].op == "tanh" and len(inner) == 1 and _close(k, math.sqrt(2.0 / math.pi)) \
                    and isinstance(inner[0], Expr) and inner[0].op == "add":
                zero, poly = self._flat(inner[0])
                if _close(zero, 0.0) and len(poly) == 2:
                    for lin, cube in (poly, poly[::-1]):
                        if lin is x and isinstance(cube, Expr) and cube.op == "mul":
                            k3, xs = self._flat(cube)
                            if _close(k3, 0.044715) and len(xs) == 3 and all(v is x for v in xs):
                                return x, "tanh"
        return None

    # -- expression building -------------------------------------------------------------
    def _combine(self, op, a, b, fold):
        if isinstance(a, Const) and isinstance(b, Const):
            return Const(fold(a.value, b.value))
        args = [v for v in (a, b) if not isinstance(v, Const)]
        consts = [v.value for v in (a, b) if isinstance(v, Const)]
        return Expr(op, args, np.asarray(consts[0], np.float64) if consts else None)

    def mul(self, a, b):
        e = self._combine("mul", a, b, np.multiply)
        if isinstance(e, Expr) and e.const is not None and e.const.size != 1:
            raise UnsupportedError(f"ONNX import: {self._at()}multiplication by a non-scalar constant (a per-channel "
                                   "scale, say) has no mpscy layer")
        return e

    def add(self, a, b):
        return self._combine("add", a, b, np.add)

    # -- nodes -------------------------------------------------------------------------------
    def get(self, name):
        if name == "":
            return None
        if name not in self.values:
            raise InvalidArgumentError(f"ONNX graph uses {name!r} before it is defined")
        return self.values[name]

    def const_of(self, name, node):
        v = self.get(name)
        if not isinstance(v, Const):
            raise UnsupportedError(f"{node.op_type} node {_shown(node)}: input {name!r} must be a constant")
        return v.value

    def run(self, node):
        op = node.op_type
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            raise UnsupportedError(f"ONNX import: operator {op} ({_node_desc(node)}) is not supported")
        attrs = {}
        for a in node.attribute:
            v = self.helper.get_attribute_value(a)
            if a.type == a.FLOAT:
                v = _f32_decimal(v)
            elif a.type == a.FLOATS:
                v = [_f32_decimal(f) for f in v]
            attrs[a.name] = v
        args = [self.get(i) for i in node.input]
        for a in args:
            if isinstance(a, Expr):
                a.uses += 1
        self.current, self.reading = node.name, f"{op} {_node_desc(node)}"
        try:
            outs = handler(node, args, attrs)
        finally:
            self.current = self.reading = None
        outs = outs if isinstance(outs, list) else [outs]
        for name, v in zip(node.output, outs):
            if isinstance(v, Expr) and v.node_name is None:
                v.node_name = node.name
            if name:
                self.values[name] = v


def _shown(node):
    """a node's name as a handler's message quotes it after the operator: 'name', or where it has
    none its first output ("Clip (unnamed, output 'y') ...", not "Clip '' ...")"""
    if node.name:
        return repr(node.name)
    return f"(unnamed, output {node.output[0]!r})" if node.output and node.output[0] else "(unnamed)"


def _node_desc(node):
    """a node as messages name it: by its name, or where it has none by its first output"""
    if node.name:
        return f"node {node.name!r}"
    return f"unnamed node, output {node.output[0]!r}" if node.output and node.output[0] else "unnamed node"


def _describe(e):
    if isinstance(e, Expr):
        inner = ", ".join(_describe(a) for a in e.args)
        flat = np.asarray(e.const).reshape(-1) if e.const is not None else None
        c = "" if flat is None else (f", const={flat.tolist()}" if flat.size <= 3 else
                                     f", const=[{', '.join(map(str, flat[:3].tolist()))}, ...] ({flat.size} values)")
        return f"{e.op}({inner}{c})"
    if isinstance(e, Sym):
        return f"tensor{tuple(e.tensor.shape)}"
    return type(e).__name__


def _safetensors_hint(source):
    """A hint for a safetensors file (an mpscy checkpoint) given to the ONNX import, from its first
    bytes where the source is bytes or a path (mpscy.load's message points the other way)."""
    try:
        if isinstance(source, (bytes, bytearray)):
            head = bytes(source[:9])
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(9)
        else:
            return ""
    except OSError:
        return ""
    if looks_like_safetensors(head):
        return "; it looks like a safetensors file (an mpscy checkpoint?): read it with mpscy.load"
    return ""


def _parse(onnx, source):
    """The ModelProto of a path, file object, bytes or ModelProto. What does not parse as one,
    or parses to a model without a graph (as an empty file does), is an InvalidArgumentError
    naming the file, not protobuf's DecodeError."""
    if hasattr(source, "graph"):
        return source
    from google.protobuf import json_format, message, text_format
    from onnx import parser    # the onnxtxt format's
    if isinstance(source, (bytes, bytearray)):
        what = "the bytes given are"
    elif isinstance(source, (str, os.PathLike)):
        what = f"{os.fspath(source)!r} is"
    elif hasattr(source, "read"):  # a file object
        what = f"{getattr(source, 'name', 'the file given')!r} is"
    else:  # an int would be taken for a file descriptor
        raise InvalidArgumentError(f"ONNX import takes a path, a file object, bytes or a ModelProto, "
                                   f"got {type(source).__name__}")
    try:
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source))
        else:
            proto = onnx.load(source)
    except (message.DecodeError, text_format.ParseError, json_format.ParseError, parser.ParseError,
            UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"ONNX import: {what} not a valid ONNX model ({e}){_safetensors_hint(source)}") \
            from None
    if not proto.HasField("graph"):
        raise InvalidArgumentError(f"ONNX import: {what} not a valid ONNX model (it has no graph)"
                                   f"{_safetensors_hint(source)}")
    return proto


def read_onnx(source):
    """(Model, {parameter name: array}) from a path, bytes or ModelProto."""
    onnx, helper, nh, _ = onnx_modules()
    from . import ops  # noqa: F401  (registers the op_* handlers on _Reader)
    proto = _parse(onnx, source)
    domains = {o.domain: o.version for o in proto.opset_import}
    opset = domains.get("", domains.get("ai.onnx"))
    if opset is None or opset < 11:
        raise UnsupportedError(f"ONNX import needs the default opset >= 11, the file has {opset}")
    graph = proto.graph
    r = _Reader(graph, nh, helper, keep_names=proto.producer_name == "mpscy")
    r.opset = opset
    r.non_affine = _non_affine(proto)
    inits = {t.name for t in graph.initializer}
    r.initializers = inits
    for t in graph.initializer:
        r.values[t.name] = Const(nh.to_array(t))
    tensors = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if len(dims) < 2 or any(d is None or d <= 0 for d in dims[1:]):
            raise UnsupportedError(f"ONNX input {vi.name!r} has shape {dims}; mpscy needs (batch, fixed sizes...)")
        if tt.elem_type != onnx.TensorProto.FLOAT:
            raise UnsupportedError(f"ONNX input {vi.name!r} is not float32")
        t = Input(tuple(dims[1:]), name=r.input_name(vi.name))
        tensors.append(t)
        r.input_tensors.append(t)
        r.values[vi.name] = Sym(t)
    if not tensors:
        raise InvalidArgumentError("the ONNX graph has no data input")
    for node in graph.node:
        r.run(node)
    if len(graph.output) != 1:
        raise UnsupportedError(f"mpscy models have one output; the ONNX graph has {len(graph.output)}")
    out = r.tensor(r.get(graph.output[0].name))
    model = Model(tensors, out)
    used = set(model.parameter_shapes())
    return model, {k: v for k, v in r.params.items() if k in used}


def _non_affine(proto):
    """The node names of the "mpscy.non_affine" metadata (empty when the file has none)."""
    from .exporter import METADATA_NON_AFFINE
    for p in proto.metadata_props:
        if p.key == METADATA_NON_AFFINE:
            try:
                names = json.loads(p.value)
            except ValueError:
                names = None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise InvalidArgumentError(f"ONNX import: the metadata {METADATA_NON_AFFINE!r} must be a JSON list of "
                                           f"node names, got {p.value[:80]!r}")
            return set(names)
    return set()


def _fit(base, suffix=""):
    """base + suffix within 40 UTF-8 bytes, cutting base (at a character boundary)."""
    room = 40 - len(suffix.encode())
    return base.encode()[:room].decode(errors="ignore") + suffix


def _safe(name):
    """A valid mpscy node name (no '.', at most 40 bytes) from an ONNX value name."""
    s = _fit("".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name))
    return s or "input"
