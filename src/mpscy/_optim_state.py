"""The Engine's optimizer state as PyTorch names it: reading it out per parameter from the native
flat slots, and writing it back after validating everything (a mixin of Engine, which holds the
graph, the tensor table and the frozen parameters). No native call but tensor reads and writes."""

import numpy as np

from . import _checks
from .errors import DTypeError, InvalidArgumentError, ShapeError

# optimizer slots that hold running sums or averages of squares (never negative)
_SQUARE_SLOTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


def _overflowed_squares(arr):
    """Whether a sums-of-squares slot holds +Inf but no NaN and no -Inf: Adam's exp_avg_sq after a
    finite gradient past 1.8e19 (its square overflows float32), as torch's own state holds it."""
    return not np.isnan(arr).any() and not (arr == -np.inf).any()


class OptimizerState:
    """get_optimizer_state / set_optimizer_state and their checks (see Engine)."""

    def get_optimizer_state(self):
        """Everything the optimizer carries between steps, in PyTorch's slot names:
        {"step": int, "<slot>": {param name: float32 array}, ...} (NAdam adds "mu_product"; SGD
        adds "momentum_started", 1.0 once a step with momentum has made the momentum buffer,
        where torch's momentum_buffer stops being None, else 0.0).
        LBFGS state is flat over the trainable parameters, as torch keeps it: {"step", "func_evals",
        "n_iter", "t", "prev_loss", "d", "prev_flat_grad", "old_dirs": [arrays],
        "old_stps": [arrays], "ro": [floats], "H_diag"}."""
        g = self._g()
        if self._lbfgs is not None:
            return self._lbfgs_state()
        params = self._trained()
        state = {}
        for i, (name, role, dtype, shape, _) in enumerate(self._tensors):
            if role != "optim":
                continue
            value = g.read_tensor(i, dtype, shape)
            if shape == ():
                state[name] = value.item()
            else:
                state[name] = {p: value[off:off + int(np.prod(s))].reshape(s).copy() for p, s, off in params}
        return state

    def set_optimizer_state(self, state):
        """Restores what get_optimizer_state returned. Everything is validated before
        anything is written; a state from another optimizer or model is rejected."""
        g = self._g()
        if not isinstance(state, dict):
            raise DTypeError(f"optimizer state must be a dict, got {type(state).__name__}")
        if self._lbfgs is not None:
            return self._set_lbfgs_state(state)
        params = self._trained()
        slots = {t[0]: (i, t) for i, t in enumerate(self._tensors) if t[1] == "optim"}
        if "momentum_started" in slots and "momentum_started" not in state and "step" in state:
            # saved before SGD kept momentum_started: a buffer was made at step 1 when momentum was
            # on then (so it holds a gradient); one that is all zeros was never made
            try:
                made = float(state["step"]) > 0 and any(np.any(np.asarray(v) != 0)
                                                        for v in state["momentum_buffer"].values())
            except (TypeError, ValueError, AttributeError, KeyError):
                made = False  # the checks below name what is wrong with step or momentum_buffer
            state = dict(state, momentum_started=1.0 if made else 0.0)
        self._check_keys(state, set(slots))
        staged = []
        for name, (i, (_, _, dtype, shape, _)) in slots.items():
            value = state[name]
            if shape == ():
                v = self._scalar(name, value, dtype)
                if name == "momentum_started" and v[0] not in (0.0, 1.0):
                    raise InvalidArgumentError(f"optimizer state 'momentum_started' must be 0 or 1, got {value!r}")
                staged.append((i, v))
                continue
            if not isinstance(value, dict) or set(value) != {p for p, _, _ in params}:
                raise InvalidArgumentError(self._slot_keys_message(name, value, params))
            flat = np.empty(shape, dtype=dtype)
            for p, s, off in params:
                arr = self._numeric(f"optimizer slot {name!r} for {p!r}", value[p], dtype)
                if arr.shape != tuple(s):
                    raise ShapeError(f"optimizer slot {name!r} for {p!r} has shape {tuple(s)}, got {arr.shape}")
                if not np.isfinite(arr).all() and not (name in _SQUARE_SLOTS and _overflowed_squares(arr)):
                    raise InvalidArgumentError(f"optimizer slot {name!r} for {p!r} contains NaN or Inf")
                if name in _SQUARE_SLOTS and (arr < 0).any():
                    raise InvalidArgumentError(f"optimizer slot {name!r} for {p!r} holds sums of squares; "
                                               f"it has a negative value")
                flat[off:off + arr.size] = arr.ravel()
            staged.append((i, flat))
        for i, arr in staged:
            g.write_tensor(i, arr)

    def _slot_keys_message(self, name, value, params):
        if not isinstance(value, dict):
            return f"optimizer slot {name!r} must be a dict of parameter name to array, got {type(value).__name__}"
        want = {p for p, _, _ in params}
        missing, extra = sorted(want - set(value)), sorted(set(value) - want, key=repr)
        frozen = [k for k in extra if k in self._frozen]
        parts = ([f"missing {missing}"] if missing else []) + \
                ([f"frozen in this engine, so without state: {frozen}"] if frozen else []) + \
                ([f"not parameters of this model: {[k for k in extra if k not in self._frozen]}"]
                 if len(frozen) < len(extra) else [])
        return (f"optimizer slot {name!r} must map each trainable parameter's name to an array: "
                + "; ".join(parts))

    def _trained(self):
        """[(name, shape, offset)] of the parameters the optimizer trains (not frozen): its
        slots are flat over them, at their offsets in the parameter slab."""
        return [(t[0], t[3], t[4]) for t in self._tensors if t[1] == "param" and t[0] not in self._frozen]

    @staticmethod
    def _check_keys(state, expected):
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected, key=repr)
        if missing or extra:
            raise InvalidArgumentError(f"optimizer state does not match this optimizer: missing {missing}, unexpected {extra}")

    @staticmethod
    def _numeric(what, value, dtype):
        """value as a `dtype` array; DTypeError naming `what` unless it holds integers or floats
        (strings such as "1.5" would convert silently, ragged lists not at all)."""
        try:
            arr = _checks.host_array(value)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.dtype.kind not in "iuf":
            got = "a ragged or non-numeric sequence" if arr is None else f"dtype {arr.dtype}"
            raise DTypeError(f"{what} must be a numeric array, got {got}")
        return _checks.cast_floats(arr, dtype, what)

    @staticmethod
    def _number(name, value, what="optimizer state"):
        """value as a Python number: a Python or numpy number, or a 0-d array (torch keeps step
        as a 0-d tensor). A string such as "3" would convert silently; it is refused."""
        try:
            arr = _checks.host_array(value) if not isinstance(value, str) else None
        except (TypeError, ValueError):
            arr = None  # a ragged sequence
        if arr is None or arr.dtype.kind not in "biuf":
            raise InvalidArgumentError(f"{what} {name!r} must be a number, got {value!r}")
        if arr.shape != ():
            raise InvalidArgumentError(f"{what} {name!r} must be a single number, got {value!r}")
        return arr.item()

    @staticmethod
    def _scalar(name, value, dtype, what="optimizer state"):
        value = OptimizerState._number(name, value, what)
        try:
            v = np.array([value], dtype=dtype)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgumentError(f"{what} {name!r} must be a number, got {value!r}") from None
        if dtype == np.int64 and (isinstance(value, bool) or not float(value).is_integer()):
            raise InvalidArgumentError(f"{what} {name!r} is a count: a whole number, got {value!r}")
        if not np.isfinite(v).all() or (dtype == np.int64 and v[0] < 0):
            raise InvalidArgumentError(f"{what} {name!r} must be finite (and >= 0 for counts), got {value!r}")
        if dtype == np.int64 and v[0] > 2**53:
            # counts live natively in a double: above 2**53 they would not come back as written
            raise InvalidArgumentError(f"{what} {name!r} is a count of at most 2**53, got {value!r}")
        return v

    def _optim_tensor(self, name):
        i = self._index[name]
        _, _, dtype, shape, _ = self._tensors[i]
        return i, dtype, shape

    def _lbfgs_state(self):
        g = self._graph
        read = {name: g.read_tensor(*self._optim_tensor(name))
                for name in ("step", "H_diag", "hist_start", "hist_len", "d", "prev_flat_grad", "ro")}
        start, count = int(read["hist_start"][()]), int(read["hist_len"][()])
        cap = read["ro"].shape[0]
        rows = [(start + k) % cap for k in range(count)]
        dirs = g.read_tensor(*self._optim_tensor("old_dirs"))
        stps = g.read_tensor(*self._optim_tensor("old_stps"))
        out = dict(self._lbfgs.state)
        out.update({"step": int(read["step"][()]), "d": read["d"], "prev_flat_grad": read["prev_flat_grad"],
                    "old_dirs": [dirs[r].copy() for r in rows], "old_stps": [stps[r].copy() for r in rows],
                    "ro": [float(read["ro"][r]) for r in rows], "H_diag": float(read["H_diag"][()])})
        return out

    def _set_lbfgs_state(self, state):
        o = self.optimizer
        self._check_keys(state, {"step", "func_evals", "n_iter", "t", "prev_loss", "d", "prev_flat_grad",
                                 "old_dirs", "old_stps", "ro", "H_diag"})
        i_d, _, (n,) = self._optim_tensor("d")
        i_ro, _, (cap,) = self._optim_tensor("ro")
        vec = {}
        for name in ("d", "prev_flat_grad"):
            arr = self._numeric(f"LBFGS state {name!r}", state[name], np.float32)
            if arr.shape != (n,):
                raise ShapeError(f"LBFGS state {name!r} must have shape ({n},), got {arr.shape}")
            vec[name] = np.ascontiguousarray(arr)
        hist = [state["old_dirs"], state["old_stps"], state["ro"]]
        if any(not isinstance(h, (list, tuple)) for h in hist) or len({len(h) for h in hist}) != 1:
            raise InvalidArgumentError("LBFGS state old_dirs, old_stps and ro must be lists of one length")
        count = len(hist[0])
        if count > o.history_size:
            raise InvalidArgumentError(f"LBFGS history of {count} entries exceeds history_size {o.history_size}")
        dirs, stps = np.zeros((cap, n), np.float32), np.zeros((cap, n), np.float32)
        for k in range(count):
            for dst, src, name in ((dirs, hist[0][k], "old_dirs"), (stps, hist[1][k], "old_stps")):
                arr = self._numeric(f"LBFGS state '{name}[{k}]'", src, np.float32)
                if arr.shape != (n,):
                    raise ShapeError(f"LBFGS state {name}[{k}] must have shape ({n},), got {arr.shape}")
                dst[k] = arr
        ro = np.zeros(cap, np.float32)
        for k in range(count):
            ro[k] = self._number(f"ro[{k}]", hist[2][k], "LBFGS state")
        for name, arr in (("d", vec["d"]), ("prev_flat_grad", vec["prev_flat_grad"]), ("old_dirs", dirs),
                          ("old_stps", stps), ("ro", ro)):
            if not np.isfinite(arr).all():
                raise InvalidArgumentError(f"LBFGS state {name!r} contains NaN or Inf")
        scalars = {"step": self._scalar("step", state["step"], np.int64),
                   "H_diag": self._scalar("H_diag", state["H_diag"], np.float64),
                   "hist_start": np.zeros(1, np.float64), "hist_len": np.array([count], np.float64)}
        py = {k: state[k] for k in ("func_evals", "n_iter")}
        for k, v in py.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise InvalidArgumentError(f"LBFGS state {k!r} must be a non-negative integer, got {v!r}")
        t = float(self._scalar("t", state["t"], np.float64)[0])
        prev_loss = state["prev_loss"]
        if prev_loss is not None:
            prev_loss = float(self._scalar("prev_loss", prev_loss, np.float64)[0])
        g = self._graph
        for name, arr in (("d", vec["d"]), ("prev_flat_grad", vec["prev_flat_grad"]), ("old_dirs", dirs),
                          ("old_stps", stps), ("ro", ro), *scalars.items()):
            g.write_tensor(self._optim_tensor(name)[0], arr)
        self._lbfgs.state = {"func_evals": int(py["func_evals"]), "n_iter": int(py["n_iter"]), "t": t,
                             "prev_loss": prev_loss}
