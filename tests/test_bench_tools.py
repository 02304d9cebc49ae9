"""The analysis of bench/cuda_timeline.py on a synthetic CUPTI trace (no GPU, no torch): how a
trace is split into steps, and the span and concurrency figures of one step; and
bench/cuda_bench.py's interleaved rounds on plain Python steps; bench/cuda_ab_trees.py on the cpu."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
cuda_timeline = pytest.importorskip("cuda_timeline")


def _act(name, ts, dur, stream, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def _step(t):
    """One deferred step from time t: the staging copy, the pull (10 us after it, 20 long), then
    a main-stream chain of 30 + 20 us beside a side-stream kernel of 25 us starting 5 us later,
    and a final 10 us kernel after a 2 us gap."""
    return [
        _act("Memcpy HtoD (Pinned -> Device)", t, 1.0, 7, cat="gpu_memcpy"),
        _act("pull_kernel(float*)", t + 11.0, 20.0, 7),
        _act("conv_a", t + 31.0, 30.0, 8),
        _act("dw_b", t + 36.0, 25.0, 9),
        _act("conv_c", t + 61.0, 20.0, 8),
        _act("norm_update_kernel", t + 83.0, 10.0, 7),
    ]


def test_steps_split_at_the_staging_copy_and_keep_kernel_steps():
    events = _step(0.0) + _step(200.0) + _step(400.0) + [{"cat": "cpu_op", "name": "x", "ts": 5.0, "dur": 1.0}]
    events.append(_act("Memcpy HtoD (Pinned -> Device)", 600.0, 1.0, 7, cat="gpu_memcpy"))  # no kernel: dropped
    steps = cuda_timeline.split_steps(events[::-1])  # any order in, start order out
    assert [len(s) for s in steps] == [6, 6, 6]
    assert [s[0]["ts"] for s in steps] == [0.0, 200.0, 400.0]


def test_step_summary_figures():
    r = cuda_timeline.step_summary(cuda_timeline.split_steps(_step(100.0))[0])
    assert r["pull_wait"] == pytest.approx(11.0) and r["pull"] == pytest.approx(20.0)
    # from the pull's end (t = 131): the chain and dw_b to +50, idle to +52, the update to +62
    assert r["span"] == pytest.approx(62.0)
    assert r["two_or_more"] == pytest.approx(25.0)           # dw_b entirely beside the chain
    assert r["one"] == pytest.approx(30.0 + 20.0 + 10.0 - 25.0)
    assert r["idle"] == pytest.approx(2.0)
    assert r["busy_sum"] == pytest.approx(85.0)
    assert [row[3] for row in r["rows"]] == ["conv_a", "dw_b", "conv_c", "norm_update_kernel"]
    assert r["rows"][0][:3] == (pytest.approx(0.0), pytest.approx(30.0), 8)


def test_step_without_a_pull_is_timed_from_its_first_activity():
    step = [e for e in _step(0.0) if not e["name"].startswith("pull")]
    r = cuda_timeline.step_summary(step)
    assert r["pull"] is None and r["pull_wait"] is None
    assert r["span"] == pytest.approx(93.0)                 # 0 .. 83 + 10
    assert r["idle"] == pytest.approx(30.0 + 2.0)           # 1 .. 31 and 81 .. 83


def test_paired_rounds_interleave_and_time_each_step():
    """paired_rounds warms each step up, then alternates: every round times each step once, for
    the same number of calls in every round, and returns each step's per-round mean in µs."""
    import time
    cuda_bench = pytest.importorskip("cuda_bench")
    order = []

    def make(tag, pause):
        def step(x, y):
            order.append(tag)
            t = time.perf_counter() + pause
            while time.perf_counter() < t:
                pass
            return 0.0
        return step

    fast, slow = make("a", 20e-6), make("b", 200e-6)
    data = [(None, None)] * 3
    times = cuda_bench.paired_rounds([fast, slow], [data, data], rounds=4, budget_s=0.004)
    assert [len(t) for t in times] == [4, 4]
    assert all(18.0 <= t <= 200.0 for t in times[0]), times[0]
    assert all(180.0 <= t <= 2000.0 for t in times[1]), times[1]
    # after the warm-up (10 calls then 10 timed, each), rounds alternate a-block, b-block
    timed = order[40:]
    blocks = [timed[0]]
    for tag in timed[1:]:
        if tag != blocks[-1]:
            blocks.append(tag)
    assert blocks == ["a", "b"] * 4, blocks


AB_TREES = pathlib.Path(__file__).resolve().parent.parent / "bench" / "cuda_ab_trees.py"


def _tree(root, name):
    """A tree for cuda_ab_trees.py: root/name/src/mpscy, a link to the mpscy this process imports."""
    import mpscy
    src = root / name / "src"
    src.mkdir(parents=True)
    (src / "mpscy").symlink_to(pathlib.Path(mpscy.__file__).parent, target_is_directory=True)
    return str(root / name)


def test_ab_trees_times_each_tree_in_its_own_process(tmp_path):
    """Two trees and one with a variable set: each worker reports the mpscy of its own tree, the
    same training reads as bit for bit the same, and each gets a row of µs against the first."""
    pytest.importorskip("cuda_bench")
    a, b = _tree(tmp_path, "A"), _tree(tmp_path, "B")
    env = dict(os.environ, AB_DEVICE="cpu", AB_ROUNDS="2")
    r = subprocess.run([sys.executable, str(AB_TREES), "mlp_small", a, b, a + " MPSCY_THREADS=1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert f"({a}/src/mpscy/__init__.py)" in out and f"({b}/src/mpscy/__init__.py)" in out
    assert "the trees agree bit for bit after 50 steps" in out
    rows = re.findall(r"^mlp_small (.+?)\s+([0-9.]+) us/step  x([0-9.]+)  \(min ([0-9.]+), max ([0-9.]+), 2 rounds of 300\)$",
                      out, re.M)
    assert [row[0] for row in rows] == [a, b, a + " MPSCY_THREADS=1"], out
    assert rows[0][2] == "1.000"
    for _, med, _, lo, hi in rows:
        assert 0.0 < float(lo) <= float(med) <= float(hi) < 1e6


def test_ab_trees_refuses_a_folder_without_mpscy(tmp_path):
    pytest.importorskip("cuda_bench")
    a = _tree(tmp_path, "A")
    r = subprocess.run([sys.executable, str(AB_TREES), "mlp_small", a, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"{tmp_path}: not an mpscy checkout (no src/mpscy)" in r.stderr
