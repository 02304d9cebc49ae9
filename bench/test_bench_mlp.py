"""Training step of MLPs (Adam, sparse cross-entropy, random data) against PyTorch CPU eager in
the same run: 784-128-64-10 at batch 32 and 256, 784-1024-1024-1024-10 at batch 1024.
Targets (2-core x86-64): batch-32 step >= 3x faster than PyTorch; the 1024-wide MLP within 1.1x.
The gate ratio is mpscy's step over a reference workload of the same FLOPs: the step's own
matrix products (forward and backward) run through numpy's BLAS."""
import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

from conftest import QUICK, compare, record, torch_adam_step

CASES = [
    ("mlp_784_128_64_10_b32", [784, 128, 64, 10], 32, 1 / 3.0),
    ("mlp_784_128_64_10_b256", [784, 128, 64, 10], 256, None),
    ("mlp_784_1024x3_10_b1024", [784, 1024, 1024, 1024, 10], 1024, 1.1),
]


def build(sizes, batch):
    stack = []
    for s in sizes[1:-1]:
        stack += [layers.Dense(s), layers.ReLU()]
    stack.append(layers.Dense(sizes[-1]))
    model = mpscy.Sequential(stack, input_shape=(sizes[0],))
    return mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=1e-3),
                        batch_size=batch, device="cpu", seed=0)


def reference_gemms(sizes, batch, rng):
    """The step's matrix products through numpy: y = x W^T, dW = dy^T x, dx = dy W."""
    mats = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        mats.append((rng.standard_normal((batch, i)).astype(np.float32),
                     rng.standard_normal((o, i)).astype(np.float32),
                     rng.standard_normal((batch, o)).astype(np.float32)))

    def run():
        for k, (x, w, dy) in enumerate(mats):
            x @ w.T
            dy.T @ x
            if k:
                dy @ w
    return run


def torch_step(torch, sizes, batch, x, y):
    torch.manual_seed(0)
    stack = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        stack += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*stack[:-1])
    return torch_adam_step(torch, model, x, y)


@pytest.mark.parametrize("name,sizes,batch,target", CASES, ids=[c[0] for c in CASES])
def test_mlp_step(benchmark, name, sizes, batch, target):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    engine = build(sizes, batch)
    big = batch * sizes[1] >= 1024 * 1024
    mpscy_s, ref_s, torch_s = compare(benchmark, lambda: engine.step(x, y), reference_gemms(sizes, batch, rng),
                                      lambda torch: torch_step(torch, sizes, batch, x, y), 2.0 if big else 0.5,
                                      3 if big else 50)
    note = ""
    if target:
        note = f"target mpscy/torch <= {target:.2f}"
    record(name, mpscy_s, ref_s, torch_s, note)
    if target and torch_s and not QUICK:
        assert mpscy_s / torch_s <= target, f"{name}: mpscy {mpscy_s * 1e6:.0f} us vs torch {torch_s * 1e6:.0f} us"
