"""Optimizers: options only. The update itself runs natively, inside the training step, as one
loop (or kernel) over the flat parameter slab, with exactly PyTorch's published algorithm and
defaults (torch.optim). Learning rate, momentum, betas and weight decay travel with every step,
so changing them (by hand or through a schedule, see mpscy.optim.schedules) never rebuilds
anything. LBFGS runs several native evaluations per `engine.step` (see mpscy.optim.lbfgs)."""

import inspect
import math

from .._checks import (choice as _choice, finite as _finite, flag as _flag, float32 as _float32, number as _number,
                       positive_int as _count)
from ..errors import InvalidArgumentError

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "NAdam", "LBFGS",
           "get", "schedules"]


def _nonneg(value, what):
    """A rate or coefficient >= 0 that fits float32 (the native update computes in float32: a rate of
    1e39 became inf there and an applied step wrote inf into every parameter)."""
    value = _number(value, what)
    if not 0.0 <= value < math.inf:
        raise InvalidArgumentError(f"{what} must be finite and >= 0, got {value}")
    return _float32(value, what)


def _betas(betas):
    try:
        b1, b2 = (_number(b, "betas") for b in betas)
    except (TypeError, ValueError, InvalidArgumentError):
        raise InvalidArgumentError(f"betas must be a pair of floats, got {betas!r}") from None
    for b in (b1, b2):
        if not 0.0 <= b < 1.0:
            raise InvalidArgumentError(f"betas must be in [0, 1), got {betas!r}")
    return b1, b2


def _flags(**named):
    return [name for name, on in named.items() if on]


class Optimizer:
    """Base class: `kind` names the native optimizer; `spec()` is its native descriptor.
    `momentum_key` says what OneCycleLR cycles: "momentum", "beta1" or None."""

    kind = None
    momentum_key = None

    def __init__(self, lr, learning_rate=None):
        if learning_rate is not None:  # Keras's name for lr
            default = inspect.signature(type(self).__init__).parameters["lr"].default
            if lr != default:
                raise InvalidArgumentError(f"give lr or learning_rate (Keras's name for it), not both: got lr={lr!r} "
                                           f"and learning_rate={learning_rate!r}")
            lr = learning_rate
        self.lr = _nonneg(lr, "lr")

    def spec(self):
        """The native optimizer descriptor (kind, hyperparameters, flags) the engine builds;
        every optimizer class gives its own (the base class has no native update)."""
        choices = [n for n in __all__ if n not in ("Optimizer", "get", "schedules")]
        raise InvalidArgumentError(f"{type(self).__name__} has no native update (it is not one of mpscy.optim's "
                                   f"optimizers); choose one of {choices}")

    def config(self):
        """Constructor arguments, for repr and checkpoints."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


class SGD(Optimizer):
    """torch.optim.SGD: momentum (the first step copies the gradient into the buffer),
    dampening, Nesterov momentum, L2 weight decay, maximize."""

    kind = "sgd"
    momentum_key = "momentum"

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 maximize=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.momentum = _nonneg(momentum, "momentum")
        self.dampening = _float32(dampening, "dampening")
        self.nesterov = _flag(nesterov, "nesterov")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.maximize = _flag(maximize, "maximize")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidArgumentError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def spec(self):
        return {"kind": self.kind, "flags": _flags(nesterov=self.nesterov, maximize=self.maximize),
                "lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """torch.optim.Adam: bias-corrected moments, L2 weight decay added to the gradient (or
    decoupled, as AdamW, with decoupled_weight_decay=True), AMSGrad, maximize."""

    kind = "adam"
    momentum_key = "beta1"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.betas = _betas(betas)
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.amsgrad = _flag(amsgrad, "amsgrad")
        self.maximize = _flag(maximize, "maximize")
        self.decoupled_weight_decay = _flag(decoupled_weight_decay, "decoupled_weight_decay")

    def spec(self):
        flags = _flags(amsgrad=self.amsgrad, maximize=self.maximize,
                       decoupled_weight_decay=self.decoupled_weight_decay)
        return {"kind": self.kind, "flags": flags, "lr": self.lr, "beta1": self.betas[0],
                "beta2": self.betas[1], "eps": self.eps, "weight_decay": self.weight_decay}


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay)."""

    kind = "adamw"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, learning_rate=None):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay=True,
                         learning_rate=learning_rate)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: square average with smoothing `alpha`, `eps` added after the square
    root, momentum buffer, centered variant (subtracts the squared mean gradient), L2 weight
    decay, maximize."""

    kind = "rmsprop"
    momentum_key = "momentum"

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.alpha = _nonneg(alpha, "alpha")
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.momentum = _nonneg(momentum, "momentum")
        self.centered = _flag(centered, "centered")
        self.maximize = _flag(maximize, "maximize")

    def spec(self):
        return {"kind": self.kind, "flags": _flags(centered=self.centered, maximize=self.maximize),
                "lr": self.lr, "alpha": self.alpha, "eps": self.eps,
                "weight_decay": self.weight_decay, "momentum": self.momentum}


class Adagrad(Optimizer):
    """torch.optim.Adagrad: accumulated squared gradients (starting at
    initial_accumulator_value), learning rate lr / (1 + (step - 1) * lr_decay), L2 weight
    decay, eps, maximize."""

    kind = "adagrad"

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, maximize=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.lr_decay = _nonneg(lr_decay, "lr_decay")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.initial_accumulator_value = _nonneg(initial_accumulator_value, "initial_accumulator_value")
        self.eps = _nonneg(eps, "eps")
        self.maximize = _flag(maximize, "maximize")

    def spec(self):
        return {"kind": self.kind, "flags": _flags(maximize=self.maximize), "lr": self.lr,
                "lr_decay": self.lr_decay, "weight_decay": self.weight_decay,
                "initial_accumulator_value": self.initial_accumulator_value, "eps": self.eps}


class Adadelta(Optimizer):
    """torch.optim.Adadelta: running averages of squared gradients and squared updates with
    coefficient `rho`, `eps` inside both square roots, lr scaling the update, L2 weight decay,
    maximize."""

    kind = "adadelta"

    def __init__(self, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.rho = _nonneg(rho, "rho")
        if self.rho > 1.0:
            raise InvalidArgumentError(f"rho must be in [0, 1], got {self.rho}")
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.maximize = _flag(maximize, "maximize")

    def spec(self):
        return {"kind": self.kind, "flags": _flags(maximize=self.maximize), "lr": self.lr,
                "rho": self.rho, "eps": self.eps, "weight_decay": self.weight_decay}


class NAdam(Optimizer):
    """torch.optim.NAdam: Adam with Nesterov momentum and the momentum-decay schedule
    mu_t = beta1 (1 - 0.5 * 0.96^(t momentum_decay)), L2 or decoupled weight decay, maximize."""

    kind = "nadam"
    momentum_key = "beta1"

    def __init__(self, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False, learning_rate=None):
        super().__init__(lr, learning_rate)
        self.betas = _betas(betas)
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.momentum_decay = _nonneg(momentum_decay, "momentum_decay")
        self.decoupled_weight_decay = _flag(decoupled_weight_decay, "decoupled_weight_decay")
        self.maximize = _flag(maximize, "maximize")

    def spec(self):
        flags = _flags(decoupled_weight_decay=self.decoupled_weight_decay, maximize=self.maximize)
        return {"kind": self.kind, "flags": flags, "lr": self.lr, "beta1": self.betas[0],
                "beta2": self.betas[1], "eps": self.eps, "weight_decay": self.weight_decay,
                "momentum_decay": self.momentum_decay}


class LBFGS(Optimizer):
    """torch.optim.LBFGS: limited-memory BFGS over the whole flat parameter slab. One
    `engine.step(x, y)` is one `LBFGS.step(closure)` on that batch: up to max_iter iterations
    and max_eval loss evaluations (default max_iter * 5 // 4), each evaluation one native call.
    line_search_fn=None moves lr along the direction; "strong_wolfe" searches as PyTorch does.

    weight_decay (an mpscy addition, default 0) adds weight_decay / 2 * |params|^2 to the
    objective, as an L2-regularized closure would. Gradient clipping does not apply. The history
    is planned at build time: 2 * (history_size + max_iter) * n_params floats."""

    kind = "lbfgs"

    def __init__(self, lr=1.0, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None, weight_decay=0.0,
                 learning_rate=None):
        super().__init__(lr, learning_rate)
        _count(max_iter, "max_iter")
        _count(history_size, "history_size")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        if isinstance(max_eval, bool) or not isinstance(max_eval, int) or max_eval < 1:
            raise InvalidArgumentError(f"max_eval must be a positive integer, got {max_eval!r}")
        _choice(line_search_fn, (None, "strong_wolfe"), "line_search_fn")
        self.max_iter = int(max_iter)
        self.max_eval = int(max_eval)
        self.tolerance_grad = _nonneg(tolerance_grad, "tolerance_grad")
        self.tolerance_change = _nonneg(tolerance_change, "tolerance_change")
        self.history_size = int(history_size)
        self.line_search_fn = line_search_fn
        self.weight_decay = _nonneg(weight_decay, "weight_decay")

    def spec(self):
        return {"kind": self.kind, "flags": [], "lr": self.lr, "max_iter": self.max_iter,
                "history_size": self.history_size, "tolerance_grad": self.tolerance_grad,
                "tolerance_change": self.tolerance_change, "line_search_fn": self.line_search_fn,
                "weight_decay": self.weight_decay}


def get(name):
    """An optimizer by name with PyTorch's defaults, as Keras's optimizer="adam" (case ignored):
    "sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "nadam", "lbfgs". The defaults are
    torch's, not Keras's (SGD's lr 1e-3 here, 1e-2 in Keras; RMSprop's 1e-2 here, 1e-3 in Keras)."""
    names = {cls.kind: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta, NAdam, LBFGS)}
    if not isinstance(name, str) or name.lower() not in names:
        raise InvalidArgumentError(f"unknown optimizer {name!r}; choose one of {sorted(names)} or an mpscy.optim "
                                   f"optimizer")
    return names[name.lower()]()


from . import schedules  # noqa: E402  (schedules import nothing from here but the names)
