#!/usr/bin/env python3
"""ConvTranspose2D on the cuda backend against PyTorch's (cuDNN) on the same GPU, as a training
step of BatchNorm -> ConvTranspose2D -> GlobalAvgPool2D -> Dense(10) under cross entropy with
SGD: the transposed convolution's forward and its three gradients (input, weight, bias) are most
of the step. Timed as bench/cuda_bench.py times (issue 5's rule): a NumPy batch in, the loss as a
Python float out, for both libraries (torch eager, and torch with the step in one CUDA graph);
median of repeats after a warm-up. Shapes of a DCGAN
generator (4x4, stride 2, padding 1) and a U-Net's up-convolution (2x2, stride 2). Two of
objc/cuda/conv_transpose.cu's forms: its tiled fp32 kernel on CUDA cores (the default) and its
opt-in tensor-core products ($MPSCY_CUDA_CONVT_MMA=1: faster, but their gradients stray further
from the cpu's; bench/cuda_notes.md). Each row's default form must stay within TARGET of
torch's CUDA-graph time, a guard against regressions.

    python bench/cuda_convt.py
"""

import numpy as np

import mpscy
from mpscy import layers as L

from cpu_compare import median_time as _median_time
from cuda_bench import knobs, torch_graph_step


def median_time(fn):
    """two warm-up calls (the first captures a step's graph), then the median of 30"""
    return _median_time(fn, repeat=30, warmup=2)

TARGET = 3.0   # of torch's CUDA graph: the tiled form 0.76x-2.44x on the H100 (thirty-eighth session); tensor cores 0.49x-0.70x

ROWS = [("dcgan 128->64, 8x8", (128, 8, 8), dict(filters=64, kernel_size=4, stride=2, padding=1), 64),
        ("dcgan 64->32, 16x16", (64, 16, 16), dict(filters=32, kernel_size=4, stride=2, padding=1), 64),
        ("unet 64->32, 32x32 2x2", (64, 32, 32), dict(filters=32, kernel_size=2, stride=2), 32)]


def batch(shape, n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n,) + shape).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def mpscy_time(shape, kw, n, env):
    """ms per training step with the knobs of `env` set while the engine is built and the step
    captured (its first call)"""
    with knobs(env):
        model = mpscy.Sequential([L.BatchNorm(), L.ConvTranspose2D(**kw), L.GlobalAvgPool2D(), L.Dense(10)],
                                 input_shape=shape)
        engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=mpscy.optim.SGD(0.01), batch_size=n,
                              device="cuda")
        x, y = batch(shape, n)

        def step():
            float(engine.step(x, y).loss)
        return median_time(step) * 1e3


def torch_step(shape, kw, n, graphed):
    """torch's step: eager, or (graphed) forward, loss, backward and SGD captured in one CUDA graph
    with the batch through pinned tensors (bench/cuda_bench.py's torch_graph)"""
    import torch
    nn, F = torch.nn, torch.nn.functional
    model = nn.Sequential(nn.BatchNorm2d(shape[0]),
                          nn.ConvTranspose2d(shape[0], kw["filters"], kw["kernel_size"], kw["stride"],
                                             kw.get("padding", 0)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(kw["filters"], 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(shape, n)
    y = y.astype(np.int64)
    if not graphed:
        def step():
            xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
            loss.item()
        return step
    graph_step = torch_graph_step(model, opt, (n,) + shape)
    return lambda: graph_step(x, y)


def main():
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{'step ms':24s} {'mpscy':>7s} {'tensor':>7s} {'eager':>7s} {'graph':>7s}   "
          f"{'x eager':>7s} {'x graph':>7s} {'tensor x graph':>14s}")
    missed = []
    for name, shape, kw, n in ROWS:
        ms = mpscy_time(shape, kw, n, {})
        tensor = mpscy_time(shape, kw, n, {"MPSCY_CUDA_CONVT_MMA": "1"})
        eager = median_time(torch_step(shape, kw, n, False)) * 1e3
        graph = median_time(torch_step(shape, kw, n, True)) * 1e3
        print(f"{name:24s} {ms:7.3f} {tensor:7.3f} {eager:7.3f} {graph:7.3f}   {ms / eager:7.2f} {ms / graph:7.2f} "
              f"{tensor / graph:14.2f}")
        if ms / graph > TARGET:
            missed.append(f"{name} {ms / graph:.2f}x")
    if missed:
        raise SystemExit(f"over {TARGET}x torch's CUDA-graph time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
