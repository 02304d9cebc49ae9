"""The in-graph timeline of mpscy CUDA steps, read with CUPTI through torch.profiler: every kernel
and copy of the captured step graph with its start, duration and stream, as the graph really ran
(both streams, no profiler serialization, unlike ncu's node mode). Prints the last profiled
step: each kernel's start and end from the step's first GPU activity, its stream (M main, S side),
the idle gaps of the main stream, and a summary (GPU span of the step, busy time per stream, time
with both busy).

    python bench/cuda_timeline.py [cnn|mlp_wide|mlp_small] [NAME=VALUE ...]   # env for the engine
    python bench/cuda_timeline.py cnn --json trace.json                       # keep the raw trace
"""
import json
import os
import sys
import tempfile

STEPS = 12


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
        events = json.load(f)["traceEvents"]
    acts = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    acts.sort(key=lambda e: e["ts"])
    if not acts:
        sys.exit("no GPU activity recorded (CUPTI did not trace the graph's kernels)")
    # steps: split where the GPU was idle for longer than 8 us (the host's launch and read-back)
    steps, cur, end = [], [], None
    for e in acts:
        if end is not None and e["ts"] - end > 8.0:
            steps.append(cur)
            cur = []
        cur.append(e)
        end = max(end or 0.0, e["ts"] + e["dur"])
    steps.append(cur)
    print(f"{name}: {len(acts)} activities in {len(steps)} groups (steps); the last full one:")
    last = steps[-1] if len(steps) < 2 else steps[-2]
    t0 = last[0]["ts"]
    streams = {}
    for e in last:
        s = e.get("args", {}).get("stream", -1)
        streams.setdefault(s, 0.0)
        streams[s] += e["dur"]
    main_s = last[-1].get("args", {}).get("stream", -1)  # the step ends on the main stream
    label = {s: ("M" if s == main_s else "S") for s in streams}
    prev_end = {}
    gaps = 0.0
    for e in last:
        s = e.get("args", {}).get("stream", -1)
        st, en = e["ts"] - t0, e["ts"] - t0 + e["dur"]
        gap = st - prev_end[s] if s in prev_end else 0.0
        if label[s] == "M" and gap > 0:
            gaps += gap
        prev_end[s] = en
        nm = e["name"].replace("void ", "")[:58]
        print(f"  {label[s]} {st:8.1f} {en:8.1f} {e['dur']:7.1f}  gap {gap:5.1f}  {nm}")
    span = max(e["ts"] + e["dur"] for e in last) - t0
    # time with two or more activities running at once
    pts = sorted([(e["ts"], 1) for e in last] + [(e["ts"] + e["dur"], -1) for e in last])
    both = run = 0.0
    depth, tp = 0, None
    for t, d in pts:
        if tp is not None:
            if depth >= 2:
                both += t - tp
            if depth >= 1:
                run += t - tp
        depth += d
        tp = t
    busy = ", ".join(f"{label[s]} {v:.1f}" for s, v in streams.items())
    print(f"GPU span of the step {span:.1f} us; busy per stream: {busy}; any busy {run:.1f}, two or more "
          f"busy {both:.1f}, idle {span - run:.1f}; gaps between main-stream activities {gaps:.1f} us")
    spans = [max(e["ts"] + e["dur"] for e in g) - g[0]["ts"] for g in steps[1:-1]]
    starts = [g[0]["ts"] for g in steps]
    if len(starts) > 2:
        period = (starts[-1] - starts[1]) / (len(starts) - 2)
        print(f"all steps: GPU span {min(spans):.1f}-{max(spans):.1f} us, step period {period:.1f} us "
              f"(so {period - sum(spans) / len(spans):.1f} us a step with the GPU idle: host, launch, read-back)")


if __name__ == "__main__":
    main()
