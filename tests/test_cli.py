"""python -m mpscy: --help documents train/predict/demo; train reaches its held-out accuracy
and writes a checkpoint, an ONNX file and plots; predict classifies PNG files with that
checkpoint; image folders train too; bad options fail with a message and exit code 2."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mpscy
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
    with pytest.raises(SystemExit, match="unknown --optimizer"):
        main(["train", "--optimizer", "sgdx", "--device", "cpu"])
    with pytest.raises(SystemExit, match="neither"):
        main(["train", "--data", str(tmp_path / "missing"), "--device", "cpu"])
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
