"""The cuda backend's fused train steps against the cpu: the whole step as one kernel (mlp.cu) in
each form and with its measuring knobs, and the output Dense with the loss (head.cu); which models
take each, as the engine's verbose line says. Separate kernels are tested in the other files."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import losses, optim

from cuda_util import (FUSED_MODELS, LAYER_MODELS, _maybe, _train_step_form, compare_training, cuda_only, pair,
                       targets)
from layer_refs import rel_err


# ----------------------------------------------------------------------------- the one-kernel step

def _frozen(layer):
    layer.trainable = False
    return layer


@cuda_only
@pytest.mark.parametrize("form", ["grid", "grid:3", "grid:40", "cluster:16", "cluster:4", "grid, plain", "grid, whole",
                                  "grid, unaligned", "grid, block rows", "cluster:16, block rows", "grid, 1 warp rows"])
def test_fused_forms_match_cpu(form, monkeypatch, capfd, rng):
    """The whole train step as one kernel (mlp.cu), in each form ($MPSCY_CUDA_FUSED: barriers
    across a cooperative grid or within one thread-block cluster, with fewer blocks than rows or
    more; "plain": layer 0 as its own phase after the copy, $MPSCY_CUDA_FUSED_SPLIT=0; "whole":
    each output's product over a block's slice by one thread, not in parts, $MPSCY_CUDA_FUSED_SPLITK=1;
    "unaligned": slices as wide as the blocks allow, not rounded up to 32 inputs,
    $MPSCY_CUDA_FUSED_SPLITW=0; "block rows": the row phase a block a row, not 4 warps a row with
    the row layers' weights in shared memory, $MPSCY_CUDA_FUSED_WROW=0; "1 warp rows": one warp
    a row, $MPSCY_CUDA_FUSED_WROW=1): 20 steps of full and partial batches against the cpu, with
    label smoothing and norm clipping, on chains of Dense layers with and without ReLU and bias.
    On the default grid layer 0 runs in the copy phase in every model of more than one layer
    (the benchmark MLP's 784 inputs: 13 slices of 64 for 8 groups of 4 rows, the last 16 wide;
    unaligned, 16 slices of 49); on grid:3 and cluster:4 the benchmark MLP's 8 groups of rows
    leave no block for a slice, so its layer 0 runs as its own phase there. The warp rows take
    the models whose row layers' inputs are multiples of 4 (the benchmark MLP, dense_relu,
    no_bias, long_batch), the others run a block a row."""
    plain = form.endswith(", plain")
    unaligned = form.endswith(", unaligned")
    if form.endswith(", whole"):
        monkeypatch.setenv("MPSCY_CUDA_FUSED_SPLITK", "1")
    if unaligned:
        monkeypatch.setenv("MPSCY_CUDA_FUSED_SPLITW", "0")
    block_rows = form.endswith(", block rows")
    warps = 0 if block_rows else 1 if form.endswith(", 1 warp rows") else 4
    monkeypatch.setenv("MPSCY_CUDA_FUSED_WROW", str(warps))
    form = form.split(",")[0]
    monkeypatch.setenv("MPSCY_CUDA_FUSED", form)
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    if plain:
        monkeypatch.setenv("MPSCY_CUDA_FUSED_SPLIT", "0")
    for name, (build, shape, batch) in FUSED_MODELS.items():
        capfd.readouterr()
        # label smoothing on a block-rows model and on a warp-rows one (row_loss's smoothed sums)
        smooth = name in ("deep_linear_mix", "long_batch")
        loss = losses.SparseCrossEntropy(label_smoothing=0.1) if smooth else "sparse_cross_entropy"
        # Adam's normalization turns rounding-level differences of near-zero gradient elements into
        # whole steps; the wide models run SGD, the Adam family is covered by the optimizer tests
        clip = name == "dense_relu"
        opt = (lambda: optim.SGD(0.1, momentum=0.5)) if clip else (lambda: optim.AdamW(1e-3, weight_decay=0.05))
        if name in ("wide_rows", "benchmark_mlp"):
            opt = lambda: optim.SGD(0.1, momentum=0.5)  # noqa: E731
        cpu, gpu = pair(build, shape, batch=batch, loss=loss, opt=opt, clip_grad_norm=0.5 if clip else None)
        got = _train_step_form(capfd)
        assert got.startswith("one kernel, " + form), (name, got)
        split = "layer 0 in the copy" in got
        if plain:
            assert not split, (name, got)
        warp_rows = name in ("benchmark_mlp", "dense_relu", "no_bias", "long_batch") and not block_rows
        want = f", rows by {warps} warp{'s' if warps > 1 else ''} each"
        assert (want in got) == warp_rows and (", rows by " in got) == warp_rows, (name, got)
        if form == "grid" and not plain:
            assert split == (name != "one_layer"), (name, got)
        if form == "grid" and not plain and name == "benchmark_mlp" and "grid:132" in got:
            want = "(16 slices of 49 inputs)" if unaligned else "(13 slices of 64 inputs)"
            assert "layer 0 in the copy " + want in got, (name, got)
        try:
            compare_training(cpu, gpu, rng, steps=20, rows=[batch, 7, batch, 1])
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@cuda_only
def test_relu_on_the_logits_runs_as_separate_kernels(monkeypatch, capfd, rng):
    """A ReLU on the logits (the model's output) is not the one-kernel step's: its row phase takes
    the loss's gradient as the last Dense's dz with no mask of that ReLU (which gave gradients
    ~5e-3 off the cpu's). The engine says it runs separate kernels, and 8 steps of full and
    partial batches match the cpu."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    capfd.readouterr()
    cpu, gpu = pair(lambda: [L.Dense(16), L.ReLU(), L.Dense(10), L.ReLU()], (20,), batch=32,
                    opt=lambda: optim.SGD(0.1))
    assert _train_step_form(capfd) == "separate kernels"
    compare_training(cpu, gpu, rng, steps=8, rows=[32, 7])


@cuda_only
def test_one_kernel_engines_keep_their_shared_memory(monkeypatch, capfd, rng):
    """The one-kernel step's shared-memory opt-in belongs to the kernel, not to a graph: an engine
    whose first layer runs in the copy phase with ~50 KB a block (784 -> 128 -> 10 at 64 rows)
    still trains partial batches (launched directly, not replayed from its graph) after a second
    engine with a smaller need (32 -> 64 -> 10 at 32 rows) was built, which had failed with "too
    many blocks in cooperative launch"; both match the cpu."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    opt = lambda: optim.SGD(0.05, momentum=0.9)  # noqa: E731
    capfd.readouterr()
    cpu_a, gpu_a = pair(lambda: [L.Dense(128), L.ReLU(), L.Dense(10)], (784,), batch=64, opt=opt)
    assert ", layer 0 in the copy" in _train_step_form(capfd)
    cpu_b, gpu_b = pair(lambda: [L.Dense(64), L.ReLU(), L.Dense(10)], (32,), batch=32, opt=opt)
    assert _train_step_form(capfd).startswith("one kernel, grid")
    compare_training(cpu_a, gpu_a, rng, steps=6, rows=[40, 64, 1])
    compare_training(cpu_b, gpu_b, rng, steps=4, rows=[32, 5])
    compare_training(cpu_a, gpu_a, rng, steps=2, rows=[17, 64])


@cuda_only
def test_engines_on_two_threads_keep_their_shared_memory(monkeypatch, capfd, rng):
    """The shared-memory opt-in is the kernel's, for the whole process: two engines training
    partial batches (launched directly, each launch setting its own need first) on two threads at
    once, the first needing ~50 KB a block (784 -> 128 -> 10), the second about half (784 -> 64
    -> 10), must never see the other's smaller need land between their set and their launch. A
    stress test: with the opt-in set to each launch's own need, such a launch fails; made
    raise-only (cu_smem_optin), none can."""
    import threading
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    opt = lambda: optim.SGD(0.05, momentum=0.9)  # noqa: E731
    capfd.readouterr()
    gpu_a = pair(lambda: [L.Dense(128), L.ReLU(), L.Dense(10)], (784,), batch=64, opt=opt)[1]
    assert ", layer 0 in the copy" in _train_step_form(capfd)
    gpu_b = pair(lambda: [L.Dense(64), L.ReLU(), L.Dense(10)], (784,), batch=32, opt=opt)[1]
    assert ", layer 0 in the copy" in _train_step_form(capfd)  # 64 outputs: half a's slice
    xa, ya = rng.standard_normal((40, 784)).astype(np.float32), rng.integers(0, 10, 40).astype(np.int32)
    xb, yb = rng.standard_normal((5, 784)).astype(np.float32), rng.integers(0, 10, 5).astype(np.int32)
    steps, errors = 1500, []

    def run(gpu, x, y):
        try:
            for _ in range(steps):
                assert gpu.step(x, y).applied
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in ((gpu_a, xa, ya), (gpu_b, xb, yb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert gpu_a.get_optimizer_state()["step"] == gpu_b.get_optimizer_state()["step"] == steps


@cuda_only
@pytest.mark.parametrize("knob", ["MPSCY_CUDA_FUSED_SPLITK=1 MPSCY_CUDA_FUSED_SPLITDOT=0",
                                  "MPSCY_CUDA_FUSED_WROW=0 MPSCY_CUDA_FUSED_DWIDE=1", "MPSCY_CUDA_FUSED_GRADV=0",
                                  "MPSCY_CUDA_FUSED_WROW=0 MPSCY_CUDA_FUSED_ROWU=8", "MPSCY_CUDA_FUSED_RELAYS=1",
                                  "MPSCY_CUDA_FUSED_EARLYWARP=0", "MPSCY_CUDA_FUSED_EARLYREL=0",
                                  "MPSCY_CUDA_FUSED_SKIP0=0"])
def test_fused_measuring_knobs_give_the_same_bits(knob, monkeypatch, rng):
    """The one-kernel step's measuring knobs change how it runs, never what it computes: layer
    0's partial products in the copy phase a (row, output) a thread (SPLITDOT=0, against an
    output and its rows, both with the slice whole: SPLITK=1), the row phase's d(input) loads 16
    classes at a time where a group has 2 (DWIDE=1, against 4; both with the block rows, WROW=0), the weight gradients' dz values a
    float a load (GRADV=0, against 4), the row load's partial products 8 loads a round (ROWU=8,
    against 16; with the block rows), the host's flags relayed by one warp (RELAYS=1, against 2), the early decision's
    sums by the whole block (EARLYWARP=0, against warp 0 alone), its arrival as a fence, an atomic
    and a fence with the release before the decision (EARLYREL=0, against one acquire-release
    atomic and the release beside it), block 0 with a share of the
    update (SKIP0=0, against none). Each sum runs over
    the same terms in the same order, so 10 steps of the benchmark MLP (full and partial batches,
    Adam) leave bit-identical losses, accuracies, gradient norms and parameters. Where the knob
    has two settings, the first is also the baseline's."""
    *base, (name, value) = [kv.split("=") for kv in knob.split()]
    for n, v in base:
        monkeypatch.setenv(n, v)
    build = FUSED_MODELS["benchmark_mlp"][0]
    rows = [32, 32, 7, 32, 1, 32, 32, 32, 19, 32]
    data = [(rng.standard_normal((r, 784)).astype(np.float32), rng.integers(0, 10, r).astype(np.int32)) for r in rows]
    runs = []
    for v in (None, value):
        if v is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, v)
        _, gpu = pair(build, (784,), batch=32, opt=lambda: optim.Adam(1e-3))
        results = [gpu.step(x, y) for x, y in data]
        runs.append(([(r.loss, r.accuracy, r.applied, r.grad_norm) for r in results], gpu.get_parameters()))
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@cuda_only
def test_which_train_steps_run_as_one_kernel(monkeypatch, capfd):
    """A chain of Dense (+ReLU) under cross-entropy with integer labels, small enough, is fused;
    anything else runs as separate kernels."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    cases = [
        (LAYER_MODELS["dense_relu"][0], (12,), "sparse_cross_entropy", 16, True),
        (LAYER_MODELS["dense_relu"][0], (12,), "mse", 16, False),            # not cross-entropy
        (LAYER_MODELS["leakyrelu"][0], (12,), "sparse_cross_entropy", 16, False),  # other activation
        (LAYER_MODELS["flatten"][0], (3, 4, 2), "sparse_cross_entropy", 16, False),
        (lambda: [L.Dense(16), L.ReLU(), L.Dense(80)], (12,), "sparse_cross_entropy", 16, False),  # > 64 classes
        (lambda: [L.Dense(1024), L.ReLU(), L.Dense(10)], (784,), "sparse_cross_entropy", 1024, False),  # large
        (LAYER_MODELS["dense_relu"][0], (12,), losses.SparseCrossEntropy(weight=[1.0] * 4 + [2.0]), 16,
         False),                                                                # class weights
        (lambda: [_frozen(L.Dense(16)), L.ReLU(), L.Dense(6)], (12,), "sparse_cross_entropy", 16, False),  # frozen
    ]
    for build, shape, loss, batch, fused in cases:
        capfd.readouterr()
        mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss=loss, batch_size=batch, device="cuda")
        got = _train_step_form(capfd)
        assert got.startswith("one kernel") == fused, (shape, loss, batch, got)
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    capfd.readouterr()
    mpscy.Engine(mpscy.Sequential(LAYER_MODELS["dense_relu"][0](), input_shape=(12,)), batch_size=16, device="cuda")
    assert _train_step_form(capfd) == "separate kernels, the output Dense with the loss"


# ----------------------------------------------------------------------------- the output Dense with the loss

HEAD_MODELS = {
    # the upper Dense writes the lower one's dz through the Dropout's multipliers and the ReLU's mask
    "dropout": (LAYER_MODELS["dropout"][0], (12,), 16, "sparse_cross_entropy"),
    # a Dropout below with no ReLU under it: its own backward reads the multipliers head_forward wrote
    "dropout_plain": (lambda: [L.Dense(20), _maybe("Dropout")(0.5), L.Dense(5)], (12,), 16, "sparse_cross_entropy"),
    "relu_mask": (LAYER_MODELS["dense_relu"][0], (12,), 16, "sparse_cross_entropy"),
    # dx written plain (a Softmax below), probability targets with label smoothing
    "plain_dx_soft_targets": (LAYER_MODELS["relu_first"][0], (12,), 16, losses.CrossEntropy(label_smoothing=0.2)),
    # no dx (the Dense reads the model's input), 32 classes (every lane of a row's warp)
    "input_only_32_classes": (lambda: [L.Dense(32)], (40,), 24, losses.SparseCrossEntropy(label_smoothing=0.1)),
    # a convolution below (dx into the Flatten's alias of its output), 64 rows of 96 inputs
    "conv_below": (lambda: [_maybe("Conv2D")(6, 3, padding=1), L.ReLU(), _maybe("MaxPool2D")(2), L.Flatten(),
                            L.Dense(10)], (3, 8, 8), 64, "sparse_cross_entropy"),
}


@cuda_only
@pytest.mark.parametrize("name", sorted(HEAD_MODELS))
def test_output_dense_and_loss_kernels_match_cpu(name, monkeypatch, capfd, rng):
    """head.cu: the output Dense's forward and the cross-entropy, then the Dense's backward (dW,
    db and dx with the epilogue of the layer below) as two kernels in training steps, with a
    Dropout right below applied by the first. 20 steps of full and partial batches (the last of
    one row) against the cpu at the usual tolerances; the step form says the kernels ran. Then on
    the same batches: $MPSCY_CUDA_HEAD=1 (the Dropout's own kernel) gives the default's bits, and
    $MPSCY_CUDA_HEAD=0 (the Dense, the loss kernel and the Dense's products) parameters within
    1e-5 of them."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    build, shape, batch, loss = HEAD_MODELS[name]
    opt = lambda: optim.SGD(0.05, momentum=0.9)  # noqa: E731
    form = "separate kernels, the output Dense with the loss"
    drop = form + " and the Dropout below it" if name.startswith("dropout") else form
    capfd.readouterr()
    cpu, gpu = pair(build, shape, batch=batch, loss=loss, opt=opt)
    assert _train_step_form(capfd) == drop
    state = np.random.default_rng(5)
    compare_training(cpu, gpu, rng, steps=20, rows=[batch, 7, batch, 1])
    engines = {}
    for head, want in (("2", drop), ("1", form), ("0", "separate kernels")):  # read when the engine is built
        monkeypatch.setenv("MPSCY_CUDA_HEAD", head)
        capfd.readouterr()
        engines[head] = mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss=loss, optimizer=opt(),
                                     batch_size=batch, device="cuda", seed=3)
        assert _train_step_form(capfd) == want, head
    results = {k: [] for k in engines}
    for s in range(10):
        n = (batch, 7, batch, 1)[s % 4]
        x = state.standard_normal((n,) + tuple(shape)).astype(np.float32)
        y = targets(state, engines["2"].loss, n, tuple(engines["2"].model.output_shape))
        for k, e in engines.items():
            r = e.step(x, y)
            results[k].append((r.loss, r.accuracy))
        (la, aa), (lb, ab) = results["2"][-1], results["0"][-1]
        assert abs(la - lb) <= 1e-5 * max(abs(lb), 1e-3), (s, la, lb)
        assert aa == ab, (s, aa, ab)
    assert results["1"] == results["2"]
    pa, p1, pb = (engines[k].get_parameters() for k in ("2", "1", "0"))
    for k in pa:
        assert np.array_equal(pa[k], p1[k]), k
    worst = max(rel_err(pa[k], pb[k]) for k in pb)
    assert worst <= 1e-5, worst


@cuda_only
def test_which_train_steps_run_the_output_dense_with_the_loss(monkeypatch, capfd):
    """head.cu takes an output Dense of at most 32 units under (sparse) cross-entropy in fp32,
    whose kernels' tiles at the built batch fit a block's 48 KB of shared memory, and the Dropout
    right below it when that feeds nothing else."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    dense = lambda c: (lambda: [L.Dense(16), L.ReLU(), L.Dense(c)])  # noqa: E731
    cases = [
        (dense(32), (12,), "sparse_cross_entropy", 16, {}, True),
        (dense(33), (12,), "sparse_cross_entropy", 16, {}, False),     # more than a warp of classes
        (dense(5), (12,), "mse", 16, {}, False),                       # not cross-entropy
        (dense(5), (12,), "sparse_cross_entropy", 16, {"precision": "tf32"}, False),
        (lambda: [L.Dense(5), L.Softmax()], (12,), "categorical_cross_entropy", 16, {}, False),  # output not a Dense
        # head_forward's (8 + c) * (in + 1) + 32 + 8 * c floats: 12,160 fit (48 KB with its static bytes)
        (lambda: [L.Dense(4)], (1008,), "sparse_cross_entropy", 48, {}, False),  # 12 * 1009 + 64 = 12,172
        (lambda: [L.Dense(4)], (1007,), "sparse_cross_entropy", 48, {}, True),   # 12 * 1008 + 64 = 12,160
        (dense(5), (12,), losses.SparseCrossEntropy(weight=[1, 2, 1, 1, 3]), 16, {}, False),  # class weights
        (dense(5), (12,), losses.CrossEntropy(weight=[1, 2, 1, 1, 3]), 16, {}, False),
    ]
    for build, shape, loss, batch, kw, want in cases:
        capfd.readouterr()
        mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss=loss, batch_size=batch, device="cuda", **kw)
        got = _train_step_form(capfd)
        assert got.endswith("the output Dense with the loss") == want, (shape, loss, batch, kw, got)
    # a Dropout right below that feeds nothing else: head_forward applies it ($MPSCY_CUDA_HEAD=1: not)
    drop = lambda: [L.Dense(16), L.ReLU(), _maybe("Dropout")(0.5), L.Dense(5)]  # noqa: E731
    for head, tail in (("", " and the Dropout below it"), ("1", "")):
        monkeypatch.setenv("MPSCY_CUDA_HEAD", head)
        capfd.readouterr()
        mpscy.Engine(mpscy.Sequential(drop(), input_shape=(12,)), batch_size=16, device="cuda")
        assert _train_step_form(capfd) == "separate kernels, the output Dense with the loss" + tail, head
