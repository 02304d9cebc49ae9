#!/usr/bin/env python3
"""ConvTranspose2D on the cuda backend against PyTorch's (cuDNN) on the same GPU, as a training
step of BatchNorm -> ConvTranspose2D -> GlobalAvgPool2D -> Dense(10) under cross entropy with
SGD: the transposed convolution's forward and its three gradients (input, weight, bias) are most
of the step. Timed as bench/cuda_bench.py times (issue 5's rule): a NumPy batch in, the loss as a
Python float out, for both libraries (torch eager, and torch with the step in one CUDA graph);
median of repeats after a warm-up. Shapes of a DCGAN
generator (4x4, stride 2, padding 1) and a U-Net's up-convolution (2x2, stride 2). Two of
objc/cuda/conv_transpose.cu's forms: its 3xTF32 tensor-core products (the default) and its tiled
fp32 kernel on CUDA cores ($MPSCY_CUDA_CONVT_MMA=0); for each, the largest relative difference of
one step's gradients (every parameter's) from the cpu backend's, same initial weights and batch.
Each row's default form must stay within TARGET of torch's CUDA-graph time and within GRAD_TOL
of the cpu's gradients, a guard against regressions.

    python bench/cuda_convt.py
"""

import numpy as np

import mpscy
from mpscy import layers as L

from cpu_compare import median_time as _median_time
from cuda_bench import grad_diffs, knobs, torch_eager_step, torch_graph_step


def median_time(fn):
    """two warm-up calls (the first captures a step's graph), then the median of 30"""
    return _median_time(fn, repeat=30, warmup=2)

TARGET = 1.5   # of torch's CUDA graph: tensor cores 0.47x-0.81x on the H100, the tiled form 0.76x-2.90x
GRAD_TOL = 1e-5

ROWS = [("dcgan 128->64, 8x8", (128, 8, 8), dict(filters=64, kernel_size=4, stride=2, padding=1), 64),
        ("dcgan 64->32, 16x16", (64, 16, 16), dict(filters=32, kernel_size=4, stride=2, padding=1), 64),
        ("unet 64->32, 32x32 2x2", (64, 32, 32), dict(filters=32, kernel_size=2, stride=2), 32)]


def batch(shape, n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n,) + shape).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def engine(shape, kw, n, device):
    model = mpscy.Sequential([L.BatchNorm(), L.ConvTranspose2D(**kw), L.GlobalAvgPool2D(), L.Dense(10)],
                             input_shape=shape)
    return mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=mpscy.optim.SGD(0.01), batch_size=n,
                        device=device, seed=0)


def worst(err):
    return max(err.values())


def convt_weight(err):
    return next(v for k, v in err.items() if k.startswith("convtranspose2d") and k.endswith(".weight"))


def mpscy_time(shape, kw, n, env, reference):
    """(ms per training step, gradient difference from `reference`, the cpu's gradients) with the
    knobs of `env` set while the engine is built and the step captured (its first call)"""
    with knobs(env):
        eng = engine(shape, kw, n, "cuda")
        x, y = batch(shape, n)
        err = grad_diffs(eng.gradients(x, y), reference)

        def step():
            float(eng.step(x, y).loss)
        return median_time(step) * 1e3, err


def torch_step(shape, kw, n, graphed):
    """torch's step: eager, or (graphed) forward, loss, backward and SGD captured in one CUDA graph
    with the batch through pinned tensors (bench/cuda_bench.py's torch_graph)"""
    import torch
    nn = torch.nn
    model = nn.Sequential(nn.BatchNorm2d(shape[0]),
                          nn.ConvTranspose2d(shape[0], kw["filters"], kw["kernel_size"], kw["stride"],
                                             kw.get("padding", 0)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(kw["filters"], 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(shape, n)
    y = y.astype(np.int64)
    if not graphed:
        return torch_eager_step(model, opt, x, y)
    graph_step = torch_graph_step(model, opt, (n,) + shape)
    return lambda: graph_step(x, y)


def main():
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{'step ms':24s} {'mpscy':>7s} {'tiled':>7s} {'eager':>7s} {'graph':>7s}   "
          f"{'x eager':>7s} {'x graph':>7s} {'tiled x graph':>13s}   {'grad err':>8s} {'tiled':>8s} {'W err':>8s} {'tiled':>8s}")
    missed = []
    for name, shape, kw, n in ROWS:
        reference = engine(shape, kw, n, "cpu").gradients(*batch(shape, n))
        ms, err = mpscy_time(shape, kw, n, {}, reference)
        tiled, tiled_err = mpscy_time(shape, kw, n, {"MPSCY_CUDA_CONVT_MMA": "0"}, reference)
        eager = median_time(torch_step(shape, kw, n, False)) * 1e3
        graph = median_time(torch_step(shape, kw, n, True)) * 1e3
        print(f"{name:24s} {ms:7.3f} {tiled:7.3f} {eager:7.3f} {graph:7.3f}   {ms / eager:7.2f} {ms / graph:7.2f} "
              f"{tiled / graph:13.2f}   {worst(err):8.1e} {worst(tiled_err):8.1e} {convt_weight(err):8.1e} "
              f"{convt_weight(tiled_err):8.1e}   (largest: {max(err, key=err.get)})")
        if ms / graph > TARGET:
            missed.append(f"{name} {ms / graph:.2f}x torch's CUDA-graph time (at most {TARGET}x)")
        if worst(err) > max(GRAD_TOL, 2 * worst(tiled_err)):
            missed.append(f"{name} gradients {worst(err):.1e} from the cpu's (at most {GRAD_TOL:g} or twice the tiled "
                          f"kernel's)")
    if missed:
        raise SystemExit("; ".join(missed))


if __name__ == "__main__":
    main()
