"""Per-phase times of the one-kernel MLP step (objc/cuda/mlp.cu) on the GPU: builds the benchmark
MLP (784-128-64-10, batch 32, Adam) with $MPSCY_CUDA_FUSED_TRACE set, so block 0 of the kernel
prints, for every phase, its own work time and its wait at the barrier after it (ns), and every
block's events (its pieces seen, its rows loaded, its copy done, the barrier passed, its arrival at
the early decision, the decision released) as min and max over the grid, in ns from block 0's
start. A build with FU_CLOCKS set to 1 (objc/cuda/mlp.cuh; a measuring build, not the default)
also marks the loss's steps and the row input's waits, and prints the SM clock of block 0's
chain warps at four points of each warp-row phase ("fused_mlp clocks warp w").

    python bench/cuda_fused_trace.py [form ...]      # forms as $MPSCY_CUDA_FUSED, e.g. grid:132
"""
import os
import sys

import numpy as np


def main(forms):
    os.environ.setdefault("MPSCY_CUDA_FUSED_TRACE", "1")
    import mpscy
    from mpscy import layers as L, optim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 784)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    for form in forms or [""]:
        if form:
            os.environ["MPSCY_CUDA_FUSED"] = form
        e = mpscy.Engine(mpscy.Sequential([L.Dense(128), L.ReLU(), L.Dense(64), L.ReLU(), L.Dense(10)],
                                          input_shape=(784,)), optimizer=optim.Adam(1e-3), batch_size=32,
                         device="cuda")
        print(f"# form {form or 'default'}", flush=True)
        for _ in range(6):
            e.step(x, y)
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
