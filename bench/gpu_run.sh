#!/usr/bin/env bash
# Build, test and benchmark the cuda backend in ONE call on a GPU machine (the lent H100):
# builds in place with the cuda backend forced on, runs the whole suite on cuda and on cpu,
# runs bench/cuda_bench.py, and profiles one step's kernels with ncu when it is there.
# Summaries go to stdout; full logs to $OUT (default /tmp/mpscy-gpu): build.log, pytest_cuda.log,
# pytest_cpu.log, bench.json, ncu_<model>.csv. Wheels in $WHEELS (scipy-openblas32, memray) are
# installed to /tmp/site first when given (machines without network). BENCH_ARGS defaults to
# "--paired 15" (the ratio targets also timed in interleaved rounds). Narrower runs: TESTS (pytest
# paths), PYTEST_ARGS, BENCH_ARGS (e.g. "--only cnn --paired 15"; "" for no interleaved rounds),
# PROFILE_MODELS, SKIP_TESTS/SKIP_BENCH/SKIP_LAYER_BENCH/SKIP_PROFILE.
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
SKIP_BUILD=0
source "$(dirname "$0")/gpu_setup.sh"
$PY -c "import mpscy; from mpscy import layers as L; print('backends:', mpscy.backends()); print(mpscy.Engine(mpscy.Sequential([L.Dense(2)], input_shape=(2,)), loss='mse', device='cuda').device_info())"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    MPSCY_DEVICE=cuda timeout ${TEST_TIMEOUT:-360} $PY -m pytest ${TESTS:-tests} -q -ra -p no:cacheprovider ${PYTEST_ARGS:-} \
        > "$OUT/pytest_cuda.log" 2>&1
    echo "pytest (cuda): exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30; tail -1 "$OUT/pytest_cuda.log"
    if [ "${CPU_TESTS:-1}" = 1 ]; then
        MPSCY_DEVICE=cpu timeout 120 $PY -m pytest tests -q -p no:cacheprovider > "$OUT/pytest_cpu.log" 2>&1
        echo "pytest (cpu): exit $?"; tail -1 "$OUT/pytest_cpu.log"
    fi
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    timeout ${BENCH_TIMEOUT:-300} $PY bench/cuda_bench.py --json "$OUT/bench.json" ${BENCH_ARGS---paired 15} 2>&1
    echo "bench: exit $?"
fi
if [ "${SKIP_LAYER_BENCH:-0}" != 1 ]; then  # beside the targets' models: ConvTranspose2D, a U-Net, against torch
    timeout 120 $PY bench/cuda_convt.py 2>&1
    echo "convt bench: exit $?"
    timeout 180 $PY bench/cuda_segment.py --profile 2>&1   # a U-Net under per-pixel cross entropy, its kernels
    echo "segment bench: exit $?"
    timeout 180 $PY bench/cuda_segment.py --size 128 --batch 8 2>&1
    echo "segment bench 128x128: exit $?"
fi
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [ "${SKIP_PROFILE:-0}" != 1 ] && [ -n "$NCU" ]; then
    for m in ${PROFILE_MODELS:-mlp_small}; do
        # each kernel on its own (warm caches, clocks as found), then each whole step graph as one workload
        timeout 120 "$NCU" --graph-profiling node --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu_$m.csv" \
            $PY bench/cuda_profile.py "$m" > /tmp/ncu_$m.log 2>&1
        echo "ncu $m: exit $?"; tail -3 /tmp/ncu_$m.log; $PY bench/cuda_profile.py --summarize "$OUT/ncu_$m.csv"
        timeout 120 "$NCU" --graph-profiling graph --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv --log-file /tmp/ncu_graph_$m.csv \
            $PY bench/cuda_profile.py "$m" > /tmp/ncu_graph_$m.log 2>&1
        echo "ncu graph $m: exit $?"; $PY bench/cuda_profile.py --graphs /tmp/ncu_graph_$m.csv
    done
fi
