#!/usr/bin/env python3
"""ConvTranspose2D on the cuda backend (objc/cuda/conv_transpose.cu's tiled kernel;
MPSCY_CUDA_CONVT_TILED=0 for its direct ones) against PyTorch's (cuDNN) on the same GPU: one
layer's forward and backward (input, weight and bias gradients) through `engine.gradients` (MSE
loss), against torch's module forward, MSE and backward, each timed run ending with the device
synchronized; median of repeats after a warm-up. Shapes of a DCGAN generator (4x4, stride 2,
padding 1) and a U-Net's up-convolution (2x2, stride 2). A first form on CUDA cores
(bench/cuda_notes.md): each row must stay within TARGET of torch's time, a guard against
regressions, not a goal.

    python bench/cuda_convt.py
"""
import time

import numpy as np

import mpscy
from mpscy import layers as L

TARGET = 10.0   # 4.5x-6.8x measured on the H100 (thirty-seventh session)

ROWS = [("dcgan 128->64, 8x8", (128, 8, 8), dict(filters=64, kernel_size=4, stride=2, padding=1), 64),
        ("dcgan 64->32, 16x16", (64, 16, 16), dict(filters=32, kernel_size=4, stride=2, padding=1), 64),
        ("unet 64->32, 32x32 2x2", (64, 32, 32), dict(filters=32, kernel_size=2, stride=2), 32)]


def median_time(fn, sync, repeat=15):
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{'layer':26s} {'mpscy ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    missed = []
    for name, shape, kw, batch in ROWS:
        engine = mpscy.Engine(mpscy.Sequential([L.ConvTranspose2D(**kw)], input_shape=shape), loss="mse",
                              batch_size=batch, device="cuda", input_gradients=True)
        x = np.random.default_rng(0).standard_normal((batch,) + shape).astype(np.float32)
        t = np.zeros((batch,) + engine.model.output_shape, np.float32)
        ms = median_time(lambda: engine.gradients(x, t), engine.synchronize) * 1e3
        module = torch.nn.ConvTranspose2d(shape[0], kw["filters"], kw["kernel_size"], kw["stride"],
                                          kw.get("padding", 0)).cuda()
        xt = torch.tensor(x, device="cuda", requires_grad=True)
        tt = torch.tensor(t, device="cuda")

        def torch_step():  # the data is on the GPU already: torch's cost is its kernels alone
            xt.grad = None
            module.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(module(xt), tt).backward()
        tms = median_time(torch_step, torch.cuda.synchronize) * 1e3
        print(f"{name:26s} {ms:9.3f} {tms:9.3f} {ms / tms:6.2f}")
        if ms / tms > TARGET:
            missed.append(f"{name} {ms / tms:.2f}x")
    if missed:
        raise SystemExit(f"over {TARGET}x torch's time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
