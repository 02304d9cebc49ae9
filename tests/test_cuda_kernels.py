"""The cuda backend's kernel choices and their knobs ($MPSCY_CUDA_*): GEMM paths, norm+update forms,
stream orders, weight-gradient schedules and convolution kernel forms give the cpu's results, and the
same bits wherever only the schedule changes; TF32 convolutions track the cpu within 2e-2. The
one-kernel MLP step, early return and staging are in other files."""
import numpy as np
import pytest

from mpscy import layers as L
from mpscy import optim

from cuda_util import LAYER_MODELS, PARAM_TOL, _maybe, compare_training, cuda_only, pair
from layer_refs import rel_err


# ----------------------------------------------------------------------------- execution model

@cuda_only
@pytest.mark.parametrize("gemm", ["own", "cublas", "auto"])
@pytest.mark.parametrize("coop", ["1", "0"])
def test_kernel_paths_match_cpu(gemm, coop, monkeypatch, rng):
    """Both GEMM paths (mpscy's own fused kernel, cuBLASLt), both norm+update forms (one
    cooperative kernel, two kernels) and launches with or without programmatic dependent launch
    give the cpu's results; "auto" mixes the GEMM paths by size. The one-kernel step is off here
    (test_fused_forms_match_cpu covers it)."""
    monkeypatch.setenv("MPSCY_CUDA_FUSED", "0")
    monkeypatch.setenv("MPSCY_CUDA_GEMM", gemm)
    monkeypatch.setenv("MPSCY_CUDA_COOP", coop)
    monkeypatch.setenv("MPSCY_CUDA_PDL", coop)
    for name in ("dense_relu", "odd_sizes", "dense_nobias_relu", "flatten"):
        build, shape = LAYER_MODELS[name]
        cpu, gpu = pair(build, shape, clip_grad_norm=0.5)
        compare_training(cpu, gpu, rng, steps=10, rows=[16, 7])
    # large enough that "auto" sends the first layer to cuBLASLt and the second to the own kernel
    cpu, gpu = pair(lambda: [L.Dense(700), L.ReLU(), L.Dense(10)], (512,), batch=128,
                    opt=lambda: optim.SGD(0.01, momentum=0.9))
    compare_training(cpu, gpu, rng, steps=5, rows=[128, 50])


@cuda_only
@pytest.mark.parametrize("pdl", ["0", "1"])
@pytest.mark.parametrize("name", ["conv_s2_dgrad", "conv_implicit_s1"])
def test_stream_orders_give_the_same_bits(name, pdl, monkeypatch, rng):
    """The second stream's work in another order gives the same bits: MPSCY_CUDA_STREAMS=1 runs
    it (columns, weight gradients, W re-layouts) on the main stream in enqueue order, and
    MPSCY_CUDA_INPUT_DW=side puts the weight gradient of the first convolution (no dx: it reads
    the model's input) at the end of the side stream's chain instead of on the main stream, where
    it waits for the columns the side stream built in the forward. Every kernel is deterministic
    and none depends on timing, so 8 training steps (full batches of 16, partial ones of 9 and 7)
    give bit-identical parameters in all three (and each matches the cpu), with and without
    programmatic dependent launch."""
    build, shape = LAYER_MODELS[name]
    rows = [16, 9, 16, 7, 16, 16, 9, 16]
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 5, r).astype(np.int32) for r in rows]
    monkeypatch.setenv("MPSCY_CUDA_PDL", pdl)
    params = []
    for streams, input_dw in (("2", "main"), ("1", "main"), ("2", "side")):
        monkeypatch.setenv("MPSCY_CUDA_STREAMS", streams)
        monkeypatch.setenv("MPSCY_CUDA_INPUT_DW", input_dw)
        cpu, gpu = pair(build, shape)
        for x, y in zip(xs, ys):
            assert gpu.step(x, y).applied and cpu.step(x, y).applied
        pg, pc = gpu.get_parameters(), cpu.get_parameters()
        for k in pc:
            assert rel_err(pg[k], pc[k]) <= PARAM_TOL, k
        params.append(pg)
    assert len(params[0]) >= 4
    for other in params[1:]:
        assert other.keys() == params[0].keys()
        for k in params[0]:
            assert np.array_equal(other[k], params[0][k]), k


@cuda_only
def test_weight_gradient_schedules_match(monkeypatch, rng):
    """Three 3x3 convolutions at 40 rows of 16x16 (b*OH*OW = 10240: the long weight gradient's
    own split-K product, 80 chunks of K, added by blocks of 32 warps; partial batches of 9 and 4
    rows: 18 and 8 chunks, 8 warps). Every launch asks for the largest shared-memory carveout;
    MPSCY_CUDA_CARVEOUT=-1 leaves each kernel its own, and MPSCY_CUDA_CARVEOUT=0 asks for the
    smallest; the implicit dx products are enqueued before the side stream's weight gradients,
    after them with MPSCY_CUDA_DX_FIRST=0: none changes what a kernel computes, so 6 training
    steps give the default's bits. MPSCY_CUDA_SUM_WIDE=0 adds the 80 partials with 8 warps
    (another order): it matches the cpu within the parameter tolerance."""
    build = lambda: [_maybe("Conv2D")(8, 3, padding=1), L.ReLU(), _maybe("Conv2D")(8, 3, padding=1), L.ReLU(),
                     _maybe("Conv2D")(8, 3, padding=1), L.ReLU(), L.Flatten(), L.Dense(5)]
    rows = [40, 9, 40, 4, 40, 40]
    xs = [rng.standard_normal((r, 3, 16, 16)).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 5, r).astype(np.int32) for r in rows]
    same = ({"MPSCY_CUDA_CARVEOUT": "-1"}, {"MPSCY_CUDA_CARVEOUT": "0"}, {"MPSCY_CUDA_DX_FIRST": "0"})
    envs = ({},) + same + ({"MPSCY_CUDA_SUM_WIDE": "0"},)
    params = []
    for env in envs:
        for k in ("MPSCY_CUDA_CARVEOUT", "MPSCY_CUDA_SUM_WIDE", "MPSCY_CUDA_DX_FIRST"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        cpu, gpu = pair(build, (3, 16, 16), batch=40)
        for x, y in zip(xs, ys):
            assert gpu.step(x, y).applied and cpu.step(x, y).applied
        pg, pc = gpu.get_parameters(), cpu.get_parameters()
        assert len(pc) == 8
        for k in pc:
            assert rel_err(pg[k], pc[k]) <= PARAM_TOL, (env, k)
        params.append(pg)
    for env, pg in zip(same, params[1:]):
        for k in params[0]:
            assert np.array_equal(pg[k], params[0][k]), (env, k)


@cuda_only
def test_masked_dz_written_by_the_layer_above_matches(monkeypatch, rng):
    """The README CNN's four 3x3 convolutions (stride 1, 2, 1, 2, each under a ReLU) at 8 rows of
    3x32x32: each stride-2 dx product writes the dz of the convolution below, masked by its
    ReLU, and the stride-1 implicit dx reads that dz as it lies (b, OC, OH*OW), its transpose for
    the weight gradient on the side stream. Same values in the same order as with
    MPSCY_CUDA_DZ_DIRECT=0 (the ReLU's gradient masked by the convolution's own dz pass), so 6
    training steps with partial batches of 3 and 1 rows give its bits; both match the cpu (SGD
    with momentum: Adam's first steps turn the 3xTF32 products' ~1e-6 differences on gradients
    near 0 into whole steps, 1.9e-4 here on the H200)."""
    build = lambda: [_maybe("Conv2D")(32, 3, 1, 1), L.ReLU(), _maybe("Conv2D")(32, 3, 2, 1), L.ReLU(),  # noqa: E731
                     _maybe("Conv2D")(64, 3, 1, 1), L.ReLU(), _maybe("Conv2D")(64, 3, 2, 1), L.ReLU(),
                     L.Flatten(), L.Dense(10)]
    opt = lambda: optim.SGD(0.05, momentum=0.9)  # noqa: E731
    rows = [8, 3, 8, 1, 8, 8]
    xs = [rng.standard_normal((r, 3, 32, 32)).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
    runs = []
    for env in ("", "0"):
        monkeypatch.setenv("MPSCY_CUDA_DZ_DIRECT", env)
        cpu, gpu = pair(build, (3, 32, 32), batch=8, opt=opt)
        seen = []
        for x, y in zip(xs, ys):
            rg, rc = gpu.step(x, y), cpu.step(x, y)
            assert rg.applied and rc.applied
            seen.append((rg.loss, rc.loss))
        runs.append((seen, gpu.get_parameters(), cpu.get_parameters()))
    (seen, pg, pc), (other, po, _) = runs
    assert [a for a, _ in seen] == [a for a, _ in other]
    assert len(pc) == 10
    for k in pc:
        assert np.array_equal(pg[k], po[k]), k
    for lg, lc in seen:
        assert abs(lg - lc) <= 1e-4 * max(abs(lc), 1e-3), (lc, lg)
    worst = {k: rel_err(pg[k], pc[k]) for k in pc}
    assert max(worst.values()) <= PARAM_TOL, worst


# ----------------------------------------------------------------------------- convolution kernel forms

GATHER_MODELS = {
    # (layers, input, batch, rows a step, floats of the first convolution's columns and of the
    # others' (K x b*OH*OW at the built batch), convolutions that gather, whether the first gathers
    # when it does not take conv_dw_small, the first's OC x b*OH*OW: its dz, which
    # conv_dw_small does not hold, with the bias's chunk sums)
    # the README CNN's convolutions: conv_direct, then the implicit product (stride 2, 1, 2); the
    # first (no dx) takes conv_dw_small, the others gather
    "readme_convs": (lambda: [L.Conv2D(32, 3, 1, 1), L.ReLU(), L.Conv2D(32, 3, 2, 1), L.ReLU(),
                              L.Conv2D(64, 3, 1, 1), L.ReLU(), L.Conv2D(64, 3, 2, 1), L.ReLU(),
                              L.Flatten(), L.Dense(10)], (3, 32, 32), 64, [64, 37, 64, 5, 64],
                     27 * 64 * 1024, 2 * 288 * 64 * 256 + 576 * 64 * 64, 3, True, (32, 64 * 1024)),
    # conv_direct with stride, padding and dilation (2, 2, 2) and 225 outputs a sample
    "dilated_direct": (lambda: [L.Conv2D(8, 3, stride=2, padding=2, dilation=2), L.ReLU(), L.Flatten(),
                                L.Dense(10)], (2, 30, 30), 32, [32, 19, 32, 7, 32], 18 * 32 * 225, 0, 0, True,
                       (8, 32 * 225)),
    # conv_dw_small's largest tiles: 31 taps and the bias (32 columns), 64 outputs
    "wide_taps": (lambda: [L.Conv2D(64, (1, 31)), L.ReLU(), L.Flatten(), L.Dense(10)], (1, 6, 40), 16,
                  [16, 9, 16, 3, 16], 31 * 16 * 60, 0, 0, False, (64, 16 * 60)),
    # no bias: 32 taps, 7 outputs
    "no_bias": (lambda: [L.Conv2D(7, 2, stride=3, padding=1, bias=False), L.ReLU(), L.Flatten(), L.Dense(10)],
                (8, 11, 11), 16, [16, 5, 16, 11, 16], 32 * 16 * 16, 0, 0, False, (7, 16 * 16)),
    # conv_dw_small's tiles at four output rows a tile (rows 16 wide), dilation 2, 13 outputs (not
    # a multiple of 4: not by rows)
    "patch_dilated": (lambda: [L.Conv2D(13, 3, padding=2, dilation=2), L.ReLU(), L.Flatten(), L.Dense(10)],
                      (2, 16, 16), 16, [16, 9, 16, 3, 16], 18 * 16 * 256, 0, 0, True, (13, 16 * 256)),
    # conv_dw_small by output rows (conv_dw_rows; the README's first layer takes it too): 8
    # outputs (2 columns a lane) under a MaxPool, so dz is masked by the ReLU's output as it is
    # read; then stride 2, dilation 2, no bias (27 columns of 4 a lane, the last lane's padded)
    "rows_pool": (lambda: [L.Conv2D(8, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(10)],
                  (3, 16, 16), 16, [16, 9, 16, 5, 16], 27 * 16 * 256, 0, 0, True, (8, 16 * 256)),
    "rows_dilated_nobias": (lambda: [L.Conv2D(16, 3, stride=2, padding=2, dilation=2, bias=False), L.ReLU(),
                                     L.Flatten(), L.Dense(10)],
                            (3, 32, 32), 16, [16, 9, 16, 5, 16], 27 * 16 * 256, 0, 0, True, (16, 16 * 256)),
}
ROWS_MODELS = {"readme_convs", "rows_pool", "rows_dilated_nobias"}  # their first layer's fits conv_dw_rows


def _first_layer_grad_errors(cpu, gpu, shape, n, rng, first):
    """One batch of n rows on binary grids (inputs multiples of 1/4, the tensors `first` of
    multiples of 2^-6: every pre-activation exact, so both devices take the same ReLU mask): the
    relative error of the gpu's gradient of each tensor in `first` against the cpu's (each nonzero)."""
    p = {k: (np.round(v * 64) / 64).astype(np.float32) if k in first else v for k, v in cpu.get_parameters().items()}
    cpu.set_parameters(p)
    gpu.set_parameters(p)
    x = (rng.integers(-4, 5, (n,) + shape) / 4).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    assert min(np.abs(gc[k]).max() for k in first) > 0
    return {k: rel_err(gg[k], gc[k]) for k in first}


def _assert_other_order(run, other, tol=2e-6):
    """Two runs, (losses, parameters), whose sums differ in order only: not the same bits, every
    loss and parameter within tol; returns each parameter's error."""
    (seen, pg), (alt, po) = run, other
    assert seen != alt or any(not np.array_equal(pg[k], po[k]) for k in pg)
    assert max(abs(u - v) / abs(v) for u, v in zip(seen, alt)) <= tol
    worst = {k: rel_err(pg[k], po[k]) for k in pg}
    assert max(worst.values()) <= tol, worst
    return worst


@cuda_only
@pytest.mark.parametrize("name", sorted(GATHER_MODELS))
def test_convolution_kernel_forms_give_the_same_bits(name, monkeypatch, capfd, rng):
    """A convolution whose forward reads x itself (conv_direct, the implicit product) takes its
    weight gradient's operand from x too (conv_dw_gather) instead of columns the forward's side
    stream built: the same floats in the same order as the columns' (MPSCY_CUDA_DW_GATHER=0), so
    5 SGD-with-momentum steps, with partial batches (dz's rows not a multiple of 4: its 4-byte
    copies), give the same bits, and the engine holds no columns: 54 MB less device memory for
    the README convolutions at 64 rows. So does the second convolution's stride-2 dx without the
    masked dz it writes for the first (MPSCY_CUDA_DZ_DIRECT=0), and with every weight gradient on
    one side stream (MPSCY_CUDA_SIDES=1: no second, which takes every other gathering
    convolution's by default). A convolution on the input with
    few taps takes its weight and bias gradients in one fp32 pass over dy and x (conv_dw_small),
    holding no columns and no transposed dz (8 MB less at the README's first layer): another
    order of the sums, so within 2e-6 of the split product's
    (MPSCY_CUDA_DW_SMALL=0), which gathers or reads the columns with the same bits. Where the
    geometry fits (ROWS_MODELS), the pass goes by whole output rows by default (conv_dw_rows,
    bench/dw_rows_emulate.py): another order of the sums than the tiles' (MPSCY_CUDA_DW_ROWS=0),
    within 2e-6 of them; elsewhere the same bits. With one convolution, one batch's gradients on
    binary grids (inputs multiples of 1/4, its parameters of 2^-6: every pre-activation exact, so
    both devices take the same ReLU mask) match the cpu's within 2e-5 by the rows, the tiles and
    the split product (for a chain of convolutions that is
    test_convolution_gradients_match_cpu_past_32_rows at 64 rows, whose two read x)."""
    build, shape, batch, rows, first, rest, gathered, first_gathers, (oc, nb) = GATHER_MODELS[name]
    dz = oc * nb + (-(-nb // 1024) * oc + 3) // 4 * 4  # conv.cu's dz and bias sums (chunks of 1024)
    opt = lambda: optim.SGD(0.01, momentum=0.9)  # noqa: E731
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
    runs, held = [], []
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    knobs = {"MPSCY_CUDA_DW_GATHER": "0", "MPSCY_CUDA_DZ_DIRECT": "0", "MPSCY_CUDA_DW_SMALL": "0",
             "MPSCY_CUDA_SIDES": "1", "MPSCY_CUDA_DW_ROWS": "0"}
    rows_fit = name in ROWS_MODELS
    # (knobs set, convolutions gathering, taking conv_dw_small, by rows, floats more than the default's)
    forms = [((), gathered, 1, rows_fit, 0), (("MPSCY_CUDA_DW_GATHER",), 0, 1, rows_fit, rest),
             (("MPSCY_CUDA_DZ_DIRECT",), gathered, 1, rows_fit, 0),
             (("MPSCY_CUDA_DW_SMALL",), gathered + first_gathers, 0, 0, dz + (0 if first_gathers else first)),
             (("MPSCY_CUDA_DW_SMALL", "MPSCY_CUDA_DW_GATHER"), 0, 0, 0, dz + rest + first),
             (("MPSCY_CUDA_SIDES",), gathered, 1, rows_fit, 0),
             (("MPSCY_CUDA_DW_ROWS",), gathered, 1, 0, 0)]
    for off, want, want_small, want_rows, columns in forms:
        for k, v in knobs.items():
            monkeypatch.setenv(k, v if k in off else "")
        capfd.readouterr()
        cpu, gpu = pair(build, shape, batch=batch, opt=opt)
        said = {ln for ln in capfd.readouterr().err.splitlines()
                if ln.startswith(("mpscy: cuda weight gradients", "mpscy: cuda weight and bias"))}
        line = f"mpscy: cuda weight gradients read from x (no columns): {want} convolution" + "s" * (want > 1)
        line2 = f"mpscy: cuda weight and bias gradients in one pass over dz and x: {want_small} convolution"
        line3 = "mpscy: cuda weight and bias gradients by output rows: 1 convolution"
        assert said == (({line} if want else set()) | ({line2} if want_small else set()) |
                        ({line3} if want_rows else set())), (off, said)
        held.append(gpu.stats()["bytes_in_use"])
        losses_seen = [gpu.step(x, y).loss for x, y in zip(xs, ys)]
        runs.append((losses_seen, gpu.get_parameters()))
    assert [h - held[0] for h in held] == [4 * f[4] for f in forms], held
    same = ((0, 1), (0, 2), (3, 4), (0, 5)) + (() if rows_fit else ((0, 6),))
    for a, b in same:  # the same bits
        assert runs[a][0] == runs[b][0], (forms[a][0], forms[b][0])
        assert sorted(runs[a][1]) == sorted(runs[b][1]) and len(runs[a][1]) >= 3
        for k in runs[a][1]:
            assert np.array_equal(runs[a][1][k], runs[b][1][k]), (forms[b][0], k)
    # another order of the first layer's sums: the split product, and the rows against the tiles
    for a, b in ((0, 3),) + (((0, 6),) if rows_fit else ()):
        _assert_other_order(runs[a], runs[b])
    if name == "readme_convs":
        return
    first_conv = [k for k in runs[0][1] if k.startswith("conv2d_0.")]
    for small, by_rows in (("", ""), ("", "0"), ("0", "")):  # rows (where they fit), tiles, split
        monkeypatch.setenv("MPSCY_CUDA_DW_SMALL", small)
        monkeypatch.setenv("MPSCY_CUDA_DW_ROWS", by_rows)
        cpu, gpu = pair(build, shape, batch=batch, opt=opt)
        errs = _first_layer_grad_errors(cpu, gpu, shape, rows[1], rng, first_conv)
        assert len(errs) == 2 - (name in ("no_bias", "rows_dilated_nobias"))
        assert max(errs.values()) <= 2e-5, (small, by_rows, errs)


@cuda_only
def test_rows_form_with_several_rows_a_warp(monkeypatch, rng):
    """conv_dw_rows gives each warp as many output rows as the grid leaves it: the README's first
    layer at 64 rows of 32 x 32 (2,048 output rows) with one block a multiprocessor
    (MPSCY_CUDA_DW_SMALL=1: 132 blocks of 8 warps on the H200, two rows a warp, each row's staging
    reusing the last one's room) stays within 2e-6 of the tiles' sums (MPSCY_CUDA_DW_ROWS=0) over
    4 steps, full and partial batches, and the first layer's gradients match the cpu's on binary
    grids within 2e-5."""
    monkeypatch.setenv("MPSCY_CUDA_DW_SMALL", "1")
    build = lambda: [L.Conv2D(32, 3, padding=1), L.ReLU(), L.Conv2D(8, 3, 2, 1), L.ReLU(), L.Flatten(),  # noqa: E731
                     L.Dense(10)]
    shape, rows = (3, 32, 32), [64, 37, 64, 64]
    xs = [rng.standard_normal((r,) + shape).astype(np.float32) for r in rows]
    ys = [rng.integers(0, 10, r).astype(np.int32) for r in rows]
    runs = []
    for by_rows in ("", "0"):
        monkeypatch.setenv("MPSCY_CUDA_DW_ROWS", by_rows)
        cpu, gpu = pair(build, shape, batch=64, opt=lambda: optim.SGD(0.01, momentum=0.9))
        runs.append(([gpu.step(x, y).loss for x, y in zip(xs, ys)], gpu.get_parameters()))
        if by_rows == "":
            errs = _first_layer_grad_errors(cpu, gpu, shape, 64, rng, ["conv2d_0.weight", "conv2d_0.bias"])
            assert max(errs.values()) <= 2e-5, errs
    assert len(_assert_other_order(runs[0], runs[1])) == 6


# ----------------------------------------------------------------------------- forced GEMM paths, TF32

CONV_PATH_MODELS = ("conv_pool", "conv_groups_dilation", "conv_long_k", "conv_relu_dense", "batchnorm2d",
                    "conv_s2_dgrad", "conv_implicit_s1")


@cuda_only
@pytest.mark.parametrize("gemm", ["own", "cublas"])
def test_conv_forced_gemm_paths_match_cpu(gemm, monkeypatch, rng):
    """MPSCY_CUDA_GEMM=own|cublas keep every convolution product on the small-GEMM kernel or
    cuBLASLt, with the (OC, b*OHW) result scattered to NCHW (by default fp32 convolutions use
    conv_fwd_kernel and conv_dw_kernel, which the layer tests cover). A groups-1 forward with
    K <= 32 is conv_direct_kernel in every mode; the other products of those layers still vary."""
    monkeypatch.setenv("MPSCY_CUDA_GEMM", gemm)
    for name in CONV_PATH_MODELS:
        build, shape = LAYER_MODELS[name]
        cpu, gpu = pair(build, shape)
        compare_training(cpu, gpu, rng, steps=8, rows=[16, 9])


@cuda_only
def test_conv_tf32_tracks_cpu(rng):
    """precision="tf32" convolutions (cuBLASLt on tensor cores, the long weight gradient as a batch
    of K chunks): 10-bit mantissas, so within 2e-2 of the cpu's fp32 after 5 SGD steps."""
    for name in ("conv_long_k", "conv_pool"):
        build, shape = LAYER_MODELS[name]
        cpu, gpu = pair(build, shape, opt=lambda: optim.SGD(0.01), precision="tf32")
        for _ in range(5):
            x = rng.standard_normal((16,) + shape).astype(np.float32)
            y = rng.integers(0, 5, 16).astype(np.int32)
            rc, rg = cpu.step(x, y), gpu.step(x, y)
            assert abs(rg.loss - rc.loss) <= 2e-2 * abs(rc.loss), (name, rc.loss, rg.loss)
        pc, pg = cpu.get_parameters(), gpu.get_parameters()
        worst = max(rel_err(pg[k], pc[k]) for k in pc)
        assert worst <= 2e-2, (name, worst)
