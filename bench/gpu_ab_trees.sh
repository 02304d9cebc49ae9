#!/usr/bin/env bash
# A/B source trees in ONE call on a GPU machine (the lent H100): tree A is this checkout, and each
# patch in $PATCH (space-separated; made where git is: `git diff main wip/x > .ab/x.patch`, the
# ignored folder carried) gets a copy of it with that patch applied, /tmp/mpscy-<patch's name>.
# All build at once with the cuda backend forced on (logs in $OUT/build_A.log, build_<name>.log),
# pytest runs $TESTS on each patched build on cuda (and $TESTS_A on A's, when given), then
# bench/cuda_ab_trees.py times them in turns: $MODEL (default mlp_small) over $AB_ROUNDS rounds,
# every tree plus the variants in $AB_EXTRA (";"-separated, each a tree's name then NAME=VALUE
# pairs: "A MPSCY_CUDA_FUSED_EARLYREL=0;x MPSCY_CUDA_FUSED_EARLYREL=0", A the checkout, x a patch's
# name). $TRACE (space-separated names) then runs bench/cuda_fused_trace.py on those trees (a
# measuring patch's stamps: bench/wip/dec-probe.patch). The wheels in $WHEELS go to /tmp/site
# first (gpu_setup.sh).
#
#   PATCH=".ab/x.patch .ab/y.patch" TESTS="tests/test_cuda_fused.py" WHEELS=.whl bash bench/gpu_ab_trees.sh
# AB_DEVICE=cpu checks the script itself where there is no GPU (the builds without cuda, all on cpu).
DEV=${AB_DEVICE:-cuda}
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
SKIP_BUILD=1
source "$(dirname "$0")/gpu_setup.sh"
A=$PWD
[ -n "${PATCH:-}" ] || { echo "PATCH: no patch file given"; exit 1; }
trees=() names=()
for p in $PATCH; do  # a tree for each patch: /tmp/mpscy-<its name>
    n=$(basename "$p" .patch)
    t=${B_DIR:-/tmp}/mpscy-$n
    [ -f "$p" ] || { echo "PATCH: $p is not a file"; exit 1; }
    rm -rf "$t" && mkdir -p "$t"
    tar --exclude=./build --exclude=./.whl --exclude=./.ab --exclude=./.venv --exclude=./venv --exclude=./.ci-venv \
        -cf - . | tar -xf - -C "$t"
    if command -v git > /dev/null; then
        (cd "$t" && git apply "$A/$p") || { echo "$p does not apply"; exit 1; }
    else
        (cd "$t" && patch -p1 -s < "$A/$p") || { echo "$p does not apply"; exit 1; }
    fi
    echo "$n: $t, $p applied ($(grep -c '^diff ' "$p") files)"
    trees+=("$t") names+=("$n")
done
t0=$(date +%s)
cuda=$([ "$DEV" = cuda ] && echo 1 || echo 0)
build_tree "$A" "$OUT/build_A.log" $cuda & pids=($!)
for i in "${!trees[@]}"; do build_tree "${trees[$i]}" "$OUT/build_${names[$i]}.log" $cuda & pids+=($!); done
for i in "${!pids[@]}"; do
    n=$([ "$i" = 0 ] && echo A || echo "${names[$((i - 1))]}")
    wait "${pids[$i]}" || { tail -40 "$OUT/build_$n.log"; echo "build $n failed"; exit 1; }
done
grep "^mpscy:" "$OUT/build_A.log"
echo "builds: $(( $(date +%s) - t0 )) s"
run_tests() {  # run_tests <tree> <label> <paths>: the tree's src first on the path
    (cd "$1" && MPSCY_DEVICE=$DEV PYTHONPATH="$1/src:$PYTHONPATH" timeout ${TEST_TIMEOUT:-360} $PY -m pytest $3 -q -ra \
        -p no:cacheprovider > "$OUT/pytest_$2.log" 2>&1)
    echo "pytest $2 ($DEV): exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_$2.log" | head -20; tail -1 "$OUT/pytest_$2.log"
}
if [ -n "${TESTS:-}" ]; then
    for i in "${!trees[@]}"; do run_tests "${trees[$i]}" "${names[$i]}" "$TESTS"; done
fi
[ -n "${TESTS_A:-}" ] && run_tests "$A" A "$TESTS_A"
tree_of() {  # tree_of <name>: A's or a patch's tree, "" for neither
    [ "$1" = A ] && { echo "$A"; return; }
    for i in "${!names[@]}"; do [ "${names[$i]}" = "$1" ] && echo "${trees[$i]}"; done
}
extra=()
if [ -n "${AB_EXTRA:-}" ]; then
    while read -r n rest; do
        [ -z "$n" ] && continue
        t=$(tree_of "$n")
        [ -n "$t" ] || { echo "AB_EXTRA: $n is neither A nor a patch's name"; exit 1; }
        extra+=("$t $rest")
    done <<< "$(tr ';' '\n' <<< "$AB_EXTRA")"
fi
AB_DEVICE=$DEV timeout ${AB_TIMEOUT:-300} $PY bench/cuda_ab_trees.py ${MODEL:-mlp_small} "$A" "${trees[@]}" "${extra[@]}"
echo "ab: exit $?"
for n in ${TRACE:-}; do  # block 0's trace of the one-kernel step on the trees named (A or a patch's name)
    t=$(tree_of "$n")
    [ -n "$t" ] || { echo "TRACE: $n is neither A nor a patch's name"; continue; }
    (cd "$t" && PYTHONPATH="$t/src:$PYTHONPATH" timeout 90 $PY bench/cuda_fused_trace.py > "$OUT/trace_$n.log" 2>&1)
    echo "trace $n: exit $?"; tail -n "${TRACE_LINES:-15}" "$OUT/trace_$n.log"
done
