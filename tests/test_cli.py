"""python -m mpscy: --help documents train/predict/demo; train reaches its held-out accuracy
and writes a checkpoint, an ONNX file and plots; predict classifies PNG files with that
checkpoint; image folders train too; bad options fail with a message and exit code 2."""
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import mpscy
from mpscy import layers
from mpscy.__main__ import main


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "predict", "demo", "python -m mpscy predict model.mpscy images/"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--data", "--model {mlp,cnn}", "--epochs", "--optimizer", "--lr", "--device", "--save",
                "--onnx", "--plots"):
        assert opt in out, opt


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-m", "mpscy", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and "predict" in run.stdout


def _digit_pngs(folder, x, y, per_class=None):
    Image = pytest.importorskip("PIL.Image")
    paths = []
    for i, (img, label) in enumerate(zip(x, y)):
        sub = folder / str(label) if per_class else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:04d}_{label}.png"
        Image.fromarray(np.round(img[0] * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_train_save_onnx_plots_then_predict(device, tmp_path, capsys):
    ckpt, onnx_path, plots = tmp_path / "m.mpscy", tmp_path / "m.onnx", tmp_path / "plots"
    args = ["train", "--data", "digits", "--model", "mlp", "--epochs", "12", "--optimizer", "adam", "--lr", "2e-3",
            "--device", device, "--save", str(ckpt), "--quiet"]
    if _has("onnx"):
        args += ["--onnx", str(onnx_path)]
    if _has("matplotlib"):
        args += ["--plots", str(plots)]
    assert main(args) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"held-out: loss [\d.]+  accuracy ([\d.]+)", out).group(1))
    assert acc >= 0.95, out
    for key in ("precision", "recall", "f1", "roc_auc", "saved"):
        assert key in out
    assert ckpt.exists()
    assert onnx_path.exists() == _has("onnx")
    assert (plots / "confusion_matrix.png").exists() == _has("matplotlib")

    # predict: the held-out digits of the same split, written as 8-bit PNG files
    x, y = mpscy.datasets.load_digits(images=True)
    order = np.random.Generator(np.random.PCG64(0)).permutation(len(x))
    test = np.sort(order[:int(round(len(x) * 0.2))])[:60]
    _digit_pngs(tmp_path / "imgs", x[test], y[test])
    assert main(["predict", str(ckpt), str(tmp_path / "imgs"), "--device", device, "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 60
    hits = sum(line.split("\t")[1].split(" ")[0] == line.split("\t")[0].split("_")[1].split(".")[0] for line in lines)
    assert hits / 60 >= 0.9
    assert all(len(re.findall(r"\(\d\.\d{3}\)", line)) == 2 for line in lines)


def test_train_on_an_image_folder(device, tmp_path, capsys):
    x, y = mpscy.datasets.load_digits(images=True)
    keep = np.isin(y, [0, 1, 7])[:600]
    _digit_pngs(tmp_path / "folder", x[:600][keep], y[:600][keep], per_class=True)
    ckpt = tmp_path / "f.mpscy"
    assert main(["train", "--data", str(tmp_path / "folder"), "--image-size", "8", "--channels", "1",
                 "--epochs", "8", "--lr", "3e-3", "--device", device, "--save", str(ckpt), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out
    acc = float(re.search(r"accuracy ([\d.]+)", out).group(1))
    assert acc >= 0.9, out
    engine = mpscy.load(ckpt, device=device)
    assert engine.checkpoint_meta["classes"] == ["0", "1", "7"]
    assert engine.checkpoint_meta["preprocess"]["image_size"] == [8, 8]


def test_bad_options(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "transformer"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["train", "--optimizer", "sgdx", "--device", "cpu"]) == 2
    assert "error: unknown --optimizer" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "neither" in capsys.readouterr().err
    bad = tmp_path / "broken.mpscy"
    bad.write_bytes(b"12345")
    assert main(["predict", str(bad), str(tmp_path)]) == 2
    assert "truncated" in capsys.readouterr().err


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_train_the_readme_cnn(device, tmp_path, capsys):
    if not hasattr(mpscy.layers, "Conv2D"):
        pytest.skip("needs layers.Conv2D (issue 3)")
    ckpt = tmp_path / "cnn.mpscy"
    assert main(["train", "--model", "cnn", "--epochs", "10", "--lr", "2e-3", "--device", device,
                 "--save", str(ckpt), "--quiet"]) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"held-out: loss [\d.]+  accuracy ([\d.]+)", out).group(1))
    assert acc >= 0.95, out
    engine = mpscy.load(ckpt, device=device)
    assert [type(n.layer).__name__ for n in engine.model.nodes[1:]].count("Conv2D") == 4
    assert any(type(n.layer).__name__ == "Dropout" for n in engine.model.nodes[1:])


# ----------------------------------------------------------------------------- user errors
# Every user error -- a bad value, an output path that cannot be written, a missing optional
# package -- is refused before the first training step with "error: ..." on stderr and exit
# code 2; argparse's own usage errors raise SystemExit(2), the others make main return 2.
def _run_main(argv, capsys):
    """(exit code, stdout, stderr, seconds) of main(argv), whether it returns or raises SystemExit."""
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    return code, out, err, elapsed


@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory):
    """Digits 0 and 1 as 8x8 PNG files in one sub-folder per class."""
    x, y = mpscy.datasets.load_digits(images=True)
    keep = np.isin(y, [0, 1])[:400]
    root = tmp_path_factory.mktemp("two") / "folder"
    _digit_pngs(root, x[:400][keep], y[:400][keep], per_class=True)
    return root


_BAD = [  # (command line, with {tmp} and {folder} to fill in; words the message must hold)
    ("train --seed -3", "--seed"),
    ("train --seed 18446744073709551616", "--seed"),
    ("train --epochs 0", "--epochs"),
    ("train --epochs -1", "--epochs"),
    ("train --epochs 0 --plots {tmp}/d", "--epochs"),
    ("train --batch-size 0", "--batch-size"),
    ("train --lr nan", "--lr"),
    ("train --lr -1", "--lr"),
    ("train --test-fraction 0", "--test-fraction"),
    ("train --test-fraction 1.5", "--test-fraction"),
    ("train --test-fraction nan", "--test-fraction"),
    ("train --device gpu", "--device"),
    ("train --data {folder} --image-size 0 --channels 1", "--image-size"),
    ("train --data {folder} --image-size -4 --channels 1", "--image-size"),
    ("train --image-size 16", "image folders"),
    ("train --channels 1", "image folders"),
    ("train --invert", "image folders"),
    ("train --optimizer sgdx", "unknown --optimizer"),
    ("train --data {tmp}/missing", "neither"),
    ("train --data {tmp}/one --image-size 8 --channels 1", "at least 2"),
    ("train --plots {tmp}/afile", "--plots"),
    ("train --plots {tmp}/afile/plots", "--plots"),
    ("train --save {tmp}/afile/m.mpscy", "--save"),
    ("train --save {tmp}", "--save"),
    ("train --save {tmp}/new/", "--save"),
    ("train --onnx {tmp}/afile/m.onnx", "--onnx"),
    ("train --onnx {tmp}", "--onnx"),
    ("train --save {tmp}/same --onnx {tmp}/same", "same"),
    ("train --save {tmp}/out --plots {tmp}/out", "same"),
    ("demo --epochs 0", "--epochs"),
    ("demo --seed -1", "--seed"),
    ("demo --batch-size 0", "--batch-size"),
    ("predict {tmp}/m.mpscy {tmp}/imgs --top 0", "--top"),
    ("predict {tmp}/m.mpscy {tmp}/imgs --batch-size 0", "--batch-size"),
    ("predict {tmp}/m.mpscy {tmp}/imgs --device gpu", "--device"),
    ("predict {tmp}/missing.mpscy {tmp}/imgs", "does not exist"),
    ("predict {tmp}/m.mpscy {tmp}/no_images_here", "no_images_here"),
    ("predict {tmp}/m.mpscy {tmp}/imgs", "no .jpg"),
]


@pytest.mark.parametrize("line, words", _BAD, ids=[c for c, _ in _BAD])
def test_bad_arguments_fail_before_training(line, words, tmp_path, two_class_folder, capsys):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "imgs").mkdir()
    if "{tmp}/one" in line:
        x, y = mpscy.datasets.load_digits(images=True)
        _digit_pngs(tmp_path / "one", x[y == 3][:10], y[y == 3][:10], per_class=True)
    if line.startswith("predict") and "missing" not in line:  # a real checkpoint, so only the option is wrong
        engine = mpscy.Engine(mpscy.Sequential([mpscy.layers.Dense(10)], input_shape=(1, 8, 8)), device="cpu")
        engine.save(tmp_path / "m.mpscy")
        engine.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = line.format(tmp=tmp_path, folder=two_class_folder).split()
    if argv[0] == "train":
        argv += ["--quiet"]
    argv += [] if "--device" in argv else ["--device", "cpu"]
    code, out, err, elapsed = _run_main(argv, capsys)
    assert code == 2, (code, out, err)
    assert "error: " in err and words in err, err
    assert "Traceback" not in err and "held-out" not in out and "trained" not in out, out + err
    assert elapsed < 2.0, f"{line}: refused after {elapsed:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no folder made


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in any folder")
def test_an_unwritable_output_folder_is_refused_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for opt, path in (("--save", locked / "m.mpscy"), ("--onnx", locked / "m.onnx"),
                          ("--plots", locked / "plots")):
            code, out, err, elapsed = _run_main(["train", "--device", "cpu", "--quiet", opt, str(path)], capsys)
            assert code == 2 and opt in err and "held-out" not in out and elapsed < 2.0, err
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_in_a_folder_nothing_can_be_made_in_is_refused_even_for_root(tmp_path, capsys):
    """/proc takes no new files, from root either, though os.access says root may write there:
    the check makes and removes a temporary file (root's `--save /proc/m.mpscy` trained, then
    failed with "Permission denied")."""
    for opt, path in (("--save", "/proc/mpscy-m.mpscy"), ("--onnx", "/proc/mpscy/m.onnx"),
                      ("--plots", "/proc/mpscy-plots")):
        code, out, err, elapsed = _run_main(["train", "--device", "cpu", "--quiet", opt, path], capsys)
        assert code == 2 and "no permission to write in '/proc'" in err and "held-out" not in out, err
        assert elapsed < 2.0
    assert not os.path.exists("/proc/mpscy-m.mpscy")


@pytest.mark.parametrize("option, module", [("--onnx", "onnx"), ("--plots", "matplotlib")])
def test_a_missing_optional_package_is_refused_before_training(option, module, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    code, out, err, elapsed = _run_main(["train", "--device", "cpu", "--quiet", option,
                                         str(tmp_path / "out")], capsys)
    assert code == 2 and "error: " in err and "pip install" in err and module in err, err
    assert "held-out" not in out and elapsed < 2.0
    assert not (tmp_path / "out").exists()


def test_output_folders_are_created(device, tmp_path, capsys):
    ckpt, onnx_path, plots = tmp_path / "a" / "b" / "m.mpscy", tmp_path / "c" / "m.onnx", tmp_path / "d" / "e"
    argv = ["train", "--epochs", "1", "--device", device, "--quiet", "--save", str(ckpt)]
    argv += ["--onnx", str(onnx_path)] if _has("onnx") else []
    argv += ["--plots", str(plots)] if _has("matplotlib") else []
    code, out, err, _ = _run_main(argv, capsys)
    assert code == 0, err
    assert ckpt.is_file() and f"saved {ckpt}" in out
    assert onnx_path.is_file() == _has("onnx")
    assert (plots / "history.png").is_file() == _has("matplotlib")


def test_a_write_error_after_training_is_reported_and_the_other_outputs_written(device, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    def disk_full(self, path, meta=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(mpscy.Engine, "save", disk_full)
    onnx_path = tmp_path / "m.onnx"
    argv = ["train", "--epochs", "1", "--device", device, "--quiet", "--save", str(tmp_path / "m.mpscy")]
    argv += ["--onnx", str(onnx_path)] if _has("onnx") else []
    code, out, err, _ = _run_main(argv, capsys)
    assert code == 2, (code, err)
    assert err.startswith("error: --save") and os.strerror(errno.ENOSPC) in err and "Traceback" not in err, err
    assert "held-out" in out and "saved" not in out
    assert onnx_path.is_file() == _has("onnx")


def test_a_bug_is_still_a_traceback(monkeypatch):
    import mpscy.__main__ as cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_load_data", broken)
    with pytest.raises(KeyError):
        main(["train", "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("argv, words", [
    (["train", "--optimizer", "sgdx", "--device", "cpu"], "unknown --optimizer"),
    (["train", "--model", "transformer"], "invalid choice"),
    (["train", "--seed", "-3", "--device", "cpu"], "--seed"),
    (["train", "--batch-size", "2147483648", "--device", "cpu", "--quiet"], "batch_size"),  # an mpscy.Error
    (["demo", "--epochs", "0"], "--epochs"),
])
def test_every_user_error_exits_2(argv, words):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    run = subprocess.run([sys.executable, "-m", "mpscy", *argv], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "error: " in run.stderr and words in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "held-out" not in run.stdout


def test_train_prints_the_binary_roc_auc_of_two_classes(device, two_class_folder, capsys):
    code, out, err, _ = _run_main(["train", "--data", str(two_class_folder), "--image-size", "8", "--channels", "1",
                                   "--epochs", "3", "--device", device, "--quiet"], capsys)
    assert code == 0, err
    assert "2 classes" in out
    auc = float(re.search(r"roc_auc ([\d.]+)", out).group(1))
    assert 0.9 <= auc <= 1.0, out


def test_train_says_when_the_roc_auc_is_undefined(device, tmp_path, capsys):
    x, y = mpscy.datasets.load_digits(images=True)
    zeros, ones = np.flatnonzero(y == 0)[:40], np.flatnonzero(y == 1)[:1]
    _digit_pngs(tmp_path / "folder", x[np.r_[zeros, ones]], y[np.r_[zeros, ones]], per_class=True)
    # a seed whose held-out tenth misses the one "1" (the folder's last sample)
    seed = next(s for s in range(100) if 40 not in np.random.Generator(np.random.PCG64(s)).permutation(41)[:4])
    code, out, err, _ = _run_main(["train", "--data", str(tmp_path / "folder"), "--image-size", "8", "--channels",
                                   "1", "--epochs", "1", "--seed", str(seed), "--test-fraction", "0.1",
                                   "--device", device, "--quiet"], capsys)
    assert code == 0, err
    assert "roc_auc n/a" in out, out


def test_cli_predict_prints_the_softmax_of_the_preprocessed_images(device, tmp_path, capsys):
    """predict --top 10 prints every class's probability: the softmax of the checkpoint's
    outputs on the images as load_image reads them (summing to 1 within the 3-decimal
    rounding), with --invert on 1 - pixel. The two references differ by more than 0.01, so
    an ignored --invert shows."""
    Image = pytest.importorskip("PIL.Image")
    x, _ = mpscy.datasets.load_digits(images=True)
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    for i in range(4):
        path = folder / f"d{i}.png"
        Image.fromarray(np.round(x[i, 0] * 255).astype(np.uint8)).save(path)
        files.append(path)
    model = mpscy.Sequential([layers.Flatten(), layers.Dense(10)], input_shape=(1, 8, 8))
    engine = mpscy.Engine(model, batch_size=8, device=device, seed=0)
    rng = np.random.default_rng(12)
    engine.set_parameters({k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in engine.get_parameters().items()})
    pre = {"image_size": [8, 8], "channels": 1, "mean": None, "std": None, "invert": False}
    engine.save(tmp_path / "m.mpscy", meta={"preprocess": pre, "classes": [str(k) for k in range(10)]})

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    refs = {}
    for invert in (False, True):
        imgs = np.stack([mpscy.data.load_image(f, (8, 8), 1, invert=invert) for f in files])
        refs[invert] = softmax(engine.predict(imgs).astype(np.float64))
    assert np.abs(refs[True] - refs[False]).max() > 0.01
    for invert in (False, True):
        argv = ["predict", str(tmp_path / "m.mpscy"), str(folder), "--device", device, "--top", "10"]
        assert main(argv + (["--invert"] if invert else [])) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split("\t")[0] for line in lines] == [f.name for f in files]
        for line, ref in zip(lines, refs[invert]):
            probs = dict(re.findall(r"(\d) \((\d\.\d{3})\)", line.split("\t")[1]))
            assert len(probs) == 10
            got = np.array([float(probs[str(k)]) for k in range(10)])
            assert math.isclose(got.sum(), 1.0, abs_tol=0.006)
            np.testing.assert_allclose(got, ref, atol=0.0006)
