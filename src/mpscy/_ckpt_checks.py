"""The checks of a checkpoint's description (the JSON that save writes into the safetensors
metadata): every field's type and range, and the engine setters' rules for the step values, so
that a damaged or foreign file is refused naming the field before anything is built or changed."""

import numpy as np

from . import _checks
from .errors import CheckpointError, InvalidArgumentError

STEP_VALUES = ("lr", "momentum", "beta1", "beta2", "weight_decay")  # the per-step values a checkpoint holds


def short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_description(desc, where):
    """Checks every field of a description against what save writes (types, ranges, and the
    engine setters' rules for the step values), so that a damaged or foreign file is refused
    here, naming the field, before anything is built or changed. initial_lr and engine.threads
    (which earlier files lack) and the fields always read as optional (mpscy, step_values,
    schedule, meta) may be missing."""
    from . import optim as _optim
    from .engine import _MAX_THREADS as MAX_THREADS, _clip_arg

    def fail(problem):
        raise CheckpointError(f"{where} has a malformed description: {problem}")

    def obj(value, field, keys=()):
        if not isinstance(value, dict):
            fail(f"{field or 'it'} must be a JSON object, got {short(value)}")
        missing = [k for k in keys if k not in value]
        if missing:
            fail(f"{field + '.' if field else ''}{missing[0]} is missing")
        return value

    def text(value, field):
        if not isinstance(value, str) or not value:
            fail(f"{field} must be a non-empty string, got {short(value)}")

    def integer(value, field):   # seeds and counters: the generator's are uint64
        if type(value) is not int or not 0 <= value < 2**64:
            fail(f"{field} must be an integer in [0, 2**64), got {short(value)}")

    def number(value, field):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{field} must be a number, got {short(value)}")
        return value

    def rule(check, value, field):   # a public setter's check; its message names the field and value
        try:
            check(value, field)
        except InvalidArgumentError as e:
            fail(str(e))

    def decodes(value, field):   # arrays are kept as {"__ndarray__": list, "dtype": name}
        try:
            unjson(value)
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
            fail(f"{field} holds a malformed array: {e}")

    def schedule(info, field):   # _describe_schedule's record, its composed schedules too
        obj(info, field, ("module", "class", "state"))
        text(info["module"], f"{field}.module")
        text(info["class"], f"{field}.class")
        decodes(obj(info["state"], f"{field}.state"), f"{field}.state")
        for k, child in obj(info.get("children") or {}, f"{field}.children").items():
            schedule(child, f"{field}.children.{k}")

    obj(desc, "", ("version", "model", "loss", "optimizer", "engine", "rng", "counters", "optimizer_state"))
    if "mpscy" in desc:
        text(desc["mpscy"], "mpscy")
    model = obj(desc["model"], "model", ("class", "nodes"))
    if model["class"] not in ("Sequential", "Model"):
        fail(f"model.class must be 'Sequential' or 'Model', got {short(model['class'])}")
    nodes = model["nodes"]
    if not isinstance(nodes, list) or not nodes:
        fail(f"model.nodes must be a non-empty list, got {short(nodes)}")
    for k, n in enumerate(nodes):
        field = f"model.nodes[{k}]"
        text(obj(n, field, ("name", "layer"))["name"], f"{field}.name")
        if n["layer"] is None:
            shape = obj(n, field, ("shape",))["shape"]
            if not isinstance(shape, list) or not all(type(d) is int and d > 0 for d in shape):
                fail(f"{field}.shape must be a list of positive integers, got {short(shape)}")
            continue
        text(n["layer"], f"{field}.layer")
        if "module" in n:
            text(n["module"], f"{field}.module")
        decodes(obj(n.get("config", {}), f"{field}.config"), f"{field}.config")
        if type(n.get("trainable", True)) is not bool:
            fail(f"{field}.trainable must be true or false, got {short(n['trainable'])}")
        inputs = obj(n, field, ("inputs",))["inputs"]
        if not isinstance(inputs, list) or not inputs or not all(type(i) is int and 0 <= i < k for i in inputs):
            fail(f"{field}.inputs must be a non-empty list of earlier nodes' indices (below {k}), "
                 f"got {short(inputs)}")
    for part in ("loss", "optimizer"):
        info = obj(desc[part], part, ("module", "class", "config"))
        text(info["module"], f"{part}.module")
        text(info["class"], f"{part}.class")
        decodes(obj(info["config"], f"{part}.config"), f"{part}.config")
    e = obj(desc["engine"], "engine", ("batch_size", "seed", "precision", "clip_grad_norm", "clip_grad_value",
                                       "input_gradients"))
    rule(_checks.positive_int, e["batch_size"], "engine.batch_size")
    integer(e["seed"], "engine.seed")
    if e["precision"] not in ("fp32", "tf32"):
        fail(f"engine.precision must be 'fp32' or 'tf32', got {short(e['precision'])}")
    for k in ("clip_grad_norm", "clip_grad_value"):
        if e[k] is not None:
            rule(_clip_arg, number(e[k], f"engine.{k}"), f"engine.{k}")
    if not isinstance(e["input_gradients"], bool):
        fail(f"engine.input_gradients must be true or false, got {short(e['input_gradients'])}")
    if "threads" in e:   # older files lack it: 0, the device's default
        integer(e["threads"], "engine.threads")
        if e["threads"] > MAX_THREADS:
            fail(f"engine.threads must be in [0, {MAX_THREADS}], got {e['threads']}")
    for k, v in obj(desc.get("step_values", {}), "step_values").items():
        field = f"step_values.{k}"
        if k not in STEP_VALUES:
            fail(f"{field} is not a step value ({', '.join(STEP_VALUES)})")
        if k in ("beta1", "beta2"):   # each of the betas setter's pair
            if not 0.0 <= number(v, field) < 1.0:
                fail(f"{field} must be in [0, 1), got {v!r}")
        else:
            rule(_optim._nonneg, number(v, field), field)
    if desc.get("initial_lr") is not None:
        rule(_optim._nonneg, number(desc["initial_lr"], "initial_lr"), "initial_lr")
    rng = obj(desc["rng"], "rng", ("seed", "counter"))
    integer(rng["seed"], "rng.seed")
    integer(rng["counter"], "rng.counter")
    counters = obj(desc["counters"], "counters", ("epoch", "iterations"))
    integer(counters["epoch"], "counters.epoch")
    integer(counters["iterations"], "counters.iterations")
    obj(desc["optimizer_state"], "optimizer_state")   # its values: set_optimizer_state's checks
    info = desc.get("schedule")
    if info is not None:
        schedule(obj(info, "schedule", ("per", "monitor")), "schedule")
        if info["per"] not in ("step", "epoch"):
            fail(f"schedule.per must be 'step' or 'epoch', got {short(info['per'])}")
        if info["monitor"] is not None and not isinstance(info["monitor"], str):
            fail(f"schedule.monitor must be a string, got {short(info['monitor'])}")
    decodes(desc.get("meta"), "meta")


def unjson(v):
    """A description's JSON value with its {"__ndarray__": ..., "dtype": ...} entries as arrays."""
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.asarray(v["__ndarray__"], dtype=v["dtype"])
        return {k: unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unjson(x) for x in v]
    return v
