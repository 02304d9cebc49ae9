#!/usr/bin/env bash
# After bench/gpu_run.sh in the same call (it builds in place and installs $WHEELS to /tmp/site):
# ncu's detailed sections (throughput, warp states, scheduler, occupancy) for the kernels of one
# CNN step whose names match $KERNELS (a regex), to $OUT/ncu_detail.txt, with the lines that
# matter printed; then interleaved A/B of the CNN step for each variant in $AB (";"-separated
# lists of NAME=VALUE, as bench/cuda_ab.py takes them; "" is the default engine). $STALLS: the
# stall reasons of the matching kernels; $SOURCE: their per-instruction samples (ncu_source.csv).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mpscy-gpu}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src:/tmp/site:${PYTHONPATH:-}
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
MODEL=${MODEL:-cnn}
if [ -n "${KERNELS:-}" ] && [ -n "$NCU" ]; then
    timeout ${NCU_TIMEOUT:-200} "$NCU" --graph-profiling node --clock-control none --cache-control none \
        -k "regex:${KERNELS}" --launch-count ${LAUNCHES:-12} \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis \
        $PY bench/cuda_profile.py "$MODEL" > "$OUT/ncu_detail.txt" 2>&1
    echo "ncu detail: exit $?"
    grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Stall|Issued Warp Per|No Eligible|Achieved Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|L2 Hit|DRAM Throughput|One or More Eligible|Active Warps Per" "$OUT/ncu_detail.txt" | head -${DETAIL_LINES:-200}
fi
if [ -n "${STALLS:-}" ] && [ -n "$NCU" ]; then
    # per kernel matching $STALLS: tensor-pipe use, issue rate, shared-memory bank conflicts and
    # the warp stall reasons (cycles per issued instruction), one line per metric
    M=gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
    M=$M,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active
    M=$M,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
    for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected lg_throttle \
             dispatch_stall no_instruction tex_throttle selected drain branch_resolving membar sleeping misc; do
        M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
    done
    timeout ${NCU_TIMEOUT:-200} "$NCU" --graph-profiling node --clock-control none --cache-control none \
        -k "regex:${STALLS}" --launch-count ${LAUNCHES:-12} --metrics "$M" --csv \
        $PY bench/cuda_profile.py "$MODEL" > "$OUT/ncu_stalls.csv" 2>/dev/null
    echo "ncu stalls: exit $?"
    $PY - "$OUT/ncu_stalls.csv" <<'PYEOF'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, mi, vi, ii = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value"), h.index("ID")
cur = None
for r in rows[1:]:
    if r[ii] != cur:
        cur = r[ii]
        print(f"-- {r[ki][:70]}")
    name = r[mi].replace("smsp__average_warps_issue_stalled_", "stall ").replace("_per_issue_active.ratio", "")
    try:
        if float(r[vi].replace(",", "")) < 0.05 and name.startswith("stall"):
            continue
    except ValueError:
        pass
    print(f"   {name:70s} {r[vi]}")
PYEOF
fi
if [ -n "${SOURCE:-}" ] && [ -n "$NCU" ]; then
    # per SASS instruction (with CUDA lines when built with MPSCY_CUDA_LINEINFO=1) of the kernels
    # matching $SOURCE: warp-state samples by stall reason, to $OUT/ncu_source.csv (one table a
    # profiled launch; warm caches, clocks as found)
    timeout ${NCU_TIMEOUT:-200} "$NCU" --graph-profiling node --clock-control none --cache-control none \
        -k "regex:${SOURCE}" --launch-skip ${SKIP_LAUNCHES:-2} --launch-count ${LAUNCHES:-4} \
        --section SourceCounters --section WarpStateStats --import-source yes -f -o /tmp/ncu_source \
        $PY bench/cuda_profile.py "$MODEL" > "$OUT/ncu_source.log" 2>&1
    echo "ncu source: exit $?"; tail -2 "$OUT/ncu_source.log"
    "$NCU" -i /tmp/ncu_source.ncu-rep --page source --csv --print-source ${PRINT_SOURCE:-cuda,sass} \
        > "$OUT/ncu_source.csv" 2> "$OUT/ncu_source_page.err"
    echo "ncu source page: exit $? ($(wc -l < "$OUT/ncu_source.csv") lines)"; head -3 "$OUT/ncu_source_page.err"
fi
if [ -n "${AB+x}" ]; then
    IFS=';' read -ra VARIANTS <<< "$AB"
    $PY bench/cuda_ab.py "$MODEL" "${VARIANTS[@]}" 2>&1 | tail -8
fi
