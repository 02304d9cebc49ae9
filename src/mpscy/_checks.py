"""Option checks shared by layers, optimizers, schedules, callbacks and fit: a value converted, or
InvalidArgumentError naming the option (never a bare ValueError, TypeError or OverflowError from
float() or int(), nor numpy's ambiguous truth value of an array compared with a string)."""

import math
import os

import numpy as np

from .errors import InvalidArgumentError

INT32_LIMIT = 2**31  # sizes and counts travel in the native descriptors as int32


def number(value, what):
    """float(value)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}") from None


def finite(value, what):
    """float(value), finite."""
    v = number(value, what)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{what} must be a finite number, got {value!r}")
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
    if name is not None and (not isinstance(name, str) or not name or len(name.encode()) > 40 or "." in name):
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
