"""CUDA benchmark: one training step, timed the same way for every framework — a NumPy batch in,
the loss out as a Python float — for mpscy (device="cuda"), PyTorch eager, PyTorch eager with
fused Adam, PyTorch with the whole step captured in a CUDA graph, and JAX jit. Three models:
the MLP 784-128-64-10 at batch 32, the README CNN on 3x32x32 at batch 64, and the MLP
784-1024-1024-1024-10 at batch 1024, all fp32 (TF32 off everywhere; mpscy tf32 is an extra
row). Also measures the two ceilings of METHOD.md (fp32 GEMM rate, copy bandwidth) and the
latency floor (an empty CUDA-graph replay plus a 4-byte read-back) and prints each model's floor.

    python bench/cuda_bench.py [--json out.json] [--quick] [--only mlp_small,cnn,mlp_wide]
    python bench/cuda_bench.py --smoke     # cpu only: checks the script itself, no GPU needed
    python bench/cuda_bench.py --only cnn --paired 15   # also mpscy and PyTorch's graph interleaved

The ratio of two figures timed one after the other takes in whatever drifted between them (the
CNN's PyTorch graph moved by ~50 µs between runs); --paired adds the median over interleaved
rounds of each round's ratio, for the models whose target is a ratio.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np

MODELS = {
    "mlp_small": {"input": (784,), "batch": 32, "hidden": [128, 64], "classes": 10},
    "cnn": {"input": (3, 32, 32), "batch": 64, "classes": 10},
    "mlp_wide": {"input": (784,), "batch": 1024, "hidden": [1024, 1024, 1024], "classes": 10},
}
CONVS = [(32, 3, 1, 1), (32, 3, 2, 1), (64, 3, 1, 1), (64, 3, 2, 1)]  # out, kernel, stride, padding
LR = 1e-3


def batches(spec, n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((spec["batch"],) + spec["input"]).astype(np.float32)
        y = rng.integers(0, spec["classes"], spec["batch"])
        out.append((x, y))
    return out


def _settle(step):
    """Waits for work a step left running (mpscy's training step returns before its update ends)."""
    sync = getattr(step, "sync", None)
    if sync is not None:
        sync()


def _warm_up(step, data, budget_s):
    """Runs the step over every batch (at least 10 times), times 10 more, and returns how many
    steps take about budget_s (20 to 20,000)."""
    for i in range(max(10, len(data))):
        step(*data[i % len(data)])
    _settle(step)
    t0 = time.perf_counter()
    for i in range(10):
        step(*data[i % len(data)])
    _settle(step)
    per = (time.perf_counter() - t0) / 10
    return int(min(max(budget_s / max(per, 1e-7), 20), 20000))


def _timed(step, data, iters):
    """One timed run of `iters` steps over the batches, ending with the device idle: (µs per
    step, the last loss)."""
    t0 = time.perf_counter()
    for i in range(iters):
        loss = step(*data[i % len(data)])
    _settle(step)
    return (time.perf_counter() - t0) / iters * 1e6, loss


def time_steps(step, data, budget_s, repeats):
    """Median over `repeats` of the mean time per step (µs); each step ends with a float loss,
    and each timed run with the device idle (mpscy: Engine.synchronize())."""
    iters = _warm_up(step, data, budget_s)
    runs = [_timed(step, data, iters) for _ in range(repeats)]
    loss = runs[-1][1]
    assert isinstance(loss, float) and np.isfinite(loss), loss
    return statistics.median(t for t, _ in runs), loss


def paired_rounds(steps, data, rounds, budget_s):
    """Interleaved timing of several steps (A, B, A, B, ...): each round times every step for
    about budget_s (its mean per step, ending with the device idle), so drift of the host or the
    GPU during the run falls on all alike. Returns each step's per-round µs lists."""
    iters = [_warm_up(step, d, budget_s) for step, d in zip(steps, data)]
    times = [[] for _ in steps]
    for _ in range(rounds):
        for k, (step, d) in enumerate(zip(steps, data)):
            times[k].append(_timed(step, d, iters[k])[0])
    return times


# ----------------------------------------------------------------------------- mpscy

@contextlib.contextmanager
def knobs(env):
    """The environment variables of `env` set inside the block, as they were after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mpscy_step(name, spec, device="cuda", precision="fp32", fused=None, env=None):
    """fused: $MPSCY_CUDA_FUSED while the engine is built ("0": separate kernels; a form such
    as "grid:66" or "cluster:16"; None: the library's choice); env: other variables set while it
    is built (MPSCY_CUDA_DEFER=0: the batch staged before the launch, not while the graph runs)."""
    import mpscy
    from mpscy import layers as L, optim
    if name == "cnn":
        if not hasattr(L, "Conv2D") or not hasattr(L, "Dropout"):
            return None
        ls = []
        for out, k, s, p in CONVS:
            ls += [L.Conv2D(out, k, s, p), L.ReLU()]
        ls += [L.Flatten(), L.Dense(128), L.ReLU(), L.Dropout(0.5), L.Dense(spec["classes"])]
    else:
        ls = []
        for h in spec["hidden"]:
            ls += [L.Dense(h), L.ReLU()]
        ls.append(L.Dense(spec["classes"]))
    env = dict(env or {})
    if fused is not None:
        env["MPSCY_CUDA_FUSED"] = fused
    with knobs(env):
        engine = mpscy.Engine(mpscy.Sequential(ls, input_shape=spec["input"]), loss="sparse_cross_entropy",
                              optimizer=optim.Adam(LR), batch_size=spec["batch"], device=device, seed=0,
                              precision=precision)

    def step(x, y):
        return engine.step(x, y).loss
    step.engine = engine
    step.sync = engine.synchronize
    return step


# ----------------------------------------------------------------------------- PyTorch

def torch_model(name, spec):
    import torch.nn as nn
    if name == "cnn":
        ls, c = [], spec["input"][0]
        hw = spec["input"][1]
        for out, k, s, p in CONVS:
            ls += [nn.Conv2d(c, out, k, s, p), nn.ReLU()]
            c, hw = out, (hw + 2 * p - k) // s + 1
        ls += [nn.Flatten(), nn.Linear(c * hw * hw, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, spec["classes"])]
        return nn.Sequential(*ls)
    ls, d = [], spec["input"][0]
    for h in spec["hidden"]:
        ls += [nn.Linear(d, h), nn.ReLU()]
        d = h
    ls.append(nn.Linear(d, spec["classes"]))
    return nn.Sequential(*ls)


def torch_eager(name, spec, device, fused=False):
    import torch
    import torch.nn.functional as F
    model = torch_model(name, spec).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True) if fused else torch.optim.Adam(model.parameters(), lr=LR)

    def step(x, y):
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y).to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def torch_graph(name, spec):
    """The whole step (forward, loss, backward, fused capturable Adam) in one CUDA graph; batches
    go through pinned tensors, the best a PyTorch user can do."""
    import torch
    model = torch_model(name, spec).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=True, capturable=True)
    return torch_graph_step(model, opt, (spec["batch"],) + spec["input"])


def torch_eager_step(model, opt, x, y, **loss_kw):
    """step() -> None: the model's cross-entropy step with `opt`, eager, the NumPy batch (x, int64
    labels y) copied to the GPU and the loss read back (bench/cuda_convt.py's and
    cuda_segment.py's); loss_kw go to F.cross_entropy."""
    import torch
    import torch.nn.functional as F

    def step():
        xt, yt = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt), yt, **loss_kw)
        loss.backward()
        opt.step()
        loss.item()
    return step


def grad_diffs(got, ref, floor_share=0.0):
    """{parameter: max |got - ref| / max(max |ref|, floor)} over the gradients of ref (a
    gradients() dict; "loss" left out), floor = floor_share times the largest |ref| of all (a
    gradient that is 0 in exact arithmetic, a bias under BatchNorm, is then measured against the
    model's scale, not against its own rounding residue)"""
    keys = [k for k in ref if k != "loss"]
    floor = floor_share * max(np.abs(ref[k]).max() for k in keys)
    return {k: float(np.abs(got[k].astype(np.float64) - ref[k]).max() / max(np.abs(ref[k]).max(), floor, 1e-30))
            for k in keys}


def torch_graph_step(model, opt, shape, label_shape=(), **loss_kw):
    """step(x, y) -> loss: the model's cross-entropy step with `opt` captured in one CUDA graph
    (three warm-up steps on a side stream first), x of `shape` and int64 labels (n, *label_shape)
    copied through pinned tensors (bench/cuda_convt.py's and cuda_segment.py's too); loss_kw go to
    F.cross_entropy."""
    import torch
    import torch.nn.functional as F
    n = shape[0]
    ys = (n,) + tuple(label_shape)
    sx, sy = torch.zeros(shape, device="cuda"), torch.zeros(ys, dtype=torch.int64, device="cuda")
    px, py = torch.zeros(shape).pin_memory(), torch.zeros(ys, dtype=torch.int64).pin_memory()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(sx), sy, **loss_kw).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = F.cross_entropy(model(sx), sy, **loss_kw)
        loss.backward()
        opt.step()
    nx, ny = px.numpy(), py.numpy()

    def step(x, y):
        nx[...] = x
        ny[...] = y
        sx.copy_(px, non_blocking=True)
        sy.copy_(py, non_blocking=True)
        graph.replay()
        return loss.item()
    return step


# ----------------------------------------------------------------------------- JAX

def jax_step(name, spec):
    import jax
    import jax.numpy as jnp
    import optax
    jax.config.update("jax_default_matmul_precision", "highest")
    key = jax.random.PRNGKey(0)

    def dense_init(k, i, o):
        bound = 1 / np.sqrt(i)
        k1, k2 = jax.random.split(k)
        return {"w": jax.random.uniform(k1, (i, o), minval=-bound, maxval=bound),
                "b": jax.random.uniform(k2, (o,), minval=-bound, maxval=bound)}

    params, keys = [], list(jax.random.split(key, 16))
    if name == "cnn":
        c, hw = spec["input"][0], spec["input"][1]
        for out, k, s, p in CONVS:
            bound = 1 / np.sqrt(c * k * k)
            params.append({"w": jax.random.uniform(keys.pop(), (out, c, k, k), minval=-bound, maxval=bound),
                           "b": jnp.zeros((out,))})
            c, hw = out, (hw + 2 * p - k) // s + 1
        params += [dense_init(keys.pop(), c * hw * hw, 128), dense_init(keys.pop(), 128, spec["classes"])]
    else:
        d = spec["input"][0]
        for h in spec["hidden"] + [spec["classes"]]:
            params.append(dense_init(keys.pop(), d, h))
            d = h

    def forward(params, x, rng):
        if name == "cnn":
            for (out, k, s, p), q in zip(CONVS, params[:4]):
                x = jax.lax.conv_general_dilated(x, q["w"], (s, s), [(p, p), (p, p)],
                                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
                x = jax.nn.relu(x + q["b"][None, :, None, None])
            x = x.reshape(x.shape[0], -1)
            x = jax.nn.relu(x @ params[4]["w"] + params[4]["b"])
            keep = jax.random.bernoulli(rng, 0.5, x.shape)
            x = jnp.where(keep, x / 0.5, 0.0)
            return x @ params[5]["w"] + params[5]["b"]
        for q in params[:-1]:
            x = jax.nn.relu(x @ q["w"] + q["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def loss_fn(params, x, y, rng):
        logits = forward(params, x, rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(LR)
    state = {"p": params, "o": tx.init(params), "k": jax.random.PRNGKey(1)}

    @jax.jit
    def train(st, x, y):
        k, sub = jax.random.split(st["k"])
        loss, grads = jax.value_and_grad(loss_fn)(st["p"], x, y, sub)
        upd, o = tx.update(grads, st["o"], st["p"])
        return {"p": optax.apply_updates(st["p"], upd), "o": o, "k": k}, loss

    def step(x, y):
        nonlocal state
        state, loss = train(state, x, y)
        return float(loss)
    return step


# ----------------------------------------------------------------------------- floors

def flops_bytes(name, spec):
    """FLOPs of one step (forward, dW, dX except for the input) and the fewest bytes it must move:
    parameters read twice and gradients written once, Adam reading p, g, m, v and writing p, m, v,
    every activation written once and read once, the input batch read once."""
    b = spec["batch"]
    flops, act, params = 0, 0, 0
    if name == "cnn":
        c, hw = spec["input"][0], spec["input"][1]
        first = True
        for out, k, s, p in CONVS:
            ho = (hw + 2 * p - k) // s + 1
            mac = b * out * ho * ho * c * k * k
            flops += 2 * mac * (2 if first else 3)
            params += out * c * k * k + out
            act += b * out * ho * ho
            c, hw, first = out, ho, False
        dims = [(c * hw * hw, 128), (128, spec["classes"])]
    else:
        d = spec["input"][0]
        dims = []
        for h in spec["hidden"] + [spec["classes"]]:
            dims.append((d, h))
            d = h
    for i, (di, do) in enumerate(dims):
        flops += 2 * b * di * do * (2 if (i == 0 and name != "cnn") else 3)
        params += di * do + do
        act += b * do
    nbytes = 4 * (params * (2 + 1 + 7) + 2 * act + b * int(np.prod(spec["input"])))
    return flops, nbytes


def ceilings():
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda")
    for _ in range(2):
        a @ a
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    torch.cuda.synchronize()
    tflops = 5 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e12
    del a, x, y
    # latency floor: replay of a graph holding one tiny kernel, then a 4-byte read-back
    z = torch.zeros(1, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        z.add_(1)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        z.add_(1)
    for _ in range(100):
        g.replay()
        z.item()
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        g.replay()
        z.item()
    lat = (time.perf_counter() - t0) / n * 1e6
    return tflops, bw, lat


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="short timing budget")
    ap.add_argument("--smoke", action="store_true", help="cpu only, to check the script without a GPU")
    ap.add_argument("--only", default="mlp_small,cnn,mlp_wide")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="also time mpscy and PyTorch's CUDA graph in ROUNDS interleaved rounds for the models "
                    "whose target is a ratio, and print the median of the rounds' ratios")
    ap.add_argument("--forms", default="", help="also time the MLP b32 under these $MPSCY_CUDA_FUSED forms, "
                    "space-separated, e.g. 'grid:66 grid:33 cluster:16'")
    args = ap.parse_args()
    budget, repeats = (0.05, 3) if args.quick or args.smoke else (0.4, 5)
    results, info = {}, {}
    targets = {"mlp_small": ("abs", 25.0), "cnn": ("ratio", 0.3), "mlp_wide": ("ratio", 0.8)}
    if not args.smoke:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        info["device"] = torch.cuda.get_device_name()
        info["fp32_tflops"], info["copy_tb_s"], info["launch_readback_us"] = ceilings()
        print(f"# {info['device']}: fp32 GEMM {info['fp32_tflops']:.1f} TFLOP/s, copy {info['copy_tb_s']:.2f} TB/s, "
              f"graph replay + 4-byte read-back {info['launch_readback_us']:.1f} us", flush=True)
    for name in args.only.split(","):
        spec = MODELS[name]
        if args.smoke:
            spec = dict(spec, batch=min(spec["batch"], 64))
        data = batches(spec)
        data32 = [(x, y.astype(np.int32)) for x, y in data]
        runs = [("mpscy", lambda: mpscy_step(name, spec, "cpu" if args.smoke else "cuda"), data32)]
        if args.smoke:
            runs.append(("torch eager", lambda: torch_eager(name, spec, "cpu"), data))
        else:
            if name == "mlp_small":
                runs.append(("mpscy separate kernels", lambda: mpscy_step(name, spec, "cuda", fused="0"), data32))
                for form in args.forms.split():
                    runs.append((f"mpscy {form}", lambda form=form: mpscy_step(name, spec, "cuda", fused=form), data32))
            else:
                runs.append(("mpscy staged first", lambda: mpscy_step(name, spec, "cuda", env={"MPSCY_CUDA_DEFER": "0"}),
                             data32))
            runs += [("mpscy tf32", lambda: mpscy_step(name, spec, "cuda", "tf32"), data32),
                     ("torch eager", lambda: torch_eager(name, spec, "cuda"), data),
                     ("torch eager fused", lambda: torch_eager(name, spec, "cuda", fused=True), data),
                     ("torch cuda graph", lambda: torch_graph(name, spec), data),
                     ("jax jit", lambda: jax_step(name, spec), data32)]
        results[name] = {}
        for label, make, d in runs:
            if label == "mpscy tf32" and name == "mlp_small":
                continue
            try:
                step = make()
                if step is None:
                    print(f"{name:10s} {label:24s} n/a (layers missing)", flush=True)
                    continue
                us, loss = time_steps(step, d, budget, repeats)
                results[name][label] = us
                print(f"{name:10s} {label:24s} {us:10.1f} us/step  (loss {loss:.4f})", flush=True)
                del step
            except Exception as e:  # one framework failing must not hide the others
                print(f"{name:10s} {label:24s} failed: {type(e).__name__}: {e}", flush=True)
        if args.paired and not args.smoke and targets[name][0] == "ratio":
            ours, ref = mpscy_step(name, spec, "cuda"), torch_graph(name, spec)
            t_ours, t_ref = paired_rounds([ours, ref], [data32, data], args.paired, budget / 4)
            ratios = sorted(a / b for a, b in zip(t_ours, t_ref))
            results[name]["paired"] = {"mpscy": t_ours, "torch cuda graph": t_ref, "ratios": ratios}
            print(f"{name:10s} paired, {args.paired} interleaved rounds: mpscy {statistics.median(t_ours):.1f} us, "
                  f"torch cuda graph {statistics.median(t_ref):.1f} us, ratio median {statistics.median(ratios):.3f} "
                  f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
            del ours, ref
        if not args.smoke:
            flops, nbytes = flops_bytes(name, spec)
            t_math = flops / (info["fp32_tflops"] * 1e12) * 1e6
            t_mem = nbytes / (info["copy_tb_s"] * 1e12) * 1e6
            results[name]["floor_us"] = max(t_math, t_mem, info["launch_readback_us"])
            results[name]["floor_parts_us"] = {"math": t_math, "memory": t_mem, "launch": info["launch_readback_us"]}

    print("\n| model | framework | us/step | x torch graph | x mpscy |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ref, ours = r.get("torch cuda graph"), r.get("mpscy")
        for label, us in r.items():
            if not isinstance(us, float) or label == "floor_us":
                continue
            a = f"{us / ref:.2f}" if ref else "-"
            b = f"{us / ours:.2f}" if ours else "-"
            print(f"| {name} | {label} | {us:.1f} | {a} | {b} |")
        if "floor_us" in r:
            parts = r["floor_parts_us"]
            print(f"| {name} | floor (max of math {parts['math']:.1f}, memory {parts['memory']:.1f}, "
                  f"launch {parts['launch']:.1f}) | {r['floor_us']:.1f} | | |")
    if not args.smoke:
        print()
        for name, (kind, goal) in targets.items():
            r = results.get(name, {})
            if "mpscy" not in r:
                print(f"target {name}: not measured")
                continue
            if kind == "abs":
                print(f"target {name}: {r['mpscy']:.1f} us <= {goal} us: {'MET' if r['mpscy'] <= goal else 'MISSED'}")
            elif "torch cuda graph" in r:
                ratio = r["mpscy"] / r["torch cuda graph"]
                print(f"target {name}: {ratio:.2f}x torch cuda graph <= {goal}x: {'MET' if ratio <= goal else 'MISSED'}")
            if kind == "ratio" and "paired" in r:
                m = statistics.median(r["paired"]["ratios"])
                print(f"target {name}, paired rounds: {m:.3f}x torch cuda graph <= {goal}x: "
                      f"{'MET' if m <= goal else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
