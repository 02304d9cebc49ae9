"""Training step of the README CNN (issue 3) on 3x32x32 inputs at batch 64, Adam, sparse
cross-entropy, against PyTorch CPU eager in the same run: Conv2D(32, 3, 1, 1) - ReLU -
Conv2D(32, 3, 2, 1) - ReLU - Conv2D(64, 3, 1, 1) - ReLU - Conv2D(64, 3, 2, 1) - ReLU - Dense(128)
- ReLU - Dropout(0.5) - Dense(10), about 4 GFLOP per step. Target: within 1.25x of PyTorch.
The gate ratio is mpscy's step over a reference workload of the same FLOPs: the step's own matrix
products (each convolution as im2col GEMMs over the whole batch, forward, weight gradient and
input gradient, and the Dense layers) through numpy's BLAS."""

import mpscy
from mpscy import layers, optim

from conftest import QUICK, compare_image_model, record, torch_adam_step

BATCH = 64
INPUT = (3, 32, 32)
CONVS = [(32, 1), (32, 2), (64, 1), (64, 2)]  # (filters, stride), 3x3 kernels, padding 1
TARGET = 1.25


def build():
    stack = []
    for filters, stride in CONVS:
        stack += [layers.Conv2D(filters, 3, stride=stride, padding=1), layers.ReLU()]
    stack += [layers.Dense(128), layers.ReLU(), layers.Dropout(0.5), layers.Dense(10)]
    model = mpscy.Sequential(stack, input_shape=INPUT)
    return mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=1e-3),
                        batch_size=BATCH, device="cpu", seed=0)


def gemm_shapes():
    """(m, k, n) of every matrix product of one training step."""
    shapes, (c, h, w) = [], INPUT
    for i, (filters, stride) in enumerate(CONVS):
        h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        k, n = c * 9, BATCH * h * w
        shapes += [(filters, k, n), (filters, n, k)]  # forward, weight gradient
        if i:
            shapes.append((k, filters, n))            # input gradient (columns)
        c = filters
    for fan_in, units in [(c * h * w, 128), (128, 10)]:
        shapes += [(BATCH, fan_in, units), (units, BATCH, fan_in), (BATCH, units, fan_in)]
    return shapes


def torch_step(torch, x, y):
    torch.manual_seed(0)
    nn = torch.nn
    stack, c = [], INPUT[0]
    for filters, stride in CONVS:
        stack += [nn.Conv2d(c, filters, 3, stride, 1), nn.ReLU()]
        c = filters
    model = nn.Sequential(*stack, nn.Flatten(), nn.Linear(c * 8 * 8, 128), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(128, 10))
    return torch_adam_step(torch, model, x, y)


def test_cnn_step(benchmark):
    mpscy_s, ref_s, torch_s, flops = compare_image_model(benchmark, build(), gemm_shapes(), torch_step, BATCH, INPUT)
    record("cnn_readme_3x32x32_b64", mpscy_s, ref_s, torch_s,
           f"{flops / 1e9:.1f} GFLOP, {flops / mpscy_s / 1e9:.0f} GFLOP/s; target mpscy/torch <= {TARGET}")
    if torch_s and not QUICK:
        assert mpscy_s / torch_s <= TARGET, f"mpscy {mpscy_s * 1e3:.1f} ms vs torch {torch_s * 1e3:.1f} ms"
