"""Option checks shared by layers, optimizers, schedules, callbacks and fit: a value converted, or
InvalidArgumentError naming the option (never a bare ValueError, TypeError or OverflowError from
float() or int(), nor numpy's ambiguous truth value of an array compared with a string)."""

import contextlib
import math
import os
import sys
import tempfile
import warnings

import numpy as np

from .errors import InvalidArgumentError

INT32_LIMIT = 2**31  # sizes and counts travel in the native descriptors as int32
FLOAT32_MAX = float(np.finfo(np.float32).max)  # options the native code reads as float32 stay below it


def host_array(value):
    """np.asarray(value), with a torch tensor read as its own .numpy() would refuse to: one that
    requires grad through .detach(), one on a GPU through .cpu(), a bfloat16 one (NumPy has no
    bfloat16) widened to float32, which is exact. Anything else raises what np.asarray raises."""
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        value = t
    return np.asarray(value)


def cast_floats(a, dtype, what, rows=False):
    """Array a as `dtype` in C order. A finite value past a narrower float type's range (1e300 in
    float64 for float32), which the cast would make an Inf later reported as "NaN or Inf", is
    refused as what it is, without NumPy's overflow warning; with rows, naming its row and the
    type's largest value (a batch's form). The shape is kept, a 0-d value's too."""
    with np.errstate(over="ignore"):
        out = np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray: it makes a 0-d value (1,)
    if a.dtype.kind == "f" and out.dtype.kind == "f" and a.dtype.itemsize > out.dtype.itemsize and out.size:
        past = np.isinf(out) & np.isfinite(a)
        if past.any():
            at = np.unravel_index(int(np.argmax(past)), a.shape)
            where = f" at row {at[0]}" if rows and a.ndim else ""
            limit = f" (largest {float(np.finfo(out.dtype).max):.4g})" if rows else ""
            raise InvalidArgumentError(f"{what} holds {float(a[at])!r}{where}, past {out.dtype}'s range{limit}")
    return out


def number(value, what):
    """float(value) of a real number: strings and bools are refused, not converted (float("0.5")
    and float(True) would be)."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}") from None


def flag(value, what, hint=""):
    """A bool (numpy's too): an on/off option, where a number or a string is far more likely a
    misplaced argument than a truth value (torch's nn.Linear(16, 10) habit gives Dense(16, 10))."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{what} must be True or False, got {value!r}{hint}")
    return bool(value)


def finite(value, what):
    """float(value), finite."""
    v = number(value, what)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}")
    return v


def float32(value, what):
    """float(value), finite in float32 (|value| <= 3.4028235e+38): an option the native code reads as
    float32 (an optimizer's rate, a layer's slope), which would become inf there."""
    v = finite(value, what)
    if abs(v) > FLOAT32_MAX:
        raise InvalidArgumentError(f"{what} must fit float32 (|value| <= {FLOAT32_MAX:.8g}), got {value!r}")
    return v


def integer(value, what):
    """An int (an axis); bools and floats such as 1.5 are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}")
    return int(value)


def positive_int(value, what):
    """An int in [1, 2**31): a size or count the native descriptors hold."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value < INT32_LIMIT:
        raise InvalidArgumentError(f"{what} must be a positive integer below 2**31, got {value!r}")
    return int(value)


def node_name(name, what):
    """None, or a node name: a non-empty string of at most 40 bytes (the native descriptor's
    room) without '.' (parameters are named "<node>.<suffix>")."""
    if name is not None and not isinstance(name, str):  # a torch argument given by position
        raise InvalidArgumentError(f"{what} name must be a string, got {name!r}: a PyTorch argument passed by "
                                   f"position (inplace, dilation, ceil_mode, ...) lands here; pass mpscy's own "
                                   f"options by keyword")
    if name is not None and (not name or len(name.encode()) > 40 or "." in name):
        raise InvalidArgumentError(f"{what} name must be a non-empty string of at most 40 bytes without '.', "
                                   f"got {name!r}")
    return name


def nonneg_int(value, what):
    """An int >= 0 (a count, a patience, an epoch); bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidArgumentError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def choice(value, options, what):
    """value, one of `options` (strings, ints or None). Only a str, an int or None is compared:
    an array is refused by its type rather than compared element by element."""
    if (value is None or isinstance(value, (str, int, np.integer))) and value in options:
        return value
    names = [repr(o) for o in options]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise InvalidArgumentError(f"{what} must be {listed}, got {value!r}")


def path(value, what):
    """A non-empty file or folder path, as a str (a str or an os.PathLike giving one)."""
    try:
        p = os.fspath(value)
    except TypeError:
        p = None
    if not isinstance(p, str) or not p:
        raise InvalidArgumentError(f"{what} must be a path (a non-empty str or os.PathLike), got {value!r}")
    return p


def can_write_in(folder):
    """Whether a new file can be made in the existing folder: os.access, then a temporary file
    made and removed there, since os.access grants root everything, even on a read-only or
    virtual file system (/proc, /sys, a read-only mount) where the write would fail later."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".mpscy-check-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return True


def can_write_file(path):
    """Whether the existing file can be opened for writing: os.access, then an open for appending
    that writes nothing (the same reason as can_write_in)."""
    if not os.access(path, os.W_OK):
        return False
    try:
        with open(path, "ab"):
            pass
    except OSError:
        return False
    return True


def warn_user(message, category=UserWarning):
    """warnings.warn attributed to the first caller outside mpscy, however deep in mpscy the
    warning arises (a fit, a callback, a checkpoint load in between)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "mpscy":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# What building a model, a layer or an engine warns about: the loss and the output (Engine),
# Keras's channels-last shapes (Model) and BatchNorm momentum
LOSS_WARNING = r"loss \S+ takes "
FROZEN_WARNING = r"every layer with parameters is frozen"
BUILD_WARNINGS = (LOSS_WARNING, r"\S+ '[^']*' reads input ", r"BatchNorm momentum=", FROZEN_WARNING)


@contextlib.contextmanager
def quiet_build_warnings(patterns=BUILD_WARNINGS):
    """A block in which those build warnings (or the ones given) are silent: a model rebuilt from
    a checkpoint was built, and warned about, when it was trained."""
    with warnings.catch_warnings():
        for pattern in patterns:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield
