"""Model descriptions: `Sequential` (a list of layers) and the functional API (`Input`, layers
called on tensors, `Model(inputs, outputs)`) for DAGs such as residual blocks. A model is a
topologically ordered list of nodes with resolved per-sample shapes; it becomes the native
graph descriptor when an Engine is built. Nothing here touches native memory."""

import numpy as np

from ._checks import node_name
from .errors import InvalidArgumentError, ShapeError
from ._checks import warn_user
from .layers import Layer
from .layers.base import _IMAGE_KINDS, stale_trainable_message
from .layers.conv import channels_last_hint

__all__ = ["Tensor", "Input", "Model", "Sequential"]


class Tensor:
    """A symbolic tensor: the output of `Input` or of a layer call. `shape` excludes the batch."""

    __slots__ = ("shape", "layer", "inputs", "name")

    def __init__(self, shape, layer=None, inputs=(), name=None):
        self.shape = tuple(int(s) for s in shape)
        self.layer = layer
        self.inputs = tuple(inputs)
        self.name = name

    def __repr__(self):
        src = "Input" if self.layer is None else type(self.layer).__name__
        return f"Tensor(shape=(None, {', '.join(map(str, self.shape))}), from={src})"


def _check_shape(shape, what="input_shape"):
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        shape = tuple(shape)
    except TypeError:
        raise ShapeError(f"{what} must be a tuple of positive integers, got {shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
        raise ShapeError(f"{what} must be a non-empty tuple of positive integers, got {shape!r}")
    if len(shape) > 6:
        raise ShapeError(f"{what} has rank {len(shape)}; at most 6 per-sample dimensions are supported")
    return tuple(int(s) for s in shape)


def Input(shape, name=None):
    """A model input of per-sample `shape` (batch excluded), e.g. Input((1, 28, 28)); `name` as a
    layer's (default "input", or "input_<k>" for input k of several)."""
    return Tensor(_check_shape(shape, "Input shape"), name=node_name(name, "Input"))


class Node:
    """One entry of a model's ordered node list."""

    __slots__ = ("layer", "inputs", "shape", "name")

    def __init__(self, layer, inputs, shape, name):
        self.layer, self.inputs, self.shape, self.name = layer, tuple(inputs), tuple(shape), name


def _post_order(output):
    """Every tensor `output` depends on, producers before consumers, in the order a depth-first
    walk of each tensor's inputs (first to last) finishes them. Iterative: a model may be deeper
    than Python's recursion limit."""
    order, done, on_path = [], set(), set()
    stack = [(output, 0)]  # (tensor, index of the next input to walk)
    on_path.add(id(output))
    while stack:
        t, k = stack[-1]
        if k < len(t.inputs):
            stack[-1] = (t, k + 1)
            src = t.inputs[k]
            if id(src) in done:
                continue
            if id(src) in on_path:
                raise InvalidArgumentError("the model graph has a cycle")
            on_path.add(id(src))
            stack.append((src, 0))
            continue
        stack.pop()
        on_path.discard(id(t))
        done.add(id(t))
        order.append(t)
    return order


def _free_name(made, given):
    """A made-up layer name (<prefix>_<position>), or <made>_1, _2, ... where a layer was given it."""
    name, j = made, 0
    while name in given:
        j += 1
        name = f"{made}_{j}"
    return name


class Model:
    """A model from the functional API: ``Model(inputs, outputs)`` with one output tensor.

    Example::

        x = mpscy.Input((1, 8, 8))
        h = layers.Conv2D(16, 3, padding=1)(x)
        y = layers.Add()([h, layers.Conv2D(16, 1)(x)])
        model = mpscy.Model(x, layers.Dense(10)(layers.Flatten()(y)))
    """

    def __init__(self, inputs, outputs):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if isinstance(outputs, (list, tuple)):
            if len(outputs) != 1:
                raise InvalidArgumentError(f"a model has exactly one output tensor, got {len(outputs)}")
            outputs = outputs[0]
        if not inputs or not all(isinstance(t, Tensor) and t.layer is None for t in inputs):
            raise InvalidArgumentError("Model inputs must be tensors made by mpscy.Input")
        for k, t in enumerate(inputs):
            if any(t is u for u in inputs[:k]):
                raise InvalidArgumentError(f"Model input {k} is the same Input as an earlier one: pass each once")
        if not isinstance(outputs, Tensor):
            raise InvalidArgumentError("Model outputs must be an mpscy tensor")
        self._build(inputs, outputs)

    def _build(self, inputs, output):
        if output.layer is None:
            raise InvalidArgumentError("the model's output is one of its Inputs: a model needs at least one layer")
        order = _post_order(output)
        reached_inputs = [t for t in order if t.layer is None]
        for t in reached_inputs:
            if not any(t is i for i in inputs):
                raise InvalidArgumentError("the output depends on an Input that is not in the model's inputs")
        for k, i in enumerate(inputs):
            if not any(t is i for t in reached_inputs):
                named = f" ({i.name!r})" if i.name else ""
                raise InvalidArgumentError(f"model input {k}{named}, of shape {i.shape}, does not reach the output")
        # inputs first, in the order given; then layers in dependency order
        order = list(inputs) + [t for t in order if t.layer is not None]
        index = {id(t): k for k, t in enumerate(order)}
        self.nodes, used = [], set()
        # a made-up name (<prefix>_<position>) passes over the names given (an ONNX graph's, or a
        # join's chain made inside an imported one), so that only two given names can clash
        given = {t.layer.name if t.layer is not None else t.name for t in order} - {None}
        position = 0
        for k, t in enumerate(order):
            if t.layer is None:
                name = t.name or ("input" if len(inputs) == 1 else f"input_{k}")
                self.nodes.append(Node(None, (), t.shape, name))
                continue
            name = t.layer.name or _free_name(f"{t.layer.prefix}_{position}", given)
            position += 1
            self.nodes.append(Node(t.layer, [index[id(s)] for s in t.inputs], t.shape, name))
        for n in self.nodes:
            if n.name in used:
                raise InvalidArgumentError(f"two layers are named {n.name!r}")
            used.add(n.name)
        self.output = len(self.nodes) - 1
        self.input_shapes = [n.shape for n in self.nodes if n.layer is None]
        for n in self.nodes:  # an image layer on an input that looks like Keras's (H, W, C), 16 x 16 or more;
            # not one whose window is 1 wide (a 1-D signal, (C, L, 1), with no Conv1D to take it)
            if (n.layer is not None and n.layer.kind in _IMAGE_KINDS and self.nodes[n.inputs[0]].layer is None
                    and n.layer.window_width(self.nodes[n.inputs[0]].shape) != 1):
                hint = channels_last_hint(self.nodes[n.inputs[0]].shape, least=16)
                if hint:
                    warn_user(f"{type(n.layer).__name__} {n.name!r} reads input {self.nodes[n.inputs[0]].name!r} "
                              f"as (C, H, W){hint}")

    # -- descriptions --------------------------------------------------------------------
    @property
    def input_shape(self):
        """The per-sample input shape (batch excluded); a list of them for several inputs."""
        return self.input_shapes[0] if len(self.input_shapes) == 1 else self.input_shapes

    @property
    def output_shape(self):
        """The per-sample output shape (batch excluded)."""
        return self.nodes[self.output].shape

    def _in_shapes(self, node):
        return [self.nodes[i].shape for i in node.inputs]

    def native_layers(self):
        """The list of node dicts the native graph builder takes."""
        out = []
        for n in self.nodes:
            if n.layer is None:
                out.append({"kind": "input", "name": n.name, "inputs": [], "shape": list(n.shape)})
                continue
            d = {"kind": n.layer.kind, "name": n.name, "inputs": list(n.inputs), "shape": list(n.shape)}
            d.update(n.layer.native(self._in_shapes(n)))
            if not n.layer.trainable and self._has_weights(n):  # a ReLU has nothing to freeze
                d["flags"] = list(d.get("flags", ())) + ["frozen"]
            out.append(d)
        return out

    @property
    def trainable(self):
        """True when some layer with parameters is trainable. Setting it sets every layer's
        `trainable` (Keras's ``base_model.trainable = False`` freezes the whole model)."""
        return any(n.layer.trainable for n in self.nodes if n.layer is not None and self._has_weights(n))

    def _has_weights(self, node):
        """Whether the node's layer has parameters to train (running statistics are not)."""
        return any(not suffix.startswith("running_") for suffix, _ in node.layer.parameters(self._in_shapes(node)))

    @trainable.setter
    def trainable(self, value):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgumentError(f"trainable must be True or False, got {value!r}")
        stale = []
        for layer in self.layers:
            layer._trainable = bool(value)
            stale.append(layer._stale_in())
        stale = [name for name in stale if name]
        if stale:  # one warning for the model
            warn_user(stale_trainable_message(stale, bool(value)))

    @property
    def layers(self):
        """The model's layers in node order (dependency order; a Sequential's as given)."""
        return [n.layer for n in self.nodes if n.layer is not None]

    def named_layers(self):
        """[(name, layer)] in node order, each layer with the name the summary and the parameters
        use ("dense_0", or the name given), as torch's named_children(): an unnamed layer's own
        `name` stays None, its name being the model's."""
        return [(n.name, n.layer) for n in self.nodes if n.layer is not None]

    def get_layer(self, name):
        """The layer of the node named `name` (as in the summary: "dense_0", or the name given)."""
        for n in self.nodes:
            if n.name == name and n.layer is not None:
                return n.layer
        names = [n.name for n in self.nodes if n.layer is not None]
        raise InvalidArgumentError(f"no layer named {name!r}; the model's layers: {', '.join(names)}")

    def parameter_shapes(self):
        """{"<layer>.<suffix>": shape} of every parameter and buffer, in native order."""
        out = {}
        for n in self.nodes:
            if n.layer is not None:
                for suffix, shape in n.layer.parameters(self._in_shapes(n)):
                    out[f"{n.name}.{suffix}"] = tuple(shape)
        return out

    def init_parameters(self, seed):
        """PyTorch-default initial values of every parameter and buffer, from `seed`."""
        rng = np.random.Generator(np.random.PCG64(seed))
        out = {}
        for n in self.nodes:
            if n.layer is not None:
                for suffix, arr in n.layer.init(self._in_shapes(n), rng).items():
                    out[f"{n.name}.{suffix}"] = arr
        return out

    def batch_statistics_nodes(self):
        """Names of BatchNorm nodes whose channels get one value per sample, so that a train-mode
        batch needs at least 2 rows (PyTorch refuses the same)."""
        return [n.name for n in self.nodes if n.layer is not None and hasattr(n.layer, "values_per_channel")
                and n.layer.values_per_channel(self._in_shapes(n)) == 1]

    def summary_rows(self):
        """[(name, type, output shape, parameter count)] for summaries."""
        shapes = self.parameter_shapes()
        rows = []
        for n in self.nodes:
            kind = "Input" if n.layer is None else type(n.layer).__name__
            count = sum(int(np.prod(s)) for k, s in shapes.items() if k.rsplit(".", 1)[0] == n.name)
            rows.append((n.name, kind, (None,) + tuple(n.shape), count))
        return rows


    def connections(self):
        """Each node's input node names, or None for every node when the model is a plain chain
        (each layer reading the node before it): the "Connected to" column of a summary."""
        chain = all(n.inputs == ((k - 1,) if n.layer is not None else ()) for k, n in enumerate(self.nodes))
        return None if chain else [[self.nodes[i].name for i in n.inputs] for n in self.nodes]

    def __repr__(self):
        ins = ", ".join(f"{n.name}: {n.shape}" for n in self.nodes if n.layer is None)
        return (f"<{type(self).__name__}: {len(self.nodes) - len(self.input_shapes)} layers, "
                f"inputs ({ins}) -> output {self.output_shape}>")


class Sequential(Model):
    """A plain stack of layers: ``Sequential([Dense(128), ReLU(), Dense(10)], input_shape=(784,))``,
    or with the input first as Keras 3 writes it, ``Sequential([Input((784,)), Dense(128), ...])``.
    Default layer names are ``<prefix>_<position>`` (the Input not counted): dense_0, relu_1, dense_2."""

    def __init__(self, layers, input_shape=None):
        if isinstance(layers, (Layer, str)) or not hasattr(layers, "__iter__"):
            raise InvalidArgumentError(f"Sequential takes a list of layers, got {type(layers).__name__}")
        layers = list(layers)
        first = layers[0] if layers and isinstance(layers[0], Tensor) and layers[0].layer is None else None
        if first is not None:
            if input_shape is not None and _check_shape(input_shape, "input_shape") != first.shape:
                raise ShapeError(f"Sequential got input_shape={tuple(input_shape)} and an Input of shape "
                                 f"{first.shape}: give one of them")
            layers = layers[1:]
        elif input_shape is None:
            raise InvalidArgumentError("Sequential needs input_shape= (the per-sample shape, batch excluded) or an "
                                       "mpscy.Input(shape) as its first item")
        if not layers:
            raise InvalidArgumentError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise InvalidArgumentError(f"Sequential item {i} is {type(layer).__name__}, not an mpscy layer")
            if layer.n_inputs != 1:
                raise InvalidArgumentError(f"{type(layer).__name__} takes several inputs: use the functional API")
        x = Tensor(first.shape, name=first.name) if first is not None else Tensor(_check_shape(input_shape,
                                                                                                "input_shape"))
        t = x
        names, called = [], []
        try:
            for i, layer in enumerate(layers):
                try:
                    t = layer(t)
                except ShapeError as e:  # a named layer's message names it already
                    raise ShapeError(f"layer {i}: {e}" if layer.name else
                                     f"layer {i} ({type(layer).__name__}): {e}") from None
                called.append(layer)
                names.append(layer.name)
            self._build([x], t)
            given = set(names) - {None}
            for i, (node, name) in enumerate(zip(self.nodes[1:], names)):
                node.name = name or _free_name(f"{node.layer.prefix}_{i}", given)
            seen = set()
            for node in self.nodes:
                if node.name in seen:
                    raise InvalidArgumentError(f"two layers are named {node.name!r}")
                seen.add(node.name)
        except Exception:
            for layer in called:  # a model that failed to build uses up none of its layers
                layer._called = False
            raise
        self._names = [n.name for n in self.nodes[1:]]
