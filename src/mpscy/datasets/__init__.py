"""Small data sets bundled with mpscy (no download). See SOURCE.txt beside this file."""

import numbers
import os

import numpy as np

from ..errors import InvalidArgumentError, ShapeError

__all__ = ["load_digits", "train_test_split"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits(images=False):
    """The 8x8 handwritten digits (UCI, CC BY 4.0): x float32 (1797, 64) scaled to [0, 1]
    (or (1797, 1, 8, 8) with images=True), y int32 (1797,) in 0..9."""
    with np.load(os.path.join(_HERE, "digits.npz")) as f:
        x = f["images"].astype(np.float32) / np.float32(16.0)
        y = f["labels"].astype(np.int32)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return np.ascontiguousarray(x), y


def train_test_split(x, y, test_fraction=0.2, seed=0):
    """A fixed, seeded shuffle split: (x_train, y_train, x_test, y_test) — not scikit-learn's
    order (x_train, x_test, y_train, y_test), so unpack it by these names. x and y have the same
    number of rows; round(n * test_fraction) of them, test_fraction in (0, 1), go to the test
    split, and each split must get at least one row."""
    x, y = np.asarray(x), np.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if a.ndim == 0:
            raise ShapeError(f"{name} must have a row dimension, got a scalar")
    n = len(x)
    if len(y) != n:
        raise ShapeError(f"y has {len(y)} rows for {n} rows of x")
    if (isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real)
            or not 0 < test_fraction < 1):
        raise InvalidArgumentError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise InvalidArgumentError(f"test_fraction {test_fraction} of {n} rows gives {n_test} test and "
                                   f"{n - n_test} training rows; each split needs at least one row")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return (np.ascontiguousarray(x[train]), np.ascontiguousarray(y[train]),
            np.ascontiguousarray(x[test]), np.ascontiguousarray(y[test]))
