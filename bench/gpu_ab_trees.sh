#!/usr/bin/env bash
# A/B two source trees in ONE call on a GPU machine (the lent H100): tree A is this checkout, tree
# B a copy of it with $PATCH applied (made where git is: `git diff main wip/x > .ab/x.patch`, the
# ignored folder carried). Both build at once with the cuda backend forced on (logs in
# $OUT/build_A.log, build_B.log), pytest runs $TESTS on B's build on cuda (and $TESTS_A on A's, when
# given), then bench/cuda_ab_trees.py times them in turns: $MODEL (default mlp_small) over
# $AB_ROUNDS rounds, both trees plus any variants in $AB_EXTRA (e.g. "B MPSCY_CUDA_FUSED_EARLYREL=0":
# A and B name the trees). The wheels in $WHEELS go to /tmp/site first (gpu_setup.sh).
#
#   PATCH=.ab/wrow.patch TESTS="tests/test_cuda_fused.py" WHEELS=.whl bash bench/gpu_ab_trees.sh
# AB_DEVICE=cpu checks the script itself where there is no GPU (the builds without cuda, all on cpu).
DEV=${AB_DEVICE:-cuda}
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv
SKIP_BUILD=1
source "$(dirname "$0")/gpu_setup.sh"
A=$PWD
B=${B_DIR:-/tmp/mpscy-B}
[ -n "${PATCH:-}" ] && [ -f "$PATCH" ] || { echo "PATCH: no patch file given (\$PATCH=${PATCH:-})"; exit 1; }
rm -rf "$B" && mkdir -p "$B"
tar --exclude=./build --exclude=./.whl --exclude=./.ab --exclude=./.venv --exclude=./venv --exclude=./.ci-venv -cf - . | tar -xf - -C "$B"
if command -v git > /dev/null; then
    (cd "$B" && git apply "$A/$PATCH") || { echo "the patch does not apply"; exit 1; }
else
    (cd "$B" && patch -p1 -s < "$A/$PATCH") || { echo "the patch does not apply"; exit 1; }
fi
echo "B: $B, $PATCH applied ($(grep -c '^diff ' "$PATCH") files)"
t0=$(date +%s)
build() {  # build <tree> <log>
    (cd "$1" && MPSCY_CUDA=$([ "$DEV" = cuda ] && echo 1 || echo 0) MPSCY_CUDA_ARCH=${MPSCY_CUDA_ARCH:-90} $PY setup.py -q build_ext --inplace --force > "$2" 2>&1)
}
build "$A" "$OUT/build_A.log" & pa=$!
build "$B" "$OUT/build_B.log" & pb=$!
wait $pa || { tail -40 "$OUT/build_A.log"; echo "build A failed"; exit 1; }
wait $pb || { tail -40 "$OUT/build_B.log"; echo "build B failed"; exit 1; }
grep "^mpscy:" "$OUT/build_B.log"
echo "builds: $(( $(date +%s) - t0 )) s"
SITE=$(tr ':' '\n' <<< "${PYTHONPATH:-}" | grep -v -x "$A/src" | paste -sd:)  # gpu_setup.sh's, less A's src
run_tests() {  # run_tests <tree> <label> <paths>
    (cd "$1" && MPSCY_DEVICE=$DEV PYTHONPATH="$1/src:$SITE" timeout ${TEST_TIMEOUT:-360} $PY -m pytest $3 -q -ra \
        -p no:cacheprovider > "$OUT/pytest_$2.log" 2>&1)
    echo "pytest $2 ($DEV): exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_$2.log" | head -20; tail -1 "$OUT/pytest_$2.log"
}
[ -n "${TESTS:-}" ] && run_tests "$B" B "$TESTS"
[ -n "${TESTS_A:-}" ] && run_tests "$A" A "$TESTS_A"
extra=()
if [ -n "${AB_EXTRA:-}" ]; then
    while read -r t rest; do
        case $t in A) extra+=("$A $rest") ;; B) extra+=("$B $rest") ;; *) echo "AB_EXTRA: $t is not A or B"; exit 1 ;; esac
    done <<< "$(tr ';' '\n' <<< "$AB_EXTRA")"
fi
AB_DEVICE=$DEV PYTHONPATH=$SITE timeout ${AB_TIMEOUT:-300} $PY bench/cuda_ab_trees.py ${MODEL:-mlp_small} "$A" "$B" "${extra[@]}"
echo "ab: exit $?"
