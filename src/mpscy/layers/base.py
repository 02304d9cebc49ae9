"""The Layer base class, its shared option checks and PyTorch's default initializer, and the
layers without spatial structure: Dense, the element-wise activations, Softmax, Flatten and
Dropout. Options only; computation happens in the backend."""

import math
import weakref

import numpy as np

from .._checks import INT32_LIMIT, choice, finite, flag, float32, integer, node_name, number, positive_int, warn_user
from ..errors import InvalidArgumentError, ShapeError


# layer options travel in the native descriptor's int32 `ints`
_INT32_LIMIT = INT32_LIMIT
MAX_RANK = 6   # the native descriptor's per-sample rank (objc/mpscy.h MPSCY_MAX_RANK)
# layers that read (C, H, W)
_IMAGE_KINDS = ("conv2d", "convtranspose2d", "maxpool2d", "avgpool2d", "globalavgpool2d", "upsample2d")
_positive_int, _integer, _finite = positive_int, integer, finite


def _size(shape):
    return int(np.prod(shape, dtype=np.int64))


class Layer:
    """Base class. Subclasses set `kind` (the native layer kind) and `prefix` (default names)."""

    kind = None
    prefix = "layer"
    n_inputs = 1
    _trainable = True

    def __init__(self, name=None):
        self.name = node_name(name, "layer")
        self._called = False

    @property
    def trainable(self):
        """Whether an Engine trains this layer's parameters (Keras's ``layer.trainable``, torch's
        ``requires_grad``); True by default. Set it before building the Engine: an engine reads it
        when it is built, as Keras reads it at ``compile`` (a change while an engine built with
        this layer is open warns: build a new one). A frozen layer's parameters keep their
        values (no update, weight decay included); they get no gradient, no optimizer state and no
        share of the clipping norm, as torch's optimizers skip a parameter whose grad is None.
        Gradients still flow through a frozen layer to trainable layers before it; below the first
        trainable layer no backward runs. A frozen BatchNorm still updates its running statistics
        in train mode, as in torch (Keras runs a frozen BatchNorm in inference mode instead)."""
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentError(f"trainable must be True or False, got {value!r}")
        self._trainable = bool(value)
        stale = self._stale_in()
        if stale:
            warn_user(stale_trainable_message([stale], self._trainable))

    def _stale_in(self):
        """This layer's name in an open engine built with another `trainable`, else None."""
        for engine in list(self.__dict__.get("_engines", ())):
            built = engine._built_trainable(self)
            if built is not None and built != self._trainable:
                return engine._layer_name(self)
        return None

    def __getstate__(self):  # copies and pickles leave out the engines built with the layer
        state = self.__dict__.copy()
        state.pop("_engines", None)
        return state

    def _built_into(self, engine):
        """Notes an engine built with this layer, so that changing `trainable` can warn."""
        self.__dict__.setdefault("_engines", weakref.WeakSet()).add(engine)

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

    def window_width(self, input_shape):
        """For a layer that reads (C, H, W) images: how many columns one output reads or repeats
        (1 for a 1-D signal (C, L, 1) read through windows 1 wide, which is no channels-last image);
        None for the others."""
        return None

    # -- functional API ----------------------------------------------------------------
    def __call__(self, *inputs):
        from ..model import Tensor
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
        try:
            shape = self.output_shape([t.shape for t in inputs])
        except (ShapeError, InvalidArgumentError) as e:
            hint = ""
            root = inputs[0]   # the model input this image comes from, through the layers' first inputs
            while root.layer is not None and root.inputs:
                root = root.inputs[0]
            if isinstance(e, ShapeError) and self.kind in _IMAGE_KINDS and root.layer is None:
                from .conv import channels_last_hint  # late: conv imports this module
                hint = channels_last_hint(root.shape)  # the model's input may be Keras's (H, W, C)
            if not self.name and not hint:
                raise
            raise type(e)(f"{type(self).__name__} {self.name!r}: {e}{hint}" if self.name else f"{e}{hint}") from None
        self._called = True
        return Tensor(shape, layer=self, inputs=inputs)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def stale_trainable_message(names, value):
    """The warning for layers set to trainable=value after an open engine was built with them."""
    which = f"layer {names[0]!r} is" if len(names) == 1 else f"layers {', '.join(map(repr, names))} are"
    return (f"{which} now trainable={value}, but an open engine was built with trainable={not value} and keeps "
            "it: build a new Engine for the change to take effect (copy the weights with "
            "set_parameters(get_parameters()))")


def kaiming_uniform(rng, shape, fan_in):
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)), the default of Linear and Conv weights:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Dense(Layer):
    """Fully connected layer, y = x W^T + b (torch.nn.Linear). Inputs of higher rank are
    flattened row-major. Weight (units, in_features), bias (units). Keras's use_bias= is taken
    as bias=; activation= is not (a layer after it, as layers.ReLU())."""

    kind = "dense"
    prefix = "dense"

    def __init__(self, units, bias=None, name=None, *, use_bias=None, activation=None):
        if activation not in (None, "linear"):
            raise InvalidArgumentError(f"Dense activation={activation!r}: mpscy's layers compute one operation "
                                       f"each; add the activation layer after it (layers.ReLU() for 'relu')")
        if bias is not None and use_bias is not None:
            raise InvalidArgumentError("Dense got both bias= and Keras's use_bias=; give one")
        if use_bias is not None:
            bias = flag(use_bias, "Dense use_bias")  # not bias's nn.Linear hint, which reads a positional int
        bias = True if bias is None else bias
        super().__init__(name)
        self.units = _positive_int(units, "Dense units")
        self.bias = flag(bias, "Dense bias", hint=(
            f" (Dense({units}, {bias!r}) reads as torch's nn.Linear(in, out): the input size is inferred, so "
            f"nn.Linear(in, {bias!r}) is Dense({bias!r}))" if isinstance(bias, (int, np.integer)) and
            not isinstance(bias, (bool, np.bool_)) else ""))

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
    """x if x > 0 else negative_slope * x (torch's default 0.01; Keras 2's alpha= is taken for it)."""
    kind = "leakyrelu"
    prefix = "leaky_relu"

    def __init__(self, negative_slope=None, name=None, *, alpha=None):
        super().__init__(name)
        if negative_slope is not None and alpha is not None:
            raise InvalidArgumentError("LeakyReLU got both negative_slope= and Keras's alpha=; give one")
        slope = alpha if alpha is not None else 0.01 if negative_slope is None else negative_slope
        self.negative_slope = float32(slope, "LeakyReLU negative_slope")

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
        self.alpha = float32(alpha, "ELU alpha")

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


class ReLU6(_Activation):
    """min(max(x, 0), 6) (torch.nn.ReLU6; MobileNet's activation)."""
    kind = "relu6"
    prefix = "relu6"


class Hardsigmoid(_Activation):
    """min(max(x + 3, 0), 6) / 6 (torch.nn.Hardsigmoid; Keras 3's hard_sigmoid)."""
    kind = "hardsigmoid"
    prefix = "hardsigmoid"


class Hardswish(_Activation):
    """x * min(max(x + 3, 0), 6) / 6 (torch.nn.Hardswish; Keras's hard_silu, MobileNetV3's)."""
    kind = "hardswish"
    prefix = "hardswish"


HardSigmoid, HardSwish = Hardsigmoid, Hardswish


class Softplus(_Activation):
    """log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold (torch.nn.Softplus)."""
    kind = "softplus"
    prefix = "softplus"

    def __init__(self, beta=1.0, threshold=20.0, name=None):
        super().__init__(name)
        self.beta = _real(beta, "Softplus beta", 0.0, math.inf, low_open=True, high_open=True)
        self.threshold = _finite(threshold, "Softplus threshold")
        with np.errstate(over="ignore", divide="ignore"):  # the backends compute in float32: beta and 1 / beta
            b32, t32 = np.float32(self.beta), np.float32(self.threshold)  # must be normal floats there
            inv = np.float32(1.0) / b32
        if not (b32 >= np.finfo(np.float32).tiny and np.isfinite(b32) and np.isfinite(inv)):
            raise InvalidArgumentError(f"Softplus beta {beta!r} does not fit float32 as a normal number with a "
                                       "finite reciprocal")
        if not np.isfinite(t32):
            raise InvalidArgumentError(f"Softplus threshold {threshold!r} does not fit float32")

    def native(self, input_shapes):
        return {"reals": [self.beta, self.threshold]}

    def config(self):
        return {"beta": self.beta, "threshold": self.threshold}


class Mish(_Activation):
    """x * tanh(softplus(x)) (torch.nn.Mish)."""
    kind = "mish"
    prefix = "mish"


class GELU(_Activation):
    """x * Phi(x); approximate="tanh" uses PyTorch's tanh approximation."""
    kind = "gelu"
    prefix = "gelu"

    def __init__(self, approximate="none", name=None):
        super().__init__(name)
        self.approximate = choice(approximate, ("none", "tanh"), "GELU approximate")

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
        self.axis = _integer(axis, "Softmax axis")

    def _axis(self, shape):
        rank = len(shape)
        ax = self.axis
        if ax < 0:
            ax += rank + 1  # axis counts the batch dimension, as in Keras: -1 is the last
            ax -= 1
        else:
            ax -= 1
        full = f"(n, {', '.join(map(str, shape))})"
        if ax == -1 and self.axis in (0, -rank - 1):
            raise ShapeError(f"Softmax axis {self.axis} is the batch axis of input shape {full}: axes count it (as "
                             f"torch's dim= and Keras's axis=), so a sample's first dimension (the classes of a (C, H, W) "
                             "segmentation output) is axis 1")
        if not 0 <= ax < rank:
            raise ShapeError(f"Softmax axis {self.axis} is out of range for input shape {full}")
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


class Reshape(Layer):
    """(n, *input shape) -> (n, *target_shape), the same elements row-major (Keras's Reshape; torch's
    x.view(n, ...)): target_shape per sample, a tuple of positive ints, one of which may be -1
    (inferred from the others), as a generator's Dense(C * H * W) becomes Reshape((C, H, W))."""
    kind = "flatten"   # the native Flatten with a target shape: the same bytes either way
    prefix = "reshape"

    def __init__(self, target_shape, name=None):
        super().__init__(name)
        shape = (target_shape,) if isinstance(target_shape, (int, np.integer)) else target_shape
        try:
            shape = tuple(shape)
        except TypeError:
            shape = None
        ok = shape is not None and 1 <= len(shape) <= MAX_RANK and all(
            not isinstance(v, bool) and isinstance(v, (int, np.integer)) and (v == -1 or 1 <= v < _INT32_LIMIT)
            for v in shape)
        if not ok or sum(v == -1 for v in shape) > 1:
            raise InvalidArgumentError(f"{type(self).__name__} target_shape must be 1 to {MAX_RANK} positive ints "
                                       f"(at most one of them -1) per sample, without the batch, got {target_shape!r}")
        self.target_shape = tuple(int(v) for v in shape)

    def _resolved(self, input_shape):
        total, known = _size(input_shape), int(np.prod([v for v in self.target_shape if v != -1]))
        if -1 in self.target_shape and known and total % known == 0 and total // known < _INT32_LIMIT:
            return tuple(total // known if v == -1 else v for v in self.target_shape)
        if -1 not in self.target_shape and known == total:
            return self.target_shape
        raise ShapeError(f"{type(self).__name__} cannot reshape a per-sample input of shape {tuple(input_shape)} "
                         f"({total} elements) to {self.target_shape} (each dimension below 2**31)")

    def output_shape(self, input_shapes):
        return self._resolved(input_shapes[0])

    def native(self, input_shapes):
        shape = self._resolved(input_shapes[0])
        return {"ints": [len(shape), *shape]}

    def config(self):
        return {"target_shape": self.target_shape}


class Unflatten(Reshape):
    """torch's nn.Unflatten(dim, unflattened_size): axis `dim` of the batched tensor (1 is the
    first per-sample axis; negative counts from the end) split into unflattened_size (one entry
    may be -1), as nn.Unflatten(1, (C, H, W)) after a Linear."""
    prefix = "unflatten"

    def __init__(self, dim, unflattened_size, name=None):
        Reshape.__init__(self, unflattened_size, name=name)   # checks the sizes
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim == 0:
            raise InvalidArgumentError(f"Unflatten dim must be a nonzero int (0 is the batch), got {dim!r}")
        self.dim, self.unflattened_size = int(dim), self.target_shape

    def _resolved(self, input_shape):
        rank = len(input_shape)
        axis = self.dim - 1 if self.dim > 0 else rank + 1 + self.dim - 1
        if not 0 <= axis < rank:
            raise ShapeError(f"Unflatten dim {self.dim} is outside a per-sample input of shape {tuple(input_shape)} "
                             f"(batched, dims 1..{rank} or -{rank}..-1)")
        size = input_shape[axis]
        known = int(np.prod([v for v in self.unflattened_size if v != -1]))
        if (-1 in self.unflattened_size and (not known or size % known)) or (
                -1 not in self.unflattened_size and known != size):
            raise ShapeError(f"Unflatten cannot split dim {self.dim} of size {size} into {self.unflattened_size}")
        parts = tuple(size // known if v == -1 else v for v in self.unflattened_size)
        if max(parts) >= _INT32_LIMIT:
            raise ShapeError(f"Unflatten of dim {self.dim} (size {size}) into {self.unflattened_size} gives {parts}: "
                             f"each dimension must be below 2**31")
        out = tuple(input_shape[:axis]) + parts + tuple(input_shape[axis + 1:])
        if len(out) > MAX_RANK:
            raise ShapeError(f"Unflatten gives rank {len(out)} per sample; at most {MAX_RANK}")
        return out

    def config(self):
        return {"dim": self.dim, "unflattened_size": self.unflattened_size}


_KERAS_ACTIVATIONS = {   # Keras 3's activation names: the layer, and its options where Keras's differ from ours
    "relu": (ReLU, {}), "sigmoid": (Sigmoid, {}), "tanh": (Tanh, {}), "softmax": (Softmax, {}),
    "gelu": (GELU, {}), "swish": (Swish, {}), "silu": (Swish, {}), "elu": (ELU, {}), "softplus": (Softplus, {}),
    "mish": (Mish, {}), "relu6": (ReLU6, {}), "hard_sigmoid": (Hardsigmoid, {}), "hard_swish": (Hardswish, {}),
    "hard_silu": (Hardswish, {}), "leaky_relu": (LeakyReLU, {"negative_slope": 0.2}),
}


def Activation(activation, name=None):
    """Keras's Activation("relu") and the rest of Keras 3's names: the layer that computes it
    (ReLU(), ...), with Keras's defaults where they differ ("leaky_relu": slope 0.2; "gelu" exact;
    "hard_sigmoid" relu6(x + 3) / 6, as Keras 3 and torch)."""
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in _KERAS_ACTIVATIONS:
        extra = " ('linear' is no layer at all: leave it out)" if key == "linear" else ""
        raise InvalidArgumentError(f"Activation {activation!r} is not available{extra}: one of "
                                   f"{', '.join(sorted(_KERAS_ACTIVATIONS))}")
    cls, kw = _KERAS_ACTIVATIONS[key]
    return cls(name=name, **kw)


def _real(value, what, low, high, low_open=False, high_open=False):
    """float(value) within the bounds, or InvalidArgumentError naming `what`: every bounded float
    option of a layer goes through here (unbounded ones through _checks.finite)."""
    v = number(value, what)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidArgumentError(f"{what} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


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
