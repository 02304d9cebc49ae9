"""A model too big for the device: clean OutOfMemoryError? memory returned? small engine after?"""
import gc
from common import *

rng = np.random.default_rng(5)


def small_ok(tag):
    e = mpscy.Engine(mpscy.Sequential([L.Conv2D(8, 3, padding=1), L.ReLU(), L.Flatten(), L.Dense(10)], input_shape=(3, 16, 16)),
                     batch_size=32, device=DEV)
    x = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    r = e.step(x, rng.integers(0, 10, 32))
    p = e.predict(x)
    e.synchronize()
    return np.isfinite(r.loss) and np.isfinite(p).all()


@case
def too_big_params():
    small_ok("warm")
    gc.collect()
    f0 = gpu_free()
    total = torch.cuda.mem_get_info()[1] if TDEV == "cuda" else 0
    info(f"free {f0 / 2**30:.2f} GiB of {total / 2**30:.2f} GiB")
    # 100000 x 100000 Dense: 40 GB of weights, x4 with grads and Adam: past any single GPU here
    for name, model, kw in (
            ("Dense 100k x 100k (160 GB with Adam)", mpscy.Sequential([L.Dense(100000)], input_shape=(100000,)), dict(batch_size=8, loss="mse")),
            ("Dense 60k x 60k SGD (~29 GB params+grads, fits?)", None, None),
            ("activations: ReLU over 2^28 floats x batch 128 (~400 GB)", mpscy.Sequential([L.ReLU()], input_shape=(2 ** 28,)), dict(batch_size=128, loss="mse")),
            ("conv activations 64ch 1024x1024 batch 64 (~100+ GB)", mpscy.Sequential([L.Conv2D(64, 3, padding=1), L.ReLU(), L.Conv2D(64, 3, padding=1)], input_shape=(3, 1024, 1024)), dict(batch_size=64, loss="mse")),
    ):
        if model is None:
            continue
        t = time.time()
        try:
            e = mpscy.Engine(model, device=DEV, **kw)
            check(f"{name}: refused", False, f"built! stats {e.stats()}")
            del e
        except mpscy.OutOfMemoryError as ex:
            check(f"{name}: OutOfMemoryError", True, f"{ex} ({time.time() - t:.1f}s)")
        except Exception as ex:  # noqa
            check(f"{name}: OutOfMemoryError", False, f"{type(ex).__module__}.{type(ex).__name__}: {ex} ({time.time() - t:.1f}s)")
        gc.collect()
        f1 = gpu_free()
        check(f"{name}: device memory returned after the failure", TDEV != "cuda" or f0 - f1 < 64 * 2**20,
              f"free before {f0 / 2**30:.3f} GiB after {f1 / 2**30:.3f} GiB")
        check(f"{name}: a small engine builds and trains after", small_ok(name), "")
    if TDEV == "cuda":
        y = torch.ones(1000, device="cuda").sum().item()
        check("torch still works after", y == 1000.0, "")


@case
def fits_barely_then_predict():
    """a model that takes most of the GPU: builds, trains one step, predicts, closes, returns memory"""
    if TDEV != "cuda":
        return
    f0 = gpu_free()
    # params+grads+adam = 4 * n floats; aim at ~10% of free memory
    n = int(f0 * 0.10 / 16)
    side = int(n ** 0.5)
    t = time.time()
    try:
        e = mpscy.Engine(mpscy.Sequential([L.Dense(side)], input_shape=(side,)), loss="mse", batch_size=4, device=DEV)
        info(f"built Dense {side}x{side} ({side * side * 4 / 2**30:.1f} GiB of weights) in {time.time() - t:.1f}s, stats {e.stats()}")
        x = rng.standard_normal((4, side)).astype(np.float32)
        r = e.step(x, np.zeros((4, side), np.float32))
        check("huge Dense: step", np.isfinite(r.loss), f"{r}")
        e.close()
        del e
        gc.collect()
        f1 = gpu_free()
        check("huge Dense: memory returned on close", f0 - f1 < 64 * 2**20, f"{f0 / 2**30:.2f} -> {f1 / 2**30:.2f} GiB ({time.time() - t:.1f}s)")
    except Exception as ex:  # noqa
        check("huge Dense that should fit", False, f"{type(ex).__name__}: {ex} ({time.time() - t:.1f}s)")


done()
