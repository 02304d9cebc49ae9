"""Error paths, state unchanged, closing, many engines (memory returned), two engines, threads."""
import gc, threading
from common import *

rng = np.random.default_rng(2)


def snapshot(e):
    return e.get_parameters(), e.get_optimizer_state(), e.iterations, e.stats()["steps"]


def same_state(name, e, snap, expect_iter_advance=False):
    p0, o0, it0, _ = snap
    p1, o1 = e.get_parameters(), e.get_optimizer_state()
    dp = max(float(np.max(np.abs(p1[k] - v))) for k, v in p0.items())
    do = 0.0
    for slot, v in o0.items():
        if isinstance(v, dict):
            for k, a in v.items():
                do = max(do, float(np.max(np.abs(np.asarray(o1[slot][k]) - a))))
        else:
            do = max(do, abs(float(o1[slot]) - float(v)))
    return check(name, dp == 0.0 and do == 0.0, f"param diff {dp:g}, optimizer-state diff {do:g}, "
                                                f"iterations {it0}->{e.iterations}, step {o0.get('step')}->{o1.get('step')}")


def cnn(bn=True):
    ls = [L.Conv2D(16, 3, padding=1)] + ([L.BatchNorm()] if bn else []) + [L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                                                                           L.Dense(32), L.ReLU(), L.Dense(10)]
    return mpscy.Sequential(ls, input_shape=(3, 32, 32))


def mlp():
    return mpscy.Sequential([L.Dense(64), L.ReLU(), L.Dense(10)], input_shape=(40,))


@case
def nan_small_and_large_batches():
    for name, mk, shape, b in (("MLP b32 (one-kernel)", mlp, (40,), 32), ("CNN+BN b64 (deferred staging)", cnn, (3, 32, 32), 64)):
        e = mpscy.Engine(mk(), optimizer=optim.Adam(1e-3), batch_size=b, device=DEV, seed=0)
        clean = mpscy.Engine(mk(), optimizer=optim.Adam(1e-3), batch_size=b, device=DEV, seed=0)
        good = [(rng.standard_normal((b,) + shape).astype(np.float32), rng.integers(0, 10, b)) for _ in range(3)]
        for xb, yb in good[:2]:
            e.step(xb, yb)
            clean.step(xb, yb)
        snap = snapshot(e)
        for row, val in ((b - 3, np.nan), (0, np.inf), (b // 2, -np.inf)):
            bad = good[2][0].copy()
            bad.reshape(b, -1)[row, 5] = val
            try:
                e.step(bad, good[2][1])
                check(f"{name}: {val} at row {row} raises", False, "no exception")
            except mpscy.NonFiniteError as ex:
                check(f"{name}: {val} at row {row} raises NonFiniteError naming the row", f"row {row}" in str(ex), str(ex))
        # partial bad batch
        bad = good[2][0][:b - 5].copy()
        bad.reshape(b - 5, -1)[2, 0] = np.nan
        expect_raises(f"{name}: NaN in a partial batch", lambda: e.step(bad, good[2][1][:b - 5]), mpscy.NonFiniteError, "row 2")
        # labels out of range
        yb = good[2][1].copy()
        yb[4] = 10
        expect_raises(f"{name}: label 10 of 10 classes", lambda: e.step(good[2][0], yb), mpscy.InvalidArgumentError)
        yb[4] = -1
        expect_raises(f"{name}: label -1", lambda: e.step(good[2][0], yb), mpscy.InvalidArgumentError)
        same_state(f"{name}: state unchanged after bad batches", e, snap)
        # overflow inside the network: compare with the cpu engine's behaviour from the same state
        huge = good[2][0].copy() * 1e37
        twin = mpscy.Engine(mk(), optimizer=optim.Adam(1e-3), batch_size=b, device="cpu", seed=0)
        twin.set_parameters(e.get_parameters())
        twin.set_optimizer_state(e.get_optimizer_state())
        probe = mpscy.Engine(mk(), optimizer=optim.Adam(1e-3), batch_size=b, device=DEV, seed=0)
        probe.set_parameters(e.get_parameters())
        probe.set_optimizer_state(e.get_optimizer_state())
        outs = []
        for en in (twin, probe):
            try:
                r = en.step(huge, good[2][1])
                outs.append(("applied" if r.applied else "not applied", f"{r.loss:.5g}"))
            except mpscy.NonFiniteError as ex:
                outs.append(("NonFiniteError", str(ex)[:60]))
        pt, pp = twin.get_parameters(), probe.get_parameters()
        inf_t = sorted(k for k, v in pt.items() if not np.isfinite(v).all())
        inf_p = sorted(k for k, v in pp.items() if not np.isfinite(v).all())
        check(f"{name}: 1e37-scaled input: same outcome on cpu and {DEV}", outs[0][0] == outs[1][0] and inf_t == inf_p,
              f"cpu {outs[0]} non-finite {inf_t}; {DEV} {outs[1]} non-finite {inf_p}")
        # then the good batch: same as the clean engine
        e.step(*good[2])
        clean.step(*good[2])
        pe, pc = e.get_parameters(), clean.get_parameters()
        d = max(float(np.max(np.abs(pe[k] - pc[k]))) for k in pc)
        check(f"{name}: after refused batches, training == an engine that never saw them", d == 0.0, f"max diff {d:g}")
        # predict with NaN
        xp = good[0][0].copy()
        xp.reshape(b, -1)[1, 1] = np.nan
        expect_raises(f"{name}: predict with NaN names row", lambda: e.predict(np.concatenate([good[1][0], xp])), mpscy.NonFiniteError, f"row {b + 1}")


@case
def overflow_inside_network_mse():
    mk = lambda: mpscy.Sequential([L.Dense(64), L.ReLU(), L.Dense(4)], input_shape=(40,))
    for b, n in ((32, 32), (512, 512), (512, 100)):   # 512x40 floats = 80 KiB: deferred staging
        e = mpscy.Engine(mk(), loss="mse", optimizer=optim.Adam(1e-3), batch_size=b, device=DEV, seed=0)
        x = rng.standard_normal((n, 40)).astype(np.float32)
        t = rng.standard_normal((n, 4)).astype(np.float32)
        e.step(x, t)
        snap = snapshot(e)
        try:
            r = e.step(x * 1e30, t)
            check(f"MSE b{b} n{n}: overflow inside the network refused", False, f"applied={r.applied} loss={r.loss} grad_norm={r.grad_norm}")
        except mpscy.NonFiniteError as ex:
            check(f"MSE b{b} n{n}: overflow inside the network refused", True, str(ex))
        same_state(f"MSE b{b} n{n}: state unchanged after in-network overflow", e, snap)
        bad_t = t.copy(); bad_t[3, 1] = np.nan
        expect_raises(f"MSE b{b} n{n}: NaN target", lambda: e.step(x, bad_t), mpscy.NonFiniteError)
        same_state(f"MSE b{b} n{n}: state unchanged after NaN target", e, snap)


@case
def close_and_lifecycle():
    e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    e.step(x, y)
    e.close()
    e.close()
    expect_raises("step after close", lambda: e.step(x, y), mpscy.StateError, "closed")
    expect_raises("predict after close", lambda: e.predict(x), mpscy.StateError, "closed")
    expect_raises("stats after close", lambda: e.stats(), mpscy.StateError, "closed")
    expect_raises("synchronize after close", lambda: e.synchronize(), mpscy.StateError, "closed")
    with mpscy.Engine(mlp(), batch_size=8, device=DEV) as e2:
        e2.step(rng.standard_normal((8, 40)).astype(np.float32), rng.integers(0, 10, 8))
    check("with-block closes", e2.closed, "")


@case
def many_engines_memory_returned():
    if os.environ.get("SKIP_MEM"):
        return
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    # warm up (cuBLASLt, context)
    w = mpscy.Engine(cnn(), batch_size=64, device=DEV)
    w.step(x, y)
    w.close()
    del w
    gc.collect()
    f0 = gpu_free()
    t = time.time()
    peak_used = 0
    for i in range(60):
        e = mpscy.Engine(cnn(), batch_size=64, device=DEV, seed=i)
        e.step(x, y)
        e.predict(x)
        if i == 0:
            peak_used = f0 - gpu_free()
            st = e.stats()
        if i % 2:
            e.close()
        del e
    gc.collect()
    f1 = gpu_free()
    info(f"one CNN engine takes {peak_used / 2**20:.1f} MiB on the GPU (stats: {st})")
    check("60 engines created/destroyed: GPU memory returned", TDEV != "cuda" or f0 - f1 < 8 * 2**20,
          f"free before {f0 / 2**20:.1f} MiB, after {f1 / 2**20:.1f} MiB (diff {(f0 - f1) / 2**20:.1f} MiB) in {time.time() - t:.1f}s")
    # engines kept alive by a reference cycle
    f0 = gpu_free()
    for i in range(10):
        e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
        e.cycle = e
        e.step(x, y)
        del e
    gc.collect()
    f1 = gpu_free()
    check("engines in reference cycles freed after gc", TDEV != "cuda" or f0 - f1 < 8 * 2**20, f"diff {(f0 - f1) / 2**20:.1f} MiB")
    # with torch tensors alive
    if TDEV == "cuda":
        hog = torch.empty(int(2 ** 30), dtype=torch.uint8, device="cuda")
        e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
        e.step(x, y)
        del hog, e
        torch.cuda.empty_cache()


@case
def two_engines_alternating():
    xs = [rng.standard_normal((64, 3, 32, 32)).astype(np.float32) for _ in range(6)]
    ys = [rng.integers(0, 10, 64) for _ in range(6)]
    a = mpscy.Engine(cnn(), optimizer=optim.Adam(1e-3), batch_size=64, device=DEV, seed=1)
    b = mpscy.Engine(mlp(), optimizer=optim.SGD(0.1, momentum=0.9), batch_size=32, device=DEV, seed=2)
    xm = [rng.standard_normal((32, 40)).astype(np.float32) for _ in range(6)]
    la, lb = [], []
    for i in range(6):
        la.append(a.step(xs[i], ys[i]).loss)
        lb.append(b.step(xm[i], ys[i][:32]).loss)
        if i == 3:
            _ = a.predict(xs[0]); _ = b.predict(xm[0])
    pa, pb = a.get_parameters(), b.get_parameters()
    a2 = mpscy.Engine(cnn(), optimizer=optim.Adam(1e-3), batch_size=64, device=DEV, seed=1)
    b2 = mpscy.Engine(mlp(), optimizer=optim.SGD(0.1, momentum=0.9), batch_size=32, device=DEV, seed=2)
    la2 = [a2.step(xs[i], ys[i]).loss for i in range(6)]
    lb2 = [b2.step(xm[i], ys[i][:32]).loss for i in range(6)]
    da = max(float(np.max(np.abs(pa[k] - v))) for k, v in a2.get_parameters().items())
    db = max(float(np.max(np.abs(pb[k] - v))) for k, v in b2.get_parameters().items())
    check("two engines alternating == each alone (bitwise)", la == la2 and lb == lb2 and da == 0 and db == 0,
          f"loss diffs {max(abs(p - q) for p, q in zip(la, la2)):g}/{max(abs(p - q) for p, q in zip(lb, lb2)):g}, param diffs {da:g}/{db:g}")


@case
def writes_right_after_step():
    """the update of a step may still run when step returns: writes and reads right after must see it finished"""
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    e = mpscy.Engine(cnn(), optimizer=optim.Adam(1e-2), batch_size=64, device=DEV, seed=0)
    e.step(x, y)
    e.synchronize()
    p0, o0 = e.get_parameters(), e.get_optimizer_state()
    worst_p = worst_o = 0.0
    for _ in range(20):
        e.step(x, y)
        e.set_parameters(p0)                 # no synchronize in between
        e.set_optimizer_state(o0)
        p1, o1 = e.get_parameters(), e.get_optimizer_state()
        worst_p = max(worst_p, max(float(np.max(np.abs(p1[k] - v))) for k, v in p0.items()))
        worst_o = max(worst_o, max(float(np.max(np.abs(np.asarray(o1["exp_avg"][k]) - v))) for k, v in o0["exp_avg"].items()))
    check("set_parameters/set_optimizer_state right after step are not overwritten by the in-flight update",
          worst_p == 0.0 and worst_o == 0.0, f"param diff {worst_p:g}, exp_avg diff {worst_o:g}")
    # lr change right after a step applies to the next step only
    a = mpscy.Engine(cnn(bn=False), optimizer=optim.SGD(0.1), batch_size=64, device=DEV, seed=0)
    b = mpscy.Engine(cnn(bn=False), optimizer=optim.SGD(0.1), batch_size=64, device=DEV, seed=0)
    a.step(x, y); a.learning_rate = 0.0; a.step(x, y)
    b.step(x, y); b.synchronize(); b.learning_rate = 0.0; b.step(x, y); b.synchronize()
    d = max(float(np.max(np.abs(a.get_parameters()[k] - v))) for k, v in b.get_parameters().items())
    check("learning_rate set right after step == after synchronize", d == 0.0, f"diff {d:g}")
    # gradients() and evaluate right after step see the updated weights
    c = mpscy.Engine(cnn(), optimizer=optim.Adam(1e-2), batch_size=64, device=DEV, seed=0)
    c2 = mpscy.Engine(cnn(), optimizer=optim.Adam(1e-2), batch_size=64, device=DEV, seed=0)
    c.step(x, y); g = c.gradients(x, y)
    c2.step(x, y); c2.synchronize(); time.sleep(0.05); g2 = c2.gradients(x, y)
    d = max(float(np.max(np.abs(g[k] - g2[k]))) for k in g2 if k != "loss")
    check("gradients() right after step == after synchronize", d == 0.0, f"diff {d:g}")
    # BN running stats: gradients() and predict() must not move them
    rs0 = {k: v for k, v in c.get_parameters().items() if "running" in k}
    c.gradients(x, y); c.predict(x); c.evaluate(x, y)
    rs1 = {k: v for k, v in c.get_parameters().items() if "running" in k}
    d = max(float(np.max(np.abs(rs1[k] - v))) for k, v in rs0.items())
    check("gradients/predict/evaluate leave BatchNorm running stats alone", d == 0.0, f"diff {d:g}")


@case
def synchronize_and_stats_no_alloc():
    e = mpscy.Engine(cnn(), batch_size=64, device=DEV)
    x = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    e.step(x, y)
    s0 = e.stats()
    for n in (64, 64, 17, 1 + 1, 64):
        e.step(x[:n], y[:n])
    e.predict(x[:50])
    e.evaluate(x, y)
    e.gradients(x, y)
    e.synchronize()
    s1 = e.stats()
    check("no allocations per step/predict/evaluate/gradients", s1["allocations"] == s0["allocations"] and s1["bytes_in_use"] == s0["bytes_in_use"],
          f"before {s0} after {s1}")
    info(f"device_info {e.device_info()}")
    di = e.device_info()
    if TDEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        check("device_info memory/threads match torch", di["memory_bytes"] == p.total_memory and di["threads"] == p.multi_processor_count,
              f"{di['memory_bytes']} vs {p.total_memory}, {di['threads']} vs {p.multi_processor_count}")
    # timing: step returns before update; synchronize after
    t = time.perf_counter()
    for _ in range(50):
        e.step(x, y)
    e.synchronize()
    info(f"CNN b64 3x32x32 step: {(time.perf_counter() - t) / 50 * 1e6:.1f} us")


done()
