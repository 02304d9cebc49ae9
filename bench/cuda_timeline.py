"""The in-graph timeline of mpscy CUDA steps, read with CUPTI through torch.profiler: every kernel
and copy of the captured step graph with its start, duration and stream, as the graph really ran
(both streams, no profiler serialization, unlike ncu's node mode). Prints one profiled
step: each kernel's start and end (from the end of the deferred batch's pull, when there is one),
its stream (a graph's branches run on streams of the driver's choosing), and how much of the span
had no, one, or two or more kernels running.

    python bench/cuda_timeline.py [cnn|mlp_wide|mlp_small] [NAME=VALUE ...]   # env for the engine
    python bench/cuda_timeline.py cnn --json trace.json                       # keep the raw trace
"""
import json
import os
import sys
import tempfile

STEPS = 12  # profiled steps (the profiler slows the host: ~390 against ~303 us a CNN step)


def split_steps(events):
    """The GPU activities of a chrome trace (kernels, copies, sets), in start order, split into
    steps: each begins with the graph's first node, the copy of the staged parameter block."""
    acts = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    acts.sort(key=lambda e: e["ts"])
    steps, cur = [], []
    for e in acts:
        if e["name"].startswith("Memcpy HtoD") and cur:
            steps.append(cur)
            cur = []
        cur.append(e)
    steps.append(cur)
    return [g for g in steps if any(e["cat"] == "kernel" for e in g)]


def step_summary(step):
    """One step's figures: the pull kernel's wait and duration (None without one), then, from
    its end, the span and the time with no, one, or two or more activities running, and the
    activities themselves as (start, end, stream, name)."""
    pull = [e for e in step if e["name"].startswith("pull_kernel")]
    t0 = pull[0]["ts"] + pull[0]["dur"] if pull else step[0]["ts"]
    # from the pull's end, and what started beside the pull (a first convolution: negative times;
    # the span's figures count from the pull's end)
    beside = [e for e in step if pull and e is not pull[0] and pull[0]["ts"] <= e["ts"] < t0 - 0.5]
    body = beside + [e for e in step if e["ts"] >= t0 - 0.5]
    pts = sorted([(max(e["ts"], t0), 1) for e in body] + [(max(e["ts"] + e["dur"], t0), -1) for e in body])
    depth, tp, acc = 0, None, [0.0, 0.0, 0.0]
    for t, d in pts:
        if tp is not None:
            acc[min(depth, 2)] += t - tp
        depth += d
        tp = t
    return {
        "pull_wait": pull[0]["ts"] - step[0]["ts"] if pull else None,
        "pull": pull[0]["dur"] if pull else None,
        "span": max(e["ts"] + e["dur"] for e in body) - t0,
        "idle": acc[0], "one": acc[1], "two_or_more": acc[2],
        "busy_sum": sum(max(e["ts"] + e["dur"], t0) - max(e["ts"], t0) for e in body),
        "rows": [(e["ts"] - t0, e["ts"] - t0 + e["dur"], e.get("args", {}).get("stream", "?"), e["name"])
                 for e in body],
    }


def report(events, name):
    steps = split_steps(events)
    if not steps:
        sys.exit("no GPU activity recorded (CUPTI did not trace the graph's kernels)")
    print(f"{name}: {len(steps)} steps; the last but one:")
    r = step_summary(steps[-2] if len(steps) > 1 else steps[-1])
    if r["pull"] is not None:
        print(f"  staging copy to pull start {r['pull_wait']:.1f} us, pull {r['pull']:.1f} us "
              "(it ends when the host's last piece has crossed); times below from the pull's end")
    for st, en, stream, nm in r["rows"]:
        print(f"  {st:8.1f} {en:8.1f} {en - st:7.1f}  s{stream:<3} {nm.replace('void ', '')[:60]}")
    print(f"span {r['span']:.1f} us: idle {r['idle']:.1f}, one activity {r['one']:.1f}, two or more "
          f"{r['two_or_more']:.1f}; sum of activity times {r['busy_sum']:.1f}")
    periods = sorted(b[0]["ts"] - a[0]["ts"] for a, b in zip(steps, steps[1:]))
    if periods:
        print(f"median step period under the profiler {periods[len(periods) // 2]:.1f} us")


def main():
    args = [a for a in sys.argv[1:]]
    keep = None
    if "--json" in args:
        i = args.index("--json")
        keep = args[i + 1]
        del args[i:i + 2]
    name = args[0] if args else "cnn"
    env = dict(kv.split("=", 1) for kv in args[1:])
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import torch
    from torch.profiler import ProfilerActivity, profile
    from cuda_bench import MODELS, batches, mpscy_step
    spec = MODELS[name]
    step = mpscy_step(name, spec, env=env)
    data = [(x, y.astype("int32")) for x, y in batches(spec, 4)]
    for i in range(50):
        step(*data[i % len(data)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(STEPS):
            step(*data[i % len(data)])
    path = keep or os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        report(json.load(f)["traceEvents"], name)


if __name__ == "__main__":
    main()
