"""Layers that join branches of a functional model: Add and Concatenate."""

from ..errors import InvalidArgumentError, ShapeError
from .base import Layer, _integer


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
        self.axis = _integer(axis, "Concatenate axis")

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
