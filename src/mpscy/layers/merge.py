"""Layers that join branches of a functional model: Add and Concatenate."""

from ..errors import InvalidArgumentError, ShapeError
from .base import Layer, _integer

MOST_INPUTS = 8  # inputs of one native node (mpscy.h's MPSCY_MAX_INPUTS)


class _Join(Layer):
    """A join of any number of tensors: past MOST_INPUTS (a DenseNet block's torch.cat of 25), the
    first MOST_INPUTS are joined by an unnamed layer of the same kind and options, and this layer
    joins that with the rest (again so while more remain). Add sums left to right and Concatenate
    keeps the order either way, so the values, and their gradients, are the same bits."""

    def __call__(self, *inputs):
        from ..model import Tensor
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        if len(inputs) > MOST_INPUTS and not self._called and all(isinstance(t, Tensor) for t in inputs):
            try:  # every input's shape checked first, each named by its own index
                self.output_shape([t.shape for t in inputs])
            except (ShapeError, InvalidArgumentError) as e:
                if not self.name:
                    raise
                raise type(e)(f"{type(self).__name__} {self.name!r}: {e}") from None
            head = type(self)(**self.config())(*inputs[:MOST_INPUTS])
            return self(head, *inputs[MOST_INPUTS:])
        return super().__call__(*inputs)


class Add(_Join):
    """Element-wise sum of two or more tensors of the same shape: ``Add()([a, b])``; more than 8
    are summed as a chain of Add layers of at most 8 inputs (left to right, as one would)."""

    kind = "add"
    prefix = "add"
    n_inputs = None

    def output_shape(self, input_shapes):
        if len(input_shapes) < 2:
            raise InvalidArgumentError(f"Add needs at least 2 inputs, got {len(input_shapes)}")
        first = tuple(input_shapes[0])
        for k, s in enumerate(input_shapes[1:], 1):
            if tuple(s) != first:
                raise ShapeError(f"Add input {k} has per-sample shape {tuple(s)}, input 0 has {first}")
        return first


class Concatenate(_Join):
    """Joins tensors along `axis`, counted with the batch as axis 0 (Keras's convention):
    axis=1 is the channel axis of (C, H, W) images, -1 the last axis. Other dims must agree. More
    than 8 tensors are joined as a chain of Concatenate layers of at most 8 inputs."""

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
        if not input_shapes:
            raise InvalidArgumentError("Concatenate needs at least 1 input, got 0")
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
