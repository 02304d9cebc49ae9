#!/usr/bin/env bash
# Downloads the wheels a lent GPU machine lacks (it has no package registry) into .whl/ (ignored by
# git), for Python 3.12 on manylinux x86_64: scipy-openblas32 at the version pyproject.toml pins
# (the build needs it) and memray (the allocation tests). Run on a machine with pip access, then
# give `.whl` to the device call's carry and WHEELS=.whl to gpu_run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ob=$(grep -o 'scipy-openblas32==[0-9.]*' pyproject.toml | head -1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$ob" memray
ls -1 .whl
