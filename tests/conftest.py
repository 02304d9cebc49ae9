"""Shared test setup. The whole suite runs on one backend, chosen by MPSCY_DEVICE (default cpu);
tests take the `device` fixture and are skipped when that backend is not built or has no device."""
import os

import numpy as np
import pytest

import mpscy

DEVICE = os.environ.get("MPSCY_DEVICE", "cpu")


def pytest_report_header(config):
    return f"mpscy device under test: {DEVICE}; backends present: {mpscy.backends()}"


@pytest.fixture
def device():
    """The backend under test (MPSCY_DEVICE), skipped when it is not available."""
    if DEVICE not in mpscy.backends():
        pytest.skip(f"backend {DEVICE!r} is not built or has no device here")
    return DEVICE


@pytest.fixture
def rng():
    """A fresh, seeded generator per test."""
    return np.random.Generator(np.random.PCG64(12345))
