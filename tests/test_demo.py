"""The main job: `python -m mpscy demo` trains an MLP on the bundled digits to >= 0.95 held-out
accuracy in under 10 seconds on the CPU; and the bundled data set is what it claims to be."""
import os
import re
import subprocess
import sys
import time

import numpy as np

import mpscy


def test_digits_dataset():
    x, y = mpscy.datasets.load_digits()
    assert x.shape == (1797, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    xi, _ = mpscy.datasets.load_digits(images=True)
    assert xi.shape == (1797, 1, 8, 8) and np.array_equal(xi.reshape(1797, 64), x)
    a = mpscy.datasets.train_test_split(x, y, 0.2, seed=0)
    b = mpscy.datasets.train_test_split(x, y, 0.2, seed=0)
    assert len(a[0]) == 1438 and len(a[2]) == 359 and all(np.array_equal(p, q) for p, q in zip(a, b))


def test_demo_reaches_095_in_under_10_seconds():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mpscy", "demo"], capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout + run.stderr
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", run.stdout)]
    assert len(accuracies) == 20
    assert accuracies[-1] >= 0.95
    assert elapsed < 10.0, f"demo took {elapsed:.1f} s"
