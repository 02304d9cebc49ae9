# Sourced by bench/gpu_run.sh and bench/gpu_sanitize.sh (not run on its own): the repository root
# as the working folder, $OUT (default /tmp/mpscy-gpu) and $PY (default python3); the wheels in
# $WHEELS (scipy-openblas32, memray) installed to /tmp/site first when given (machines without
# network); build_tree; then, unless SKIP_BUILD=1, an in-place build with the cuda backend forced on (its
# log in $OUT/build.log, its "mpscy:" lines and time printed); src/ put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/mpscy-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    ls "$WHEELS"/*.whl > /dev/null 2>&1 \
        || { echo "no wheels in $WHEELS: run bench/fetch_wheels.sh where pip works, and carry $WHEELS"; exit 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# build_tree DIR LOG [CUDA]: an in-place build of the checkout at DIR, its log to LOG, the cuda
# backend forced on (CUDA=0: off; gpu_ab_trees.sh's check of itself on a machine with no GPU)
build_tree() {
    (cd "$1" && MPSCY_CUDA=${3:-1} MPSCY_CUDA_ARCH=${MPSCY_CUDA_ARCH:-90} $PY setup.py -q build_ext --inplace --force \
        > "$2" 2>&1)
}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    t0=$(date +%s)
    build_tree . "$OUT/build.log" || { tail -60 "$OUT/build.log"; exit 1; }
    grep "^mpscy:" "$OUT/build.log"
    echo "build: $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
