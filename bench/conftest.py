"""Benchmark helpers shared by bench/test_*.py: timing by median of repeats, the optional PyTorch
comparison, and a short table printed at the end of the run. Benchmarks never assert absolute
times: each records ratios measured in the same run (see bench/README.md and bench/gate).

MPSCY_BENCH_QUICK=1 runs one short round of everything (CI), without the target assertions."""
import gc
import os
import time

import numpy as np
import pytest

QUICK = os.environ.get("MPSCY_BENCH_QUICK") == "1"
ROWS = []


def measure(fn, min_time=0.2, repeat=7):
    """Median seconds per call of fn(): `repeat` blocks, each calling fn enough times to last
    about min_time / repeat seconds, after a warm-up."""
    if QUICK:
        min_time, repeat = min_time / 10, 3
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_time / repeat / once))
    times = []
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
    finally:
        gc.enable()
    return float(np.median(times))


def pause():
    """Lets BLAS worker threads of the library timed before stop spinning."""
    time.sleep(0.05)


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_adam_step(torch, model, x, y):
    """A PyTorch training step with the same contract as engine.step: batch in, loss as a
    Python float out (Adam, lr 1e-3, cross-entropy)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tx), ty)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def gemm_workload(shapes, rng):
    """A reference workload: one numpy matrix product (float32, random) of each (m, k, n) shape."""
    mats = [(rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32))
            for m, k, n in shapes]

    def run():
        for a, b in mats:
            a @ b
    return run


def compare(benchmark, step, reference, make_torch_step, min_time, rounds, **extra):
    """Times mpscy's step, the reference workload and PyTorch's step (make_torch_step(torch),
    when torch is installed) the same way, then pytest-benchmark's own rounds of the step, and
    stores the ratios in benchmark.extra_info (with `extra`). Returns (mpscy_s, ref_s, torch_s or
    None)."""
    mpscy_s = measure(step, min_time=min_time)
    pause()
    ref_s = measure(reference, min_time=min_time)
    pause()
    torch = torch_or_none()
    torch_s = measure(make_torch_step(torch), min_time=min_time) if torch else None
    pause()
    benchmark.pedantic(step, rounds=1 if QUICK else rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"ratio": mpscy_s / ref_s, "mpscy_s": mpscy_s, "ref_s": ref_s, "torch_s": torch_s,
                                 "torch_ratio": mpscy_s / torch_s if torch_s else None, **extra})
    return mpscy_s, ref_s, torch_s


def compare_image_model(benchmark, engine, shapes, torch_step, batch, input_shape, classes=10):
    """compare() for an image model trained on one random batch: its reference workload is its
    matrix products (`shapes`), PyTorch's step torch_step(torch, x, y). Returns (mpscy_s,
    ref_s, torch_s, flops of the matrix products)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + input_shape).astype(np.float32)
    y = rng.integers(0, classes, batch).astype(np.int64)
    flops = 2 * sum(m * k * n for m, k, n in shapes)
    times = compare(benchmark, lambda: engine.step(x, y), gemm_workload(shapes, rng),
                    lambda torch: torch_step(torch, x, y), 3.0, 20, gflop=flops / 1e9)
    return (*times, flops)


def record(name, mpscy_s, ref_s, torch_s=None, note=""):
    ROWS.append((name, mpscy_s, ref_s, torch_s, note))


def machine_line():
    """What ran: the cpu device's name (it names the OpenBLAS kernels in use) and threads, and
    OPENBLAS_CORETYPE when set, since it holds mpscy's and numpy's OpenBLAS to the kernels it
    names while PyTorch's own BLAS and oneDNN ignore it."""
    import mpscy
    from mpscy import layers
    info = mpscy.Engine(mpscy.Sequential([layers.Dense(1)], input_shape=(1,)), loss="mse",
                        batch_size=1, device="cpu").device_info()
    line = f"device: {info['name']}, {info['threads']} threads"
    core = os.environ.get("OPENBLAS_CORETYPE")
    return line + (f"; OPENBLAS_CORETYPE={core} is set (PyTorch does not read it)" if core else "")


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("mpscy benchmarks (median per step)")
    tr.write_line(machine_line())
    tr.write_line(f"{'benchmark':34s} {'mpscy':>11s} {'ref ratio':>10s} {'torch':>11s} {'torch/mpscy':>12s}  note")
    for name, m, r, t, note in ROWS:
        ts = f"{t * 1e6:9.1f}us" if t else "        n/a"
        sp = f"{t / m:11.2f}x" if t else "         n/a"
        tr.write_line(f"{name:34s} {m * 1e6:9.1f}us {m / r:10.3f} {ts} {sp}  {note}")


@pytest.fixture
def quick():
    return QUICK
