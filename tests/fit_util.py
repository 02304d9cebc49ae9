"""Shared by test_fit.py and test_callbacks.py: the digits split (a module-scoped fixture), a
small classifier engine for it, and a comparison of two engines' parameters. No tests here."""
import numpy as np
import pytest

import mpscy
from mpscy import layers, optim


@pytest.fixture(scope="module")
def digits():
    x, y = mpscy.datasets.load_digits()
    return mpscy.datasets.train_test_split(x, y, 0.25, seed=0)


def digits_engine(device, lr=1e-3, seed=0, batch=32, opt=None):
    """64 -> 32 -> ReLU -> 10, Adam(lr) unless opt is given."""
    model = mpscy.Sequential([layers.Dense(32), layers.ReLU(), layers.Dense(10)], input_shape=(64,))
    return mpscy.Engine(model, optimizer=opt or optim.Adam(lr), batch_size=batch, device=device, seed=seed)


def same_params(a, b):
    pa, pb = a.get_parameters(), b.get_parameters()
    return all(np.array_equal(pa[k], pb[k]) for k in pa)
