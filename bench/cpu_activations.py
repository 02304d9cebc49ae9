#!/usr/bin/env python3
"""The cpu backend's element-wise activations against PyTorch's CPU kernels: one activation layer
on (64, 32, 32, 32) float32 (2M elements), forward and backward through `engine.gradients` (MAE
loss, input gradients) against torch's module, forward, MAE and backward, both on the same
threads; median of repeats after a warm-up. The flatten row (a copy each way) is about mpscy's
cost of the call itself (staging the batch and the target, the loss, the input gradient's copy),
which every other row includes. With torch installed, each activation's row must be within TARGET
of torch's time measured in the same run.

    python bench/cpu_activations.py [--threads N]
"""
import argparse
import time

import numpy as np

import mpscy
from mpscy import layers as L

TARGET = 3.0   # mpscy / torch for one layer's forward and backward, the call's own cost included


def median_time(fn, repeat=9):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
    t = np.zeros_like(x)
    rows = [("flatten", L.Flatten, "Flatten"), ("relu", L.ReLU, "ReLU"), ("sigmoid", L.Sigmoid, "Sigmoid"),
            ("tanh", L.Tanh, "Tanh"), ("swish", L.Swish, "SiLU"), ("elu", L.ELU, "ELU"), ("gelu", L.GELU, "GELU"),
            ("gelu_tanh", lambda: L.GELU(approximate="tanh"), ("GELU", {"approximate": "tanh"})),
            ("softplus", L.Softplus, "Softplus"), ("mish", L.Mish, "Mish"), ("relu6", L.ReLU6, "ReLU6"),
            ("hardswish", L.Hardswish, "Hardswish")]
    print(f"{'activation':12s} {'mpscy ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    missed = []
    for name, make, torch_name in rows:
        engine = mpscy.Engine(mpscy.Sequential([make()], input_shape=shape), loss="mae", batch_size=64, device="cpu",
                              input_gradients=True, threads=args.threads)
        target = t.reshape(64, -1) if name == "flatten" else t
        ms = median_time(lambda: engine.gradients(x, target)) * 1e3
        line = f"{name:12s} {ms:9.2f}"
        if torch is not None:
            cls, kw = torch_name if isinstance(torch_name, tuple) else (torch_name, {})
            module = getattr(torch.nn, cls)(**kw)
            xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(target)

            def torch_step():
                xt.grad = None
                torch.nn.functional.l1_loss(module(xt), tt).backward()
            tms = median_time(torch_step) * 1e3
            line += f" {tms:9.2f} {ms / tms:6.2f}"
            if name != "flatten" and ms / tms > TARGET:  # flatten: the call's own cost, for reference
                missed.append(f"{name} {ms / tms:.2f}x")
        print(line)
    if missed:
        raise SystemExit(f"over {TARGET}x torch's time: {', '.join(missed)}")


if __name__ == "__main__":
    main()
