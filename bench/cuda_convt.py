#!/usr/bin/env python3
"""ConvTranspose2D on the cuda backend against PyTorch's (cuDNN) on the same GPU, as a training
step of BatchNorm -> ConvTranspose2D -> GlobalAvgPool2D -> Dense(10) under cross entropy with
SGD: the transposed convolution's forward and its three gradients (input, weight, bias) are most
of the step. Timed as bench/cuda_bench.py times (issue 5's rule): a NumPy batch in, the loss as a
Python float out, for both libraries; median of repeats after a warm-up. Shapes of a DCGAN
generator (4x4, stride 2, padding 1) and a U-Net's up-convolution (2x2, stride 2). Two of
objc/cuda/conv_transpose.cu's forms: its tensor-core products (the default on sm_80 and newer)
and its tiled kernel on CUDA cores ($MPSCY_CUDA_CONVT_MMA=0, the form before them). Each row's
default form must stay within TARGET of torch's time, a guard against regressions.

    python bench/cuda_convt.py
"""
import os
import time

import numpy as np

import mpscy
from mpscy import layers as L

TARGET = 10.0   # 4.5x-6.8x measured on the H100 (thirty-seventh session)

ROWS = [("dcgan 128->64, 8x8", (128, 8, 8), dict(filters=64, kernel_size=4, stride=2, padding=1), 64),
        ("dcgan 64->32, 16x16", (64, 16, 16), dict(filters=32, kernel_size=4, stride=2, padding=1), 64),
        ("unet 64->32, 32x32 2x2", (64, 32, 32), dict(filters=32, kernel_size=2, stride=2), 32)]


def median_time(fn, repeat=30):
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def batch(shape, n):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n,) + shape).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def mpscy_time(shape, kw, n, knobs):
    """ms per training step with the knobs set while the step is captured (its first call)"""
    saved = {k: os.environ.get(k) for k in knobs}
    os.environ.update(knobs)
    try:
        model = mpscy.Sequential([L.BatchNorm(), L.ConvTranspose2D(**kw), L.GlobalAvgPool2D(), L.Dense(10)],
                                 input_shape=shape)
        engine = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=mpscy.optim.SGD(0.01), batch_size=n,
                              device="cuda")
        x, y = batch(shape, n)

        def step():
            float(engine.step(x, y).loss)
        return median_time(step) * 1e3
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torch_time(shape, kw, n):
    import torch
    nn = torch.nn
    model = nn.Sequential(nn.BatchNorm2d(shape[0]),
                          nn.ConvTranspose2d(shape[0], kw["filters"], kw["kernel_size"], kw["stride"],
                                             kw.get("padding", 0)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(kw["filters"], 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(shape, n)
    y = y.astype(np.int64)

    def step():
        xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        loss.item()
    return median_time(step) * 1e3


def main():
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{'layer (step ms)':26s} {'mpscy':>8s} {'tiled':>8s} {'torch':>8s} {'ratio':>6s} {'tiled':>6s}")
    missed = []
    for name, shape, kw, n in ROWS:
        ms = mpscy_time(shape, kw, n, {})
        tiled = mpscy_time(shape, kw, n, {"MPSCY_CUDA_CONVT_MMA": "0"})
        tms = torch_time(shape, kw, n)
        print(f"{name:26s} {ms:8.3f} {tiled:8.3f} {tms:8.3f} {ms / tms:6.2f} {tiled / tms:6.2f}")
        if ms / tms > TARGET:
            missed.append(f"{name} {ms / tms:.2f}x")
    if missed:
        raise SystemExit(f"over {TARGET}x torch's time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
