"""Checkpoints: one safetensors file with everything needed to continue training exactly —
model description, parameters and buffers (BatchNorm statistics), optimizer state, dropout
generator (seed, counter), per-step values (learning rate, momentum, betas, weight decay),
epoch and step counters, the position within the epoch of a save made inside fit's epoch, and
the attached schedule's state_dict. `mpscy.load` rebuilds the engine; damaged files raise
CheckpointError. Why safetensors: see the note below."""

# Why safetensors (_safetensors.py writes and reads it with NumPy alone): a flat, pickle-free
# standard container that any safetensors reader opens and can memory-map; its JSON header lists
# each tensor's dtype, shape and byte range, so a truncated file is detected exactly, and its
# string metadata carries our JSON description. We add a SHA-256 of the tensor bytes, so a
# corrupted file is refused rather than loaded with wrong numbers. Files are written to a
# temporary name and renamed, so an interrupted save never leaves half a file. The
# description's checks are in _ckpt_checks.py.

import hashlib
import importlib
import inspect
import json
import os
import sys

import numpy as np

from ._checks import quiet_build_warnings, warn_user
from ._optim_state import _SQUARE_SLOTS, _overflowed_squares
from ._ckpt_checks import STEP_VALUES as _STEP_VALUES, check_description as _check_description, short as _short, \
    unjson as _unjson
from ._safetensors import _path, read_safetensors, write_safetensors
from .errors import CheckpointError, Error, InvalidArgumentError, NonFiniteError

__all__ = ["save", "load", "restore", "read", "write_safetensors", "read_safetensors", "CheckpointError"]

FORMAT = "mpscy-checkpoint"
VERSION = 1


# ----------------------------------------------------------------------------- descriptions
def _describe_model(engine):
    """The engine's model, each layer's `trainable` as the engine was built with it (a later
    change to a layer applies to a new engine only)."""
    from .model import Sequential
    model, frozen = engine.model, engine._frozen_layers()
    nodes = []
    for n in model.nodes:
        if n.layer is None:
            nodes.append({"name": n.name, "layer": None, "shape": list(n.shape)})
            continue
        cls = type(n.layer)
        nodes.append({"name": n.name, "layer": cls.__name__, "module": cls.__module__,
                      "config": _jsonable(n.layer.config()), "inputs": list(n.inputs)})
        if id(n.layer) in frozen:  # only when frozen: other checkpoints stay as they were
            nodes[-1]["trainable"] = False
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


def _class(module, name, base, what):
    """The class a checkpoint names, looked up in a module already imported; only mpscy's own
    modules are imported here. A checkpoint is data: loading one never runs the top-level code
    of a module it names (a user's custom layer or loss needs its module imported first)."""
    if not isinstance(module, str) or not isinstance(name, str):
        raise CheckpointError(f"the checkpoint's {what} class is named by {module!r}.{name!r}, not by strings")
    mod = sys.modules.get(module)
    if mod is None and (module == __package__ or module.startswith(__package__ + ".")):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = None
    cls = getattr(mod, name, None) if mod is not None else None
    if cls is None:
        raise CheckpointError(f"the checkpoint's {what} {module}.{name} cannot be found; import the module "
                              "that defines it first" + (" (a checkpoint never imports a module itself)"
                                                         if mod is None else ""))
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        raise CheckpointError(f"{module}.{name} is not a {base.__name__ if base is not None else 'class'}")
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
        layer.trainable = n.get("trainable", True)
        built.append(layer)
    inputs = [n for n in nodes if n["layer"] is None]
    if desc["class"] == "Sequential" and len(inputs) == 1 and all(
            n.get("inputs") == [k - 1] for k, n in enumerate(nodes) if k > 0):
        return Sequential([Input(tuple(inputs[0]["shape"]), name=inputs[0]["name"]), *built[1:]])  # its input's name
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
            if not isinstance(name, str) or name not in tensors:
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


def _schedule_name(info):
    """A schedule's class with its composed schedules', "LinearWarmup(then=StepLR)", from its
    record (_describe_schedule's) or _classes' of an attached schedule."""
    children = info.get("children") or {}
    inner = ", ".join(f"{k}={_schedule_name(v)}" for k, v in children.items())
    return f"{info['class']}({inner})" if children else info["class"]


def _classes(s):
    """The classes of a schedule and its composed ones, as _describe_schedule records them (no
    state: an attached schedule without a state_dict is named too)."""
    return {"class": type(s).__qualname__, "children": {k: _classes(v) for k, v in _children(s).items()}}


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
    if not callable(getattr(cls, "step", None)) or not (hasattr(cls, "from_state_dict") or
                                                        callable(getattr(cls, "load_state_dict", None))):
        raise CheckpointError(f"{info['module']}.{info['class']} is not a schedule: it needs step() and "
                              f"load_state_dict() or from_state_dict()")
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
def _meta_json(meta):
    """`meta` as JSON values (arrays as {"__ndarray__", "dtype"}); what JSON cannot hold is
    refused naming meta, before anything is written."""
    if meta is None:
        return None
    try:
        value = _jsonable(meta)
        json.dumps(value)
    except RecursionError:
        raise InvalidArgumentError("meta is not JSON-serializable: it contains itself, or nests too deeply") from None
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"meta is not JSON-serializable: {e}") from None
    return value


def save(engine, path, meta=None):
    """Writes `engine` to `path` (see the module docstring for what is kept)."""
    path = _path(path)
    meta = _meta_json(meta)
    g = engine._g()
    tensors = {f"params/{k}": v for k, v in engine.get_parameters().items()}
    optimizer_state = _pack(engine.get_optimizer_state(), "optimizer", tensors)
    for k, v in tensors.items():
        # load and set_parameters take finite values only: a file that cannot be loaded is not
        # written (a BatchNorm fed a value near float32's limit keeps an infinite running
        # variance, as PyTorch's does, while the step's loss and gradients stay finite); a sum of
        # squares of the optimizer may hold +Inf (set_optimizer_state takes it, as torch's state has it)
        slot = k.split("/")[1] if k.startswith("optimizer/") else None
        if v.dtype.kind == "f" and not np.isfinite(v).all() and not (slot in _SQUARE_SLOTS and _overflowed_squares(v)):
            raise NonFiniteError(f"cannot save {path!r}: {k.split('/', 1)[1]} contains NaN or Inf, "
                                 f"and a checkpoint holds finite values only (as load and set_parameters)")
    schedule = None
    if engine._schedule is not None:
        schedule = {**_describe_schedule(engine._schedule), "per": engine._schedule_per,
                    "monitor": engine._schedule_monitor}
    from . import __version__
    initial_lr = getattr(engine, "_initial_lr", None)
    desc = {
        "version": VERSION, "mpscy": __version__,
        "model": _describe_model(engine),
        "loss": {"module": type(engine.loss).__module__, "class": type(engine.loss).__name__,
                 "config": _jsonable(engine.loss.config())},
        "optimizer": {"module": type(engine.optimizer).__module__, "class": type(engine.optimizer).__name__,
                      "config": _jsonable(engine.optimizer.config())},
        "engine": {"batch_size": engine.batch_size, "seed": engine.seed, "precision": engine.precision,
                   "clip_grad_norm": engine.clip_grad_norm, "clip_grad_value": engine.clip_grad_value,
                   "input_gradients": engine.input_gradients, "threads": engine._threads},
        "step_values": {k: float(getattr(g, k)) for k in _STEP_VALUES if hasattr(g, k)},
        "initial_lr": None if initial_lr is None else float(initial_lr),
        "rng": {"seed": int(g.seed), "counter": int(g.counter)},
        "counters": {"epoch": int(engine.epoch), "iterations": int(g.counter)},
        "optimizer_state": optimizer_state,
        "schedule": schedule,
        "meta": meta,
    }
    position = _fit_position(engine)
    if position is not None:   # only then: a save between epochs writes what earlier versions wrote
        desc["position"] = position
    try:
        text = json.dumps(desc)
    except (TypeError, ValueError, RecursionError) as e:   # a layer's config or a schedule's state
        raise InvalidArgumentError(f"cannot save {path!r}: its description is not JSON-serializable: {e}") from None
    write_safetensors(path, tensors, {"format": FORMAT, "mpscy": text,
                                      "mpscy_sha256": hashlib.sha256(text.encode()).hexdigest()}, checksum=True)


def read(path):
    """(description dict, {tensor name: array}) of a checkpoint, fully checked."""
    path = _path(path)
    tensors, metadata = read_safetensors(path)   # metadata: str -> str, checked
    if metadata.get("format") != FORMAT or "mpscy" not in metadata:
        raise CheckpointError(f"{path!r} is a safetensors file but not an mpscy checkpoint")
    if "sha256" not in metadata:
        raise CheckpointError(f"{path!r} has no checksum; it was not written by mpscy")
    digest = metadata.get("mpscy_sha256")   # files of earlier versions have none
    if digest is not None and hashlib.sha256(metadata["mpscy"].encode()).hexdigest() != digest:
        raise CheckpointError(f"{path!r} is corrupted: its description does not match its SHA-256")
    try:
        desc = json.loads(metadata["mpscy"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path!r} has a corrupted description: {e}") from None
    if not isinstance(desc, dict):
        raise CheckpointError(f"{path!r} has a malformed description: it must be a JSON object, got {_short(desc)}")
    version = desc.get("version")
    if type(version) is not int or version != VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {_short(version)}; this mpscy reads version {VERSION}")
    _check_description(desc, repr(path))
    _check_position(desc.get("position"), repr(path))
    return desc, tensors


def _fit_position(engine):
    """Where fit is within the engine's epoch when a callback (or another thread) saves inside it:
    the batches done, what they depend on (batch size, shuffling) and the epoch's sums so far
    (training.fit's record). Outside fit and in its on_train_begin, the position a load or
    restore brought that no fit has taken yet (a loaded mid-epoch engine saved again keeps it);
    else None."""
    position = getattr(engine, "_fit_position", None)
    if position is not None:
        return position()
    pending = getattr(engine, "_resume_position", None)
    if pending is not None and pending["epoch"] == engine.epoch:
        return {k: v for k, v in pending.items() if k != "epoch"}
    return None


def _count(v):
    return type(v) is int and v >= 0


# each field of a position and its rule (JSON's bool is no count here; a loader may have no batch_size)
_POSITION = {"batches": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
             "rows": (_count, "an integer >= 0"), "counted": (_count, "an integer >= 0"),
             "void": (_count, "an integer >= 0"),
             "loss_sum": (lambda v: type(v) in (int, float) and np.isfinite(v), "a finite number"),
             "acc_sum": (lambda v: type(v) in (int, float) and np.isfinite(v), "a finite number"),
             "lr": (lambda v: type(v) in (int, float) and np.isfinite(v) and v >= 0, "a finite number >= 0"),
             "has_acc": (lambda v: type(v) is bool, "true or false"),
             "batch_size": (lambda v: v is None or (_count(v) and v >= 1), "an integer >= 1 or null"),
             "shuffle": (lambda v: v is None or type(v) is bool, "true, false or null"),
             "order": (lambda v: v is None or isinstance(v, str), "a string or null")}


def _check_position(position, where):
    """A position record (optional: files saved between epochs, and earlier files, have none):
    exactly its fields, each by its rule and together, so that a damaged one is refused before
    anything changes. One without its loader order (9d93c77 wrote none) gets it: "arrays" where
    it was saved over arrays (shuffle recorded), else None (a later fit runs that epoch again)."""
    if position is None:
        return
    fail = f"{where} has a malformed description: "
    if not isinstance(position, dict):
        raise CheckpointError(f"{fail}position must be a JSON object, got {_short(position)}")
    if set(position) not in (set(_POSITION), set(_POSITION) - {"order"}):   # 9d93c77 wrote no order
        raise CheckpointError(f"{fail}position must have the fields {sorted(_POSITION)}, got {sorted(position)}")
    position.setdefault("order", "arrays" if position.get("shuffle") is not None else None)
    for k, (ok, rule) in _POSITION.items():
        if not ok(position[k]):
            raise CheckpointError(f"{fail}position.{k} must be {rule}, got {_short(position[k])}")
    # and the fields together, as fit keeps them: a skipped batch (every label ignore_index) adds
    # no rows and no counted labels, an applied one at least one of each and at most batch_size rows
    p = position
    applied = p["batches"] - p["void"]
    # arrays' batches hold at most batch_size rows; a loader's batch_size need not bound its
    # batches (a collate_fn that joins several rows an item)
    most = None if p["batch_size"] is None or p["shuffle"] is None else applied * p["batch_size"]
    for bad, why in ((applied < 0, "void batches past its batches"),
                     (p["rows"] < applied or (most is not None and p["rows"] > most),
                      f"{p['rows']} rows for {applied} applied batches of at most {p['batch_size']}"),
                     ((p["counted"] == 0) != (applied == 0), f"{p['counted']} counted labels for {applied} applied "
                                                             "batches"),
                     (not p["has_acc"] and p["acc_sum"] != 0, "an accuracy sum without accuracy")):
        if bad:
            raise CheckpointError(f"{fail}position is inconsistent: {why}")


def load(path, device="auto", batch_size=None, **engine_kwargs):
    """Rebuilds the engine saved at `path` on `device` and restores its whole state, so
    training continues exactly where it stopped. batch_size overrides the saved one (e.g. for
    inference), as do the engine settings precision, clip_grad_norm, clip_grad_value and
    input_gradients, and threads (the saved engine's by default: on the cpu a convolution's weight
    gradient depends on the thread count in its last bits). The model, loss, optimizer and seed
    are the checkpoint's."""
    from . import losses as _losses, optim as _optim
    from .engine import Engine
    path = _path(path)
    fixed = sorted(set(engine_kwargs) & {"model", "loss", "optimizer", "seed"})
    if fixed:
        hint = "; for another loss, build an Engine with it and restore(engine, path)" if "loss" in fixed else ""
        raise InvalidArgumentError(f"load takes {', '.join(fixed)} from the checkpoint{hint}")
    unknown = sorted(set(engine_kwargs) - set(inspect.signature(Engine).parameters))
    if unknown:
        raise InvalidArgumentError(f"load got unexpected keyword arguments {unknown}; it takes device, batch_size "
                                   "and Engine's precision, clip_grad_norm, clip_grad_value, input_gradients, threads")
    desc, tensors = read(path)
    with quiet_build_warnings():  # the model was built, and warned about, when it was trained
        try:
            model = _rebuild_model(desc["model"])
        except CheckpointError:
            raise
        except Error as e:   # an Input's shape, a layer's wiring: the file's model cannot be built
            raise CheckpointError(f"{path!r}: its model cannot be rebuilt: {e}") from None
        lo, op = desc["loss"], desc["optimizer"]
        loss = _construct(_class(lo["module"], lo["class"], _losses.Loss, "loss"), _unjson(lo["config"]), "loss")
        optimizer = _construct(_class(op["module"], op["class"], _optim.Optimizer, "optimizer"),
                               _unjson(op["config"]), "optimizer")
        e = desc["engine"]
        settings = {k: e[k] for k in ("clip_grad_norm", "clip_grad_value", "precision", "input_gradients")}
        settings["threads"] = e.get("threads", 0)   # a convolution's weight gradient sums per thread
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
    config = ", ".join(f"{k}={v!r}" for k, v in node.get("config", {}).items())
    frozen = " (frozen)" if node.get("trainable", True) is False else ""
    return f"{node['name']}: {node['layer']}({config}){frozen} of {node['inputs']}"


def _check_same_run(engine, desc, where):
    """restore() continues the saved run, so the engine must have its layers (kinds, options,
    wiring) and its optimizer's algorithm (options beyond the step values): parameter names and
    shapes alone let a ReLU model take a Tanh model's weights, or plain SGD a Nesterov run's
    momentum buffers. The loss and the engine's settings (clipping, precision, batch size) are
    the engine's own."""
    def unnamed(nodes):  # names are the parameters' check, above
        return [{k: v for k, v in n.items() if k != "name"} for n in nodes]

    mine = json.loads(json.dumps(_describe_model(engine)["nodes"]))
    saved = desc["model"]["nodes"]
    if unnamed(mine) != unnamed(saved):
        i = next((k for k, (a, b) in enumerate(zip(unnamed(saved), unnamed(mine))) if a != b),
                 min(len(saved), len(mine)))
        theirs = _node_text(saved[i]) if i < len(saved) else "nothing"
        ours = _node_text(mine[i]) if i < len(mine) else "nothing"
        plain = [[{k: v for k, v in n.items() if k != "trainable"} for n in unnamed(x)] for x in (saved, mine)]
        if plain[0] == plain[1]:  # the same model, frozen otherwise: the optimizer state covers other parameters
            def frozen(nodes):
                return [n["name"] for n in nodes if n.get("trainable", True) is False]
            raise CheckpointError(f"{where} was saved from an engine with other frozen layers "
                                  f"({frozen(saved) or 'none'}; this engine: {frozen(mine) or 'none'}), so its "
                                  "optimizer state covers other parameters: build the engine with the same layers "
                                  "frozen (mpscy.load does)")
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
    path = _path(path)
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
    # every value is read first (read() checked them all): below, only set_parameters,
    # set_optimizer_state and the schedule can fail, and the rollback covers them
    opt_state = _unpack(desc["optimizer_state"], tensors, path)
    step_values = {k: float(v) for k, v in desc.get("step_values", {}).items() if hasattr(g, k)}
    initial_lr = desc.get("initial_lr")
    rng, seed, epoch = desc["rng"], desc["engine"]["seed"], desc["counters"]["epoch"]
    info = desc.get("schedule")
    state = _unjson(info["state"]) if info else None
    meta = _unjson(desc.get("meta"))
    # what the failable calls can change (a schedule re-applies its rates and may record the
    # initial one); the rest is assigned after them and cannot fail
    current = engine._schedule
    if info and current is not None and (not _same_schedule(current, info) or engine._schedule_per != info["per"]):
        # said before anything changes: under warnings-as-errors it raises with the engine as it was
        warn_user(f"restore replaces the attached {_schedule_name(_classes(current))} (per={engine._schedule_per!r}) "
                  f"with the checkpoint's {_schedule_name(info)} (per={info['per']!r}); attach yours again with "
                  "set_schedule after restore to keep it")
    before = (engine.get_parameters(), engine.get_optimizer_state(),
              {k: getattr(g, k) for k in _STEP_VALUES if hasattr(g, k)}, getattr(engine, "_initial_lr", None))
    try:
        engine.set_parameters(params)           # each validates fully before writing
        engine.set_optimizer_state(opt_state)
        schedule = None
        if info:
            current = engine._schedule
            if current is not None and _same_schedule(current, info):
                current.load_state_dict(state)
                schedule = current
            else:
                schedule = _build_schedule(engine, info)
        for k, v in step_values.items():        # after the schedule's, which re-applies its last rate
            setattr(g, k, v)
        if initial_lr is not None:
            engine._initial_lr = float(initial_lr)
        g.seed, g.counter = rng["seed"], rng["counter"]
        engine.seed = seed                      # fit's shuffling orders follow it
        engine.epoch = epoch
    except Exception as e:
        engine.set_parameters(before[0])
        engine.set_optimizer_state(before[1])
        for k, v in before[2].items():
            setattr(g, k, v)
        engine._initial_lr = before[3]
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{where} cannot be restored into this engine: {e}") from e
    if schedule is not None:
        engine._schedule, engine._schedule_per, engine._schedule_monitor = schedule, info["per"], info["monitor"]
    engine.checkpoint_meta = meta
    # a save inside fit's epoch: the next fit with initial_epoch=engine.epoch continues it (training._resumed)
    position = desc.get("position")
    engine._resume_position = None if position is None else {**position, "epoch": epoch}
