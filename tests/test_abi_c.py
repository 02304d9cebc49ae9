"""Compiles and runs the plain-C tests: tests/c/test_abi.c, which includes only objc/mpscy.h and
links the CPU backend's sources (the ABI trains a tiny model with no Python involved), and
tests/c/test_lbfgs_run.c (common/lbfgs.c's order of an L-BFGS call's parts, over fake parts), and
tests/c/test_staging.c (the Cython bridge's and the cuda backend's batch copies, _staging.h)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blas_flags():
    if sys.platform == "darwin":
        return [], ["-framework", "Accelerate"]
    ob = pytest.importorskip("scipy_openblas32", reason="the C test links scipy-openblas32 (a [test] extra)")
    lib = ob.get_lib_dir()
    return ["-I" + ob.get_include_dir()], ["-L" + lib, "-l" + ob.get_library(), "-Wl,-rpath," + lib]


def _build_and_run(tmp_path, test, std="c99", extra=()):
    """tests/c/<test>.c linked with the library's C sources and the CPU backend, run: its stdout."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    cflags, libs = _blas_flags()
    sources = [os.path.join(ROOT, "tests", "c", test + ".c"), os.path.join(ROOT, "objc", "mpscy.c")]
    for pattern in ("objc/null/*.c", "objc/common/*.c", "objc/cpu/*.c"):
        sources += sorted(glob.glob(os.path.join(ROOT, pattern)))
    exe = str(tmp_path / test)
    cmd = [cc, "-std=" + std, "-D_POSIX_C_SOURCE=200809L", "-O1", "-Wall", "-Werror", "-I" + os.path.join(ROOT, "objc"),
           *extra, *cflags, *sources, *libs, "-lm", "-lpthread", "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok ") and " 0 failures" in run.stdout
    return run.stdout


def test_plain_c_abi(tmp_path):
    out = _build_and_run(tmp_path, "test_abi")
    assert int(out.split()[1]) >= 38  # every check ran


def test_lbfgs_call_order_and_undo(tmp_path):
    out = _build_and_run(tmp_path, "test_lbfgs_run")
    assert int(out.split()[1]) == 28  # every check ran


def test_staging_copies(tmp_path):
    """The non-temporal copy of a device's batch against the plain copy: 15 lengths x 64 end
    offsets, NaN and -Inf at 10 places each, and a streamed job of 7 pieces and their flags."""
    out = _build_and_run(tmp_path, "test_staging", std="c11",
                         extra=["-I" + os.path.join(ROOT, "src", "mpscy"), "-Wno-unused-function"])
    assert int(out.split()[1]) == 15 * 64 * 2 + 10 * 2 * 2 + 1 + 1 + 1 + 1 + 7 + 1
