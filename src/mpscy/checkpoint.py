"""Checkpoints: one safetensors file with everything needed to continue training exactly —
model description, parameters and buffers (BatchNorm statistics), optimizer state, dropout
generator (seed, counter), per-step values (learning rate, momentum, betas, weight decay),
epoch and step counters, and the attached schedule's state_dict. `mpscy.load` rebuilds the
engine; damaged files raise CheckpointError. Why safetensors: see the note below."""

# Why safetensors (written here with NumPy alone, no extra dependency): a flat, pickle-free
# standard container that any safetensors reader opens and can memory-map; its JSON header lists
# each tensor's dtype, shape and byte range, so a truncated file is detected exactly, and its
# string metadata carries our JSON description. We add a SHA-256 of the tensor bytes, so a
# corrupted file is refused rather than loaded with wrong numbers. Files are written to a
# temporary name and renamed, so an interrupted save never leaves half a file.

import hashlib
import importlib
import inspect
import json
import os
import struct

import numpy as np

from .errors import Error, InvalidArgumentError, NonFiniteError

__all__ = ["save", "load", "restore", "read", "write_safetensors", "read_safetensors", "CheckpointError"]

FORMAT = "mpscy-checkpoint"
VERSION = 1
_MAX_HEADER = 100 << 20   # the reference implementation's limit on the JSON header
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


class CheckpointError(Error, ValueError):
    """A checkpoint file is missing, truncated, corrupted, or not an mpscy checkpoint."""


# ----------------------------------------------------------------------------- safetensors
def write_safetensors(path, tensors, metadata=None, checksum=False):
    """Writes {name: array} and string metadata as a safetensors file (little-endian,
    row-major, the header padded with spaces to 8 bytes), atomically. checksum=True adds the
    SHA-256 of the tensor bytes to the metadata as "sha256"."""
    header, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        arr = arr if arr.flags.c_contiguous else arr.copy()  # ascontiguousarray would make 0-d 1-d
        key = arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == ">" else arr.dtype.str
        if key not in _NAMES:
            raise InvalidArgumentError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[key], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    metadata = dict(metadata or {})
    if checksum:
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        metadata["sha256"] = h.hexdigest()
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        f = open(tmp, "wb")
    except OSError as e:  # named by the path asked for, not the temporary file's
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
    try:
        with f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for c in chunks:
                f.write(c)
        try:
            os.replace(tmp, path)
        except OSError as e:  # a folder at `path`, say: named by the path asked for
            raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors(path):
    """({name: array}, metadata) from a safetensors file, every header field checked against the
    file; raises CheckpointError naming the first problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path!r} is truncated: {len(raw)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise CheckpointError(f"{path!r} is truncated or not a safetensors file: header of {n} bytes "
                              f"announced, {len(raw) - 8} bytes present")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r} has a corrupted header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r} has a corrupted header: not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    data = memoryview(raw)[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path!r}: the header entry of {name!r} is malformed: {info!r}") from None
        if min(shape, default=0) < 0 or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path!r}: tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, begin, end)
    spans.sort()
    expect = 0
    for begin, end, name in spans:
        if begin != expect:
            raise CheckpointError(f"{path!r}: tensor {name!r} starts at byte {begin}, expected {expect}")
        expect = end
    if len(data) < expect:
        raise CheckpointError(f"{path!r} is truncated: {expect} bytes of tensor data expected, {len(data)} present")
    if len(data) > expect:
        raise CheckpointError(f"{path!r} has {len(data) - expect} unexpected bytes after its tensor data")
    digest = metadata.get("sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path!r} is corrupted: the tensor data does not match its SHA-256")
    out = {name: np.frombuffer(data[b:e], dtype=dt).reshape(sh).astype(dt.newbyteorder("="), copy=True)
           for name, (dt, sh, b, e) in tensors.items()}
    return out, metadata


# ----------------------------------------------------------------------------- descriptions
def _describe_model(model):
    from .model import Sequential
    nodes = []
    for n in model.nodes:
        if n.layer is None:
            nodes.append({"name": n.name, "layer": None, "shape": list(n.shape)})
            continue
        cls = type(n.layer)
        nodes.append({"name": n.name, "layer": cls.__name__, "module": cls.__module__,
                      "config": _jsonable(n.layer.config()), "inputs": list(n.inputs)})
    return {"class": "Sequential" if isinstance(model, Sequential) else "Model", "nodes": nodes}


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, np.generic):
        return v.item()
    return v


def _unjson(v):
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.asarray(v["__ndarray__"], dtype=v["dtype"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def _class(module, name, base, what):
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"the checkpoint's {what} {module}.{name} cannot be found; import the module "
                              "that defines it first") from None
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"{module}.{name} is not a {base.__name__}")
    return cls


def _construct(cls, config, what):
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in params}
    try:
        return cls(**kwargs)
    except Exception as e:
        raise CheckpointError(f"cannot rebuild {what} {cls.__name__}({kwargs}): {e}") from None


def _rebuild_model(desc):
    from . import layers as _layers
    from .model import Input, Model, Sequential
    nodes = desc["nodes"]
    built = []
    for n in nodes:
        if n["layer"] is None:
            built.append(None)
            continue
        cls = _class(n.get("module", _layers.__name__), n["layer"], _layers.Layer, "layer")
        layer = _construct(cls, {**_unjson(n.get("config", {})), "name": n["name"]}, "layer")
        built.append(layer)
    inputs = [n for n in nodes if n["layer"] is None]
    if desc["class"] == "Sequential" and len(inputs) == 1 and all(
            n.get("inputs") == [k - 1] for k, n in enumerate(nodes) if k > 0):
        return Sequential(built[1:], input_shape=tuple(inputs[0]["shape"]))
    tensors = []
    for n, layer in zip(nodes, built):
        if layer is None:
            tensors.append(Input(tuple(n["shape"]), name=n["name"]))
        else:
            args = [tensors[i] for i in n["inputs"]]
            tensors.append(layer(args if len(args) > 1 else args[0]))
    return Model([t for t, n in zip(tensors, nodes) if n["layer"] is None], tensors[-1])


# ----------------------------------------------------------------------------- nested state
def _pack(obj, prefix, tensors):
    """JSON skeleton of a nested optimizer state; arrays go to `tensors` under a path name."""
    if isinstance(obj, np.ndarray):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _pack(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unpack(skel, tensors, path):
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            name = skel["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"{os.fspath(path)!r} lacks the tensor {name!r} its description names")
            return tensors[name]
        return {k: _unpack(v, tensors, path) for k, v in skel.items()}
    if isinstance(skel, list):
        return [_unpack(v, tensors, path) for v in skel]
    return skel


def _is_schedule(v):
    return callable(getattr(v, "step", None)) and callable(getattr(v, "state_dict", None)) and hasattr(v, "engine")


def _children(s):
    """The schedules a composed schedule holds in its attributes (LinearWarmup's `then`), by name."""
    return {k: v for k, v in vars(s).items() if k != "engine" and _is_schedule(v)}


def _describe_schedule(s):
    """Class, state_dict and, for composed schedules (LinearWarmup(then=...)), the schedules
    held in its attributes, so each can be rebuilt with its own class."""
    if not callable(getattr(s, "state_dict", None)):
        raise InvalidArgumentError(f"the attached schedule {type(s).__name__} has no state_dict(); it cannot be saved")
    children = {k: _describe_schedule(v) for k, v in _children(s).items()}
    return {"module": type(s).__module__, "class": type(s).__qualname__, "state": _jsonable(s.state_dict()),
            "children": children}


def _same_schedule(s, info):
    """Whether schedule `s` has the record's classes throughout, its composed schedules too (a
    LinearWarmup whose `then` is of another class takes the record's, built anew)."""
    if type(s).__qualname__ != info["class"] or type(s).__module__ != info["module"]:
        return False
    children = info.get("children") or {}
    mine = _children(s)
    return set(mine) == set(children) and all(_same_schedule(mine[k], children[k]) for k in children)


def _build_schedule(engine, info):
    """A schedule object from _describe_schedule's record. A class with
    `from_state_dict(engine, state)` builds itself; otherwise (PyTorch's convention: the
    state_dict holds the attributes) it is created without __init__, given its attributes, its
    engine and its child schedules, and then load_state_dict(state) runs as usual."""
    cls = _class(info["module"], info["class"], None, "schedule")
    state = _unjson(info["state"])
    if hasattr(cls, "from_state_dict"):
        return cls.from_state_dict(engine, state)
    obj = cls.__new__(cls)
    children = info.get("children") or {}
    vars(obj).update({k: v for k, v in state.items() if k not in children})
    obj.engine = engine
    for k, child in children.items():
        setattr(obj, k, _build_schedule(engine, child))
    obj.load_state_dict(state)
    return obj


# ----------------------------------------------------------------------------- save / load
_STEP_VALUES = ("lr", "momentum", "beta1", "beta2", "weight_decay")


def save(engine, path, meta=None):
    """Writes `engine` to `path` (see the module docstring for what is kept)."""
    g = engine._g()
    tensors = {f"params/{k}": v for k, v in engine.get_parameters().items()}
    optimizer_state = _pack(engine.get_optimizer_state(), "optimizer", tensors)
    for k, v in tensors.items():
        # load and set_parameters take finite values only: a file that cannot be loaded is not
        # written (a BatchNorm fed a value near float32's limit keeps an infinite running
        # variance, as PyTorch's does, while the step's loss and gradients stay finite)
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise NonFiniteError(f"cannot save {os.fspath(path)!r}: {k.split('/', 1)[1]} contains NaN or Inf, "
                                 f"and a checkpoint holds finite values only (as load and set_parameters)")
    schedule = None
    if engine._schedule is not None:
        schedule = {**_describe_schedule(engine._schedule), "per": engine._schedule_per,
                    "monitor": engine._schedule_monitor}
    from . import __version__
    initial_lr = getattr(engine, "_initial_lr", None)
    desc = {
        "version": VERSION, "mpscy": __version__,
        "model": _describe_model(engine.model),
        "loss": {"module": type(engine.loss).__module__, "class": type(engine.loss).__name__,
                 "config": _jsonable(engine.loss.config())},
        "optimizer": {"module": type(engine.optimizer).__module__, "class": type(engine.optimizer).__name__,
                      "config": _jsonable(engine.optimizer.config())},
        "engine": {"batch_size": engine.batch_size, "seed": engine.seed, "precision": engine.precision,
                   "clip_grad_norm": engine.clip_grad_norm, "clip_grad_value": engine.clip_grad_value,
                   "input_gradients": engine.input_gradients},
        "step_values": {k: float(getattr(g, k)) for k in _STEP_VALUES if hasattr(g, k)},
        "initial_lr": None if initial_lr is None else float(initial_lr),
        "rng": {"seed": int(g.seed), "counter": int(g.counter)},
        "counters": {"epoch": int(engine.epoch), "iterations": int(g.counter)},
        "optimizer_state": optimizer_state,
        "schedule": schedule,
        "meta": _jsonable(meta) if meta is not None else None,
    }
    try:
        text = json.dumps(desc)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"checkpoint metadata is not JSON-serializable: {e}") from None
    write_safetensors(path, tensors, {"format": FORMAT, "mpscy": text,
                                      "mpscy_sha256": hashlib.sha256(text.encode()).hexdigest()}, checksum=True)


def read(path):
    """(description dict, {tensor name: array}) of a checkpoint, fully checked."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT or "mpscy" not in metadata:
        raise CheckpointError(f"{os.fspath(path)!r} is a safetensors file but not an mpscy checkpoint")
    if "sha256" not in metadata:
        raise CheckpointError(f"{os.fspath(path)!r} has no checksum; it was not written by mpscy")
    digest = metadata.get("mpscy_sha256")   # files of earlier versions have none
    if digest is not None and hashlib.sha256(metadata["mpscy"].encode()).hexdigest() != digest:
        raise CheckpointError(f"{os.fspath(path)!r} is corrupted: its description does not match its SHA-256")
    try:
        desc = json.loads(metadata["mpscy"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.fspath(path)!r} has a corrupted description: {e}") from None
    if not isinstance(desc, dict) or desc.get("version") != VERSION:
        raise CheckpointError(f"{os.fspath(path)!r} has checkpoint version {desc.get('version')!r}; "
                              f"this mpscy reads version {VERSION}")
    return desc, tensors


def load(path, device="auto", batch_size=None, **engine_kwargs):
    """Rebuilds the engine saved at `path` on `device` and restores its whole state, so
    training continues exactly where it stopped. batch_size overrides the saved one (e.g. for
    inference), as do the engine settings precision, clip_grad_norm, clip_grad_value and
    input_gradients; other keyword arguments go to Engine (threads=...). The model, loss,
    optimizer and seed are the checkpoint's."""
    from . import losses as _losses, optim as _optim
    from .engine import Engine
    fixed = sorted(set(engine_kwargs) & {"model", "loss", "optimizer", "seed"})
    if fixed:
        hint = "; for another loss, build an Engine with it and restore(engine, path)" if "loss" in fixed else ""
        raise InvalidArgumentError(f"load takes {', '.join(fixed)} from the checkpoint{hint}")
    desc, tensors = read(path)
    model = _rebuild_model(desc["model"])
    lo, op = desc["loss"], desc["optimizer"]
    loss = _construct(_class(lo["module"], lo["class"], _losses.Loss, "loss"), _unjson(lo["config"]), "loss")
    optimizer = _construct(_class(op["module"], op["class"], _optim.Optimizer, "optimizer"),
                           _unjson(op["config"]), "optimizer")
    e = desc["engine"]
    settings = {k: e[k] for k in ("clip_grad_norm", "clip_grad_value", "precision", "input_gradients")}
    settings.update(engine_kwargs)
    engine = Engine(model, loss=loss, optimizer=optimizer,
                    batch_size=e["batch_size"] if batch_size is None else batch_size, device=device,
                    seed=e["seed"], **settings)
    _restore(engine, desc, tensors, path)
    return engine


# the optimizer's values a step may change (engine.learning_rate, momentum, betas, weight_decay):
# the checkpoint's replace the engine's; every other option is the algorithm itself
_OPTIM_STEP_KEYS = ("lr", "momentum", "betas", "weight_decay")


def _node_text(node):
    if node["layer"] is None:
        return f"{node['name']}: Input{tuple(node['shape'])}"
    config = ", ".join(f"{k}={v!r}" for k, v in node["config"].items())
    return f"{node['name']}: {node['layer']}({config}) of {node['inputs']}"


def _check_same_run(engine, desc, where):
    """restore() continues the saved run, so the engine must have its layers (kinds, options,
    wiring) and its optimizer's algorithm (options beyond the step values): parameter names and
    shapes alone let a ReLU model take a Tanh model's weights, or plain SGD a Nesterov run's
    momentum buffers. The loss and the engine's settings (clipping, precision, batch size) are
    the engine's own."""
    def unnamed(nodes):  # names are the parameters' check, above
        return [{k: v for k, v in n.items() if k != "name"} for n in nodes]

    mine = json.loads(json.dumps(_describe_model(engine.model)["nodes"]))
    saved = desc["model"]["nodes"]
    if unnamed(mine) != unnamed(saved):
        i = next((k for k, (a, b) in enumerate(zip(unnamed(saved), unnamed(mine))) if a != b),
                 min(len(saved), len(mine)))
        theirs = _node_text(saved[i]) if i < len(saved) else "nothing"
        ours = _node_text(mine[i]) if i < len(mine) else "nothing"
        raise CheckpointError(f"{where} was saved from another model: its node {i} is {theirs}, this engine's is "
                              f"{ours}")
    cfg = json.loads(json.dumps(_jsonable(engine.optimizer.config())))
    saved_cfg = desc["optimizer"]["config"]
    differ = sorted(k for k in set(cfg) | set(saved_cfg)
                    if k not in _OPTIM_STEP_KEYS and cfg.get(k, "(none)") != saved_cfg.get(k, "(none)"))
    if differ:
        raise CheckpointError(f"{where} was saved by {desc['optimizer']['class']} with "
                              f"{', '.join(f'{k}={saved_cfg.get(k)!r}' for k in differ)}; this engine's has "
                              f"{', '.join(f'{k}={cfg.get(k)!r}' for k in differ)}")


def restore(engine, path):
    """Loads a checkpoint's state into an existing engine built with the same model (layer kinds,
    options and wiring) and optimizer algorithm (checked): parameters, optimizer state,
    generator, counters, step values (learning rate, momentum, betas, weight decay), and the
    schedule (an attached schedule of the saved class takes the saved state). The loss and the
    engine's settings (clipping, precision, batch size) stay the engine's. Nothing changes when
    it fails."""
    desc, tensors = read(path)
    _restore(engine, desc, tensors, path)


def _restore(engine, desc, tensors, path):
    g = engine._g()
    where = repr(os.fspath(path))
    params = {k[len("params/"):]: v for k, v in tensors.items() if k.startswith("params/")}
    expected = {t[0] for t in engine._tensors if t[1] in ("param", "buffer")}
    if set(params) != expected:
        raise CheckpointError(f"{where} does not match this model: missing {sorted(expected - set(params))}, "
                              f"unexpected {sorted(set(params) - expected)}")
    if type(engine.optimizer).__name__ != desc["optimizer"]["class"]:
        raise CheckpointError(f"{where} holds {desc['optimizer']['class']} state; this engine uses "
                              f"{type(engine.optimizer).__name__}")
    _check_same_run(engine, desc, where)
    opt_state = _unpack(desc["optimizer_state"], tensors, path)
    before = engine.get_parameters(), engine.get_optimizer_state()
    try:
        engine.set_parameters(params)           # each validates fully before writing
        engine.set_optimizer_state(opt_state)
        info = desc.get("schedule")
        schedule = None
        if info:
            current = engine._schedule
            if current is not None and _same_schedule(current, info):
                current.load_state_dict(_unjson(info["state"]))
                schedule = current
            else:
                schedule = _build_schedule(engine, info)
    except Exception as e:
        engine.set_parameters(before[0])
        engine.set_optimizer_state(before[1])
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where} cannot be restored into this engine: {e}") from e
    for k, v in desc.get("step_values", {}).items():
        if k in _STEP_VALUES and hasattr(g, k):
            setattr(g, k, v)
    if desc.get("initial_lr") is not None:
        engine._initial_lr = desc["initial_lr"]
    g.seed = int(desc["rng"]["seed"])
    engine.seed = int(desc["engine"]["seed"])   # fit's shuffling orders follow it
    g.counter = int(desc["rng"]["counter"])
    engine.epoch = int(desc["counters"]["epoch"])
    if schedule is not None:
        engine._schedule, engine._schedule_per, engine._schedule_monitor = schedule, info["per"], info["monitor"]
    engine.checkpoint_meta = _unjson(desc.get("meta"))
