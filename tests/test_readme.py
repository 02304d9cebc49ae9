"""The README's Python examples run as written, in order, in one namespace (each builds on the ones
before it, as a reader would run them), in a fresh directory: the documentation cannot drift from
the API unnoticed. Examples that need an optional extra (onnx for ONNX, matplotlib for plots) are
left out where it is not installed, and counted."""
import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# The one fragment that assumes the reader's own batches: it gets the first 320 rows of the
# training split before it, in batches of 32.
BATCHES = "batches = [(x_train[i:i + 32], y_train[i:i + 32]) for i in range(0, 320, 32)]\n"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _missing(code):
    """The optional extras a block needs that are not installed here."""
    wants = {"onnx": "mpscy.onnx" in code, "matplotlib": "from mpscy import plot" in code}
    return [m for m, wanted in wants.items() if wanted and importlib.util.find_spec(m) is None]


def test_readme_examples_run(tmp_path, monkeypatch, capsys):
    blocks = _blocks()
    assert len(blocks) >= 11, len(blocks)
    monkeypatch.chdir(tmp_path)
    ns, ran, left_out = {}, 0, []
    for i, code in enumerate(blocks):
        if _missing(code):
            left_out.append((i, _missing(code)))
            continue
        if "for x, y in batches:" in code:
            code = BATCHES + code
        exec(compile(code, f"README.md python block {i}", "exec"), ns)  # noqa: S102 - the README's own code
        ran += 1
    capsys.readouterr()
    assert ran + len(left_out) == len(blocks) and ran >= len(blocks) - 2, left_out  # at most ONNX and plots
    # what the examples leave behind is what they say they make
    assert 0.9 <= ns["history"].history["val_accuracy"][-1] <= 1.0
    assert (tmp_path / "model.mpscy").exists() and ns["engine2"].epoch == ns["engine"].epoch + 5
