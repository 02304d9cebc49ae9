"""Learning-rate schedules, as torch.optim.lr_scheduler defines them, built on the engine they
drive: ``StepLR(engine, step_size=3, gamma=0.5)``. Building one sets the learning rate of step 0;
each `step()` (`step(metric)` for ReduceLROnPlateau) sets `engine.learning_rate` (and, for
OneCycleLR, `engine.momentum` or beta1) for the next native step, without a rebuild. When to
call `step()` (per batch or per epoch) is the caller's choice. Rates come from each schedule's
closed form, which PyTorch's recursive form equals up to rounding while one schedule drives an
engine (torch's schedulers stepped together compound; here the last one stepped wins, and a
schedule stepping over a rate changed behind it warns once)."""

import bisect
import contextlib
import math
import weakref

from .._checks import (FLOAT32_MAX, choice as _choice, finite as _finite, flag as _flag, nonneg_int as _nonneg_int,
                       number as _as_number, positive_int, warn_user)
from .._weak import WeakEngine
from ..errors import InvalidArgumentError

__all__ = ["Schedule", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
           "CosineAnnealingWarmRestarts", "LinearWarmup", "OneCycleLR", "ReduceLROnPlateau"]


_positive_int = positive_int   # a step count in [1, 2**31): its float() never overflows
_WARNED = weakref.WeakValueDictionary()  # id -> a schedule that warned of a rate changed behind it (any
                                         # class, hashable or not; not in its state)


def _number(value, what, low=None, high=None):
    """float(value), finite, within [low, high]."""
    value = _finite(value, what)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidArgumentError(f"{what} must be in [{low}, {high}], got {value}")
    return value


def _positive(value, what):
    """float(value), finite and > 0 (a divisor)."""
    value = _number(value, what, 0.0)
    if value == 0.0:
        raise InvalidArgumentError(f"{what} must be > 0, got {value}")
    return value


def _decayed(base, gamma, k):
    """base * gamma ** k, as torch's repeated product gives it: inf where the power overflows
    (Python's float power raises instead), 0 for a base of 0."""
    if base == 0.0:
        return 0.0
    try:
        return base * gamma ** k
    except OverflowError:
        return math.inf


class Schedule:
    """Base class. Subclasses give `lr_at(epoch)` (and `momentum_at(epoch)` when they cycle
    momentum). `last_epoch` counts `step()` calls; `base_lr` is the engine's initial rate (the
    first schedule built on an engine records it, as torch records `initial_lr`). `engine` is
    held weakly (an attached schedule is the engine's: a strong reference back would keep a
    dropped engine's memory until the cycle collector ran)."""

    engine = WeakEngine("schedule")

    def __init__(self, engine):
        from ..engine import Engine  # late: engine imports optim
        if not isinstance(engine, Engine):
            raise InvalidArgumentError(f"a schedule is built on an mpscy.Engine, got {type(engine).__name__}")
        self.engine = engine
        initial = getattr(engine, "_initial_lr", None)
        self.base_lr = engine.learning_rate if initial is None else initial
        self.last_epoch = 0
        self._last_lr = None
        self._last_momentum = None

    def _start(self):
        """Sets step 0's rate; subclasses call it once every option is checked."""
        self._set_epoch(0)
        self._built()

    def _built(self):
        # the engine's initial rate is recorded only by a schedule that was built: a refused
        # one leaves nothing behind for the next schedule to start from
        if getattr(self.engine, "_initial_lr", None) is None:
            self.engine._initial_lr = self.base_lr

    def lr_at(self, epoch):
        """The learning rate for step (or epoch) `epoch`, by torch's formula for this schedule."""
        raise NotImplementedError

    def momentum_at(self, epoch):
        """The momentum (or beta1) for `epoch` where the schedule cycles it, else None."""
        return None

    def steps_left(self):
        """How many more times step() can run before the schedule refuses it (OneCycleLR past its
        total_steps), or None for a schedule without an end; fit checks it before training."""
        final = self._final_step()
        return None if final is None else max(final - self.last_epoch, 0)

    def _final_step(self):
        """The last position step() reaches (None: no end)."""
        return None

    def _set_epoch(self, epoch):
        # either may refuse the epoch: nothing changed yet
        lr, momentum = self._checked(self.lr_at(epoch), epoch), self.momentum_at(epoch)
        self.last_epoch = epoch
        self._apply(lr, momentum)

    def _checked(self, lr, epoch):
        """lr, or InvalidArgumentError naming this schedule where it is not finite in float32 (torch's
        rate becomes inf there; an engine takes no such rate): the step is refused, nothing changed."""
        if not math.isfinite(lr) or abs(lr) > FLOAT32_MAX:   # the native step reads it as float32
            raise InvalidArgumentError(f"{type(self).__name__} gives a learning rate of {lr} at step {epoch} "
                                       f"(base_lr {self.base_lr}), which no step can use; the step is refused")
        return lr

    def _apply(self, lr, momentum=None):
        # the momentum first: its setter may refuse it, and then the rate is as it was too (the
        # rate, finite and >= 0 by then, is always taken)
        if momentum is not None:
            _set_momentum(self.engine, momentum)
            self._last_momentum = momentum
        self.engine.learning_rate = lr
        self._last_lr = lr

    def step(self):
        """Advances one step (or epoch) and sets the learning rate the next native step uses."""
        self._warn_if_overridden()
        self._set_epoch(self.last_epoch + 1)

    def _warn_if_overridden(self):
        """Warns (once a schedule) when the engine's rate is no longer the one this schedule set
        last: another schedule or an assignment changed it, and this schedule's closed form is
        about to set its own rate over that change, where torch's chained schedulers compound."""
        last = self._last_lr
        if last is None or _WARNED.get(id(self)) is self:
            return
        now = self.engine.learning_rate
        if now != last:
            _WARNED[id(self)] = self
            name = type(self).__name__
            warn_user(f"{name}.step(): the engine's learning rate is {now}, not the {last} this schedule set last; "
                      f"another schedule, a restore or an assignment changed it, and {name} sets its own rate over "
                      f"that change (torch's schedulers stepped together compound): drive an engine with one "
                      f"schedule, or compose them with LinearWarmup(then=...)")

    def get_last_lr(self):
        """The learning rate this schedule set last (a float: an engine has one rate)."""
        return self._last_lr

    def state_dict(self):
        """Everything but the engine, as plain values (torch's convention)."""
        return {k: v for k, v in vars(self).items() if k != "engine"}

    def load_state_dict(self, state):
        """Restores state_dict() output and re-applies the last learning rate (and momentum)
        to the engine, so that the next native step continues the schedule. A state the engine
        refuses (a negative rate, beta1 of 1 or more) changes nothing: the schedule's fields and
        the engine's rate and momentum are put back before the error is raised."""
        self._check_state(state)
        with self._kept_on_failure():
            self._load(state)

    @contextlib.contextmanager
    def _kept_on_failure(self):
        fields = self._fields()
        engine = self.engine
        lr, momentum = engine.learning_rate, _get_momentum(engine)
        try:
            yield
        except BaseException:
            for obj, saved in fields:
                vars(obj).clear()
                vars(obj).update(saved)
            engine.learning_rate = lr
            if momentum is not None:
                _set_momentum(engine, momentum)
            raise

    def _fields(self):
        """(schedule, a copy of its fields) for this schedule and every schedule it drives."""
        out = [(self, dict(vars(self)))]
        for v in vars(self).values():
            if isinstance(v, Schedule):
                out += v._fields()
        return out

    def _load(self, state):
        vars(self).update(state)
        if self._last_lr is not None:
            self._apply(self._last_lr, self._last_momentum)

    def _check_state(self, state):
        """Exactly this schedule's attributes: a state of another schedule (one with other
        fields, or a composed one of other classes) is refused before anything changes."""
        if not isinstance(state, dict):
            raise InvalidArgumentError(f"schedule state must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - set(vars(self)) - {"engine"})
        if unknown or "engine" in state:
            raise InvalidArgumentError(f"schedule state has keys {unknown or ['engine']} that "
                                       f"{type(self).__name__} lacks")
        missing = sorted(set(vars(self)) - {"engine"} - set(state))
        if missing:
            raise InvalidArgumentError(f"schedule state lacks {missing}, which {type(self).__name__} has")

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _momentum_key(engine):
    return getattr(engine.optimizer, "momentum_key", None)


def _get_momentum(engine):
    key = _momentum_key(engine)
    if key == "beta1":
        return engine.betas[0]
    return engine.momentum if key else None


def _set_momentum(engine, value):
    if _momentum_key(engine) == "beta1":
        engine.betas = (value, engine.betas[1])
    else:
        engine.momentum = value


class StepLR(Schedule):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, engine, step_size, gamma=0.1):
        super().__init__(engine)
        self.step_size = _positive_int(step_size, "step_size")
        self.gamma = _number(gamma, "gamma", 0.0)
        self._start()

    def lr_at(self, epoch):
        return _decayed(self.base_lr, self.gamma, epoch // self.step_size)


def _milestone(m):
    """A milestone as an int: a whole number (2 or 2.0, as torch's Counter matches 2.0 with step 2);
    2.5 is refused, not truncated to 2 (torch's step count never equals it: no decay there)."""
    v = int(m)
    if v != m:
        raise ValueError(m)
    return v


class MultiStepLR(Schedule):
    """lr = base_lr * gamma ** (number of milestones in [0, epoch]); repeated milestones count
    twice; a negative milestone is never reached (torch's step count starts at 0)."""

    def __init__(self, engine, milestones, gamma=0.1):
        super().__init__(engine)
        try:
            self.milestones = sorted(_milestone(m) for m in milestones)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgumentError(f"milestones must be integers, got {milestones!r}") from None
        self.gamma = _number(gamma, "gamma", 0.0)
        self._start()

    def lr_at(self, epoch):
        # a negative milestone (kept as given, in a state_dict too) is never passed
        passed = bisect.bisect_right(self.milestones, epoch) - bisect.bisect_left(self.milestones, 0)
        return _decayed(self.base_lr, self.gamma, passed)


class ExponentialLR(Schedule):
    """lr = base_lr * gamma ** epoch."""

    def __init__(self, engine, gamma):
        super().__init__(engine)
        self.gamma = _number(gamma, "gamma", 0.0)
        self._start()

    def lr_at(self, epoch):
        return _decayed(self.base_lr, self.gamma, epoch)


class CosineAnnealingLR(Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2 (periodic past
    T_max, as PyTorch's)."""

    def __init__(self, engine, T_max, eta_min=0.0):
        super().__init__(engine)
        self.T_max = _positive_int(T_max, "T_max")
        self.eta_min = _number(eta_min, "eta_min", 0.0)
        self._start()

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class CosineAnnealingWarmRestarts(Schedule):
    """SGDR: cosine from base_lr to eta_min over T_i steps, then restart with T_i *= T_mult.
    `step(epoch)` also accepts a (fractional) epoch, as PyTorch's does."""

    def __init__(self, engine, T_0, T_mult=1, eta_min=0.0):
        super().__init__(engine)
        self.T_0 = _positive_int(T_0, "T_0")
        self.T_mult = _positive_int(T_mult, "T_mult")
        self.eta_min = _number(eta_min, "eta_min", 0.0)
        self.T_i = self.T_0
        self.T_cur = 0
        self._apply(self._lr())
        self._built()

    def _lr(self):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2

    def lr_at(self, epoch):
        """The rate at (possibly fractional) `epoch`, without changing this schedule."""
        T_i, T_cur = self._position(epoch)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * T_cur / T_i)) / 2

    def _position(self, epoch):
        if epoch >= self.T_0:
            if self.T_mult == 1:
                return self.T_0, epoch % self.T_0
            # the last cycle that starts at or before `epoch` (cycle k starts at T_0 (T_mult^k - 1)
            # / (T_mult - 1)), found by adding the cycles' lengths in integers: torch's float log
            # lands just below a whole number at some restarts (log(243, 3) is 4.999...), putting
            # them a cycle early
            start, length = 0, self.T_0
            while start + length <= epoch:
                start, length = start + length, length * self.T_mult
            return length, epoch - start
        return self.T_0, epoch

    def step(self, epoch=None):
        self._warn_if_overridden()
        self._advance(epoch)

    def _advance(self, epoch):
        if epoch is None:
            epoch = self.last_epoch + 1
            T_i, T_cur = self.T_i, self.T_cur + 1
            if T_cur >= T_i:
                T_i, T_cur = T_i * self.T_mult, T_cur % T_i
        else:
            epoch = _number(epoch, "epoch", 0.0)
            T_i, T_cur = self._position(epoch)
        lr = self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * T_cur / T_i)) / 2
        self._apply(self._checked(lr, epoch))   # may refuse the step: nothing changed yet
        self.T_i, self.T_cur, self.last_epoch = T_i, T_cur, math.floor(epoch)

    def _set_epoch(self, epoch):  # used when composed under LinearWarmup
        self._advance(epoch)


class LinearWarmup(Schedule):
    """Linear warmup from start_factor * base_lr to base_lr over warmup_steps steps, then hands
    over to `then` (another schedule built on the same engine), whose step 0 comes right after
    the warmup: torch's SequentialLR([LinearLR(start_factor, 1.0, warmup_steps), then],
    milestones=[warmup_steps]). Without `then` the rate stays at base_lr."""

    def __init__(self, engine, warmup_steps, start_factor=1.0 / 3, then=None):
        super().__init__(engine)
        self.warmup_steps = _positive_int(warmup_steps, "warmup_steps")
        self.start_factor = _number(start_factor, "start_factor", 0.0, 1.0)
        if self.start_factor == 0.0:
            raise InvalidArgumentError("start_factor must be > 0 (as torch's LinearLR)")
        if then is not None:
            if not isinstance(then, Schedule) or isinstance(then, ReduceLROnPlateau):
                raise InvalidArgumentError("then must be a schedule (not ReduceLROnPlateau) built on the same engine")
            if then.engine is not engine:
                raise InvalidArgumentError("then must be built on the same engine as the warmup")
            self.base_lr = then.base_lr
        self.then = then
        self._start()

    def lr_at(self, epoch):
        if self.then is not None and epoch >= self.warmup_steps:
            return self.then.lr_at(epoch - self.warmup_steps)
        f = self.start_factor + (1.0 - self.start_factor) * min(self.warmup_steps, epoch) / self.warmup_steps
        return self.base_lr * f

    def _set_epoch(self, epoch):
        if self.then is not None and epoch >= self.warmup_steps:
            self.then._set_epoch(epoch - self.warmup_steps)  # may refuse the epoch: nothing changed yet
            self.last_epoch = epoch
            self._last_lr, self._last_momentum = self.then._last_lr, self.then._last_momentum
        else:
            super()._set_epoch(epoch)

    def _final_step(self):
        final = None if self.then is None else self.then._final_step()
        return None if final is None else self.warmup_steps + final

    def state_dict(self):
        state = super().state_dict()
        state["then"] = None if self.then is None else self.then.state_dict()
        return state

    def load_state_dict(self, state):
        self._check_state(state)
        state = dict(state)
        inner = state.pop("then", None)
        if (inner is None) != (self.then is None):
            raise InvalidArgumentError("schedule state and this LinearWarmup differ in having a `then` schedule")
        with self._kept_on_failure():
            if inner is not None:
                self.then.load_state_dict(inner)
            self._load(state)


class OneCycleLR(Schedule):
    """The 1cycle policy: the rate rises from max_lr / div_factor to max_lr over pct_start of
    total_steps, then falls to max_lr / (div_factor * final_div_factor) ("cos" or "linear"
    annealing; three_phase as PyTorch). With cycle_momentum (the default) momentum, or beta1 for
    Adam-family optimizers, moves inversely between max_momentum and base_momentum."""

    def __init__(self, engine, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85,
                 max_momentum=0.95, div_factor=25.0, final_div_factor=1e4, three_phase=False):
        super().__init__(engine)
        if total_steps is not None:
            self.total_steps = _positive_int(total_steps, "total_steps")
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = _positive_int(epochs, "epochs") * _positive_int(steps_per_epoch, "steps_per_epoch")
        else:
            raise InvalidArgumentError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        self.pct_start = _number(pct_start, "pct_start", 0.0, 1.0)
        self.anneal_strategy = _choice(anneal_strategy, ("cos", "linear"), "anneal_strategy")
        self.max_lr = _number(max_lr, "max_lr", 0.0)
        self.initial_lr = self.max_lr / _positive(div_factor, "div_factor")
        self.min_lr = self.initial_lr / _positive(final_div_factor, "final_div_factor")
        self.base_lr = self.initial_lr
        self.cycle_momentum = _flag(cycle_momentum, "cycle_momentum")
        if self.cycle_momentum and _momentum_key(engine) is None:
            raise InvalidArgumentError(f"{type(engine.optimizer).__name__} has no momentum or beta1 for "
                                       "cycle_momentum=True to cycle")
        self.base_momentum = _number(base_momentum, "base_momentum", 0.0)
        self.max_momentum = _number(max_momentum, "max_momentum", 0.0)
        if (self.cycle_momentum and _momentum_key(engine) == "beta1"
                and max(self.base_momentum, self.max_momentum) >= 1.0):
            raise InvalidArgumentError(f"base_momentum and max_momentum cycle beta1 of "
                                       f"{type(engine.optimizer).__name__}, which must stay below 1; "
                                       f"got {self.base_momentum} and {self.max_momentum}")
        T = self.total_steps
        if three_phase:
            self._phases = [(float(self.pct_start * T) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (float(2 * self.pct_start * T) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                            (T - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self._phases = [(float(self.pct_start * T) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                            (T - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        self.three_phase = _flag(three_phase, "three_phase")
        start = 0.0
        for i, (end, *_) in enumerate(self._phases):
            if end == start:   # torch divides by zero in it
                raise InvalidArgumentError(f"OneCycleLR: pct_start={self.pct_start} of total_steps={T} leaves "
                                           f"phase {i + 1} without steps; choose another pct_start")
            start = end
        self._start()
        engine._initial_lr = self.initial_lr   # torch overwrites initial_lr (once built: a refusal changes nothing)

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _final_step(self):
        return self.total_steps

    def _at(self, epoch):
        if epoch > self.total_steps:
            raise InvalidArgumentError(f"OneCycleLR stepped {epoch} times; total_steps is {self.total_steps}")
        start_step = 0.0
        for i, (end_step, lr0, lr1, m0, m1) in enumerate(self._phases):
            if epoch <= end_step or i == len(self._phases) - 1:
                pct = (epoch - start_step) / (end_step - start_step)
                return (self._anneal(getattr(self, lr0), getattr(self, lr1), pct),
                        self._anneal(getattr(self, m0), getattr(self, m1), pct))
            start_step = end_step

    def lr_at(self, epoch):
        # torch's last step (epoch == total_steps, after the last training step) extrapolates
        # the linear anneal past min_lr, below 0 when min_lr is small; that rate is never used,
        # and an engine takes no negative rate: 0 instead
        return max(self._at(epoch)[0], 0.0)

    def momentum_at(self, epoch):
        if not self.cycle_momentum:
            return None
        # the same last step extrapolates the linear anneal's momentum past max_momentum, to 1
        # or more when the last phase is short; never used, but beta1 must stay below 1: the
        # momentum stays within [base_momentum, max_momentum] instead
        lo, hi = sorted((self.base_momentum, self.max_momentum))
        return min(max(self._at(epoch)[1], lo), hi)


class ReduceLROnPlateau(Schedule):
    """Multiplies the rate by `factor` (not below min_lr; changes smaller than eps are skipped)
    once the metric given to step(metric) has not improved for more than `patience` steps;
    improvement is relative or absolute by `threshold` ("rel"/"abs") in mode "min" or "max";
    after a reduction, `cooldown` steps pass before bad steps count again. Building it does not
    change the rate."""

    def __init__(self, engine, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        super().__init__(engine)
        self.mode = _choice(mode, ("min", "max"), "mode")
        self.threshold_mode = _choice(threshold_mode, ("rel", "abs"), "threshold_mode")
        self.factor = _number(factor, "factor", 0.0)
        if self.factor >= 1.0:
            raise InvalidArgumentError(f"factor must be < 1, got {self.factor}")
        self.patience = _nonneg_int(patience, "patience")
        self.cooldown = _nonneg_int(cooldown, "cooldown")
        self.threshold = _number(threshold, "threshold", 0.0)
        self.min_lr = _number(min_lr, "min_lr", 0.0)
        self.eps = _number(eps, "eps", 0.0)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self._last_lr = engine.learning_rate
        self._built()

    def _is_better(self, a, best):
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold

    def step(self, metric):
        """Records `metric` (e.g. a validation loss) and reduces the rate on a plateau. A NaN
        metric is no improvement (a bad step), as in torch."""
        current = _as_number(metric, "metric")  # NaN and inf taken as they come, as torch
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            old = float(self.engine.learning_rate)
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.engine.learning_rate = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self.engine.learning_rate

    def lr_at(self, epoch):
        raise InvalidArgumentError("ReduceLROnPlateau has no closed form: its rate follows the metric")
