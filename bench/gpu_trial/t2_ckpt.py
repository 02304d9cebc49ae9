"""Checkpoints across devices: save on A, load on B, predict agreement, optimizer state, continue training."""
import tempfile, pathlib
from common import *

TMP = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
X = rng.standard_normal((16 * 12, 3, 16, 16)).astype(np.float32)
Y = rng.integers(0, 5, len(X)).astype(np.int64)


def model():
    # no bias before the BatchNorm: its gradient is rounding noise (~6e-9 here) that Adam, RMSprop
    # and NAdam scale up to whole steps, so after 7 steps it differs by ~4e-3 between the cpu on 1
    # and on 2 threads, as between devices: a comparison of it measures nothing
    return mpscy.Sequential([L.Conv2D(8, 3, padding=1, bias=False), L.BatchNorm(), L.ReLU(), L.Conv2D(8, 3, stride=2, padding=1),
                             L.ReLU(), L.Dropout(0.3), L.Flatten(), L.Dense(32), L.ReLU(), L.Dense(5)],
                            input_shape=(3, 16, 16))


def batches(k0, k1):
    for k in range(k0, k1):
        yield X[16 * k:16 * (k + 1)], Y[16 * k:16 * (k + 1)]


def opt_state_equal(a, b):
    worst = 0.0
    for slot, v in a.items():
        if isinstance(v, dict):
            for p, arr in v.items():
                worst = max(worst, float(np.max(np.abs(np.asarray(arr) - np.asarray(b[slot][p])))))
        else:
            worst = max(worst, abs(float(v) - float(b[slot])))
    return worst


def roundtrip(src, dst, optfn, tag):
    a = mpscy.Engine(model(), optimizer=optfn(), batch_size=16, device=src, seed=7)
    for xb, yb in batches(0, 5):
        a.step(xb, yb)
    path = TMP / f"{tag}.mpscy"
    a.save(str(path))
    b = mpscy.load(str(path), device=dst)
    check(f"[{tag}] {src}->{dst}: params identical after load", all(np.array_equal(v, b.get_parameters()[k]) for k, v in a.get_parameters().items()), "")
    w = opt_state_equal(a.get_optimizer_state(), b.get_optimizer_state())
    check(f"[{tag}] {src}->{dst}: optimizer state identical", w == 0.0, f"max abs diff {w:g}")
    check(f"[{tag}] {src}->{dst}: counters", (a.iterations, a.epoch, a.learning_rate) == (b.iterations, b.epoch, b.learning_rate),
          f"{(a.iterations, a.epoch, a.learning_rate)} vs {(b.iterations, b.epoch, b.learning_rate)}")
    r = rel(b.predict(X), a.predict(X))
    check(f"[{tag}] {src}->{dst}: predict agreement", r < 1e-5, f"rel {r:.2e}")
    for xb, yb in batches(5, 12):
        ra = a.step(xb, yb)
        rb = b.step(xb, yb)
    check(f"[{tag}] {src}->{dst}: continued step loss", abs(ra.loss - rb.loss) < 1e-4 * abs(ra.loss), f"{ra.loss:.7f} vs {rb.loss:.7f}")
    cmp_params(f"[{tag}] {src}->{dst}: params after 7 more steps on each", b.get_parameters(), a.get_parameters(), 1e-4, fro=True)
    # load with another batch size on dst and predict
    c = mpscy.load(str(path), device=dst, batch_size=7)
    r = rel(c.predict(X[:50]), mpscy.load(str(path), device=src).predict(X[:50]))
    check(f"[{tag}] load(batch_size=7) on {dst}: predict agreement", r < 1e-5, f"rel {r:.2e}")
    return a, b


@case
def cuda_to_cpu_adam():
    roundtrip(DEV, "cpu", lambda: optim.Adam(1e-3), "adam_d2c")


@case
def cpu_to_cuda_adam():
    roundtrip("cpu", DEV, lambda: optim.Adam(1e-3), "adam_c2d")


@case
def cuda_to_cpu_sgd_nesterov():
    roundtrip(DEV, "cpu", lambda: optim.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), "sgd_d2c")


@case
def cpu_to_cuda_rmsprop():
    roundtrip("cpu", DEV, lambda: optim.RMSprop(1e-3, momentum=0.5, centered=True), "rms_c2d")


@case
def cuda_to_cpu_nadam():
    roundtrip(DEV, "cpu", lambda: optim.NAdam(2e-3), "nadam_d2c")


@case
def restore_into_existing_engine():
    a = mpscy.Engine(model(), optimizer=optim.AdamW(1e-3), batch_size=16, device=DEV, seed=3)
    for xb, yb in batches(0, 3):
        a.step(xb, yb)
    a.save(str(TMP / "r.mpscy"))
    b = mpscy.Engine(model(), optimizer=optim.AdamW(1e-3), batch_size=32, device="cpu", seed=99)
    mpscy.checkpoint.restore(b, str(TMP / "r.mpscy"))
    r = rel(b.predict(X), a.predict(X))
    check("restore() DEV ckpt into cpu engine: predict", r < 1e-5, f"rel {r:.2e}")


@case
def save_right_after_step_no_sync():
    """save immediately after step (early-return update in flight)"""
    a = mpscy.Engine(model(), optimizer=optim.Adam(1e-2), batch_size=16, device=DEV, seed=3)
    ref = mpscy.Engine(model(), optimizer=optim.Adam(1e-2), batch_size=16, device=DEV, seed=3)
    for xb, yb in batches(0, 4):
        a.step(xb, yb)
        ref.step(xb, yb)
    a.save(str(TMP / "now.mpscy"))  # no synchronize
    ref.synchronize()
    b = mpscy.load(str(TMP / "now.mpscy"), device="cpu")
    w = max(float(np.max(np.abs(v - ref.get_parameters()[k]))) for k, v in b.get_parameters().items())
    check("save right after step holds the finished update", w == 0.0, f"max abs diff {w:g}")


done()
