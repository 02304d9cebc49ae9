"""Per-kernel GPU time of one mpscy CUDA step, read with Nsight Compute: run the workload under
ncu (each kernel node of the captured graph is timed on its own), then summarize the CSV.

    ncu --graph-profiling node --metrics gpu__time_duration.sum --csv --log-file k.csv \
        python bench/cuda_profile.py [mlp_small|mlp_wide|cnn]
    python bench/cuda_profile.py --summarize k.csv
"""
import csv
import os
import sys
from collections import OrderedDict

WARMUP, STEPS = 3, 3


def workload(name):
    # ncu runs a graph's kernels one at a time inside the launch call, so a step whose graph waits
    # for the host's staging (step.cu's deferred staging) would wait out its patience: stage first
    os.environ["MPSCY_CUDA_DEFER"] = "0"
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from cuda_bench import MODELS, batches, mpscy_step
    spec = MODELS[name]
    step = mpscy_step(name, spec)
    data = [(x, y.astype("int32")) for x, y in batches(spec, 2)]
    for i in range(WARMUP + STEPS):
        step(*data[i % 2])


def summarize_graphs(path):
    """ncu --graph-profiling graph: one row per launched step graph; the last ones are steady."""
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    vals = [float(r["Metric Value"].replace(",", "")) / 1000.0 for r in csv.DictReader(lines)
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    print("GPU time of each step graph (us):", ", ".join(f"{v:.1f}" for v in vals[-STEPS:]))


def summarize(path):
    rows = []
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            v = float(r["Metric Value"].replace(",", ""))
            unit = r.get("Metric Unit", "nsecond")
            rows.append((r["Kernel Name"][:60], v / 1000.0 if unit.startswith("n") else v))
    if not rows:
        print("no kernel timings in", path)
        return
    # the last STEPS steps are the steady state; each has the same kernel sequence
    per_step = len(rows) // (WARMUP + STEPS)
    last = rows[-per_step:]
    agg = OrderedDict()
    for k, v in last:
        agg[k] = agg.get(k, 0.0) + v
    print(f"kernels per step: {per_step}; GPU busy time of one step: {sum(v for _, v in last):.1f} us")
    for k, v in agg.items():
        print(f"  {v:8.2f} us  {k}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--graphs":
        summarize_graphs(sys.argv[2])
    else:
        workload(sys.argv[1] if len(sys.argv) > 1 else "mlp_small")
