"""A/B timing of mpscy CUDA engines that differ only in environment variables read when the
engine is built (MPSCY_CUDA_COOP=0, MPSCY_CUDA_DEFER=0, ...): every variant is built in one
process, then timed in interleaved rounds (A, B, C, A, B, C, ...) so drift in the host or the GPU
falls on all of them alike. Time per step as in cuda_bench.py: NumPy batch in, loss as a float out.

    python bench/cuda_ab.py cnn "" MPSCY_CUDA_COOP=0 "MPSCY_CUDA_COOP=0 MPSCY_CUDA_PDL=0"

Each variant argument is a space-separated list of NAME=VALUE ("" is the default engine); the
name `batches` is not a variable but the number of distinct batches that variant's steps cycle
through (default 4; cuda_bench.py's timings cycle through 8), so that the host's staging from
arrays out of its caches can be timed against arrays in them:

    python bench/cuda_ab.py cnn "" batches=8 batches=64

Prints the median µs per step of each variant over the rounds and its ratio to the first.
$AB_ROUNDS sets the number of rounds (default 15).
"""
import os
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cuda_bench import MODELS, batches, mpscy_step  # noqa: E402


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in MODELS:
        sys.exit(__doc__)
    name, variants = sys.argv[1], sys.argv[2:]
    spec = MODELS[name]
    cache = {}
    steps, datas = [], []
    for v in variants:
        env = dict(kv.split("=", 1) for kv in v.split())
        n = int(env.pop("batches", 4))
        if n not in cache:
            cache[n] = [(x, y.astype("int32")) for x, y in batches(spec, n)]
        datas.append(cache[n])
        steps.append(mpscy_step(name, spec, env=env))
    for step, data in zip(steps, datas):  # capture and warm every graph
        for i in range(max(30, len(data))):
            step(*data[i % len(data)])
    rounds, iters = int(os.environ.get("AB_ROUNDS", 15)), 300
    times = [[] for _ in steps]
    for _ in range(rounds):
        for k, (step, data) in enumerate(zip(steps, datas)):
            times[k].append(time_round(step, data, iters))
    report(name, [v or "(default)" for v in variants], times, iters)


def time_round(step, data, iters):
    """µs a step over `iters` steps cycling through `data`, ending with the engine synchronized;
    a NaN loss fails the round."""
    t0 = time.perf_counter()
    for i in range(iters):
        loss = step(*data[i % len(data)])
    step.sync()
    us = (time.perf_counter() - t0) / iters * 1e6
    assert loss == loss, "loss is NaN"
    return us


def report(name, labels, times, iters):
    """Prints each variant's median µs a step over its rounds, its ratio to the first's, and the range."""
    base = statistics.median(times[0])
    for v, t in zip(labels, times):
        med = statistics.median(t)
        print(f"{name:8s} {v:50s} {med:8.1f} us/step  x{med / base:.3f}  "
              f"(min {min(t):.1f}, max {max(t):.1f}, {len(t)} rounds of {iters})")


if __name__ == "__main__":
    main()
