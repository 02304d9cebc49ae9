"""The cuda backend's optimizers against the cpu's: every optimizer and clipping mode after training
(one-kernel step and separate kernels), the update's batches and element rules bit for bit, and the
gradient norm (early or over the whole slab) covering every tensor. Not the layers' kernels."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import optim

from cuda_util import LAYER_MODELS, PARAM_TOL, compare_training, cuda_only, pair
from layer_refs import rel_err


# ----------------------------------------------------------------------------- optimizers

def _opt(name, **kw):
    if not hasattr(optim, name):
        pytest.skip(f"optim.{name} is not in this mpscy")
    return lambda: getattr(optim, name)(**kw)


OPTIM_CASES = {
    "sgd": lambda: _opt("SGD", lr=0.05),
    "sgd_momentum": lambda: _opt("SGD", lr=0.02, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov": lambda: _opt("SGD", lr=0.02, momentum=0.9, nesterov=True, maximize=False),
    "adam": lambda: _opt("Adam", lr=1e-3),
    "adam_amsgrad_wd": lambda: _opt("Adam", lr=2e-3, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda: _opt("AdamW", lr=1e-3, weight_decay=0.1),
    "rmsprop": lambda: _opt("RMSprop", lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda: _opt("Adagrad", lr=1e-2, initial_accumulator_value=0.1),
    "adadelta": lambda: _opt("Adadelta", lr=1.0),
    "nadam": lambda: _opt("NAdam", lr=2e-3),
    "nadam_decoupled": lambda: _opt("NAdam", lr=2e-3, weight_decay=0.01, decoupled_weight_decay=True),
    "lbfgs": lambda: _opt("LBFGS", lr=0.1, history_size=5, max_iter=4),
    "lbfgs_wolfe": lambda: _opt("LBFGS", lr=1.0, history_size=4, max_iter=5, line_search_fn="strong_wolfe"),
}


@cuda_only
@pytest.mark.parametrize("fused", ["default", "0"])
@pytest.mark.parametrize("name", sorted(OPTIM_CASES))
def test_optimizer_matches_cpu(name, fused, monkeypatch, rng):
    """Every optimizer on the Dense/ReLU chain, trained by the one-kernel step (mlp.cu) and by
    separate kernels ($MPSCY_CUDA_FUSED=0)."""
    if fused == "0":
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    opt = OPTIM_CASES[name]()
    cpu, gpu = pair(LAYER_MODELS["dense_relu"][0], (12,), opt=opt)
    # L-BFGS runs several evaluations and a line search per step: 4 steps are ~20 evaluations,
    # after which float rounding (amplified through the curvature history) is still far below 1e-4
    steps = 4 if name.startswith("lbfgs") else 20
    compare_training(cpu, gpu, rng, steps=steps, schedule=lambda s: cpu.optimizer.lr * (1.0 if s < steps // 2 else 0.3))
    sc, sg = cpu.get_optimizer_state(), gpu.get_optimizer_state()
    assert sc.keys() == sg.keys() and sg["step"] == sc["step"]
    for slot, v in sc.items():
        if isinstance(v, dict):
            for p in v:
                assert rel_err(sg[slot][p], v[p]) <= 10 * PARAM_TOL, (slot, p)
        elif isinstance(v, np.ndarray):
            assert rel_err(sg[slot], v) <= 10 * PARAM_TOL, slot


@cuda_only
def test_lbfgs_dropout_masks_match_cpu(rng):
    """An L-BFGS step's evaluations (MPSCY_MODE_LBFGS calls, each a GRAD graph on cuda) draw their
    Dropout masks from the call's seed and counter, as the cpu's do: the losses of every step and
    the parameters after them match the cpu (the first evaluation's mask already differed when the
    params block kept the key of the last TRAIN, EVAL or GRAD call, or zero)."""
    opt = OPTIM_CASES["lbfgs"]()
    cpu, gpu = pair(LAYER_MODELS["dropout"][0], (12,), opt=opt)
    compare_training(cpu, gpu, rng, steps=3)


@cuda_only
@pytest.mark.parametrize("fused", ["default", "0"])
@pytest.mark.parametrize("clip", [{"clip_grad_norm": 0.05}, {"clip_grad_value": 0.002},
                                  {"clip_grad_norm": 0.5, "clip_grad_value": 0.01}])
def test_clipping_matches_cpu(clip, fused, monkeypatch, rng):
    if fused == "0":
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    cpu, gpu = pair(LAYER_MODELS["dense_relu"][0], (12,), opt=lambda: optim.SGD(0.1, momentum=0.5), **clip)
    compare_training(cpu, gpu, rng)


# ----------------------------------------------------------------------------- update rules

@cuda_only
@pytest.mark.parametrize("opt", ["sgd", "adam_amsgrad"])
def test_large_slab_update_matches_cpu(opt, monkeypatch, rng):
    """1.5M parameters: more than one element per thread of the largest update grid, so every
    thread of the cooperative norm+update kernel strides the slab several times, with clipping
    on. Parameters and every optimizer slot must match the cpu's."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    make = (lambda: optim.SGD(0.05, momentum=0.9)) if opt == "sgd" else _opt("Adam", lr=1e-3, amsgrad=True)
    cpu, gpu = pair(lambda: [L.Dense(1500), L.ReLU(), L.Dense(5)], (1000,), opt=make, clip_grad_norm=0.5)
    assert sum(v.size for v in cpu.get_parameters().values()) == 1_000 * 1_500 + 1_500 + 1_500 * 5 + 5
    compare_training(cpu, gpu, rng, steps=6, rows=[16, 9])
    sc, sg = cpu.get_optimizer_state(), gpu.get_optimizer_state()
    for slot, v in sc.items():
        if isinstance(v, dict):
            for k in v:
                assert rel_err(sg[slot][k], v[k]) <= 10 * PARAM_TOL, (slot, k)


@cuda_only
@pytest.mark.parametrize("coop", ["1", "0", "early"])
@pytest.mark.parametrize("name", sorted(n for n in OPTIM_CASES if not n.startswith("lbfgs")))
def test_update_batches_give_the_same_bits(name, coop, monkeypatch, rng):
    """The update's batches (every operand of 4 elements a thread loaded before any is stored)
    compute what the loop of an element an iteration does ($MPSCY_CUDA_UPD_BATCHED=0): the same
    element rules on the same values; the norm's sum of squares, 4 loads at a time, adds the same
    terms in the same order. 1.5M parameters (several batches a thread, the last partial,
    in the largest update grid), the three norm+update forms (one cooperative kernel, two
    kernels, with $MPSCY_CUDA_NORM_EARLY=0; the early norm's final kernel, its last layer's
    1.5M squares as partials on the main stream), clipping by norm, and by value too in the
    two-kernel and early forms; 6 steps (full and partial batches) leave bit-identical losses,
    gradient norms, parameters and optimizer slots."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    monkeypatch.setenv("MPSCY_CUDA_COOP", "0" if coop == "0" else "1")
    monkeypatch.setenv("MPSCY_CUDA_NORM_EARLY", "1" if coop == "early" else "0")
    clip = {"clip_grad_norm": 0.5} if coop == "1" else {"clip_grad_norm": 0.5, "clip_grad_value": 2e-4}
    rows = [16, 9, 16, 16, 7, 16]
    data = [(rng.standard_normal((r, 1000)).astype(np.float32), rng.integers(0, 5, r).astype(np.int32)) for r in rows]
    runs = []
    for batched in ("0", None):
        if batched is None:
            monkeypatch.delenv("MPSCY_CUDA_UPD_BATCHED", raising=False)
        else:
            monkeypatch.setenv("MPSCY_CUDA_UPD_BATCHED", batched)
        gpu = mpscy.Engine(mpscy.Sequential([L.Dense(1500), L.ReLU(), L.Dense(5)], input_shape=(1000,)),
                           optimizer=OPTIM_CASES[name]()(), batch_size=16, device="cuda", seed=3, **clip)
        results = [gpu.step(x, y) for x, y in data]
        assert all(r.applied for r in results)
        runs.append(([(r.loss, r.grad_norm) for r in results], gpu.get_parameters(), gpu.get_optimizer_state()))
    for other in runs[1:]:
        assert other[0] == runs[0][0]
        assert other[1].keys() == runs[0][1].keys()
        assert all(np.array_equal(other[1][k], runs[0][1][k]) for k in runs[0][1])
        slots = 0
        for slot, v in runs[0][2].items():
            if isinstance(v, dict):
                for k in v:
                    assert np.array_equal(other[2][slot][k], v[k]), (slot, k)
                    slots += 1
        assert slots >= 4 or name == "sgd", runs[0][2].keys()


@cuda_only
@pytest.mark.parametrize("fused", ["default", "0"])
@pytest.mark.parametrize("name", sorted(n for n in OPTIM_CASES if not n.startswith("lbfgs")))
def test_update_rules_give_the_cpus_bits(name, fused, monkeypatch, capfd, rng):
    """The element rules (common/optim_math.h) round every product on its own on cuda
    (__fmul_rn: nvcc contracts no product and sum into a fused multiply-add) as the cpu build
    does (-ffp-contract=off, also in its avx512f clone of the update loop, which has FMA), so the
    same parameters, optimizer state and gradients give a bit-identical step on both devices.
    Exact gradients: a Dense(4) on 8 inputs under sparse cross-entropy, its 4 weight rows one
    vector and its biases one value, so every row's logits are equal and the softmax is exactly
    1/4 on both devices; inputs multiples of 1/4, parameters of 2^-6, 16 rows: dz, dW and db are
    exact. The state is on a grid too, from its fourth step (no first-step branch), the moments
    signed and the squares positive. One step by the one-kernel step (mlp.cu's update) and by
    separate kernels ($MPSCY_CUDA_FUSED=0: the output Dense's head kernels, then the early norm's
    final kernel with its update batches). On the H200 with either device contracting, 14 and 20
    of these cases failed (with a mean squared error model, which takes no one-kernel step)."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    if fused == "0":
        monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    capfd.readouterr()
    cpu, gpu = pair(lambda: [L.Dense(4)], (8,), opt=OPTIM_CASES[name](), batch=16)
    form = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mpscy: cuda train step:")]
    assert len(form) == 1 and ("one kernel" in form[0]) == (fused == "default"), form
    grid = lambda lo, hi, step, shape: (rng.integers(round(lo / step), round(hi / step) + 1, shape) * step  # noqa: E731
                                        ).astype(np.float32)
    b, w = sorted(cpu.get_parameters())  # dense_0.bias, dense_0.weight
    params = {w: np.tile(grid(-1, 1, 2.0 ** -6, (1, 8)), (4, 1)), b: np.full(4, grid(-1, 1, 2.0 ** -6, ())[()])}
    state = cpu.get_optimizer_state()
    state["step"] = 3
    if "momentum_started" in state:  # SGD: the loaded buffer is used, as after 3 steps
        state["momentum_started"] = 1.0
    for slot, v in state.items():
        if isinstance(v, dict):  # moments signed and small, squares and sums positive
            signed = slot in ("exp_avg", "momentum_buffer", "grad_avg")
            state[slot] = {k: grid(-0.125, 0.125, 2.0 ** -9, a.shape) if signed else grid(0.5, 1, 2.0 ** -6, a.shape)
                           for k, a in v.items()}
    for e in (cpu, gpu):
        e.set_parameters(params)
        e.set_optimizer_state(state)
    x, y = grid(-2, 2, 0.25, (16, 8)), rng.integers(0, 4, 16).astype(np.int32)
    rc, rg = cpu.step(x, y), gpu.step(x, y)
    assert rc.applied and rg.applied and rg.grad_norm == rc.grad_norm
    assert abs(rg.loss - np.log(4.0)) <= 1e-6 and abs(rc.loss - np.log(4.0)) <= 1e-6, (rc.loss, rg.loss)
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert all(not np.array_equal(pc[k], params[k]) for k in pc)
    for k in pc:
        assert np.array_equal(pg[k], pc[k]), (k, np.abs(pg[k] - pc[k]).max())
    sc, sg = cpu.get_optimizer_state(), gpu.get_optimizer_state()
    slots = 0
    for slot, v in sc.items():
        if isinstance(v, dict):
            for k in v:
                assert np.array_equal(sg[slot][k], v[k]), (slot, k)
                slots += 1
        else:
            assert sg[slot] == v, slot
    assert slots >= 2, sc.keys()


# ----------------------------------------------------------------------------- gradient norm

def _norm_cnn(dropout=True):
    """The README CNN's layer kinds at a small size: a no-dx first convolution, stride-2 and
    stride-1 ones on both side streams, a Dense with its ReLU (and Dropout), the output Dense."""
    ls = [L.Conv2D(8, 3, 1, 1), L.ReLU(), L.Conv2D(8, 3, 2, 1), L.ReLU(), L.Conv2D(16, 3, 1, 1), L.ReLU(),
          L.Conv2D(16, 3, 2, 1), L.ReLU(), L.Flatten(), L.Dense(32), L.ReLU()]
    return ls + ([L.Dropout(0.5)] if dropout else []) + [L.Dense(10)]


NORM_MODELS = {
    "cnn": (lambda: _norm_cnn(False), (3, 16, 16)),
    "dense_relu": LAYER_MODELS["dense_relu"],
    "batchnorm2d": LAYER_MODELS["batchnorm2d"],
    "layernorm": LAYER_MODELS["layernorm"],
    "conv_long_k": LAYER_MODELS["conv_long_k"],
    "wide_first": (lambda: [L.Dense(700), L.ReLU(), L.Dense(24), L.ReLU(), L.Dense(5)], (30,)),  # 21,700 late floats
}


@cuda_only
@pytest.mark.parametrize("early", ["1", "0"])
@pytest.mark.parametrize("name", sorted(NORM_MODELS))
def test_gradient_norm_covers_every_tensor(name, early, monkeypatch, rng):
    """The step's gradient norm is the norm of every parameter's gradient, whichever form sums it:
    the early norm ($MPSCY_CUDA_NORM_EARLY=1, the default: each layer's squares on their own
    stream after its backward, the last layer's in the final kernel, or as partials first when
    they are more than 8,192 floats, as in wide_first) and the whole slab's pass at the end (0).
    The step's grad_norm against the float64 norm of the gradients `gradients()` reads back for
    the same batch and parameters: within 1e-12 relative, while every tensor holds more than 1e-9
    of the squares, so a tensor missed or counted twice fails."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    monkeypatch.setenv("MPSCY_CUDA_NORM_EARLY", early)
    build, shape = NORM_MODELS[name]
    gpu = mpscy.Engine(mpscy.Sequential(build(), input_shape=shape), loss="sparse_cross_entropy",
                       optimizer=optim.Adam(1e-3), batch_size=16, device="cuda", seed=3)
    x = rng.standard_normal((16,) + shape).astype(np.float32)
    y = rng.integers(0, 5, 16).astype(np.int32)
    grads = {k: v for k, v in gpu.gradients(x, y).items() if k != "loss"}
    squares = {k: float(np.sum(np.square(v, dtype=np.float64))) for k, v in grads.items()}
    total = sum(squares.values())
    assert len(squares) >= 3 and min(squares.values()) > 1e-9 * total, squares
    r = gpu.step(x, y)
    assert r.applied
    assert abs(r.grad_norm - np.sqrt(total)) <= 1e-12 * np.sqrt(total), (r.grad_norm, np.sqrt(total))


@cuda_only
@pytest.mark.parametrize("clip", [None, 0.05])
def test_norm_early_gives_the_same_steps(clip, monkeypatch, rng):
    """The early norm changes only the order of the norm's sum: without clipping (the norm only
    decides) 6 steps of a CNN with Dropout, full and partial batches, leave bit-identical losses
    and parameters with $MPSCY_CUDA_NORM_EARLY=1 and 0, and gradient norms within 1e-12; with
    clipping by a norm of 0.05 (every step clipped) the coefficient may round apart by an ulp:
    parameters within 1e-6, and both within the cpu's tolerance. Clipped or not, a second engine
    of the early form gives the same bits (the update stores the clipped gradients back, so with
    clipping the last layer's squares are summed before the final kernel, not in it, where a
    block already updating would race with one still reading them)."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    shape, rows = (3, 16, 16), [16, 9, 16, 16, 7, 16]
    data = [(rng.standard_normal((r,) + shape).astype(np.float32), rng.integers(0, 10, r).astype(np.int32))
            for r in rows]
    runs = []
    for early in ("1", "0", "1"):
        monkeypatch.setenv("MPSCY_CUDA_NORM_EARLY", early)
        cpu, gpu = pair(_norm_cnn, shape, **({"clip_grad_norm": clip} if clip else {}))
        results = [gpu.step(x, y) for x, y in data]
        ref = [cpu.step(x, y) for x, y in data]
        assert all(r.applied for r in results)
        if clip:
            assert all(r.grad_norm > clip for r in results)
        pg, pc = gpu.get_parameters(), cpu.get_parameters()
        assert max(rel_err(pg[k], pc[k]) for k in pc) <= PARAM_TOL
        for r, c in zip(results, ref):
            assert abs(r.grad_norm - c.grad_norm) <= 1e-4 * c.grad_norm
        runs.append(([r.loss for r in results], [r.grad_norm for r in results], pg))
    (l1, n1, p1), (l0, n0, p0), (l2, n2, p2) = runs
    assert l2 == l1 and n2 == n1 and all(np.array_equal(p2[k], p1[k]) for k in p1)
    assert len(p1) == 12 and p1.keys() == p0.keys()
    for a, b in zip(n1, n0):
        assert abs(a - b) <= 1e-12 * b
    if clip:
        assert max(rel_err(p1[k], p0[k]) for k in p0) <= 1e-6
    else:
        assert l1 == l0
        assert all(np.array_equal(p1[k], p0[k]) for k in p0)
