"""Threads: one engine from 3 threads (StateError only), engines per thread, engine built in another thread."""
import threading
from common import *

rng = np.random.default_rng(9)


def cnn(bn=True):
    ls = [L.Conv2D(16, 3, padding=1)] + ([L.BatchNorm()] if bn else []) + [L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                                                                           L.Dense(32), L.ReLU(), L.Dense(10)]
    return mpscy.Sequential(ls, input_shape=(3, 32, 32))


@case
def threads():
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
    errs, others, n_ok = [], [], [0]

    def work():
        for _ in range(60):
            try:
                if _ % 3 == 0:
                    e.predict(x)
                else:
                    e.step(x, y)
                n_ok[0] += 1
            except mpscy.StateError as ex:
                errs.append(str(ex))
            except Exception as ex:  # noqa
                others.append(f"{type(ex).__name__}: {ex}")

    ts = [threading.Thread(target=work) for _ in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    ok = not others and all(np.isfinite(v).all() for v in e.get_parameters().values())
    check("one engine, 3 threads: only StateError, params finite", ok,
          f"{len(errs)} StateErrors, {n_ok[0]} calls ok, other errors {others[:3]}")
    # each thread its own engine, concurrently == sequentially
    xs = [rng.standard_normal((64, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    res = {}

    def own(seed):
        en = mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=seed)
        for xb in xs:
            en.step(xb, y)
        res[seed] = en.get_parameters()
        en.close()

    ts = [threading.Thread(target=own, args=(s,)) for s in (1, 2, 3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    seq = {}
    for s in (1, 2, 3):
        en = mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=s)
        for xb in xs:
            en.step(xb, y)
        seq[s] = en.get_parameters()
    d = max(float(np.max(np.abs(res[s][k] - seq[s][k]))) for s in seq for k in seq[s]) if len(res) == 3 else float("nan")
    check("3 engines built and trained in 3 threads concurrently == sequential (bitwise)", d == 0.0, f"max diff {d:g}; got {len(res)} results")
    # engine built in one thread, used in another
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("e", mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=5)))
    t.start(); t.join()
    r = holder["e"].step(x, y)
    ref = mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=5).step(x, y)
    check("engine built in another thread", r.loss == ref.loss, f"{r.loss} vs {ref.loss}")



@case
def close_while_other_thread_steps():
    """close() from another thread while steps run: StateError for the stepping thread, no crash, memory freed"""
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    for _ in range(5):
        e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
        errs = []
        go = threading.Event()

        def loop():
            go.set()
            for _ in range(200):
                try:
                    e.step(x, y)
                except mpscy.StateError as ex:
                    errs.append(str(ex))
                    return
                except Exception as ex:  # noqa
                    errs.append(f"OTHER {type(ex).__name__}: {ex}")
                    return
        t = threading.Thread(target=loop)
        t.start()
        go.wait()
        time.sleep(0.005)
        e.close()
        t.join()
    check("close() from another thread mid-training: StateError, no crash", errs and not errs[0].startswith("OTHER"), f"{errs[:1]}")


@case
def mixed_calls_many_threads_two_engines():
    """4 threads hammer 2 engines with step/predict/evaluate/get_parameters; only StateError allowed"""
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    es = [mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=s) for s in (0, 1)]
    bad = []
    cnt = [0, 0]

    def work(k):
        for i in range(40):
            e = es[(i + k) % 2]
            try:
                op = i % 5
                if op == 0: e.step(x, y)
                elif op == 1: e.predict(x[:10])
                elif op == 2: e.evaluate(x, y)
                elif op == 3: e.get_parameters()
                else: e.step(x[:33], y[:33])
                cnt[0] += 1
            except mpscy.StateError:
                cnt[1] += 1
            except Exception as ex:  # noqa
                bad.append(f"{type(ex).__name__}: {ex}")
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    fin = all(np.isfinite(v).all() for e in es for v in e.get_parameters().values())
    check("2 engines x 4 threads mixed calls: only StateError, params finite", not bad and fin,
          f"ok {cnt[0]}, StateError {cnt[1]}, other {bad[:3]}")


done()
