"""Convolution, pooling and upsampling over (C, H, W) images (NCHW batches): Conv2D,
ConvTranspose2D, MaxPool2D, AvgPool2D, GlobalAvgPool2D and Upsample, with Keras's names for
some of them (MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, UpSampling2D); their option
checks, padding ("valid", "same" or explicit) and PyTorch's floor-mode shape rules. Options only;
computation happens in the backend."""

import numpy as np

from ..errors import InvalidArgumentError, ShapeError
from .._checks import flag
from .base import _INT32_LIMIT, Layer, _positive_int, kaiming_uniform


def _pair(value, what, minimum=1):
    """An int or a pair of ints, each >= minimum and below 2**31 (the descriptor's int32), as a
    tuple (h, w)."""
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = None
    if (pair is None or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not minimum <= v < _INT32_LIMIT
                   for v in pair)):
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum} and below 2**31 or a pair of them, "
                                   f"got {value!r}")
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
            lo = total // 2
            outs = {p: (n + 2 * p - d * (k - 1) - 1) // s + 1 for p in (lo, lo + 1)}
            fits = [p for p, o in outs.items() if o == out]
            if fits:  # stride > 1: one more row on each side still gives `out` outputs, aligned differently
                advice = (f"padding={fits[0]} on both sides gives the same {out} outputs, one row off Keras's "
                          f"(which pads {lo} before and {lo + 1} after): pass it if that is what you want")
            else:
                advice = (f"no padding on both sides alike gives {out} outputs (padding={lo} gives {outs[lo]}, "
                          f"padding={lo + 1} gives {outs[lo + 1]})")
            raise InvalidArgumentError(
                f"{what} padding='same' needs {total} row{'s' if total != 1 else ''} of padding along {axis} (input {n}, kernel {k}, "
                f"stride {s}), which cannot be split evenly: {advice}")
        pads.append(total // 2)
    return tuple(pads)


def channels_last_hint(shape, least=5):
    """A hint when a per-sample image shape looks like Keras's channels-last (H, W, C): 1, 3 or 4
    last, the other two at least `least`; else "". For a layer that reads a model input (Layer's
    shape errors, Model's warning); a feature map deeper in may have any shape."""
    if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] >= least and shape[1] >= least:
        return (f" ({tuple(shape)} looks like a channels-last (H, W, C) image: mpscy's images are (C, H, W), "
                f"input_shape={(shape[2], shape[0], shape[1])}, batches NCHW: np.ascontiguousarray(x.transpose(0, 3, 1, 2)))")
    return ""


def _image(shape, what):
    if len(shape) != 3:
        raise ShapeError(f"{what} needs (C, H, W) inputs per sample (NCHW batches), got per-sample shape "
                         f"{tuple(shape)}")
    return tuple(int(s) for s in shape)


def _window_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class _Conv(Layer):
    """What Conv2D and ConvTranspose2D share: a weight of _weight_shape(C) and a bias of filters,
    both drawn as torch draws them, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = weight.size(1)
    x kh x kw (the input's channels per group for a convolution, its filters per group for a
    transposed one)."""

    def __init__(self, name, filters, kernel_size, stride, dilation, groups, bias):
        super().__init__(name)
        what = type(self).__name__
        self.filters = _positive_int(filters, f"{what} filters")
        self.kernel_size = _pair(kernel_size, f"{what} kernel_size")
        self.stride = _pair(stride, f"{what} stride")
        self.dilation = _pair(dilation, f"{what} dilation")
        self.groups = _positive_int(groups, f"{what} groups")
        self.bias = flag(bias, f"{what} bias")
        if self.filters % self.groups:
            raise InvalidArgumentError(f"{what} filters {self.filters} must be divisible by groups {self.groups}")

    def parameters(self, input_shapes):
        p = [("weight", self._weight_shape(input_shapes[0][0]))]
        if self.bias:
            p.append(("bias", (self.filters,)))
        return p

    def init(self, input_shapes, rng):
        shape = self._weight_shape(input_shapes[0][0])
        fan_in = shape[1] * shape[2] * shape[3]
        out = {"weight": kaiming_uniform(rng, shape, fan_in)}
        if self.bias:
            out["bias"] = kaiming_uniform(rng, (self.filters,), fan_in)
        return out

    def window_width(self, input_shape):
        return self.kernel_size[1]


def _keras_conv_args(what, given, keras):
    """torch's argument values with Keras's spellings (strides=, dilation_rate=, use_bias=) folded
    in: given {torch name: value or None}, keras {torch name: Keras value or None}; both of one
    pair is refused."""
    out = {}
    names = {"stride": "strides", "dilation": "dilation_rate", "bias": "use_bias"}
    for k, v in given.items():
        if keras.get(k) is not None and v is not None:
            raise InvalidArgumentError(f"{what} got both {k}= and Keras's {names[k]}=; give one")
        out[k] = keras[k] if keras.get(k) is not None else v
    return out


class Conv2D(_Conv):
    """2-D convolution over (C, H, W) inputs (torch.nn.Conv2d): weight (filters, C / groups,
    kh, kw), bias (filters). kernel_size, stride, dilation: an int or (h, w); padding: an int,
    (ph, pw), "valid" (0) or "same" (output ceil(in / stride), when it pads both sides alike).
    Keras's strides=, dilation_rate=, use_bias= and data_format="channels_first" are taken as
    those; activation= is not (a layer after it, as layers.ReLU())."""

    kind = "conv2d"
    prefix = "conv2d"

    def __init__(self, filters, kernel_size, stride=None, padding=0, dilation=None, groups=1, bias=None, name=None,
                 *, strides=None, dilation_rate=None, use_bias=None, data_format=None, activation=None):
        _keras_channels_first(data_format, "Conv2D")
        if activation not in (None, "linear"):
            raise InvalidArgumentError(f"Conv2D activation={activation!r}: mpscy's layers compute one operation "
                                       f"each; add the activation layer after it (layers.ReLU() for 'relu'; the "
                                       f"cpu and cuda backends run a ReLU that follows a Conv2D inside it)")
        args = _keras_conv_args("Conv2D", {"stride": stride, "dilation": dilation, "bias": bias},
                                {"stride": strides, "dilation": dilation_rate, "bias": use_bias})
        super().__init__(name, filters, kernel_size, 1 if args["stride"] is None else args["stride"],
                         1 if args["dilation"] is None else args["dilation"], groups,
                         True if args["bias"] is None else args["bias"])
        self.padding = _padding_arg(padding)

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

    def _weight_shape(self, c):
        return (self.filters, c // self.groups) + self.kernel_size

    def native(self, input_shapes):
        ph, pw = self._pads(input_shapes[0])
        return {"flags": ["bias"] if self.bias else [],
                "ints": [self.filters, *self.kernel_size, *self.stride, ph, pw, *self.dilation, self.groups]}

    def config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups, "bias": self.bias}


class ConvTranspose2D(_Conv):
    """2-D transposed convolution over (C, H, W) inputs (torch.nn.ConvTranspose2d, the gradient of
    a Conv2D with respect to its input; a decoder's learned upsampling): weight (C, filters /
    groups, kh, kw), bias (filters); output (filters, (H - 1) stride - 2 padding + dilation
    (kernel - 1) + output_padding + 1, likewise for W). kernel_size, stride, padding, dilation and
    output_padding: an int or (h, w); output_padding (extra rows or columns on one side, which
    make the output of a strided layer any size) must be below the stride or the dilation, as
    torch's. torch's arguments in torch's order, without in_channels (the input's): so
    ConvTranspose2D(64, 4, 2, 1) is torch's ConvTranspose2d(C, 64, 4, 2, 1)."""

    kind = "convtranspose2d"
    prefix = "convtranspose2d"

    def __init__(self, filters, kernel_size, stride=1, padding=0, output_padding=0, groups=1, bias=True, dilation=1,
                 name=None):
        super().__init__(name, filters, kernel_size, stride, dilation, groups, bias)
        if isinstance(padding, str):
            raise InvalidArgumentError(f"ConvTranspose2D padding must be an integer >= 0 or a pair of them, got "
                                       f"{padding!r} (as torch's ConvTranspose2d: padding p crops p rows from each "
                                       f"side of the full output)")
        self.padding = _pair(padding, "ConvTranspose2D padding", minimum=0)
        self.output_padding = _pair(output_padding, "ConvTranspose2D output_padding", minimum=0)
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise InvalidArgumentError(f"ConvTranspose2D output_padding {self.output_padding} must be smaller than the "
                                       f"stride {self.stride} or the dilation {self.dilation} (as torch's)")

    def output_shape(self, input_shapes):
        c, h, w = _image(input_shapes[0], "ConvTranspose2D")
        if c % self.groups:
            raise ShapeError(f"ConvTranspose2D groups {self.groups} must divide the {c} input channels")
        out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, d, op in
               zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation, self.output_padding)]
        if min(out) <= 0:
            raise ShapeError(f"ConvTranspose2D input (C, H, W) = {(c, h, w)} gives an output of {tuple(out)}: "
                             f"padding {self.padding} crops more than the full output")
        return (self.filters, *out)

    def _weight_shape(self, c):
        return (c, self.filters // self.groups) + self.kernel_size

    def native(self, input_shapes):
        return {"flags": ["bias"] if self.bias else [],
                "ints": [self.filters, *self.kernel_size, *self.stride, *self.padding, *self.dilation, self.groups,
                         *self.output_padding]}

    def config(self):
        return {"filters": self.filters, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "output_padding": self.output_padding, "groups": self.groups,
                "bias": self.bias, "dilation": self.dilation}

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

    def window_width(self, input_shape):
        return self.pool_size[1]


class MaxPool2D(_Pool2D):
    """Max pooling over (C, H, W) (torch.nn.MaxPool2d, floor mode): stride defaults to
    pool_size; padding (at most half the window) counts as -inf."""
    kind = "maxpool2d"
    prefix = "maxpool2d"


class AvgPool2D(_Pool2D):
    """Average pooling over (C, H, W) (torch.nn.AvgPool2d, floor mode). With
    count_include_pad=True (PyTorch's default) padded zeros count in the divisor. It and name are
    keywords only: torch.nn.AvgPool2d's fourth positional argument is ceil_mode, so a ported
    AvgPool2d(3, 1, 1, False) is refused rather than read as count_include_pad=False."""
    kind = "avgpool2d"
    prefix = "avgpool2d"

    def __init__(self, pool_size, stride=None, padding=0, *torch_args, count_include_pad=True, name=None):
        if torch_args:
            raise InvalidArgumentError(
                f"AvgPool2D takes pool_size, stride and padding by position, got {len(torch_args)} more "
                f"({', '.join(map(repr, torch_args))}): torch.nn.AvgPool2d's fourth and fifth are ceil_mode "
                f"(floor mode only here) and count_include_pad; pass count_include_pad and name by keyword")
        super().__init__(pool_size, stride, padding, name)
        self.count_include_pad = flag(count_include_pad, "count_include_pad")

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

    def window_width(self, input_shape):  # a signal (C, L, 1) averaged over L reads 1 column
        return input_shape[2] if len(input_shape) == 3 else None


def _pair_of(value):
    """value as given (a number, a numpy scalar or array, a sequence) as a tuple, a number twice"""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _whole_pair(value, what, why=None):
    """A positive whole number (a whole float too, as torch's scale_factor=2.0; a numpy scalar or
    array) or a pair of them, as (h, w); the message quotes the value as given, and why (by
    default, that nearest-neighbour upsampling repeats each pixel a whole number of times)."""
    whole = tuple(int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else v
                  for v in _pair_of(value))
    if (len(whole) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v < _INT32_LIMIT
                               for v in whole)):
        why = why or "nearest-neighbour upsampling repeats each pixel a whole number of times"
        raise InvalidArgumentError(f"{what} must be a whole number >= 1 or a pair of them ({why}), got {value!r}")
    return int(whole[0]), int(whole[1])


def _positive_pair(value, what):
    """A finite number > 0 or a pair of them, as (h, w) floats (a whole one as an int)."""
    pair = _pair_of(value)
    if (len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                              or not 0 < v < _INT32_LIMIT for v in pair)):
        raise InvalidArgumentError(f"{what} must be a number > 0 or a pair of them, got {value!r}")
    return tuple(int(v) if float(v).is_integer() else float(v) for v in pair)


class Upsample(Layer):
    """Upsampling of (C, H, W) images, as torch.nn.Upsample, in torch's argument order (so
    Upsample((64, 64)) is a size, as nn.Upsample((64, 64)) is):

    - mode="nearest" (or "nearest-exact", the same for whole factors), Keras's UpSampling2D:
      (C, H, W) -> (C, H * sh, W * sw), each pixel repeated over an sh x sw block; the gradient of
      an input pixel is the sum of its block's. Whole factors only: size must be a whole multiple
      of the input's (H, W), scale_factor an int, a whole float as torch's 2.0, or (sh, sw).
    - mode="bilinear": each output pixel interpolated from its four nearest inputs, exactly as
      torch's upsample_bilinear2d from the input and output sizes, align_corners=False (torch's
      default: pixels as squares, their centres aligned) or True (the corner pixels' centres
      aligned). size may be any (H, W), larger or smaller than the input's (no antialiasing, as
      torch's default); scale_factor a whole factor, or any factor with recompute_scale_factor=True
      or align_corners=True (the output size floor(H * s), the interpolation then from the sizes,
      as torch does).

    recompute_scale_factor changes nothing for whole factors and is accepted as torch's."""
    kind = "upsample2d"
    prefix = "upsample2d"
    _names = {"scale_factor": "scale_factor", "mode": "mode"}
    _MODES = ("nearest", "nearest-exact", "bilinear")
    _fractional_hint = ("a factor that is not whole needs recompute_scale_factor=True (the output size floor(H * s), "
                        "interpolated from the sizes) or align_corners=True, or size=")

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None, recompute_scale_factor=None,
                 name=None):
        super().__init__(name)
        what = type(self).__name__
        if mode not in self._MODES:
            raise InvalidArgumentError(f"{what} {self._names['mode']} {mode!r} is not available: one of "
                                       f"{', '.join(repr(m) for m in self._MODES)}; for a learned upsampling, "
                                       f"ConvTranspose2D")
        if recompute_scale_factor is not None and not isinstance(recompute_scale_factor, (bool, np.bool_)):
            raise InvalidArgumentError(f"{what} recompute_scale_factor must be None or a bool, got "
                                       f"{recompute_scale_factor!r}")
        if mode == "bilinear":
            if align_corners is not None and not isinstance(align_corners, (bool, np.bool_)):
                raise InvalidArgumentError(f"{what} align_corners must be None, False or True, got {align_corners!r}")
        elif align_corners is not None:
            raise InvalidArgumentError(f"{what} align_corners applies to interpolating modes only (torch refuses it "
                                       f"with mode={mode!r} as well)")
        if (scale_factor is None) == (size is None):
            raise InvalidArgumentError(f"{what} needs either scale_factor or size, not "
                                       f"{'both' if size is not None else 'neither'}")
        if size is not None and recompute_scale_factor:
            raise InvalidArgumentError(f"{what} recompute_scale_factor=True applies to scale_factor, not to an explicit "
                                       f"size (torch refuses it too)")
        self.mode = mode
        self.align_corners = bool(align_corners) if mode == "bilinear" else None
        self.recompute_scale_factor = recompute_scale_factor
        sf = f"{what} {self._names['scale_factor']}"
        if mode == "bilinear" and (recompute_scale_factor or align_corners) and scale_factor is not None:
            # the output floor(H s); recomputed, or with align_corners (where torch's ratio is (H - 1) /
            # (OH - 1) whatever the factor), the interpolation depends on the sizes alone
            self.scale_factor = _positive_pair(scale_factor, sf)
        elif scale_factor is not None:
            self.scale_factor = _whole_pair(scale_factor, sf, None if mode != "bilinear" else self._fractional_hint)
        else:
            self.scale_factor = None
        self.size = None if size is None else _whole_pair(size, f"{what} size", "the output's (H, W)")

    def _out_hw(self, shape):
        c, h, w = _image(shape, type(self).__name__)
        if self.size is not None:
            return self.size
        sh, sw = self.scale_factor
        oh, ow = int(np.floor(h * float(sh))), int(np.floor(w * float(sw)))
        if oh < 1 or ow < 1 or oh >= _INT32_LIMIT or ow >= _INT32_LIMIT:
            raise ShapeError(f"{type(self).__name__} scale_factor {self.scale_factor} makes the input's (H, W) = "
                             f"{(h, w)} an image of {(oh, ow)}: each side must be 1 to 2**31 - 1")
        return oh, ow

    def _factors(self, shape):
        if self.scale_factor is not None:
            return self.scale_factor
        c, h, w = _image(shape, type(self).__name__)
        if self.size[0] % h or self.size[1] % w:
            raise ShapeError(f"{type(self).__name__} size {self.size} is not a whole multiple of the input's (H, W) = "
                             f"{(h, w)}: nearest-neighbour upsampling here repeats each pixel a whole number of times "
                             f"(mode='bilinear' takes any size)")
        return self.size[0] // h, self.size[1] // w

    def output_shape(self, input_shapes):
        c, h, w = _image(input_shapes[0], type(self).__name__)
        if self.mode == "bilinear":
            return (c, *self._out_hw(input_shapes[0]))
        sh, sw = self._factors(input_shapes[0])
        return (c, h * sh, w * sw)

    def native(self, input_shapes):
        if self.mode == "bilinear":
            return {"ints": [0, 0, 1, int(self.align_corners), *self._out_hw(input_shapes[0])]}
        return {"ints": [*self._factors(input_shapes[0]), 0, 0, 0, 0]}

    def window_width(self, input_shape):
        if len(input_shape) != 3:
            return None
        if self.mode == "bilinear":  # a signal (C, L, 1) kept 1 wide reads 1 column
            return 1 if input_shape[2] == 1 and self._out_hw(input_shape)[1] == 1 else 2
        return self._factors(input_shape)[1]

    def config(self):
        c = {"size": self.size} if self.size is not None else {"scale_factor": self.scale_factor}
        c["mode"] = self.mode
        if self.mode == "bilinear":
            c["align_corners"] = self.align_corners
            if self.recompute_scale_factor and self.scale_factor is not None:
                c["recompute_scale_factor"] = True
        return c


def _keras_channels_first(data_format, what):
    if data_format not in (None, "channels_first"):
        raise InvalidArgumentError(f"{what} data_format {data_format!r}: mpscy's images are channels-first "
                                   f"(C, H, W), batches NCHW (np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for a channels-last batch)")


class MaxPooling2D(MaxPool2D):
    """Keras's name and arguments for MaxPool2D: MaxPooling2D(pool_size=(2, 2), strides=None,
    padding="valid", data_format=None); "same" as MaxPool2D takes it (both sides alike)."""

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None, name=None):
        _keras_channels_first(data_format, "MaxPooling2D")
        super().__init__(pool_size, strides, padding, name=name)

    def config(self):
        return {"pool_size": self.pool_size, "strides": self.stride, "padding": self.padding}


class AveragePooling2D(AvgPool2D):
    """Keras's name and arguments for AvgPool2D: AveragePooling2D(pool_size=(2, 2), strides=None,
    padding="valid", data_format=None), the padding left out of each average, as Keras leaves it
    (AvgPool2D's count_include_pad=False)."""

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None, name=None):
        _keras_channels_first(data_format, "AveragePooling2D")
        super().__init__(pool_size, strides, padding, count_include_pad=False, name=name)

    def config(self):
        return {"pool_size": self.pool_size, "strides": self.stride, "padding": self.padding}


class GlobalAveragePooling2D(GlobalAvgPool2D):
    """Keras's name for GlobalAvgPool2D: GlobalAveragePooling2D(data_format=None, keepdims=False)."""

    def __init__(self, data_format=None, keepdims=False, name=None):
        _keras_channels_first(data_format, "GlobalAveragePooling2D")
        if keepdims:
            raise InvalidArgumentError("GlobalAveragePooling2D keepdims=True is not available: the output is (C,), "
                                       "which feeds Dense or Concatenate directly")
        super().__init__(name=name)


class UpSampling2D(Upsample):
    """Keras's name and arguments for Upsample: UpSampling2D(size=(2, 2), data_format=None,
    interpolation="nearest"), "bilinear" as Keras computes it (half-pixel centres, torch's
    align_corners=False); images are channels-first (C, H, W) here, so data_format may only be
    "channels_first" (or None)."""
    _names = {"scale_factor": "size", "mode": "interpolation"}
    _MODES = ("nearest", "bilinear")
    _fractional_hint = "Keras's UpSampling2D repeats or interpolates by whole factors"

    def __init__(self, size=(2, 2), data_format=None, interpolation="nearest", name=None):
        _keras_channels_first(data_format, "UpSampling2D")
        super().__init__(scale_factor=size, mode=interpolation, name=name)

    def config(self):
        return {"size": self.scale_factor, "interpolation": self.mode}
