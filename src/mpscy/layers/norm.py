"""Normalization layers: BatchNorm (batch statistics in train mode, running statistics in eval
mode, both as PyTorch) and LayerNorm. Options, parameter shapes and initial values only."""

import math

import numpy as np

from .._checks import flag as _flag, warn_user
from ..errors import InvalidArgumentError, ShapeError
from .base import Layer, _real


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
        if momentum is None:
            raise InvalidArgumentError("BatchNorm momentum=None (torch's cumulative moving average) is not "
                                       "supported; give a number in [0, 1]")
        self.momentum = _real(momentum, "BatchNorm momentum", 0.0, 1.0)
        if self.momentum >= 0.9:  # Keras's meaning (its default 0.99) is the old statistics' weight
            warn_user(f"BatchNorm momentum={momentum} is PyTorch's: the new batch's weight in the running "
                      f"statistics, which then follow the last batch almost alone; Keras's momentum={momentum} is "
                      f"momentum={1 - self.momentum:.3g} here")
        self.eps = _real(eps, "BatchNorm eps", 0.0, math.inf, low_open=True, high_open=True)
        self.affine = _flag(affine, "affine")

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
        self.elementwise_affine = _flag(elementwise_affine, "elementwise_affine")

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
