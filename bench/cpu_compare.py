"""One layer's forward and backward on the cpu backend against PyTorch's CPU kernels, shared by
cpu_activations.py, cpu_resize.py and cpu_convt.py: `engine.gradients` (input gradients) against
torch's module forward, loss and backward on the same threads, median of repeats after a warm-up,
a table, and SystemExit where a gated row is over its target times torch's time in the same run."""
import argparse
import time

import numpy as np

import mpscy


def median_time(fn, repeat=9, warmup=1):
    """seconds per fn() call, the median of `repeat` after `warmup` calls"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(doc, title, rows, loss, target):
    """rows: (name, make_layer, per-sample input shape, batch, make_torch_module(torch) or None,
    gated); loss "mae" or "mse"; target the gated rows' bound on mpscy / torch."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    threads = ap.parse_args().threads
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    width = max(len(title), *(len(r[0]) for r in rows))
    print(f"{title:{width}s} {'mpscy ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    missed = []
    for name, make, shape, batch, torch_make, gated in rows:
        engine = mpscy.Engine(mpscy.Sequential([make()], input_shape=shape), loss=loss, batch_size=batch,
                              device="cpu", input_gradients=True, threads=threads)
        x = np.random.default_rng(0).standard_normal((batch,) + tuple(shape)).astype(np.float32)
        t = np.zeros((batch,) + engine.model.output_shape, np.float32)
        ms = median_time(lambda: engine.gradients(x, t)) * 1e3
        line = f"{name:{width}s} {ms:9.2f}"
        if torch is not None and torch_make is not None:
            module = torch_make(torch)
            xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t)
            fn = torch.nn.functional.l1_loss if loss == "mae" else torch.nn.functional.mse_loss

            def torch_step():
                xt.grad = None
                module.zero_grad(set_to_none=True)
                fn(module(xt), tt).backward()
            tms = median_time(torch_step) * 1e3
            line += f" {tms:9.2f} {ms / tms:6.2f}"
            if gated and ms / tms > target:
                missed.append(f"{name} {ms / tms:.2f}x")
        print(line)
    if missed:
        raise SystemExit(f"over {target}x torch's time: {', '.join(missed)}")
