"""A/B timing of mpscy builds from different source trees (a branch against main, say), where
cuda_ab.py times variants of one build: each tree's mpscy runs in a worker process of its own,
and the workers time their steps in turns (A, B, A, B, ... over the rounds), so drift of the host
or the GPU falls on all alike. The timing is cuda_ab.py's: a NumPy batch in, the loss as a float
out, 300 steps a round, each round ending with Engine.synchronize(); only one worker runs at a time.

    python bench/cuda_ab_trees.py mlp_small /tmp/mpscy-A /tmp/mpscy-B "/tmp/mpscy-A MPSCY_CUDA_FUSED_EARLYREL=0"

Each argument after the model is a tree (a checkout built in place: `setup.py build_ext
--inplace`), then optionally NAME=VALUE pairs set while its engine is built. Before timing, every
worker trains 50 steps from the same seed and batches and reports its last loss and a CRC of its
parameters' bytes, so a change meant to leave the arithmetic alone shows whether it did (the
trees "agree bit for bit" or not). Prints the median µs per step of each tree over the rounds and
its ratio to the first. $AB_ROUNDS sets the number of rounds (default 15); $AB_DEVICE the device
(default cuda; cpu checks the script itself where there is no GPU).
"""
import os
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK_STEPS, ITERS = 50, 300


def worker(name, tree, env):
    """Runs in the tree's own process: builds its engine, reports its check, then times rounds on
    request ("<n>" on stdin: n steps, answered with µs a step; "q": the end)."""
    sys.path.insert(0, HERE)
    import numpy as np
    from cuda_ab import time_round
    from cuda_bench import MODELS, batches, mpscy_step
    import mpscy
    where = os.path.abspath(mpscy.__file__)
    if not where.startswith(os.path.abspath(tree) + os.sep):
        raise SystemExit(f"worker for {tree} imported mpscy from {where}: build the tree in place")
    spec = MODELS[name]
    data = [(x, y.astype("int32")) for x, y in batches(spec, 4)]
    step = mpscy_step(name, spec, device=os.environ.get("AB_DEVICE", "cuda"), env=env)
    for i in range(CHECK_STEPS):
        loss = step(*data[i % len(data)])
    step.sync()
    crc = 0
    for k, v in sorted(step.engine.get_parameters().items()):
        crc = zlib.crc32(np.ascontiguousarray(v).tobytes(), zlib.crc32(k.encode(), crc))
    print(f"ready {loss!r} {crc:08x} {where}", flush=True)
    for line in sys.stdin:
        if line.strip() == "q":
            break
        print(f"{time_round(step, data, int(line))!r}", flush=True)


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        name, tree, *kv = sys.argv[2:]
        return worker(name, tree, dict(p.split("=", 1) for p in kv))
    sys.path.insert(0, HERE)
    from cuda_ab import report
    from cuda_bench import MODELS
    if len(sys.argv) < 4 or sys.argv[1] not in MODELS:
        sys.exit(__doc__)
    name, variants = sys.argv[1], sys.argv[2:]
    procs = []
    for v in variants:
        tree, *kv = v.split()
        if not os.path.isdir(os.path.join(tree, "src", "mpscy")):
            sys.exit(f"{tree}: not an mpscy checkout (no src/mpscy)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(tree, "src")] + [  # no other tree's mpscy
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not os.path.isdir(os.path.join(p, "mpscy"))])
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", name, tree, *kv],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    checks = []
    for v, p in zip(variants, procs):  # the workers build and check at once (bits, not time)
        line = p.stdout.readline().split()
        if not line or line[0] != "ready":
            sys.exit(f"{v}: the worker failed (exit {p.wait()})")
        checks.append((line[1], line[2]))
        print(f"{v}: loss after {CHECK_STEPS} steps {line[1]}, parameters' CRC {line[2]} ({line[3]})")
    same = all(c == checks[0] for c in checks)
    print(f"the trees {'agree bit for bit' if same else 'DIFFER'} after {CHECK_STEPS} steps")

    def ask(p, n):
        p.stdin.write(f"{n}\n")
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            sys.exit(f"a worker ended (exit {p.wait()})")
        return float(line)

    for p in procs:  # warm every graph in its turn
        ask(p, 30)
    rounds = int(os.environ.get("AB_ROUNDS", 15))
    times = [[] for _ in procs]
    for _ in range(rounds):
        for k, p in enumerate(procs):
            times[k].append(ask(p, ITERS))
    for p in procs:
        p.stdin.write("q\n")
        p.stdin.flush()
        p.wait()
    report(name, variants, times, ITERS)


if __name__ == "__main__":
    main()
