"""Device memory given back: run under `compute-sanitizer --tool memcheck --leak-check full`
(bench/gpu_sanitize.sh does), which reports every cudaMalloc not freed by the process's end.
Engines on cuda (the one-kernel MLP, the README CNN, a wide MLP's cuBLASLt path) are closed,
dropped without close, and dropped after fit with a schedule and callbacks attached (which once
made reference cycles); with the cycle collector off, none may outlive its last reference.
Prints the count of engines still alive (0) and, from each engine's native device counters, how
many gave back every byte they counted (cuda counts a buffer as given back only once cudaFree or
cudaFreeHost succeeded), then exits; the sanitizer's LEAK SUMMARY is the result. If the sanitizer
reports leaks while the counters say every byte was given back, the frees succeeded and the
report is the sanitizer's; if the counters say otherwise, the runtime refused the frees."""
import gc
import os
import sys
import weakref

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpscy  # noqa: E402
from mpscy import callbacks, layers as L, optim  # noqa: E402
from mpscy.optim import schedules  # noqa: E402


def models():
    yield [L.Dense(128), L.ReLU(), L.Dense(64), L.ReLU(), L.Dense(10)], (784,), 32
    yield [L.Conv2D(32, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Conv2D(64, 3, padding=1), L.BatchNorm(), L.ReLU(),
           L.GlobalAvgPool2D(), L.Dense(10)], (3, 32, 32), 64
    yield [L.Dense(1024), L.ReLU(), L.Dense(1024), L.ReLU(), L.Dense(10)], (784,), 256


def device_free_bytes():
    """cudaMemGetInfo's free bytes through the CUDA runtime mpscy loaded (None off cuda)."""
    import ctypes
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            rt = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        return free.value if rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0 else None
    return None


def workload_engine():
    """An engine as cuda_profile.py's workload (the memcheck model runs) builds and steps it."""
    from cuda_bench import MODELS, batches, mpscy_step
    spec = MODELS["mlp_small"]
    step = mpscy_step("mlp_small", spec, device=os.environ.get("SAN_DEVICE", "cuda"), env={"MPSCY_CUDA_DEFER": "0"})
    data = [(x, y.astype("int32")) for x, y in batches(spec, 2)]
    for i in range(4):
        step(*data[i % 2])
    return step.engine


def holders(obj, depth=3, seen=None):
    """What refers to obj, `depth` levels up: types, and frames by function and line (a frame
    that outlived its call is what compute-sanitizer's host backtraces left: gpu_sanitize.sh)."""
    import inspect
    seen = {id(sys._getframe())} if seen is None else seen
    out = []
    for r in gc.get_referrers(obj):
        if id(r) in seen or r is globals():
            continue
        d = f"frame {r.f_code.co_name}:{r.f_lineno}" if inspect.isframe(r) else type(r).__name__
        if depth > 1 and not inspect.ismodule(r):
            seen.add(id(r))
            d += " <- [" + holders(r, depth - 1, seen) + "]"
        out.append(d)
    return ", ".join(out[:6]) or "-"


def main():
    gc.disable()
    rng = np.random.default_rng(0)
    alive, counters = [], []
    fresh = mpscy._native.Device(os.environ.get("SAN_DEVICE", "cuda")).stats()["bytes_in_use"]
    first = mpscy.Engine(mpscy.Sequential([L.Dense(2)], input_shape=(2,)), loss="mse",
                         device=os.environ.get("SAN_DEVICE", "cuda"))  # the context, before the count
    before = device_free_bytes()
    for build, shape, batch in models():
        x = rng.standard_normal((batch,) + shape).astype(np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        for how in ("close", "drop", "fit"):
            e = mpscy.Engine(mpscy.Sequential(build, input_shape=shape), optimizer=optim.SGD(0.01, momentum=0.9),
                             batch_size=batch, device=os.environ.get("SAN_DEVICE", "cuda"), seed=0)
            dev = e._device  # kept past the engine (and past close): its counters once the graph is gone
            build = [type(layer)(**layer.config()) for layer in build]  # fresh layers for the next engine
            e.step(x, y)
            e.step(x[: batch // 2], y[: batch // 2])  # a partial batch's graph too
            if how == "close":
                e.close()
            if how == "fit":
                e.set_schedule(schedules.StepLR(e, step_size=1))
                e.fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.EarlyStopping(monitor="loss")])
            alive.append(weakref.ref(e))
            del e
            counters.append((how, shape, dev.stats()))
            del dev
    e = workload_engine()  # the benchmark's way: cuda_bench.mpscy_step, staged first, Adam
    alive.append(weakref.ref(e))
    dev = e._device
    del e
    counters.append(("workload", "mlp_small", dev.stats()))
    del dev
    left = sum(r() is not None for r in alive)
    for k, r in enumerate(alive):
        if r() is not None:
            print(f"  alive: engine {k} ({counters[k][0]} {counters[k][1]}), held by {holders(r())}")
    after = device_free_bytes()
    held = "unknown" if before is None or after is None else f"{(before - after) / 2**20:.1f} MiB"
    print(f"engines built {len(alive)}, still alive {left}; device memory not given back: {held}")
    kept = [(how, shape, st) for how, shape, st in counters if st["bytes_in_use"] != fresh]
    print(f"native counters: {len(counters) - len(kept)} of {len(counters)} devices back to a fresh device's "
          f"{fresh} bytes")
    for how, shape, st in kept:
        print(f"  {how} {shape}: {st}")
    first.close()
    return 1 if left or kept else 0


if __name__ == "__main__":
    sys.exit(main())
