#!/usr/bin/env python3
"""The cpu backend's Upsample (nearest and bilinear) against PyTorch's CPU kernels: one layer on
(64, 32, 32, 32) float32, forward and backward through `engine.gradients` (MAE loss, input
gradients) against torch's nn.Upsample, forward, MAE and backward, both on the same threads;
median of repeats after a warm-up (cpu_activations.py's timing). Up by 2 (8M outputs) in each mode,
and bilinear down to 20 x 20. With torch installed, each row must be within TARGET of torch's time
measured in the same run.

    python bench/cpu_resize.py [--threads N]
"""
import argparse

import numpy as np

import mpscy
from mpscy import layers as L

from cpu_activations import median_time

TARGET = 3.0   # mpscy / torch for one layer's forward and backward, the call's own cost included

ROWS = [("nearest x2", dict(scale_factor=2)),
        ("bilinear x2", dict(scale_factor=2, mode="bilinear")),
        ("bilinear x2 align", dict(scale_factor=2, mode="bilinear", align_corners=True)),
        ("bilinear to 20x20", dict(size=(20, 20), mode="bilinear"))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    shape = (32, 32, 32)
    x = np.random.default_rng(0).standard_normal((64,) + shape).astype(np.float32)
    print(f"{'upsample':18s} {'mpscy ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    missed = []
    for name, kw in ROWS:
        engine = mpscy.Engine(mpscy.Sequential([L.Upsample(**kw)], input_shape=shape), loss="mae", batch_size=64,
                              device="cpu", input_gradients=True, threads=args.threads)
        t = np.zeros((64,) + engine.model.output_shape, np.float32)
        ms = median_time(lambda: engine.gradients(x, t)) * 1e3
        line = f"{name:18s} {ms:9.2f}"
        if torch is not None:
            module = torch.nn.Upsample(**kw)
            xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t)

            def torch_step():
                xt.grad = None
                torch.nn.functional.l1_loss(module(xt), tt).backward()
            tms = median_time(torch_step) * 1e3
            line += f" {tms:9.2f} {ms / tms:6.2f}"
            if ms / tms > TARGET:
                missed.append(f"{name} {ms / tms:.2f}x")
        print(line)
    if missed:
        raise SystemExit(f"over {TARGET}x torch's time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
