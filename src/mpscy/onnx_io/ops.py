"""The ONNX operator handlers of the importer: one `op_<Type>(node, args, attrs)` per
operator, each returning the symbolic value(s) of the node's outputs (see importer.py).
Attribute defaults are the ONNX specification's."""

import math

import numpy as np

from .. import layers as L
from ..errors import UnsupportedError
from .importer import Const, Expr, ShapeVec, Sym, _f32_decimal, _Reader, _scalar, _shown


def _layer_class(name):
    cls = getattr(L, name, None)
    if cls is None:
        raise UnsupportedError(f"ONNX import needs mpscy.layers.{name}, which this mpscy does not have")
    return cls


def _onnx_shape(r, v):
    """["N", *per-sample dims] as ONNX sees the value (GlobalAveragePool keeps (C, 1, 1))."""
    shape = list(r.shape(v))
    return ["N", *shape, 1, 1] if getattr(v, "squeezed", False) else ["N", *shape]


def _flat(r, x):
    """x flattened to (N, features): a layer where x has more than one per-sample axis, else x
    itself (a GlobalAveragePool output, (N, C, 1, 1) to ONNX, becomes (N, C) to it as well)."""
    if len(r.shape(x)) != 1:
        return r.layer(L.Flatten, [x])
    return Sym(x.tensor) if getattr(x, "squeezed", False) else x


def _image(r, x):
    """x as an (N, C, H, W) image for a layer that reads one: a GlobalAveragePool's (or kept-dims
    ReduceMean's) output, (N, C, 1, 1) to ONNX but (N, C) to mpscy, through a Reshape to (C, 1, 1)
    (a 1x1 convolution after the pool, as NiN's and SqueezeNet's heads and SE blocks have)."""
    if isinstance(x, Expr):  # a pending activation of the pooled value (a sigmoid): its layer now
        r.tensor(x)
        x = x.cached
    if not getattr(x, "squeezed", False):
        return x
    if getattr(x, "image", None) is None:
        x.image = r.layer(L.Reshape, [x], node_name=None, target_shape=(*r.shape(x), 1, 1))
    return x.image


def _pairs(attrs, key, default):
    v = list(attrs.get(key, default))
    if len(v) != 2:
        raise UnsupportedError(f"only 2-D {key} are supported, got {v}")
    return tuple(int(a) for a in v)


def _text(attrs, key, default):
    """A string attribute (ONNX stores them as bytes)."""
    v = attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _pads(node, attrs, r, x, kernel, stride, dilation=(1, 1)):
    auto = _text(attrs, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        # the ONNX spec's padding for an output of ceil(in / stride) (torch writes it for
        # padding="same"): mpscy pads both sides alike, so only an even total is taken
        pads = []
        for n_in, k, s, d in zip(list(r.shape(x))[-2:], kernel, stride, dilation):
            total = max((-(-n_in // s) - 1) * s + (k - 1) * d + 1 - n_in, 0)
            if total % 2:
                raise UnsupportedError(f"{node.op_type} {_shown(node)}: auto_pad {auto} pads one side of a {n_in}-wide "
                                       f"axis more than the other, which mpscy's layers do not")
            pads.append(total // 2)
        return tuple(pads)
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"{node.op_type} {_shown(node)}: auto_pad {auto!r} is not supported; "
                               "export with explicit pads")
    p = list(attrs.get("pads", [0, 0, 0, 0]))
    if len(p) != 4 or p[0] != p[2] or p[1] != p[3]:
        raise UnsupportedError(f"{node.op_type} {_shown(node)}: asymmetric pads {p} are not supported")
    return int(p[0]), int(p[1])


def _set(name):
    def deco(fn):
        setattr(_Reader, "op_" + name, fn)
        return fn
    return deco


# ----------------------------------------------------------------------------- plumbing
@_set("Identity")
def _identity(r, node, args, attrs):
    return args[0]


@_set("Constant")
def _constant(r, node, args, attrs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            v = attrs[key]
            return Const(r.nh.to_array(v) if key == "value" else np.asarray(v))
    raise UnsupportedError(f"Constant {_shown(node)} has no supported value attribute")


@_set("Cast")
def _cast(r, node, args, attrs):
    """A constant's cast; a shape's whole-number entries become a constant (torch's size
    arithmetic: Shape -> Gather -> Cast -> Mul -> Floor for F.interpolate(scale_factor=s,
    recompute_scale_factor=True)); a tensor, or a shape holding the batch, stays as it is."""
    x = args[0]
    if isinstance(x, ShapeVec) and all(isinstance(v, (int, np.integer)) for v in x.items):
        x = Const(np.asarray(x.items[0] if x.scalar else x.items, dtype=np.int64))
    if isinstance(x, Const):
        from onnx import helper
        return Const(x.value.astype(helper.tensor_dtype_to_np_dtype(attrs["to"])))
    return x


@_set("Floor")
def _floor(r, node, args, attrs):
    if not isinstance(args[0], Const):
        raise UnsupportedError(f"Floor {_shown(node)} of a tensor has no mpscy layer (only of constant sizes)")
    return Const(np.floor(args[0].value))


@_set("Shape")
def _shape(r, node, args, attrs):
    items = _onnx_shape(r, args[0])
    return ShapeVec(items[attrs.get("start", 0):attrs.get("end", len(items))])


@_set("ConstantOfShape")
def _constant_of_shape(r, node, args, attrs):
    """A constant tensor of a constant shape (torch's pad export builds its pads from one)."""
    shape = args[0]
    if isinstance(shape, ShapeVec) and all(isinstance(v, (int, np.integer)) for v in shape.items):
        dims = [int(v) for v in shape.items]
    elif isinstance(shape, Const):
        dims = [int(v) for v in shape.value.reshape(-1)]
    else:
        raise UnsupportedError(f"ConstantOfShape {_shown(node)} of a shape holding the batch is not supported")
    value = r.nh.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
    return Const(np.full(dims, value[0], dtype=value.dtype))


@_set("Transpose")
def _transpose(r, node, args, attrs):
    if not isinstance(args[0], Const):
        raise UnsupportedError(f"Transpose {_shown(node)} of a tensor has no mpscy layer (only of constants)")
    return Const(np.transpose(args[0].value, attrs.get("perm")))


@_set("Pad")
def _pad(r, node, args, attrs):
    """Refused by name (torch's nn.ZeroPad2d and padding_mode= of a Conv2d export as Pad, its pads
    computed through ConstantOfShape, Concat, Slice and Transpose of constants)."""
    mode = _text(attrs, "mode", "constant")
    pads = args[1].value.reshape(-1) if len(args) > 1 and isinstance(args[1], Const) else None
    value = args[2].value.reshape(-1) if len(args) > 2 and isinstance(args[2], Const) else np.zeros(1)
    if mode != "constant":
        hint = f"{mode} padding is not supported"
    elif value.size and value[0] != 0:
        hint = f"padding with {value[0]:g}, not 0, is not supported"
    elif pads is not None and (pads.size % 2 or any(pads[i] != pads[i + pads.size // 2] for i in range(pads.size // 2))):
        hint = f"pads {pads.tolist()} differ between the two sides of an axis, which no mpscy layer's padding does"
    else:
        hint = ("a convolution after it can take these zeros as its own padding= (torch's padding=, not "
                "nn.ZeroPad2d); a pool's padding is not zeros")
    raise UnsupportedError(f"Pad {_shown(node)} (mode {mode!r}) has no mpscy layer: {hint}")


@_set("Gather")
def _gather(r, node, args, attrs):
    data, idx = args
    if isinstance(data, Const) and isinstance(idx, Const):
        return Const(np.take(data.value, idx.value, axis=attrs.get("axis", 0)))
    if isinstance(data, ShapeVec) and isinstance(idx, Const) and idx.value.size == 1:
        return ShapeVec([data.items[int(idx.value.reshape(()))]], scalar=idx.value.ndim == 0)
    raise UnsupportedError(f"Gather {_shown(node)} on tensors is not supported")


@_set("Slice")
def _slice(r, node, args, attrs):
    """A slice of a shape (torch's F.interpolate(size=...) export keeps Shape(x)[0:2], the batch
    and the channels, and concatenates the new H and W) or of a constant; not of a tensor."""
    data = args[0]
    if not isinstance(data, (ShapeVec, Const)):
        raise UnsupportedError(f"Slice {_shown(node)} on tensors is not supported (torch's "
                               "padding_mode=\"circular\" and tensor indexing such as x[:, :, 1:] export as one)")

    def ints(k, default):
        if len(node.input) > k and node.input[k]:
            return [int(v) for v in np.asarray(r.const_of(node.input[k], node)).reshape(-1)]
        return default
    starts, ends = ints(1, None), ints(2, None)
    if starts is None or ends is None or len(starts) != len(ends):
        raise UnsupportedError(f"Slice {_shown(node)} needs constant starts and ends of one length")
    axes, steps = ints(3, list(range(len(starts)))), ints(4, [1] * len(starts))
    if 0 in steps:
        raise UnsupportedError(f"Slice {_shown(node)} with a step of 0 (which ONNX does not allow)")
    if isinstance(data, ShapeVec):
        if axes not in ([0], [-1]):
            raise UnsupportedError(f"Slice {_shown(node)} of a shape along axes {axes} is not supported")
        return ShapeVec(data.items[starts[0]:ends[0]:steps[0]])
    index = [slice(None)] * data.value.ndim
    for a, lo, hi, step in zip(axes, starts, ends, steps):
        index[a] = slice(lo, hi, step)
    return Const(data.value[tuple(index)])


@_set("Unsqueeze")
def _unsqueeze(r, node, args, attrs):
    x = args[0]
    axes = args[1].value.tolist() if len(args) > 1 else attrs.get("axes")
    if isinstance(x, ShapeVec) and x.scalar:
        return ShapeVec(x.items)
    if isinstance(x, Const):
        return Const(np.expand_dims(x.value, tuple(int(a) for a in np.atleast_1d(axes))))
    raise UnsupportedError(f"Unsqueeze {_shown(node)} on tensors is not supported")


@_set("Concat")
def _concat(r, node, args, attrs):
    if all(isinstance(a, (ShapeVec, Const)) for a in args):
        if all(isinstance(a, Const) for a in args):
            return Const(np.concatenate([a.value for a in args], axis=attrs["axis"]))
        items = []
        for a in args:
            items.extend(a.items if isinstance(a, ShapeVec) else a.value.reshape(-1).tolist())
        return ShapeVec(items)
    rank = len(_onnx_shape(r, args[0]))
    axis = attrs["axis"] + (rank if attrs["axis"] < 0 else 0)
    if axis == 0:
        raise UnsupportedError(f"Concat {_shown(node)} along the batch axis is not supported")
    return r.layer(_layer_class("Concatenate"), args, axis=axis)


@_set("Reshape")
def _reshape(r, node, args, attrs):
    x, spec = args
    target = spec.items if isinstance(spec, ShapeVec) else spec.value.reshape(-1).tolist() if isinstance(spec, Const) else None
    if target is None:
        raise UnsupportedError(f"Reshape {_shown(node)}: the target shape must be computable at import")
    if isinstance(x, Const):
        return Const(x.value.reshape([int(t) for t in target]))
    src = _onnx_shape(r, x)
    per_sample = src[1:]
    total = int(np.prod(per_sample))
    t = [src[i] if (v == 0 and not attrs.get("allowzero", 0) and i < len(src)) else v for i, v in enumerate(target)]
    if t[0] not in ("N", -1):
        raise UnsupportedError(f"Reshape {_shown(node)} fixes the batch size to {t[0]}; export with a dynamic "
                               "batch dimension (dynamic_axes / dynamic_shapes)")
    rest = [int(v) for v in t[1:]] if t[0] == "N" or all(v != -1 for v in t[1:]) else None
    if rest is None:
        raise UnsupportedError(f"Reshape {_shown(node)} to {target} moves the batch dimension")
    if -1 in rest:
        known = int(np.prod([v for v in rest if v != -1]))
        rest[rest.index(-1)] = total // known if known else 0
    if rest == [total]:
        return _flat(r, x)
    if rest == list(r.shape(x)) and not getattr(x, "squeezed", False):
        return x
    if any(v <= 0 for v in rest) or int(np.prod(rest)) != total:
        raise UnsupportedError(f"Reshape {_shown(node)} from (N, {per_sample}) to (N, {rest}): not the same "
                               "elements per sample")
    return r.layer(L.Reshape, [x], target_shape=tuple(rest))   # torch's x.view(n, C, H, W), Keras's Reshape


@_set("Flatten")
def _flatten(r, node, args, attrs):
    if attrs.get("axis", 1) != 1:
        raise UnsupportedError(f"Flatten {_shown(node)} with axis {attrs.get('axis')} is not supported (only 1)")
    return _flat(r, args[0])


@_set("Dropout")
def _dropout(r, node, args, attrs):
    ratio = attrs.get("ratio", 0.5)
    if len(args) > 1 and args[1] is not None:
        v = np.asarray(r.const_of(node.input[1], node)).reshape(())
        ratio = _f32_decimal(v) if v.dtype == np.float32 else float(v)
    outs = [r.layer(L.Dropout, [args[0]], rate=ratio) if hasattr(L, "Dropout") and ratio > 0 else args[0]]
    return outs + [None] * (len(node.output) - 1)


# ----------------------------------------------------------------------------- arithmetic
@_set("Add")
def _add(r, node, args, attrs):
    return r.add(args[0], args[1])


@_set("Sum")
def _sum(r, node, args, attrs):
    acc = args[0]
    for a in args[1:]:
        acc = r.add(acc, a)
    return acc


@_set("Sub")
def _sub(r, node, args, attrs):
    if not isinstance(args[1], Const):
        raise UnsupportedError(f"Sub {_shown(node)} of two tensors has no mpscy layer")
    return r.add(args[0], Const(-args[1].value))


@_set("Mul")
def _mul(r, node, args, attrs):
    return r.mul(args[0], args[1])


@_set("Div")
def _div(r, node, args, attrs):
    if not isinstance(args[1], Const):
        raise UnsupportedError(f"Div {_shown(node)} by a tensor has no mpscy layer")
    return r.mul(args[0], Const(1.0 / args[1].value.astype(np.float64)))


@_set("Pow")
def _pow(r, node, args, attrs):
    e = _scalar(args[1])
    if e not in (2.0, 3.0):
        raise UnsupportedError(f"Pow {_shown(node)} with exponent {e} is not supported")
    out = r.mul(args[0], args[0])
    return r.mul(out, args[0]) if e == 3.0 else out


@_set("MatMul")
def _matmul(r, node, args, attrs):
    a, b = args
    if not isinstance(b, Const) or b.value.ndim != 2:
        raise UnsupportedError(f"MatMul {_shown(node)} needs a 2-D constant right operand")
    r.check_dense_input(node, a)
    return Expr("matmul", [a], const=b.value)


@_set("Gemm")
def _gemm(r, node, args, attrs):
    if attrs.get("transA", 0):
        raise UnsupportedError(f"Gemm {_shown(node)} with transA is not supported")
    r.check_dense_input(node, args[0])
    b = np.asarray(r.const_of(node.input[1], node), dtype=np.float64)
    w = b if attrs.get("transB", 0) else b.T                      # (out, in)
    w = w * attrs.get("alpha", 1.0)
    params = {"weight": w}
    if len(args) > 2 and args[2] is not None:
        c = np.asarray(r.const_of(node.input[2], node), dtype=np.float64) * attrs.get("beta", 1.0)
        params["bias"] = np.broadcast_to(c.reshape(-1) if c.size == w.shape[0] else c, (w.shape[0],))
    return r.layer(L.Dense, [args[0]], params, units=int(w.shape[0]), bias="bias" in params)


# ----------------------------------------------------------------------------- activations
for _op in ("Erf", "Tanh", "Sigmoid"):
    def _unary(r, node, args, attrs, _name=_op.lower()):
        return Expr(_name, [args[0]])
    _set(_op)(_unary)


@_set("Relu")
def _relu(r, node, args, attrs):
    return r.layer(L.ReLU, args[:1])


@_set("LeakyRelu")
def _leaky(r, node, args, attrs):
    return r.layer(L.LeakyReLU, args[:1], negative_slope=attrs.get("alpha", 0.01))


@_set("Elu")
def _elu(r, node, args, attrs):
    return r.layer(L.ELU, args[:1], alpha=attrs.get("alpha", 1.0))


@_set("Clip")
def _clip(r, node, args, attrs):
    """torch's ReLU6 (Clip to [0, 6]) and a Clip to [0, inf) (a ReLU)."""
    def bound(k, default):  # min and max are inputs from opset 11, which the importer requires
        if len(args) <= k or args[k] is None:
            return default
        return _scalar(Const(r.const_of(node.input[k], node)))
    low, high = bound(1, -math.inf), bound(2, math.inf)
    if low == 0.0 and high == 6.0:
        return r.layer(L.ReLU6, args[:1])
    if low == 0.0 and high is not None and high >= float(np.finfo(np.float32).max):  # to inf or float32's largest
        return r.layer(L.ReLU, args[:1])
    raise UnsupportedError(f"Clip {_shown(node)} to [{low}, {high}]: only [0, 6] (ReLU6) and [0, inf) (ReLU) "
                           f"are layers")


@_set("HardSigmoid")
def _hardsigmoid(r, node, args, attrs):
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    if not (abs(alpha - 1.0 / 6.0) < 1e-6 and abs(beta - 0.5) < 1e-6):
        raise UnsupportedError(f"HardSigmoid {_shown(node)} with alpha={alpha}, beta={beta}: only torch's "
                               "(alpha=1/6, beta=1/2, mpscy's Hardsigmoid) is a layer")
    return Expr("hardsigmoid", [args[0]])   # x * hardsigmoid(x) is a Hardswish


@_set("HardSwish")
def _hardswish(r, node, args, attrs):
    return r.layer(L.Hardswish, args[:1])


@_set("Softplus")
def _softplus(r, node, args, attrs):
    return Expr("softplus", [args[0]])      # x * tanh(softplus(x)) is a Mish; softplus(b x) / b a Softplus(beta=b)


@_set("Mish")
def _mish(r, node, args, attrs):
    return r.layer(L.Mish, args[:1])


@_set("Gelu")
def _gelu(r, node, args, attrs):
    return r.layer(L.GELU, args[:1], approximate=_text(attrs, "approximate", "none"))


@_set("Softmax")
def _softmax(r, node, args, attrs):
    rank = len(_onnx_shape(r, args[0]))
    axis = attrs.get("axis", -1 if r.opset >= 13 else 1)
    axis += rank if axis < 0 else 0
    if r.opset < 13 and axis != rank - 1:
        raise UnsupportedError(f"Softmax {_shown(node)} (opset {r.opset}, axis {axis}) flattens trailing axes")
    if axis == 0:
        raise UnsupportedError(f"Softmax {_shown(node)} over the batch axis is not supported")
    return r.layer(L.Softmax, args[:1], axis=axis)


# ----------------------------------------------------------------------------- images
@_set("Conv")
def _conv(r, node, args, attrs):
    w = np.asarray(r.const_of(node.input[1], node), dtype=np.float32)
    if w.ndim != 4:
        raise UnsupportedError(f"Conv {_shown(node)}: only 2-D convolutions are supported")
    args = [_image(r, args[0]), *args[1:]]
    params = {"weight": w}
    if len(args) > 2 and args[2] is not None:
        params["bias"] = r.const_of(node.input[2], node)
    kh, kw = _pairs(attrs, "kernel_shape", w.shape[2:])
    stride, dilation = _pairs(attrs, "strides", (1, 1)), _pairs(attrs, "dilations", (1, 1))
    return r.layer(_layer_class("Conv2D"), args[:1], params, filters=int(w.shape[0]), kernel_size=(kh, kw),
                   stride=stride, padding=_pads(node, attrs, r, args[0], (kh, kw), stride, dilation),
                   dilation=dilation, groups=int(attrs.get("group", 1)), bias="bias" in params)


@_set("ConvTranspose")
def _conv_transpose(r, node, args, attrs):
    """ConvTranspose2D from explicit pads (torch's export): pads (b, e) on an axis with output
    padding q are torch's padding b and output_padding b - e + q (the same output, cropped from the
    same first row), taken where that is below the stride or the dilation; output_shape and auto_pad
    SAME_* are refused by name."""
    w = np.asarray(r.const_of(node.input[1], node), dtype=np.float32)
    if w.ndim != 4:
        raise UnsupportedError(f"ConvTranspose {_shown(node)}: only 2-D transposed convolutions are supported")
    args = [_image(r, args[0]), *args[1:]]
    if "output_shape" in attrs:
        raise UnsupportedError(f"ConvTranspose {_shown(node)} with output_shape is not supported: export with "
                               "explicit pads and output_padding (as torch does)")
    auto = _text(attrs, "auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedError(f"ConvTranspose {_shown(node)}: auto_pad {auto!r} is not supported; export with "
                               "explicit pads (as torch does)")
    params = {"weight": w}
    if len(args) > 2 and args[2] is not None:
        params["bias"] = r.const_of(node.input[2], node)
    group = int(attrs.get("group", 1))
    kernel = _pairs(attrs, "kernel_shape", w.shape[2:])
    stride, dilation = _pairs(attrs, "strides", (1, 1)), _pairs(attrs, "dilations", (1, 1))
    extra = _pairs(attrs, "output_padding", (0, 0))
    pads = [0, 0, 0, 0] if auto == "VALID" else [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    if len(pads) != 4:
        raise UnsupportedError(f"ConvTranspose {_shown(node)}: only 2-D pads are supported, got {pads}")
    padding = (pads[0], pads[1])
    output_padding = tuple(pads[a] - pads[a + 2] + extra[a] for a in (0, 1))
    if any(not 0 <= q < max(st, d) for q, st, d in zip(output_padding, stride, dilation)):
        raise UnsupportedError(f"ConvTranspose {_shown(node)}: pads {pads} with output_padding {list(extra)} crop the "
                               f"end of an axis other than torch's padding can (output_padding {output_padding} "
                               f"against the stride {stride} and the dilation {dilation})")
    return r.layer(_layer_class("ConvTranspose2D"), args[:1], params, filters=int(w.shape[1]) * group,
                   kernel_size=kernel, stride=stride, padding=padding, output_padding=output_padding, groups=group,
                   bias="bias" in params, dilation=dilation)


def _pool(r, node, args, attrs, cls_name, **extra):
    args = [_image(r, args[0]), *args[1:]]
    if any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise UnsupportedError(f"{node.op_type} {_shown(node)} with dilations is not supported")
    k, stride = _pairs(attrs, "kernel_shape", None), _pairs(attrs, "strides", (1, 1))
    padding = _pads(node, attrs, r, args[0], k, stride)
    if attrs.get("ceil_mode", 0):  # taken where every window fits: ceil and floor give the same sizes
        sizes = r.shape(args[0])[-2:]
        if any((n + 2 * p - kk) % s for n, p, kk, s in zip(sizes, padding, k, stride)):
            raise UnsupportedError(f"{node.op_type} {_shown(node)} with ceil_mode=1 over {tuple(sizes)} (kernel {k}, "
                                   f"stride {stride}, padding {padding}) adds a partial window mpscy's pooling "
                                   "(floor mode) does not have")
    return r.layer(_layer_class(cls_name), args[:1], pool_size=k, stride=stride, padding=padding, **extra)


@_set("MaxPool")
def _maxpool(r, node, args, attrs):
    if len(node.output) > 1 and node.output[1]:
        raise UnsupportedError(f"MaxPool {_shown(node)} with an indices output is not supported")
    return _pool(r, node, args, attrs, "MaxPool2D")


@_set("AveragePool")
def _avgpool(r, node, args, attrs):
    return _pool(r, node, args, attrs, "AvgPool2D", count_include_pad=bool(attrs.get("count_include_pad", 0)))


@_set("GlobalAveragePool")
def _gap(r, node, args, attrs):
    out = r.layer(_layer_class("GlobalAvgPool2D"), args[:1])
    out.squeezed = True    # ONNX's result is (N, C, 1, 1); mpscy's is (N, C)
    return out


@_set("Resize")
def _resize(r, node, args, attrs):
    """Resizing of an (N, C, H, W) image over its two spatial axes (mpscy.layers.Upsample):
    - mode "nearest" by whole factors (scales [1, 1, sh, sw], or sizes that are such multiples), in a
      coordinate mode under which that repeats each pixel: torch's asymmetric with floor (its
      Upsample(mode="nearest") export), or half_pixel (pytorch_half_pixel) with either round (each
      output falls strictly within its pixel);
    - mode "linear" to any size, as torch's bilinear from the sizes: half_pixel (pytorch_half_pixel
      where no output side is 1) is align_corners=False, align_corners is align_corners=True."""
    mode = _text(attrs, "mode", "nearest")
    coord = _text(attrs, "coordinate_transformation_mode", "half_pixel")
    rounding = _text(attrs, "nearest_mode", "round_prefer_floor")
    x = args[0]
    shape = _onnx_shape(r, x)
    if len(shape) != 4 or getattr(x, "squeezed", False):
        raise UnsupportedError(f"Resize {_shown(node)} of a rank-{len(shape)} value is not supported (only an "
                               "(N, C, H, W) image)")
    if mode not in ("nearest", "linear"):
        raise UnsupportedError(f"Resize {_shown(node)} with mode={mode!r} is not supported: only 'nearest' and "
                               "'linear' (mpscy.layers.Upsample, mode 'nearest' and 'bilinear')")
    axes = attrs.get("axes")
    if axes is not None and [int(a) % 4 for a in axes] != [0, 1, 2, 3]:
        raise UnsupportedError(f"Resize {_shown(node)} with axes={list(axes)} is not supported: only the scales or "
                               "sizes of all four axes in order")
    policy = _text(attrs, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        raise UnsupportedError(f"Resize {_shown(node)} with keep_aspect_ratio_policy={policy!r} is not supported: "
                               "only 'stretch' (the sizes as given)")
    scales = sizes = None
    if len(node.input) > 2 and node.input[2]:
        scales = np.asarray(r.const_of(node.input[2], node), np.float64).reshape(-1)
    if len(node.input) > 3 and node.input[3]:   # constant, or Shape(x)[0:2] joined to (H, W) as torch writes
        v = r.get(node.input[3])
        sizes = v.items if isinstance(v, ShapeVec) else np.asarray(r.const_of(node.input[3], node)).reshape(-1).tolist()
    h, w = shape[2], shape[3]
    if scales is not None and scales.size:
        factors = scales
    elif sizes is not None and len(sizes) == 4 and all(isinstance(v, (int, np.integer)) for v in sizes[1:]):
        # the batch entry, "N" or the batch the file was exported with, stays the engine's
        factors = np.array([1.0, sizes[1] / shape[1], sizes[2] / h, sizes[3] / w])
    else:
        raise UnsupportedError(f"Resize {_shown(node)} needs constant scales, or sizes of 4 values whose channels, "
                               "height and width are constants")
    if factors.size != 4 or factors[0] != 1 or factors[1] != 1:
        raise UnsupportedError(f"Resize {_shown(node)} by {factors.tolist()}: only the two spatial axes may be "
                               "resized (mpscy.layers.Upsample)")
    if mode == "linear":
        return _resize_linear(r, node, attrs, x, coord, factors, (h, w), None if scales is not None and scales.size
                              else (int(sizes[2]), int(sizes[3])))
    if any(f < 1 or f != int(f) for f in factors[2:]):
        raise UnsupportedError(f"Resize {_shown(node)} by {factors.tolist()}: only whole factors >= 1 of the two "
                               "spatial axes are supported in mode 'nearest' (mpscy.layers.Upsample)")
    sh, sw = int(factors[2]), int(factors[3])
    repeats = ((coord == "asymmetric" and rounding == "floor")
               or (coord in ("half_pixel", "pytorch_half_pixel") and rounding in ("round_prefer_floor",
                                                                                  "round_prefer_ceil"))
               or (sh == 1 and sw == 1))
    if not repeats:
        raise UnsupportedError(f"Resize {_shown(node)}: coordinate_transformation_mode={coord!r} with "
                               f"nearest_mode={rounding!r} does not repeat each pixel; only asymmetric with floor "
                               "(torch's Upsample export) or half_pixel with round_prefer_floor/ceil are supported")
    return r.layer(_layer_class("Upsample"), [x], scale_factor=(sh, sw))


def _resize_linear(r, node, attrs, x, coord, factors, hw, sizes):
    """Resize's mode "linear" as Upsample(mode="bilinear"): the output size from `sizes`, or from
    the scales as ONNX takes it, floor(side * scale) in float32; ONNX then interpolates by 1 /
    scale (half_pixel), and mpscy by the sides' ratio, so a scale is taken where the two agree to
    float32 rounding (a whole factor; 0.4 of 5), or with align_corners, where both take the sides'."""
    if sizes is None:
        out = [int(np.floor(np.float32(hw[k]) * np.float32(factors[2 + k]))) for k in (0, 1)]
        # align_corners interpolates by (in - 1) / (out - 1) whatever the scale: only the size matters
        if any(o < 1 or (coord != "align_corners" and abs(hw[k] / o * factors[2 + k] - 1) > 1e-6)
               for k, o in enumerate(out)):
            raise UnsupportedError(f"Resize {_shown(node)} by {factors.tolist()}: a linear resize whose scales are not "
                                   f"the ratio of the output's sides {tuple(out)} to the input's {hw} is not supported "
                                   "(ONNX interpolates by 1 / scale, mpscy's bilinear Upsample by the sides' ratio, as "
                                   "torch's does given sizes); sizes are")
        sizes = tuple(out)
    if coord not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise UnsupportedError(f"Resize {_shown(node)}: mode='linear' with coordinate_transformation_mode={coord!r} "
                               "is not supported; only half_pixel (torch's align_corners=False) and align_corners")
    if coord == "pytorch_half_pixel" and any(o == 1 and i != 1 for o, i in zip(sizes, hw)):
        raise UnsupportedError(f"Resize {_shown(node)}: pytorch_half_pixel to an output side of 1 reads the first "
                               "pixel, where torch's bilinear (and half_pixel) reads the middle; not supported")
    if int(attrs.get("antialias", 0)) and any(o < i for o, i in zip(sizes, hw)):
        raise UnsupportedError(f"Resize {_shown(node)} with antialias=1 shrinks (H, W) = {hw} to {sizes}: "
                               "antialiased downsampling is not supported")
    return r.layer(_layer_class("Upsample"), [x], size=sizes, mode="bilinear", align_corners=coord == "align_corners")


@_set("ReduceMean")
def _reduce_mean(r, node, args, attrs):
    """The mean over both spatial axes of an image, (N, C, H, W) -> (N, C[, 1, 1]): torch's
    x.mean((2, 3)) for global average pooling. Axes are an attribute up to opset 17 and an input
    from 18."""
    x = args[0]
    axes = attrs.get("axes")
    if len(node.input) > 1 and node.input[1]:
        axes = np.asarray(r.const_of(node.input[1], node)).reshape(-1).tolist()
    shape = _onnx_shape(r, x)
    rank = len(shape)
    if axes is not None:
        axes = sorted(int(a) + (rank if int(a) < 0 else 0) for a in axes)
    if rank != 4 or getattr(x, "squeezed", False) or axes != [2, 3]:
        raise UnsupportedError(f"ReduceMean {_shown(node)} over axes {axes} of a rank-{rank} value is not supported "
                               "(only over both spatial axes of an (N, C, H, W) image, as global average pooling; "
                               "a LayerNorm exported below opset 17 arrives as such ReduceMeans: export it with "
                               "opset_version=17 or later)")
    out = r.layer(_layer_class("GlobalAvgPool2D"), [x])
    out.squeezed = bool(attrs.get("keepdims", 1))  # (N, C, 1, 1) to ONNX when the axes are kept
    return out


def _non_affine(r, node, scale, bias, names):
    """Whether the node's layer had no weight and bias, given the identity scale and zero bias
    ONNX makes it carry (a file edited since keeps them, as an affine layer): named in the
    "mpscy.non_affine" metadata, or (`names`: the scale's and bias's value names) neither of them
    an initializer, which holds a torch model's parameters, but Constant nodes, as
    torch.onnx.export writes BatchNorm(affine=False)'s and LayerNorm(elementwise_affine=False)'s."""
    identity = bool(np.all(scale == 1)) and bool(np.all(bias == 0))
    constants = not any(n in r.initializers for n in names if n)
    return identity and (node.name in r.non_affine or constants)


@_set("BatchNormalization")
def _batchnorm(r, node, args, attrs):
    """torch's eval-mode export, or its training-mode one (training=TrainingMode.TRAINING, which
    keeps Dropout): the same layer, whose mode is the engine's (step: batch statistics; predict:
    the running ones, taken from the node's inputs); the node's running-statistics outputs are
    the layer's buffers, which nothing in the graph may read."""
    if attrs.get("training_mode", 0) and any(o in r.read_names for o in node.output[1:] if o):
        raise UnsupportedError(f"BatchNormalization {_shown(node)} in training mode: another node reads its running "
                               "statistics outputs, which are the layer's buffers here")
    scale, bias, mean, var = (np.asarray(r.const_of(n, node), np.float32) for n in node.input[1:5])
    affine = not _non_affine(r, node, scale, bias, node.input[1:3])
    params = {"weight": scale, "bias": bias} if affine else {}
    params.update(running_mean=mean, running_var=var)
    # ONNX's momentum is 1 - mpscy's (torch's), a float32: 1 - 0.9 comes back as 0.1
    return r.layer(_layer_class("BatchNorm"), args[:1], params, momentum=_f32_decimal(1.0 - attrs.get("momentum", 0.9)),
                   eps=attrs.get("epsilon", 1e-5), affine=affine)


@_set("LayerNormalization")
def _layernorm(r, node, args, attrs):
    shape = r.shape(args[0])
    axis = attrs.get("axis", -1)
    axis += len(shape) + 1 if axis < 0 else 0
    if axis < 1:
        raise UnsupportedError(f"LayerNormalization {_shown(node)} over the batch axis is not supported")
    normalized = tuple(shape[axis - 1:])
    scale = np.broadcast_to(np.asarray(r.const_of(node.input[1], node), np.float32), normalized)
    if len(args) > 2 and args[2] is not None:
        bias = np.broadcast_to(np.asarray(r.const_of(node.input[2], node), np.float32), normalized)
    else:
        bias = np.zeros(normalized, np.float32)
    affine = not _non_affine(r, node, scale, bias, node.input[1:3])
    params = {"weight": scale, "bias": bias} if affine else {}
    return r.layer(_layer_class("LayerNorm"), args[:1], params, normalized_shape=normalized,
                   eps=attrs.get("epsilon", 1e-5), elementwise_affine=affine)
