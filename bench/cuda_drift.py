"""Whether the mpscy CUDA step time of one engine moves with what its process did before: the
README CNN's step (NumPy batch in, loss as a float out, as cuda_bench.py times it) in rounds of
300 steps, right after the engine is built, after the process sleeps 8 s, after 4 s of PyTorch
matrix products, and after a PyTorch CUDA graph replayed 2000 times; with the GPU's SM clock,
temperature and power before and after each, and the host's NUMA layout and this process's CPUs.

    python bench/cuda_drift.py

Written when the bench's own mpscy line for the CNN kept reading 6-11 us above cuda_ab.py's
rounds (bench/cuda_notes.md, fifteenth session).
"""
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from cuda_bench import MODELS, batches, mpscy_step  # noqa: E402


def smi():
    q = ["nvidia-smi", "--query-gpu=clocks.sm,temperature.gpu,power.draw", "--format=csv,noheader"]
    return subprocess.run(q, capture_output=True, text=True).stdout.strip()


def main():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print("\n".join(ln for ln in out.splitlines() if ln.startswith(("NUMA", "Model name", "CPU(s)", "Socket"))))
    print("this process may run on CPUs", sorted(os.sched_getaffinity(0)))
    spec = MODELS["cnn"]
    data = [(x, y.astype(np.int32)) for x, y in batches(spec)]
    step = mpscy_step("cnn", spec)

    def report(what, rounds=10, iters=300):
        before, t = smi(), []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(iters):
                step(*data[i % len(data)])
            step.sync()
            t.append((time.perf_counter() - t0) / iters * 1e6)
        print(f"{what:48s} {statistics.median(t):7.1f} us/step (min {min(t):.1f})  GPU [{before}] -> [{smi()}]",
              flush=True)

    report("right after the build")
    report("again")
    time.sleep(8)
    report("after 8 s asleep")
    report("again")
    import torch
    x = torch.randn(8192, 8192, device="cuda")
    t0 = time.time()
    while time.time() - t0 < 4:
        x @ x
    torch.cuda.synchronize()
    report("after 4 s of torch matrix products")
    g, a, s = torch.cuda.CUDAGraph(), torch.zeros(4, device="cuda"), torch.cuda.Stream()
    with torch.cuda.stream(s):
        g.capture_begin()
        a.add_(1)
        g.capture_end()
    torch.cuda.synchronize()
    for _ in range(2000):
        g.replay()
        a[0].item()
    report("after a torch CUDA graph replayed 2000 times")
    step2 = mpscy_step("cnn", spec)
    step, old = step2, step
    report("a second engine, right after its build")
    step = old
    report("the first engine again")


if __name__ == "__main__":
    main()
