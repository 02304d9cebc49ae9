#!/usr/bin/env python3
"""The cpu backend's ConvTranspose2D (conv.c's convolution tasks in the transposed roles) against
PyTorch's CPU kernels: one layer's forward and backward (input, weight and bias gradients) through
`engine.gradients` (MSE loss) against torch's nn.ConvTranspose2d forward, MSE and backward, both on
the same threads; median of repeats after a warm-up (cpu_activations.py's timing). Shapes of a
DCGAN generator (4x4, stride 2, padding 1) and a U-Net's up-convolution (2x2, stride 2), as
bench/cuda_convt.py. With torch installed, each row must be within TARGET of torch's time
measured in the same run.

    python bench/cpu_convt.py [--threads N]
"""
import argparse

import numpy as np

import mpscy
from mpscy import layers as L

from cpu_activations import median_time

TARGET = 2.0   # mpscy / torch for one layer's forward and backward, the call's own cost included

ROWS = [("dcgan 128->64, 8x8", (128, 8, 8), dict(filters=64, kernel_size=4, stride=2, padding=1), 64),
        ("dcgan 64->32, 16x16", (64, 16, 16), dict(filters=32, kernel_size=4, stride=2, padding=1), 64),
        ("unet 64->32, 32x32 2x2", (64, 32, 32), dict(filters=32, kernel_size=2, stride=2), 32)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    print(f"{'layer':24s} {'mpscy ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    missed = []
    for name, shape, kw, batch in ROWS:
        engine = mpscy.Engine(mpscy.Sequential([L.ConvTranspose2D(**kw)], input_shape=shape), loss="mse",
                              batch_size=batch, device="cpu", input_gradients=True, threads=args.threads)
        x = np.random.default_rng(0).standard_normal((batch,) + shape).astype(np.float32)
        t = np.zeros((batch,) + engine.model.output_shape, np.float32)
        ms = median_time(lambda: engine.gradients(x, t)) * 1e3
        line = f"{name:24s} {ms:9.2f}"
        if torch is not None:
            module = torch.nn.ConvTranspose2d(shape[0], kw["filters"], kw["kernel_size"], kw["stride"],
                                              kw.get("padding", 0))
            xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t)

            def torch_step():
                xt.grad = None
                module.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(module(xt), tt).backward()
            tms = median_time(torch_step) * 1e3
            line += f" {tms:9.2f} {ms / tms:6.2f}"
            if ms / tms > TARGET:
                missed.append(f"{name} {ms / tms:.2f}x")
        print(line)
    if missed:
        raise SystemExit(f"over {TARGET}x torch's time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
