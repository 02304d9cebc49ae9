"""python -m mpscy: --help documents train/predict/demo; train reaches its held-out accuracy
and writes a checkpoint, an ONNX file and plots; predict classifies PNG files with that
checkpoint, reading each loss's outputs as probabilities and refusing models it cannot classify;
image folders train too; bad options fail with a message and exit code 2."""
import math
import os
import re
import subprocess
import sys
import time
import warnings

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


@pytest.mark.parametrize("opt, lr, line_search, least", [("lbfgs", "1", True, 0.8), ("adadelta", "1", False, 0.75),
                                                        ("rmsprop", "0.01", False, 0.7)])
def test_train_without_lr_takes_the_optimizer_s_own_default(opt, lr, line_search, least, capsys):
    """Without --lr each optimizer runs at its own (torch's) default rate, not Adam's 1e-3, at which
    L-BFGS and Adadelta learn nothing in an epoch (accuracy ~0.11-0.14); L-BFGS with its
    strong-Wolfe line search (its full steps on 32-row batches reach NaN within the epoch). The
    steps printed are the epoch's 45 batches, not L-BFGS's loss evaluations (403 before)."""
    assert main(["train", "--optimizer", opt, "--epochs", "1", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"lr={lr}( \(strong-Wolfe line search\))?$", out.splitlines()[0]), out
    assert ("strong-Wolfe" in out) == line_search
    assert float(re.search(r"accuracy ([\d.]+)", out).group(1)) >= least, out
    assert re.search(r"^trained 45 steps in ", out, re.M), out


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


# ----------------------------------------------------------------------------- predict's kinds of model
# predict reads a checkpoint as an image classifier: probabilities from the loss (softmax of
# cross-entropy logits, sigmoid of BCEWithLogits's, a Softmax's or Sigmoid's output as it is),
# a single output as class 1's probability; any other model is refused with "error: ..." and 2.
def _checkpoint(path, device, model, loss, params, meta=None):
    """Saves an engine of `model` and `loss` whose parameters are zero but for `params`."""
    engine = mpscy.Engine(model, loss=loss, batch_size=8, device=device)
    engine.set_parameters({k: np.asarray(params.get(k, np.zeros(v.shape)), np.float32)
                           for k, v in engine.get_parameters().items()})
    engine.save(path, meta=meta)
    engine.close()
    return path


def _gray_pngs(folder, pixels, size=(1, 1)):
    """One gray PNG of the given size per pixel value, named a.png, b.png, ..."""
    Image = pytest.importorskip("PIL.Image")
    folder.mkdir()
    for name, v in zip("abcdefgh", pixels):
        Image.fromarray(np.full(size[::-1], v, np.uint8)).save(folder / f"{name}.png")
    return folder


def _binary_head(loss):
    """Dense(1) on a 1x1 gray image (weight 10, bias -5: logit 10 x - 5), with a Sigmoid at its
    end for binary_cross_entropy, which takes probabilities."""
    tail = [layers.Sigmoid()] if loss == "binary_cross_entropy" else []
    model = mpscy.Sequential([layers.Dense(1)] + tail, input_shape=(1, 1, 1))
    return model, {"dense_0.weight": [[10.0]], "dense_0.bias": [-5.0]}


@pytest.mark.parametrize("loss", ["bce_with_logits", "binary_cross_entropy"])
def test_cli_predict_a_single_output_binary_head(loss, device, tmp_path, capsys):
    """Pixels 0, 102, 128, 255 give logits -5, -1, 0.0196, 5: class 1 where its probability
    sigmoid(logit) is above 0.5, each class printed with its own probability (the logit 5 was
    printed as "0 (4.855)"-like raw values before)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0, 102, 128, 255])
    model, params = _binary_head(loss)
    ckpt = _checkpoint(tmp_path / "b.mpscy", device, model, loss, params)
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device], capsys)
    assert (code, err) == (0, "")
    assert out == "a.png\t0 (0.993)\nb.png\t0 (0.731)\nc.png\t1 (0.505)\nd.png\t1 (0.993)\n"
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs / "d.png"), "--device", device, "--top", "5"],
                                  capsys)
    assert (code, out) == (0, "d.png\t1 (0.993)  0 (0.007)\n")
    named = _checkpoint(tmp_path / "n.mpscy", device, model, loss, params, meta={"classes": ["cat", "dog"]})
    code, out, err, _ = _run_main(["predict", str(named), str(imgs / "a.png"), "--device", device, "--top", "2"],
                                  capsys)
    assert (code, out) == (0, "a.png\tcat (0.993)  dog (0.007)\n")


def test_cli_predict_a_binary_tie_is_class_0(device, tmp_path, capsys):
    """Logit 0 (probability 0.5) is class 0, as the engine's accuracy thresholds it (p > 0.5)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0])
    ckpt = _checkpoint(tmp_path / "t.mpscy", device, mpscy.Sequential([layers.Dense(1)], input_shape=(1, 1, 1)),
                       "bce_with_logits", {})
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device, "--top", "2"], capsys)
    assert (code, out, err) == (0, "a.png\t0 (0.500)  1 (0.500)\n", "")


@pytest.mark.parametrize("loss", ["bce_with_logits", "binary_cross_entropy"])
def test_cli_predict_a_multi_label_head_lists_each_labels_probability(loss, device, tmp_path, capsys):
    """Three independent labels with logits 2, -1, 0.5: sigmoid 0.881, 0.269, 0.622, listed
    from the most probable, each its own probability (not a softmax over the three)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0])
    tail = [layers.Sigmoid()] if loss == "binary_cross_entropy" else []
    model = mpscy.Sequential([layers.Dense(3)] + tail, input_shape=(1, 1, 1))
    ckpt = _checkpoint(tmp_path / "m.mpscy", device, model, loss, {"dense_0.bias": [2.0, -1.0, 0.5]})
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device, "--top", "3"], capsys)
    assert (code, out, err) == (0, "a.png\t0 (0.881)  2 (0.622)  1 (0.269)\n", "")


@pytest.mark.parametrize("loss, softmax_layer", [("sparse_cross_entropy", False), ("cross_entropy", False),
                                                 ("categorical_cross_entropy", True),
                                                 ("sparse_cross_entropy", True)])
def test_cli_predict_applies_the_softmax_once(loss, softmax_layer, device, tmp_path, capsys):
    """Logits 2, 0, 0 give softmax 0.787, 0.107, 0.107, whether the loss applies the softmax or
    the model ends in one (sparse_cross_entropy after a Softmax, which the engine warns about,
    printed 0.497 as softmax(softmax) before)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0])
    model = mpscy.Sequential([layers.Dense(3)] + ([layers.Softmax()] if softmax_layer else []), input_shape=(1, 1, 1))
    if loss == "sparse_cross_entropy" and softmax_layer:
        with pytest.warns(UserWarning, match="applied twice"):
            ckpt = _checkpoint(tmp_path / "s.mpscy", device, model, loss, {"dense_0.bias": [2.0, 0.0, 0.0]})
    else:
        ckpt = _checkpoint(tmp_path / "s.mpscy", device, model, loss, {"dense_0.bias": [2.0, 0.0, 0.0]})
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device, "--top", "3"], capsys)
    assert (code, out, err) == (0, "a.png\t0 (0.787)  1 (0.107)  2 (0.107)\n", "")


def test_cli_predict_a_sigmoid_output_under_bce_with_logits_is_not_squashed_twice(device, tmp_path, capsys):
    imgs = _gray_pngs(tmp_path / "imgs", [0])
    model = mpscy.Sequential([layers.Dense(1), layers.Sigmoid()], input_shape=(1, 1, 1))
    with pytest.warns(UserWarning, match="applied twice"):
        ckpt = _checkpoint(tmp_path / "s.mpscy", device, model, "bce_with_logits", {"dense_0.bias": [5.0]})
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device], capsys)
    assert (code, out, err) == (0, "a.png\t1 (0.993)\n", "")  # sigmoid(sigmoid(5)) would be 0.730


def _two_inputs():
    a, b = mpscy.Input((3, 8, 8)), mpscy.Input((3, 8, 8))
    return mpscy.Model([a, b], layers.Dense(2)(layers.Flatten()(layers.Add()([a, b]))))


def _conv_1x1():
    i = mpscy.Input((3, 8, 8))
    return mpscy.Model(i, layers.Conv2D(4, 1)(i))


_API = "; use the Python API for it: mpscy.load({ckpt!r}).predict(x)"
_NOT_CLASSIFIERS = [  # (id, model, loss, meta, the whole expected message)
    ("regression", lambda: mpscy.Sequential([layers.Dense(3)], input_shape=(3, 8, 8)), "mse", None,
     "predict classifies images, and this model was trained with loss 'mse', whose outputs are not class scores"
     + _API),
    ("segmentation", _conv_1x1, "sparse_cross_entropy", None,
     "predict classifies whole images, and this model's output per image has shape (4, 8, 8), not (classes,)" + _API),
    ("two inputs", _two_inputs, "sparse_cross_entropy", None,
     "predict takes models with one image input, and this one has 2 inputs" + _API),
    ("unsquashed bce", lambda: mpscy.Sequential([layers.Dense(1)], input_shape=(3, 8, 8)), "binary_cross_entropy",
     None, "this model was trained with loss 'binary_cross_entropy' on an output that is not squashed into [0, 1] "
     "(no Sigmoid or Softmax at its end), so its outputs are not probabilities" + _API),
    ("4 channels", lambda: mpscy.Sequential([layers.Dense(2)], input_shape=(4, 8, 8)), "sparse_cross_entropy", None,
     "this model takes images of 4 channels; predict reads gray (1) or RGB (3) images"),
    ("class names", lambda: mpscy.Sequential([layers.Dense(10)], input_shape=(3, 8, 8)), "sparse_cross_entropy",
     {"classes": ["a", "b", "c"]}, "the checkpoint's meta has 3 class names for a model of 10 outputs"),
    ("binary names", lambda: mpscy.Sequential([layers.Dense(1)], input_shape=(3, 8, 8)), "bce_with_logits",
     {"classes": ["yes"]},
     "the checkpoint's meta has 1 class names for a model of 1 output (a binary head takes 2: class 0's and "
     "class 1's)"),
]


@pytest.mark.parametrize("build, loss, meta, message", [c[1:] for c in _NOT_CLASSIFIERS],
                         ids=[c[0] for c in _NOT_CLASSIFIERS])
def test_cli_predict_refuses_what_it_cannot_classify(build, loss, meta, message, device, tmp_path, capsys):
    """Each used to be a traceback (the segmentation's TypeError at argsort, an IndexError for
    too few class names), the Python API's message ("pass x as a list of 2 arrays"), or raw
    outputs printed as probabilities (the regression's, the unsquashed BCE's)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0, 255], size=(8, 8))
    ckpt = str(tmp_path / "m.mpscy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unsquashed BCE's warning (the engine's own test)
        _checkpoint(ckpt, device, build(), loss, {}, meta=meta)
        code, out, err, _ = _run_main(["predict", ckpt, str(imgs), "--device", device], capsys)
    assert (code, out, err) == (2, "", f"error: {message.format(ckpt=ckpt)}\n")


def test_cli_predict_reads_a_checkpoint_with_other_meta(device, tmp_path, capsys):
    """Engine.save takes any JSON value as meta: a list (an AttributeError before) counts as no
    meta, and a preprocess without image_size (an ImageFolder that did not resize) resizes to the
    model's input, so images of other sizes stack (a ValueError before)."""
    imgs = _gray_pngs(tmp_path / "imgs", [0], size=(8, 8))
    _gray_pngs(tmp_path / "big", [255], size=(16, 12))
    os.replace(tmp_path / "big" / "a.png", imgs / "b.png")
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(1, 8, 8))
    params = {"dense_0.bias": [2.0, 0.0, 0.0]}
    pre = {"image_size": None, "channels": 1, "mean": None, "std": None, "invert": False}
    for k, meta in enumerate([[1, 2], {"preprocess": pre, "classes": ["x", "y", "z"]}]):
        ckpt = _checkpoint(tmp_path / f"m{k}.mpscy", device, model, "sparse_cross_entropy", params, meta=meta)
        code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device], capsys)
        names = meta["classes"] if isinstance(meta, dict) else "012"
        assert (code, out, err) == (0, f"a.png\t{names[0]} (0.787)\nb.png\t{names[0]} (0.787)\n", ""), meta


def test_cli_predict_skips_a_folder_named_like_an_image(device, tmp_path, capsys):
    """A sub-folder "z.png" is no image: it was read as one ("error: cannot read image ...")."""
    imgs = _gray_pngs(tmp_path / "imgs", [0])
    (imgs / "z.png").mkdir()
    model = mpscy.Sequential([layers.Dense(3)], input_shape=(1, 1, 1))
    ckpt = _checkpoint(tmp_path / "m.mpscy", device, model, "sparse_cross_entropy", {"dense_0.bias": [2.0, 0.0, 0.0]})
    code, out, err, _ = _run_main(["predict", str(ckpt), str(imgs), "--device", device], capsys)
    assert (code, out, err) == (0, "a.png\t0 (0.787)\n", "")
