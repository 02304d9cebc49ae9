"""Optimizers: options only. The update itself runs natively, inside the training step, as one
loop (or kernel) over the flat parameter slab, with exactly PyTorch's published algorithm and
defaults (torch.optim). Learning rate, momentum, betas and weight decay travel with every step,
so changing them (by hand or through a schedule) never rebuilds anything."""

from .errors import InvalidArgumentError

__all__ = ["Optimizer", "SGD", "Adam", "AdamW"]


def _nonneg(value, what):
    value = float(value)
    if not value >= 0.0:
        raise InvalidArgumentError(f"{what} must be >= 0, got {value}")
    return value


def _betas(betas):
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"betas must be a pair of floats, got {betas!r}") from None
    for b in (b1, b2):
        if not 0.0 <= b < 1.0:
            raise InvalidArgumentError(f"betas must be in [0, 1), got {betas!r}")
    return b1, b2


class Optimizer:
    """Base class: `kind` names the native optimizer; `spec()` is its native descriptor."""

    kind = None

    def __init__(self, lr):
        self.lr = _nonneg(lr, "lr")

    def spec(self):
        raise NotImplementedError

    def config(self):
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


class SGD(Optimizer):
    """torch.optim.SGD: momentum (the first step copies the gradient into the buffer),
    dampening, Nesterov momentum, L2 weight decay, maximize."""

    kind = "sgd"

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 maximize=False):
        super().__init__(lr)
        self.momentum = _nonneg(momentum, "momentum")
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.maximize = bool(maximize)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise InvalidArgumentError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def spec(self):
        flags = [f for f, on in (("nesterov", self.nesterov), ("maximize", self.maximize)) if on]
        return {"kind": self.kind, "flags": flags, "lr": self.lr, "momentum": self.momentum,
                "dampening": self.dampening, "weight_decay": self.weight_decay}


class Adam(Optimizer):
    """torch.optim.Adam: bias-corrected moments, L2 weight decay added to the gradient,
    AMSGrad, maximize."""

    kind = "adam"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False):
        super().__init__(lr)
        self.betas = _betas(betas)
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.amsgrad = bool(amsgrad)
        self.maximize = bool(maximize)

    def spec(self):
        flags = [f for f, on in (("amsgrad", self.amsgrad), ("maximize", self.maximize)) if on]
        return {"kind": self.kind, "flags": flags, "lr": self.lr, "beta1": self.betas[0],
                "beta2": self.betas[1], "eps": self.eps, "weight_decay": self.weight_decay}


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay)."""

    kind = "adamw"

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize)
