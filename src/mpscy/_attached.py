"""What `fit` carries across its steps and from one fit to the next: the schedule attached to an
engine (`Engine.set_schedule`; stepping it, and its room for a fit's steps checked before the
first) and the position of a checkpoint saved inside an epoch (a fit that continues that epoch
passes over the batches it had done). training.py's fit uses both."""

from . import callbacks as _callbacks, errors as _errors
from ._checks import choice, warn_user
from ._sources import _Arrays, _in_batch
from .errors import InvalidArgumentError

__all__ = ["set_schedule"]


# ----------------------------------------------------------------------------- schedules
def set_schedule(engine, schedule, per="epoch", monitor="val_loss"):
    """Attaches `schedule` (an mpscy.optim.schedules object built on this engine, or None to
    detach) for fit to step after every batch (per="step") or every epoch (per="epoch"; a
    schedule whose step() takes a metric gets logs[monitor]: "val_loss" without validation data
    is the training loss, another key missing from the logs warns and skips the step).
    Checkpoints save and restore it."""
    if schedule is None:
        engine._schedule, engine._schedule_per, engine._schedule_monitor = None, None, None
        return
    choice(per, ("step", "epoch"), "per")
    _callbacks._monitor(monitor)
    if not callable(getattr(schedule, "step", None)):
        raise InvalidArgumentError(f"a schedule needs a step() method, got {type(schedule).__name__}")
    owner = getattr(schedule, "engine", engine)
    if owner is not engine:
        raise InvalidArgumentError("this schedule was built on another engine")
    _callbacks._check_direction(schedule, monitor, "set_schedule")
    engine._schedule, engine._schedule_per, engine._schedule_monitor = schedule, per, monitor


def _step_schedule(schedule, takes_metric, logs, monitor, where, b=None):
    """Steps the attached schedule; an mpscy error it raises (OneCycleLR past its end, a rate no
    step can use, its engine gone) is said to be where(b)'s, as a step's error is (formatted only
    then: fit steps a per-step schedule every batch)."""
    try:
        if takes_metric:
            value = _callbacks._schedule_metric(logs, monitor, "set_schedule")
            if value is not None:
                schedule.step(value)
        else:
            schedule.step()
    except _errors.Error as e:
        raise _in_batch(e, where(b)) from e


def _check_schedules(engine, callbacks, steps, runs, skip):
    """A schedule with an end (OneCycleLR's total_steps, a LinearWarmup handing over to one) that
    this fit would step past is refused before the first step, where the count is known: the
    attached one per batch (steps a epoch, the first epoch resumed after `skip` batches) or per
    epoch, and a LearningRateScheduler's schedule object per epoch. Fewer steps may run (a
    callback stopping the fit, a batch whose every label is ignore_index), never more."""
    plans = []
    if engine._schedule is not None and engine._schedule_per == "step" and steps is not None:
        how = (f"set_schedule(per='step') steps it after each batch: {runs} epoch{'s' * (runs != 1)} of {steps} "
               f"batches" + (f", the first resumed after its batch {skip - 1}" if skip else ""))
        if hasattr(engine._schedule, "total_steps"):
            how += f"; OneCycleLR's total_steps counts every batch of every epoch, steps_per_epoch={steps}"
        plans.append((engine._schedule, runs * steps - skip, how))
    elif engine._schedule is not None and engine._schedule_per == "epoch":
        plans.append((engine._schedule, runs, "set_schedule(per='epoch') steps it once an epoch"))
    for cb in callbacks:
        if isinstance(cb, _callbacks.LearningRateScheduler) and cb._is_object:
            plans.append((cb.schedule, runs, "LearningRateScheduler steps it once an epoch"))
    for schedule, need, how in plans:
        left = getattr(schedule, "steps_left", None)
        left = left() if callable(left) else None
        if left is not None and need > left:
            raise InvalidArgumentError(f"{type(schedule).__name__} can step {left} more time{'s' * (left != 1)} and "
                                       f"this fit would step it {need} times ({how}): build it for this fit's "
                                       "steps, or fit fewer epochs")


# ----------------------------------------------------------------------------- a resumed epoch
def _position_record(source, batch_size, shuffle):
    """What the batches of an epoch depend on besides the data and the epoch: the batch size and
    shuffling of arrays; a loader's batch_size (None where it has none) and order (_loader_order)."""
    if isinstance(source, _Arrays):
        return {"batch_size": int(batch_size), "shuffle": bool(shuffle), "order": "arrays"}
    b = getattr(source.loader, "batch_size", None)
    return {"batch_size": b if isinstance(b, int) and not isinstance(b, bool) else None, "shuffle": None,
            "order": _loader_order(source.loader)}


def _loader_order(loader):
    """How a loader orders an epoch's batches, where a later fit gets the same order: an mpscy
    DataLoader's by its shuffle, seed and drop_last (and set_epoch); a torch DataLoader's taken in
    sequence (a SequentialSampler in a BatchSampler). None for any other: torch's RandomSampler
    draws from torch's global generator, another loader's order is its own."""
    from .data import DataLoader
    if isinstance(loader, DataLoader):
        return f"DataLoader(shuffle={loader.shuffle}, seed={loader.seed}, drop_last={loader.drop_last})"
    sampler, batches = getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)
    if (type(sampler).__name__ == "SequentialSampler" and type(batches).__name__ == "BatchSampler"
            and type(getattr(batches, "sampler", None)).__name__ == "SequentialSampler"):   # a batch_sampler= given
        return f"in sequence (drop_last={getattr(loader, 'drop_last', None)})"
    return None


def _resumed(engine, initial_epoch, runs, known, record):
    """(batches to pass over, the saved position) where this fit continues the epoch that a
    checkpoint saved inside fit was saved in (mpscy.load and restore keep the position): a fit
    with initial_epoch=engine.epoch, the batches of the same sizes and shuffling, passes over
    the batches done (the order of the epoch is the engine's, PCG64([seed, engine.epoch])) and
    starts from the sums they left, as the uninterrupted run; (0, None) otherwise, with a warning
    where a position cannot be taken."""
    pos = getattr(engine, "_resume_position", None)
    if pos is None or runs == 0:
        return 0, None
    why = None
    if pos["epoch"] != engine.epoch:   # engine.epoch was set by hand since
        why = f"the engine's epoch is now {engine.epoch}"
    elif initial_epoch != engine.epoch:
        why = f"this fit starts at initial_epoch={initial_epoch}, not {engine.epoch}"
    elif record["order"] is None:
        why = ("this fit's loader does not give an epoch's batches in an order a later fit repeats (a torch "
               "DataLoader that shuffles draws from torch's global generator; an mpscy DataLoader's order is its "
               "seed's)")
    else:
        differ = [f"{k} {pos.get(k)!r} (this fit's {record[k]!r})" for k in record if pos.get(k) != record[k]]
        if differ:
            why = f"it was saved by a fit with {', '.join(differ)}"
        elif known is not None and pos["batches"] > known:
            why = f"its epoch had more than this fit's {known} batches"
    if why is None:
        return pos["batches"], pos
    warn_user(f"this engine was saved inside epoch {pos['epoch'] + 1}, after its batch {pos['batches'] - 1}, and "
              f"{why}: that epoch runs from its first batch again (a per-step schedule saved with it is "
              f"{pos['batches']} steps ahead of its batches)")
    return 0, None
