"""A/B timing of mpscy CUDA engines that differ only in environment variables read when the
engine is built (MPSCY_CUDA_COOP=0, MPSCY_CUDA_DEFER=0, ...): every variant is built in one
process, then timed in interleaved rounds (A, B, C, A, B, C, ...) so drift in the host or the GPU
falls on all of them alike. Time per step as in cuda_bench.py: NumPy batch in, loss as a float out.

    python bench/cuda_ab.py cnn "" MPSCY_CUDA_COOP=0 "MPSCY_CUDA_COOP=0 MPSCY_CUDA_PDL=0"

Each variant argument is a space-separated list of NAME=VALUE ("" is the default engine).
Prints the median µs per step of each variant over the rounds and its ratio to the first.
"""
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
    data = [(x, y.astype("int32")) for x, y in batches(spec, 4)]
    steps = []
    for v in variants:
        env = dict(kv.split("=", 1) for kv in v.split())
        steps.append(mpscy_step(name, spec, env=env))
    for step in steps:  # capture and warm every graph
        for i in range(30):
            step(*data[i % len(data)])
    rounds, iters = 15, 300
    times = [[] for _ in steps]
    for _ in range(rounds):
        for k, step in enumerate(steps):
            t0 = time.perf_counter()
            for i in range(iters):
                loss = step(*data[i % len(data)])
            step.sync()
            times[k].append((time.perf_counter() - t0) / iters * 1e6)
            assert loss == loss, "loss is NaN"
    base = statistics.median(times[0])
    for v, t in zip(variants, times):
        med = statistics.median(t)
        print(f"{name:8s} {v or '(default)':50s} {med:8.1f} us/step  x{med / base:.3f}  "
              f"(min {min(t):.1f}, max {max(t):.1f}, {rounds} rounds of {iters})")


if __name__ == "__main__":
    main()
