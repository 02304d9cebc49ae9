#!/usr/bin/env bash
# The cuda backend under NVIDIA's compute-sanitizer, in ONE call on a GPU machine: builds in
# place with the cuda backend forced on, then runs
#   memcheck   (out-of-bounds and misaligned device accesses, leaks at exit; host backtraces
#              off, see san() below) over the cuda layer, loss and one-kernel-MLP tests, the
#              benchmark's three models, and bench/sanitize_leak.py, whose engines are all freed
#              before it exits: every LEAK SUMMARY must be empty;
#   initcheck  (device reads of memory never written) over the layer and loss tests;
#   racecheck  (shared-memory hazards) and synccheck (barrier misuse) over the benchmark's models.
# Each tool's log goes to $OUT/<tool>_<what>.log; stdout gets each run's "ERROR SUMMARY" line and
# its pytest summary. A pytest failure under a tool can be timing (kernels run 10-100x slower; a
# deferred step's wait for the host may stall): the sanitizer's own summary is the result.
# SAN_TOOLS narrows the tools (e.g. "memcheck"), SAN_MODELS the models (default "mlp_small cnn
# mlp_wide"); SAN_TIMEOUT bounds each pytest run (default 150 s), SAN_MODEL_TIMEOUT each model's
# (default 60 s, 300 s under racecheck); SAN_TESTS=0 skips the pytest runs.
source "$(dirname "$0")/gpu_setup.sh"  # SKIP_BUILD=1: the build already in place
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
[ -n "$SAN" ] || { echo "no compute-sanitizer here"; exit 1; }
export MPSCY_DEVICE=cuda
export MPSCY_CUDA_FREE_LOG=1  # a refused cudaFree or cudaFreeHost is told on stderr (<tool>_<what>.out)
TOOLS=${SAN_TOOLS:-memcheck initcheck racecheck synccheck}
T=${SAN_TIMEOUT:-150}

san() {  # seconds, tool, name, command...
    local secs=$1 tool=$2 name=$3
    shift 3
    local extra=""
    # host backtraces off: compute-sanitizer 2025.3 keeps the Python frames of every saved host
    # backtrace alive, and with them their locals, so every engine built under it outlived its last
    # reference and was reported leaked (thirty-second session; with "no", all were freed: 0 leaks)
    [ "$tool" = memcheck ] && extra="--leak-check full --show-backtrace device"
    timeout "$secs" "$SAN" --tool "$tool" $extra --print-limit 50 --log-file "$OUT/${tool}_${name}.log" "$@" \
        > "$OUT/${tool}_${name}.out" 2>&1
    local rc=$?
    echo "$tool $name: exit $rc; $(grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|LEAK SUMMARY" "$OUT/${tool}_${name}.log" | tr '\n' ' ')"
    grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/${tool}_${name}.out" | tail -1
    grep -h "refused\|native counters\|still alive\|round " "$OUT/${tool}_${name}.out" | head -6
}

models() {  # the benchmark's models, a few staged steps each (cuda_profile.py's workload)
    for m in ${SAN_MODELS:-mlp_small cnn mlp_wide}; do
        # racecheck instruments every shared-memory access: the wide MLP takes ~150 s under it
        san "${SAN_MODEL_TIMEOUT:-$([ "$1" = racecheck ] && echo 300 || echo 60)}" "$1" "$m" $PY bench/cuda_profile.py "$m"
    done
}

for tool in $TOOLS; do
    case $tool in
    memcheck)
        # the >65535-channel cases take minutes under a tool
        [ "${SAN_TESTS:-1}" = 1 ] && san "$T" memcheck layers $PY -m pytest tests/test_cuda_layers.py -k "not 65535" -q -p no:cacheprovider
        [ "${SAN_TESTS:-1}" = 1 ] && san "$T" memcheck fused $PY -m pytest tests/test_cuda_fused.py -q -p no:cacheprovider
        models memcheck
        san "$T" memcheck leak $PY bench/sanitize_leak.py
        ;;
    initcheck)
        san "$T" initcheck layers $PY -m pytest tests/test_cuda_layers.py -k "layer_matches_cpu or loss_matches_cpu" \
            -q -p no:cacheprovider ;;
    racecheck | synccheck)
        models "$tool" ;;
    esac
done
