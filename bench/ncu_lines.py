"""Summarizes ncu's source page (bench/gpu_probe.sh SOURCE=..., exported with --print-source
cuda,sass from a build with MPSCY_CUDA_LINEINFO=1): the CUDA source lines with the most warp-state
samples, each with its samples by stall reason, every profiled launch's table added into one.
Barrier samples (warps waiting at a barrier for others) are counted apart, so the lines the
critical path waits on come first.

    python bench/ncu_lines.py ncu_source.csv [rows] [file-substring]
"""
import csv
import gzip
import sys
from collections import defaultdict


def number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def main(path, top=60, only=""):
    opener = gzip.open if path.endswith(".gz") else open
    lines = defaultdict(lambda: defaultdict(float))
    text, header, fname = {}, None, ""
    with opener(path, "rt", errors="replace") as f:
        for r in csv.reader(f):
            if not r:
                continue
            if r[0] == "File Path":
                fname = r[1]
                continue
            if r[0] == "Line No":
                header = r
                continue
            if header is None or not r[0] or len(r) != len(header):
                continue  # a SASS row under its line, or a note
            key = (fname.rsplit("/", 1)[-1], int(r[0]))
            text[key] = r[1].strip()[:90]
            for c, v in zip(header[4:], r[4:]):
                if c.startswith("stall_") and "Not Issued" not in c or c == "Warp Stall Sampling (All Samples)":
                    lines[key][c] += number(v)
    if not lines:
        sys.exit("no CUDA source lines in " + path + " (export with --print-source cuda,sass)")
    allc = "Warp Stall Sampling (All Samples)"
    total = sum(v[allc] for v in lines.values()) or 1.0
    busy = {k: v[allc] - v["stall_barrier"] for k, v in lines.items()}
    reasons = defaultdict(float)
    for v in lines.values():
        for c, x in v.items():
            if c.startswith("stall_"):
                reasons[c[6:]] += x
    print(f"{len(lines)} lines, {total:.0f} samples; by reason: "
          + ", ".join(f"{c} {x:.0f}" for c, x in sorted(reasons.items(), key=lambda kv: -kv[1]) if x))
    by_file = defaultdict(float)
    for k, x in busy.items():
        by_file[k[0]] += x
    print("samples not at a barrier, by file: " + ", ".join(f"{f} {x:.0f}" for f, x in
                                                          sorted(by_file.items(), key=lambda kv: -kv[1])))
    keys = sorted((k for k in lines if only in k[0]), key=lambda k: -busy[k])
    for k in keys[:top]:
        v = lines[k]
        why = " ".join(f"{c[6:]}={x:.0f}" for c, x in sorted(v.items(), key=lambda kv: -kv[1])
                       if c.startswith("stall_") and x >= 1)
        print(f"{busy[k]:6.0f} {k[0]}:{k[1]:<5} {text[k]:<90} {why}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60, sys.argv[3] if len(sys.argv) > 3 else "")
