"""Small data sets bundled with mpscy (no download). See SOURCE.txt beside this file."""

import os

import numpy as np

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
    """A fixed, seeded shuffle split: (x_train, y_train, x_test, y_test)."""
    n = len(x)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (np.ascontiguousarray(x[train]), np.ascontiguousarray(y[train]),
            np.ascontiguousarray(x[test]), np.ascontiguousarray(y[test]))
