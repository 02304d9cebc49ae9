"""Layer specifications. A layer here holds options only: it infers its output shape, names and
initializes its parameters (PyTorch's default initializers, from the engine's seeded generator)
and describes itself to the native graph builder. All computation happens in the backend.

Shapes are per sample (batch excluded) and follow PyTorch/ONNX layouts: images are (C, H, W),
Dense weights (out, in), Conv2D weights (out_c, in_c / groups, kh, kw)."""

import math

import numpy as np

from .errors import InvalidArgumentError, ShapeError

__all__ = [
    "Layer", "Dense", "ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Swish", "SiLU", "GELU",
    "Softmax", "Flatten", "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D", "BatchNorm",
    "LayerNorm", "Dropout", "Add", "Concatenate",
]


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidArgumentError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


class Layer:
    """Base class. Subclasses set `kind` (the native layer kind) and `prefix` (default names)."""

    kind = None
    prefix = "layer"
    n_inputs = 1

    def __init__(self, name=None):
        if name is not None and (not isinstance(name, str) or not name or len(name.encode()) > 40
                                 or "." in name):
            raise InvalidArgumentError(f"layer name must be a non-empty string of at most 40 bytes "
                                       f"without '.', got {name!r}")
        self.name = name
        self._called = False

    # -- what subclasses override ------------------------------------------------------
    def output_shape(self, input_shapes):
        """Per-sample output shape from the per-sample input shapes (a list)."""
        return tuple(input_shapes[0])

    def parameters(self, input_shapes):
        """[(suffix, shape)] of trainable parameters then buffers, in native order."""
        return []

    def init(self, input_shapes, rng):
        """{suffix: float32 array}: PyTorch's default initialization of every parameter."""
        return {}

    def native(self, input_shapes):
        """Options for the native descriptor: dict(flags=[...], ints=[...], reals=[...])."""
        return {}

    def config(self):
        """Constructor arguments, for summaries and checkpoints."""
        return {}

    # -- functional API ----------------------------------------------------------------
    def __call__(self, *inputs):
        from .model import Tensor
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise InvalidArgumentError(f"{type(self).__name__} must be called on mpscy tensors "
                                       "(from mpscy.Input or another layer)")
        if self.n_inputs is not None and len(inputs) != self.n_inputs:
            raise InvalidArgumentError(f"{type(self).__name__} takes {self.n_inputs} input(s), got {len(inputs)}")
        if self._called:
            raise InvalidArgumentError(f"layer {self.name or type(self).__name__} was already called; "
                                       "create a new layer object (weight sharing is not supported)")
        shape = self.output_shape([t.shape for t in inputs])
        self._called = True
        return Tensor(shape, layer=self, inputs=inputs)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def kaiming_uniform(rng, shape, fan_in):
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)), the default of Linear and Conv weights:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Dense(Layer):
    """Fully connected layer, y = x W^T + b (torch.nn.Linear). Inputs of higher rank are
    flattened row-major. Weight (units, in_features), bias (units)."""

    kind = "dense"
    prefix = "dense"

    def __init__(self, units, bias=True, name=None):
        super().__init__(name)
        self.units = _positive_int(units, "Dense units")
        self.bias = bool(bias)

    def output_shape(self, input_shapes):
        return (self.units,)

    def parameters(self, input_shapes):
        fan_in = _size(input_shapes[0])
        p = [("weight", (self.units, fan_in))]
        if self.bias:
            p.append(("bias", (self.units,)))
        return p

    def init(self, input_shapes, rng):
        fan_in = _size(input_shapes[0])
        out = {"weight": kaiming_uniform(rng, (self.units, fan_in), fan_in)}
        if self.bias:
            out["bias"] = kaiming_uniform(rng, (self.units,), fan_in)
        return out

    def native(self, input_shapes):
        return {"flags": ["bias"] if self.bias else [], "ints": [self.units]}

    def config(self):
        return {"units": self.units, "bias": self.bias}


class _Activation(Layer):
    def output_shape(self, input_shapes):
        return tuple(input_shapes[0])


class ReLU(_Activation):
    """max(x, 0)."""
    kind = "relu"
    prefix = "relu"


class LeakyReLU(_Activation):
    """x if x > 0 else negative_slope * x."""
    kind = "leakyrelu"
    prefix = "leaky_relu"

    def __init__(self, negative_slope=0.01, name=None):
        super().__init__(name)
        self.negative_slope = float(negative_slope)

    def native(self, input_shapes):
        return {"reals": [self.negative_slope]}

    def config(self):
        return {"negative_slope": self.negative_slope}


class ELU(_Activation):
    """x if x > 0 else alpha * (exp(x) - 1)."""
    kind = "elu"
    prefix = "elu"

    def __init__(self, alpha=1.0, name=None):
        super().__init__(name)
        self.alpha = float(alpha)

    def native(self, input_shapes):
        return {"reals": [self.alpha]}

    def config(self):
        return {"alpha": self.alpha}


class Sigmoid(_Activation):
    """1 / (1 + exp(-x))."""
    kind = "sigmoid"
    prefix = "sigmoid"


class Tanh(_Activation):
    """tanh(x)."""
    kind = "tanh"
    prefix = "tanh"


class Swish(_Activation):
    """x * sigmoid(x) (torch.nn.SiLU)."""
    kind = "swish"
    prefix = "swish"


SiLU = Swish


class GELU(_Activation):
    """x * Phi(x); approximate="tanh" uses PyTorch's tanh approximation."""
    kind = "gelu"
    prefix = "gelu"

    def __init__(self, approximate="none", name=None):
        super().__init__(name)
        if approximate not in ("none", "tanh"):
            raise InvalidArgumentError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def native(self, input_shapes):
        return {"ints": [1 if self.approximate == "tanh" else 0]}

    def config(self):
        return {"approximate": self.approximate}


class Softmax(_Activation):
    """Softmax over `axis` of the per-sample shape (-1: the last axis), as torch.softmax."""
    kind = "softmax"
    prefix = "softmax"

    def __init__(self, axis=-1, name=None):
        super().__init__(name)
        self.axis = int(axis)

    def _axis(self, shape):
        rank = len(shape)
        ax = self.axis
        if ax < 0:
            ax += rank + 1  # axis counts the batch dimension, as in Keras: -1 is the last
            ax -= 1
        else:
            ax -= 1
        if not 0 <= ax < rank:
            raise ShapeError(f"Softmax axis {self.axis} is out of range for input shape (n, {', '.join(map(str, shape))})")
        return ax

    def output_shape(self, input_shapes):
        self._axis(input_shapes[0])
        return tuple(input_shapes[0])

    def native(self, input_shapes):
        return {"ints": [self._axis(input_shapes[0])]}

    def config(self):
        return {"axis": self.axis}


class Flatten(Layer):
    """(n, d1, d2, ...) -> (n, d1 * d2 * ...), row-major."""
    kind = "flatten"
    prefix = "flatten"

    def output_shape(self, input_shapes):
        return (_size(input_shapes[0]),)


# ------------------------------------------------------------------ convolution and pooling

def _pair(value, what, minimum=1):
    """An int or a pair of ints, each >= minimum, as a tuple (h, w)."""
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = None
    if (pair is None or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in pair)):
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _padding_arg(padding):
    """Checks a padding option: "same", "valid", an int >= 0 or a pair of them."""
    if isinstance(padding, str):
        if padding.lower() not in ("same", "valid"):
            raise InvalidArgumentError(f"padding must be 'same', 'valid', an integer or a pair, got {padding!r}")
        return padding.lower()
    return _pair(padding, "padding", minimum=0)


def _resolve_padding(padding, kernel, stride, dilation, hw, what):
    """Symmetric (ph, pw). "same" keeps ceil(in / stride) outputs, as Keras, where that needs
    the same padding on both sides; otherwise it is refused with the explicit padding to use."""
    if padding == "valid":
        return 0, 0
    if padding != "same":
        return padding
    pads = []
    for k, s, d, n, axis in zip(kernel, stride, dilation, hw, ("height", "width")):
        out = -(-n // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
        if total % 2:
            raise InvalidArgumentError(
                f"{what} padding='same' needs {total} rows of padding along {axis} (input {n}, kernel {k}, "
                f"stride {s}), which cannot be split evenly; pass an explicit padding such as "
                f"padding={(d * (k - 1)) // 2}")
        pads.append(total // 2)
    return tuple(pads)


def _image(shape, what):
    if len(shape) != 3:
        raise ShapeError(f"{what} needs (C, H, W) inputs per sample (NCHW batches), got per-sample shape "
                         f"{tuple(shape)}")
    return tuple(int(s) for s in shape)


def _window_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class Conv2D(Layer):
    """2-D convolution over (C, H, W) inputs (torch.nn.Conv2d): weight (filters, C / groups,
    kh, kw), bias (filters). kernel_size, stride, dilation: an int or (h, w); padding: an int,
    (ph, pw), "valid" (0) or "same" (output ceil(in / stride), when it pads both sides alike)."""

    kind = "conv2d"
    prefix = "conv2d"

    def __init__(self, filters, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, name=None):
        super().__init__(name)
        self.filters = _positive_int(filters, "Conv2D filters")
        self.kernel_size = _pair(kernel_size, "Conv2D kernel_size")
        self.stride = _pair(stride, "Conv2D stride")
        self.padding = _padding_arg(padding)
        self.dilation = _pair(dilation, "Conv2D dilation")
        self.groups = _positive_int(groups, "Conv2D groups")
        self.bias = bool(bias)
        if self.filters % self.groups:
            raise InvalidArgumentError(f"Conv2D filters {self.filters} must be divisible by groups {self.groups}")

    def _pads(self, shape):
        return _resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation, shape[1:], "Conv2D")

    def output_shape(self, input_shapes):
        c, h, w = _image(input_shapes[0], "Conv2D")
        if c % self.groups:
            raise ShapeError(f"Conv2D groups {self.groups} must divide the {c} input channels")
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph, pw = self._pads(input_shapes[0])
        oh, ow = _window_out(h, kh, sh, ph, dh), _window_out(w, kw, sw, pw, dw)
        if oh <= 0 or ow <= 0:
            raise ShapeError(f"Conv2D input (C, H, W) = {(c, h, w)} is smaller than its dilated kernel "
                             f"{(dh * (kh - 1) + 1, dw * (kw - 1) + 1)} with padding {(ph, pw)}")
        return (self.filters, oh, ow)

    def _fan_in(self, shape):
        return shape[0] // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def parameters(self, input_shapes):
        c = input_shapes[0][0]
        p = [("weight", (self.filters, c // self.groups) + self.kernel_size)]
        if self.bias:
            p.append(("bias", (self.filters,)))
        return p

    def init(self, input_shapes, rng):
        fan_in = self._fan_in(input_shapes[0])
        c = input_shapes[0][0]
        out = {"weight": kaiming_uniform(rng, (self.filters, c // self.groups) + self.kernel_size, fan_in)}
        if self.bias:
            out["bias"] = kaiming_uniform(rng, (self.filters,), fan_in)
        return out

    def native(self, input_shapes):
        ph, pw = self._pads(input_shapes[0])
        return {"flags": ["bias"] if self.bias else [],
                "ints": [self.filters, *self.kernel_size, *self.stride, ph, pw, *self.dilation, self.groups]}

    def config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups, "bias": self.bias}


class _Pool2D(Layer):
    def __init__(self, pool_size, stride=None, padding=0, name=None):
        super().__init__(name)
        what = type(self).__name__
        self.pool_size = _pair(pool_size, f"{what} pool_size")
        self.stride = self.pool_size if stride is None else _pair(stride, f"{what} stride")
        self.padding = _padding_arg(padding)
        if isinstance(self.padding, tuple) and any(2 * p > k for p, k in zip(self.padding, self.pool_size)):
            raise InvalidArgumentError(f"{what} padding {self.padding} must be at most half the pool size "
                                       f"{self.pool_size}")

    def _pads(self, shape):
        what = type(self).__name__
        pads = _resolve_padding(self.padding, self.pool_size, self.stride, (1, 1), shape[1:], what)
        if any(2 * p > k for p, k in zip(pads, self.pool_size)):
            raise InvalidArgumentError(f"{what} padding='same' needs padding {pads}, more than half the pool "
                                       f"size {self.pool_size}")
        return pads

    def output_shape(self, input_shapes):
        c, h, w = _image(input_shapes[0], type(self).__name__)
        ph, pw = self._pads(input_shapes[0])
        oh = _window_out(h, self.pool_size[0], self.stride[0], ph)
        ow = _window_out(w, self.pool_size[1], self.stride[1], pw)
        if oh <= 0 or ow <= 0:
            raise ShapeError(f"{type(self).__name__} input (C, H, W) = {(c, h, w)} is smaller than the pool "
                             f"window {self.pool_size}")
        return (c, oh, ow)

    def native(self, input_shapes):
        return {"ints": [*self.pool_size, *self.stride, *self._pads(input_shapes[0])]}

    def config(self):
        return {"pool_size": self.pool_size, "stride": self.stride, "padding": self.padding}


class MaxPool2D(_Pool2D):
    """Max pooling over (C, H, W) (torch.nn.MaxPool2d, floor mode): stride defaults to
    pool_size; padding (at most half the window) counts as -inf."""
    kind = "maxpool2d"
    prefix = "maxpool2d"


class AvgPool2D(_Pool2D):
    """Average pooling over (C, H, W) (torch.nn.AvgPool2d, floor mode). With
    count_include_pad=True (PyTorch's default) padded zeros count in the divisor."""
    kind = "avgpool2d"
    prefix = "avgpool2d"

    def __init__(self, pool_size, stride=None, padding=0, count_include_pad=True, name=None):
        super().__init__(pool_size, stride, padding, name)
        self.count_include_pad = bool(count_include_pad)

    def native(self, input_shapes):
        d = super().native(input_shapes)
        d["ints"].append(1 if self.count_include_pad else 0)
        return d

    def config(self):
        return {**super().config(), "count_include_pad": self.count_include_pad}


class GlobalAvgPool2D(Layer):
    """Mean over H and W: (C, H, W) -> (C,), as Keras's, so it feeds Dense or Concatenate."""
    kind = "globalavgpool2d"
    prefix = "global_avgpool2d"

    def output_shape(self, input_shapes):
        c, _, _ = _image(input_shapes[0], "GlobalAvgPool2D")
        return (c,)


# ------------------------------------------------------------------ normalization and dropout

def _real(value, what, low, high, low_open=False, high_open=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}") from None
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidArgumentError(f"{what} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


class BatchNorm(Layer):
    """Batch normalization over features ((F,) inputs) or channels ((C, H, W) inputs), as
    torch.nn.BatchNorm1d/2d. Train mode (`step`) normalizes with the batch statistics and then
    updates running_mean/running_var (unbiased variance, running = (1 - momentum) running +
    momentum batch); eval mode (`predict`, `evaluate`) uses the running statistics.
    Parameters weight, bias (when affine); buffers running_mean, running_var."""

    kind = "batchnorm"
    prefix = "batchnorm"

    def __init__(self, momentum=0.1, eps=1e-5, affine=True, name=None):
        super().__init__(name)
        self.momentum = _real(momentum, "BatchNorm momentum", 0.0, 1.0)
        self.eps = _real(eps, "BatchNorm eps", 0.0, math.inf, low_open=True, high_open=True)
        self.affine = bool(affine)

    def output_shape(self, input_shapes):
        shape = tuple(input_shapes[0])
        if len(shape) not in (1, 3):
            raise ShapeError(f"BatchNorm needs (F,) or (C, H, W) inputs per sample, got {shape}")
        return shape

    def values_per_channel(self, input_shapes):
        """Values one sample adds to each channel's statistics (H*W, or 1 for features)."""
        shape = input_shapes[0]
        return 1 if len(shape) == 1 else shape[1] * shape[2]

    def parameters(self, input_shapes):
        c = (input_shapes[0][0],)
        p = [("weight", c), ("bias", c)] if self.affine else []
        return p + [("running_mean", c), ("running_var", c)]

    def init(self, input_shapes, rng):
        c = input_shapes[0][0]
        out = {"weight": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)} if self.affine else {}
        out.update(running_mean=np.zeros(c, np.float32), running_var=np.ones(c, np.float32))
        return out

    def native(self, input_shapes):
        return {"flags": ["affine"] if self.affine else [], "reals": [self.momentum, self.eps]}

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps, "affine": self.affine}


class LayerNorm(Layer):
    """Layer normalization over the trailing `normalized_shape` dims of each sample
    (torch.nn.LayerNorm); weight and bias shaped normalized_shape when elementwise_affine."""

    kind = "layernorm"
    prefix = "layernorm"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, name=None):
        super().__init__(name)
        if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
            normalized_shape = (normalized_shape,)
        try:
            shape = tuple(normalized_shape)
        except TypeError:
            shape = ()
        if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
            raise InvalidArgumentError(f"LayerNorm normalized_shape must be a positive integer or a tuple of "
                                       f"them, got {normalized_shape!r}")
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = _real(eps, "LayerNorm eps", 0.0, math.inf, low_open=True, high_open=True)
        self.elementwise_affine = bool(elementwise_affine)

    def output_shape(self, input_shapes):
        shape, k = tuple(input_shapes[0]), len(self.normalized_shape)
        if shape[len(shape) - k:] != self.normalized_shape or k > len(shape):
            raise ShapeError(f"LayerNorm normalized_shape {self.normalized_shape} must equal the trailing dims "
                             f"of the per-sample input shape {shape}")
        return shape

    def parameters(self, input_shapes):
        return [("weight", self.normalized_shape), ("bias", self.normalized_shape)] if self.elementwise_affine else []

    def init(self, input_shapes, rng):
        if not self.elementwise_affine:
            return {}
        return {"weight": np.ones(self.normalized_shape, np.float32),
                "bias": np.zeros(self.normalized_shape, np.float32)}

    def native(self, input_shapes):
        return {"flags": ["affine"] if self.elementwise_affine else [], "ints": [len(self.normalized_shape)],
                "reals": [0.0, self.eps]}

    def config(self):
        return {"normalized_shape": self.normalized_shape, "eps": self.eps,
                "elementwise_affine": self.elementwise_affine}


class Dropout(_Activation):
    """Inverted dropout: in train mode each element is zeroed with probability `rate` and the
    kept ones are scaled by 1 / (1 - rate); identity in eval mode. Masks come from the engine's
    seed and step counter (the same on every backend)."""

    kind = "dropout"
    prefix = "dropout"

    def __init__(self, rate, name=None):
        super().__init__(name)
        self.rate = _real(rate, "Dropout rate", 0.0, 1.0, high_open=True)

    def native(self, input_shapes):
        return {"reals": [self.rate]}

    def config(self):
        return {"rate": self.rate}


# ------------------------------------------------------------------ merging branches

class Add(Layer):
    """Element-wise sum of two or more tensors of the same shape: ``Add()([a, b])``."""

    kind = "add"
    prefix = "add"
    n_inputs = None

    def output_shape(self, input_shapes):
        if len(input_shapes) < 2:
            raise InvalidArgumentError(f"Add needs at least 2 inputs, got {len(input_shapes)}")
        if len(input_shapes) > 8:
            raise InvalidArgumentError(f"Add takes at most 8 inputs, got {len(input_shapes)}")
        first = tuple(input_shapes[0])
        for k, s in enumerate(input_shapes[1:], 1):
            if tuple(s) != first:
                raise ShapeError(f"Add input {k} has per-sample shape {tuple(s)}, input 0 has {first}")
        return first


class Concatenate(Layer):
    """Joins tensors along `axis`, counted with the batch as axis 0 (Keras's convention):
    axis=1 is the channel axis of (C, H, W) images, -1 the last axis. Other dims must agree."""

    kind = "concat"
    prefix = "concatenate"
    n_inputs = None

    def __init__(self, axis=1, name=None):
        super().__init__(name)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise InvalidArgumentError(f"Concatenate axis must be an integer, got {axis!r}")
        self.axis = int(axis)

    def _axis(self, rank):
        ax = self.axis + rank + 1 if self.axis < 0 else self.axis
        if not 1 <= ax <= rank:
            raise ShapeError(f"Concatenate axis {self.axis} is out of range for per-sample rank {rank} "
                             "(axis 0 is the batch)")
        return ax - 1

    def output_shape(self, input_shapes):
        if not 1 <= len(input_shapes) <= 8:
            raise InvalidArgumentError(f"Concatenate takes 1 to 8 inputs, got {len(input_shapes)}")
        first = tuple(input_shapes[0])
        ax = self._axis(len(first))
        out = list(first)
        for k, s in enumerate(input_shapes[1:], 1):
            s = tuple(s)
            if len(s) != len(first) or any(a != b for d, (a, b) in enumerate(zip(s, first)) if d != ax):
                raise ShapeError(f"Concatenate input {k} has per-sample shape {s}, which differs from input 0 "
                                 f"{first} off the concatenation axis {self.axis}")
            out[ax] += s[ax]
        return tuple(out)

    def native(self, input_shapes):
        return {"ints": [self._axis(len(input_shapes[0]))]}

    def config(self):
        return {"axis": self.axis}
