"""Which cuda engines outlive their last reference (with the cycle collector off), and what holds
them: variants of one small MLP engine, each dropped inside a function, then checked through a
weak reference; for one left alive, its referrers up to three levels, frames included."""
import gc
import inspect
import os
import sys
import weakref

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpscy  # noqa: E402
from mpscy import callbacks, layers as L, optim  # noqa: E402
from mpscy.optim import schedules  # noqa: E402

DEV = os.environ.get("SAN_DEVICE", "cuda")


def describe(r):
    if inspect.isframe(r):
        return f"frame {r.f_code.co_name}:{r.f_lineno}"
    return type(r).__name__


def holders(obj, depth, seen):
    out = []
    for r in gc.get_referrers(obj):
        if r is seen or id(r) in seen or isinstance(r, list) and r and r[0] is obj and len(r) > 50:
            continue
        d = describe(r)
        if depth > 1 and not inspect.ismodule(r):
            seen.add(id(r))
            d += " <- [" + holders(r, depth - 1, seen) + "]"
        out.append(d)
    return ", ".join(out[:5]) or "-"


def engine(opt, steps, x, y):
    e = mpscy.Engine(mpscy.Sequential([L.Dense(128), L.ReLU(), L.Dense(10)], input_shape=(784,)),
                     optimizer=opt, batch_size=32, device=DEV, seed=0)
    for _ in range(steps):
        e.step(x, y)
    return e


def variant(name, x, y):
    if name == "sgd, 0 steps":
        return engine(optim.SGD(0.01), 0, x, y)
    if name == "sgd, 1 step":
        return engine(optim.SGD(0.01), 1, x, y)
    if name == "adam, 4 steps":
        return engine(optim.Adam(1e-3), 4, x, y)
    if name == "sgd, step + synchronize":
        e = engine(optim.SGD(0.01), 1, x, y)
        e.synchronize()
        return e
    if name == "sgd, predict":
        e = engine(optim.SGD(0.01), 0, x, y)
        e.predict(x)
        return e
    if name == "sgd, evaluate":
        e = engine(optim.SGD(0.01), 0, x, y)
        e.evaluate(x, y)
        return e
    if name == "sgd, fit":
        e = engine(optim.SGD(0.01), 0, x, y)
        e.fit(x, y, epochs=1, verbose=0)
        return e
    if name == "sgd, schedule":
        e = engine(optim.SGD(0.01), 0, x, y)
        e.set_schedule(schedules.StepLR(e, step_size=1))
        return e
    if name == "sgd, fit + early stopping":
        e = engine(optim.SGD(0.01), 0, x, y)
        e.fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.EarlyStopping(monitor="loss")])
        return e
    raise KeyError(name)


NAMES = ["sgd, 0 steps", "sgd, 1 step", "adam, 4 steps", "sgd, step + synchronize", "sgd, predict",
         "sgd, evaluate", "sgd, fit", "sgd, schedule", "sgd, fit + early stopping"]


def main():
    gc.disable()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 784)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int32)
    refs = []
    for name in NAMES:
        e = variant(name, x, y)
        refs.append((name, weakref.ref(e)))
        del e
    bad = 0
    for name, r in refs:
        e = r()
        print(f"{name:28s} {'ALIVE' if e is not None else 'freed'}")
        if e is not None:
            bad += 1
            print("    held by", holders(e, 3, {id(refs), id(sys._getframe())}))
        del e
    gc.enable()
    gc.collect()
    print("after gc.collect():", sum(r() is not None for _, r in refs), "alive")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
