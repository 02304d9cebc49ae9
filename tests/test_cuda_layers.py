"""The cuda backend against the cpu backend, layer by layer and loss by loss: forward outputs within
1e-5, parameters within 1e-4 after training on full and partial batches, gradients with the input's,
kernels chosen by size (split-K, direct, implicit, grids past 65,535); and, without a GPU, DeviceError
for a missing cuda backend. Not here: optimizers, fused steps, knobs that only change a schedule."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import losses, optim

from cuda_util import (ADAM_EPS, FORWARD_TOL, HAVE_CUDA, LAYER_MODELS, PARAM_TOL, _maybe, compare_gradients,
                       compare_training, cuda_only, pair, targets)
from layer_refs import rel_err


# ----------------------------------------------------------------------------- everywhere

@pytest.mark.skipif(HAVE_CUDA, reason="cuda is present here")
def test_missing_cuda_raises_device_error():
    model = mpscy.Sequential([L.Dense(4)], input_shape=(3,))
    with pytest.raises(mpscy.DeviceError, match="cuda"):
        mpscy.Engine(model, loss="mse", device="cuda")
    assert "cuda" not in mpscy.backends()


# ----------------------------------------------------------------------------- layers

def _residual():
    """A small residual DAG with Add and Concatenate, built with the functional API."""
    if not hasattr(L, "Add") or not hasattr(L, "Concatenate"):
        pytest.skip("merge layers are not in this mpscy")
    inp = mpscy.Input((12,))
    h = L.Dense(16)(inp)
    a = L.ReLU()(h)
    b = L.Dense(16)(a)
    s = L.Add()(h, b)
    c = L.Concatenate()(s, a)
    out = L.Dense(5)(L.Tanh()(c))
    return mpscy.Model(inp, out)


@cuda_only
def test_residual_add_concat_matches_cpu(rng):
    engines = [mpscy.Engine(_residual(), batch_size=16, device=d, seed=3) for d in ("cpu", "cuda")]
    compare_training(*engines, rng, rows=[16, 9])


@cuda_only
def test_an_engine_leaves_the_thread_s_current_device_as_it_found_it(rng):
    """On a host of two GPUs, with PyTorch's current device 1: building, training and reading an
    engine (which runs on the first GPU) leave the thread's current device at 1 (creating one
    moved it to 0), and the engine trains as on the cpu."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(1)
    try:
        cpu, gpu = pair(lambda: [L.Dense(16), L.ReLU(), L.Dense(5)], (12,))
        assert torch.cuda.current_device() == 1
        compare_training(cpu, gpu, rng, steps=3, rows=[16, 9])
        gpu.predict(rng.standard_normal((7, 12)).astype(np.float32))
        assert torch.cuda.current_device() == 1 and torch.ones(2, device="cuda").device.index == 1
    finally:
        torch.cuda.set_device(0)


def _two_pools(window):
    """Two MaxPool2D of the same windows over one input (each window its own stride, no padding,
    the input a whole number of windows: pool.cu's tiled backward), the second adding into the
    input gradient the first wrote, joined by Concatenate under a Dense."""
    if not hasattr(L, "Concatenate"):
        pytest.skip("merge layers are not in this mpscy")
    inp = mpscy.Input((3, 8, 12))
    h = L.ReLU()(inp)  # ties at 0: the first maximum takes the gradient
    a = L.Flatten()(L.MaxPool2D(window)(h))
    b = L.Flatten()(L.MaxPool2D(window)(L.Tanh()(inp)))
    c = L.Flatten()(L.MaxPool2D(window)(inp))
    return mpscy.Model(inp, L.Dense(5)(L.Concatenate()(a, b, c)))


@cuda_only
@pytest.mark.parametrize("window", [2, (2, 3), (4, 1)])
def test_tiling_max_pools_input_gradients_match_cpu(window, rng):
    """Max pooling whose windows tile the input, three pools reading the input (two through
    activations, one directly; the input gradient written by one and added to by the others):
    the input gradients and a training run against the cpu's."""
    engines = [mpscy.Engine(_two_pools(window), batch_size=16, device=d, seed=3, input_gradients=True)
               for d in ("cpu", "cuda")]
    x = rng.standard_normal((16, 3, 8, 12)).astype(np.float32)
    x[:, :, :4] = -np.abs(x[:, :, :4])  # the ReLU's windows over rows 0-3 all 0: ties
    y = rng.integers(0, 5, 16)
    compare_gradients(*engines, x, y)
    compare_training(*engines, rng, rows=[16, 9])


def _dropout_chain():
    """Dense -> ReLU -> Dropout -> Dense twice in a chain: the upper Dense writes the lower one's
    dz itself, through the Dropout's multipliers and the ReLU's mask, and neither backward runs.
    Then a Dropout read by two Dense layers: its own backward runs, and both add into it."""
    if not hasattr(L, "Concatenate"):
        pytest.skip("merge layers are not in this mpscy")
    inp = mpscy.Input((12,))
    h = L.Dropout(0.3)(L.ReLU()(L.Dense(24)(inp)))
    h = L.Dropout(0.5)(L.ReLU()(L.Dense(20)(h)))
    d = L.Dropout(0.25)(L.ReLU()(L.Dense(16)(h)))
    return mpscy.Model(inp, L.Dense(5)(L.Concatenate()(L.Dense(8)(d), L.Dense(6)(d))))


@cuda_only
def test_dropout_between_dense_layers_matches_cpu(rng):
    engines = [mpscy.Engine(_dropout_chain(), batch_size=16, device=d, seed=3) for d in ("cpu", "cuda")]
    compare_training(*engines, rng, rows=[16, 9])


def _strided_residual():
    """A 3x3 stride-2 convolution and a 1x1 stride-2 projection of one tensor, added: the 3x3 is
    the earlier node, so its backward (conv_dgrad_s2, C = 6 -> 8 on 6 x 10) adds to dx."""
    if not hasattr(L, "Add") or not hasattr(L, "Conv2D"):
        pytest.skip("merge or conv layers are not in this mpscy")
    inp = mpscy.Input((3, 6, 10))
    a = L.ReLU()(L.Conv2D(6, 3, padding=1)(inp))
    s = L.Add()([L.Conv2D(8, 3, stride=2, padding=1)(a), L.Conv2D(8, 1, stride=2)(a)])
    return mpscy.Model(inp, L.Dense(5)(L.Flatten()(L.ReLU()(s))))


@cuda_only
def test_strided_conv_accumulated_input_gradient_matches_cpu(rng):
    """conv_dgrad_s2 adding to dx, at the built batch (b*OH*OW = 240) and in partial batches of
    9 and 7 (135 and 105 positions: unaligned rows, scalar copies)."""
    engines = [mpscy.Engine(_strided_residual(), batch_size=16, device=d, seed=3) for d in ("cpu", "cuda")]
    compare_training(*engines, rng, rows=[16, 9, 16, 7])


def _implicit_residual():
    """3x3 stride-1 convolutions on 8 x 8 (conv_implicit.cu for the forward and dx): the second and
    a 1x1 projection of one tensor, added, so the 3x3 (the earlier node) adds its dx to the 1x1's;
    the first has dx only for the input's gradient."""
    if not hasattr(L, "Add") or not hasattr(L, "Conv2D"):
        pytest.skip("merge or conv layers are not in this mpscy")
    inp = mpscy.Input((8, 8, 8))
    a = L.ReLU()(L.Conv2D(16, 3, padding=1)(inp))
    s = L.Add()([L.Conv2D(16, 3, padding=1)(a), L.Conv2D(16, 1)(a)])
    return mpscy.Model(inp, L.Dense(5)(L.Flatten()(L.ReLU()(s))))


@cuda_only
@pytest.mark.parametrize("implicit", ["1", "0"])
def test_implicit_conv_accumulated_and_input_gradients_match_cpu(implicit, monkeypatch, rng):
    """The implicit product adding to dx, its dx of the model's input (gradients with the input's,
    a partial batch of 13), training over full and partial batches of 9 and 7 (b*OH*OW = 576 and
    448), then prediction; and the same with MPSCY_CUDA_IMPLICIT=0 (im2col and the products)."""
    monkeypatch.setenv("MPSCY_CUDA_IMPLICIT", implicit)
    engines = [mpscy.Engine(_implicit_residual(), batch_size=16, device=d, seed=3, input_gradients=True)
               for d in ("cpu", "cuda")]
    x = rng.standard_normal((13, 8, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 13).astype(np.int32)
    compare_gradients(*engines, x, y)
    compare_training(*engines, rng, rows=[16, 9, 16, 7])
    assert rel_err(engines[1].predict(x), engines[0].predict(x)) <= 10 * PARAM_TOL


@cuda_only
def test_implicit_conv_with_more_than_32_channels_matches_cpu(rng):
    """3x3 convolutions on the implicit path (OW divides 64, OH*OW a multiple of 64) with more than
    32 output channels (the forward's 64-row tiles, 105.5 KB of shared memory a block) and, for
    the second, a stride-1 dx of more than 32 input channels (the same tiles). Where a block may
    have less (99 KB on sm_86, sm_89 and sm_120) the kernel takes 32-row tiles: building the
    engine there failed with "conv_implicit: invalid argument" before. An H100 or H200 grants 227
    KB, so there this checks the 64-row tiles against the cpu over full and partial batches."""
    build = lambda: [_maybe("Conv2D")(48, 3, padding=1), L.ReLU(), _maybe("Conv2D")(40, 3, padding=1), L.ReLU(),
                     L.Flatten(), L.Dense(5)]
    cpu, gpu = pair(build, (40, 8, 8))
    compare_training(cpu, gpu, rng, rows=[16, 9])


@cuda_only
def test_conv_weight_gradient_partials_are_sized_by_the_split_taken():
    """A 1x1 convolution 2048 -> 2048 on 8 x 8 at built batches of 32 and 64 (b*OH*OW 2048 and
    4096). Its weight gradient is never split (1,024 output tiles fill the GPU; at 2048 positions
    it is one cuBLASLt product), yet each convolution's slab held room for ceil(b*OH*OW / 128)
    partials of the whole weight: 32,768 floats a position, twice everything else the engine
    holds per position (x staged, y, dy, the columns, dz, the workspace). Now the room is what the
    product planned may write: the engine's device memory grows by at most 12 x 2048 floats per
    added position (22,538 measured on the H200; the old room added 2048 x 2048 / 128 = 32,768 more)."""
    held = []
    for batch in (32, 64):
        gpu = mpscy.Engine(mpscy.Sequential([_maybe("Conv2D")(2048, 1), L.Flatten(), L.Dense(2)],
                                            input_shape=(2048, 8, 8)),
                           loss="sparse_cross_entropy", optimizer=optim.SGD(0.01), batch_size=batch,
                           device="cuda", seed=3)
        held.append(gpu.stats()["bytes_in_use"])
        del gpu
    per_position = (held[1] - held[0]) / (4 * 32 * 64)
    assert per_position <= 12 * 2048, per_position


@cuda_only
@pytest.mark.parametrize("mma,dx_first", [("1", "1"), ("1", "0"), ("0", "1")])
def test_dense_long_k_matches_cpu(mma, dx_first, monkeypatch, rng):
    """A Dense with K = 2048 at batch 64 and 130 outputs: its forward as the 3xTF32 product split
    over K with the ordered partial sum (dense.cu's dense_mma_forward; three 64-unit tiles, the last
    partial) and its dx (64 x 2048, K = 130: not a multiple of 4, 4-byte copies) as the same
    product, through a Tanh below; with $MPSCY_CUDA_DENSE_MMA=0 the small-GEMM kernel (split-K
    partials and last-block finish; five 32-column tiles) and cuBLASLt. Training over full and
    partial batches (37 and 5 rows), then prediction. SGD with momentum: with Adam, whose
    per-element normalization turns last-bit differences of near-zero gradient entries into
    learning-rate-sized steps, 12 steps ended 1.4e-4 (relative) from the cpu's first-layer weights
    at this fan-in (H200), though every product matched to fp32 rounding. The dx product is
    enqueued before the side stream's dW by default, after it with $MPSCY_CUDA_DX_FIRST=0."""
    monkeypatch.setenv("MPSCY_CUDA_DENSE_MMA", mma)
    monkeypatch.setenv("MPSCY_CUDA_DX_FIRST", dx_first)
    cpu, gpu = pair(lambda: [L.Dense(2048), L.Tanh(), L.Dense(130), L.ReLU(), L.Dense(10)], (48,), batch=64,
                    opt=lambda: optim.SGD(0.05, momentum=0.9))
    x = rng.standard_normal((69, 48)).astype(np.float32)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= FORWARD_TOL
    compare_training(cpu, gpu, rng, steps=12, rows=[64, 37, 64, 5])
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL


@cuda_only
@pytest.mark.parametrize("name", sorted(LAYER_MODELS))
def test_layer_matches_cpu(name, rng):
    build, shape = LAYER_MODELS[name]
    cpu, gpu = pair(build, shape, opt=lambda: optim.Adam(1e-3, eps=ADAM_EPS.get(name, 1e-8)))
    x = rng.standard_normal((37,) + shape).astype(np.float32)
    out_c, out_g = cpu.predict(x), gpu.predict(x)
    assert rel_err(out_g, out_c) <= FORWARD_TOL
    compare_training(cpu, gpu, rng)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL


@cuda_only
@pytest.mark.parametrize("size,align", [((10, 14), False), ((13, 6), True), ((3, 2), False)])
def test_bilinear_upsample_gives_the_cpu_s_bits(rng, size, align):
    """common/resize_math.h rounds every product and sum on its own on both backends, and the cuda
    backward sums each input's outputs in the cpu's order: the output is the cpu's to the bit (up,
    to a size that is no multiple with align_corners, and down), and the input's gradient, from an
    MSE gradient each backend computes, within 1e-6."""
    build = lambda: [L.Upsample(size=size, mode="bilinear", align_corners=align), L.Flatten()]
    cpu, gpu = pair(build, (3, 5, 7), loss="mse", input_gradients=True)
    x = rng.standard_normal((6, 3, 5, 7)).astype(np.float32)
    t = rng.standard_normal((6, 3 * size[0] * size[1])).astype(np.float32)
    np.testing.assert_array_equal(gpu.predict(x), cpu.predict(x))
    assert rel_err(gpu.gradients(x, t)["input"], cpu.gradients(x, t)["input"]) <= 1e-6


@cuda_only
def test_convtranspose_split_weight_gradient_with_partial_batches_matches_cpu(rng):
    """A ConvTranspose2D whose weight gradient's K (b x 16 x 16 positions) is split over the GPU
    (16 splits at the built batch of 32, fewer for the partial batches of 19 and 7), with groups:
    20 Adam steps against the cpu, and one step's gradients within 1e-5."""
    build = lambda: [L.ConvTranspose2D(8, 4, stride=2, padding=1, groups=2), L.ReLU(), L.Conv2D(4, 3, stride=2),
                     L.Flatten(), L.Dense(5)]
    cpu, gpu = pair(build, (8, 16, 16), batch=32, opt=lambda: optim.Adam(1e-3, eps=1e-6), input_gradients=True)
    x = rng.standard_normal((32, 8, 16, 16)).astype(np.float32)
    compare_gradients(cpu, gpu, x, rng.integers(0, 5, 32).astype(np.int32), tol=1e-5)
    compare_training(cpu, gpu, rng, rows=[32, 19, 32, 7])


CONVT_FORMS = {"mma": {}, "mma_one_sample_columns": {"MPSCY_CUDA_CONVT_COLS": "1"},
               "tiled": {"MPSCY_CUDA_CONVT_MMA": "0"},
               "direct": {"MPSCY_CUDA_CONVT_MMA": "0", "MPSCY_CUDA_CONVT_TILED": "0"}}


@cuda_only
@pytest.mark.parametrize("form", list(CONVT_FORMS))
def test_convtranspose_every_cuda_form_matches_cpu(rng, monkeypatch, form):
    """Each of conv_transpose.cu's forms, chosen by its knobs (read when the graph is built and
    captured): the tensor-core products (the default), with the forward's columns one sample at a
    time too, the tiled fp32 kernel, and the direct reference kernels. Two layers: 4x4 stride 2 in 2
    groups of 3 input channels over 5x7 inputs (35 positions: 4-byte copies), and 3x3 stride 2
    with output padding and dilation 2 from 36 channels (tiles of 64) to 20 over 10x14 (140
    positions, 180 taps a row of W: 16-byte copies); the input's gradient too. One step's gradients within 1e-5 of the cpu's, then 20
    Adam steps on full and partial batches (13 and 5 of 16) within 1e-4."""
    for k, v in CONVT_FORMS[form].items():
        monkeypatch.setenv(k, v)
    build = lambda: [L.ConvTranspose2D(36, 4, stride=2, padding=1, groups=2), L.ReLU(),
                     L.ConvTranspose2D(20, 3, stride=2, padding=1, output_padding=1, dilation=2), L.ReLU(),
                     L.Conv2D(4, 3, stride=3), L.Flatten(), L.Dense(5)]
    cpu, gpu = pair(build, (6, 5, 7), batch=16, opt=lambda: optim.Adam(1e-3, eps=1e-6), input_gradients=True)
    x = rng.standard_normal((16, 6, 5, 7)).astype(np.float32)
    compare_gradients(cpu, gpu, x, rng.integers(0, 5, 16).astype(np.int32), tol=1e-5)
    compare_training(cpu, gpu, rng, rows=[16, 13, 16, 5])


@cuda_only
@pytest.mark.parametrize("form", ["mma", "tiled"])
def test_convtranspose_wide_weight_gradient_partials_at_a_partial_batch_match_cpu(rng, monkeypatch, form):
    """2x2 stride-2 taps from 256 channels over 8x8 (K = b x 64 positions): at the built batch
    of 64 the tensor-core weight gradient writes 16 partials, at 33 rows 17 (its splits are
    asked by the batch, the partials written rounded from them): the workspace holds the most
    any batch writes. One step's gradients at 64 and 33 rows within 1e-5 of the cpu's, for the
    tiled kernel (measured 3.4e-7 and 3.7e-7 on the H100) and for the tensor-core products, whose
    weight gradient here strayed past 1e-4 on the H100 before their accumulators were summed in
    IEEE fp32 every 32 products (mma.cuh's RESUM)."""
    if form == "tiled":
        monkeypatch.setenv("MPSCY_CUDA_CONVT_MMA", "0")
    build = lambda: [L.ConvTranspose2D(64, 2, stride=2), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(5)]
    cpu, gpu = pair(build, (256, 8, 8), batch=64, opt=lambda: optim.SGD(0.01), input_gradients=True)
    for rows in (64, 33):
        x = rng.standard_normal((rows, 256, 8, 8)).astype(np.float32)
        compare_gradients(cpu, gpu, x, rng.integers(0, 5, rows).astype(np.int32), tol=1e-5)


@cuda_only
@pytest.mark.parametrize("form", ["mma", "tiled"])
def test_convtranspose_depthwise_over_a_large_batch_matches_cpu(rng, monkeypatch, form):
    """A depthwise ConvTranspose2D (256 groups of one channel, 2x2 stride 2 over 4x4) at a batch
    of 300: the tensor-core forward's columns of every sample fit one chunk, but a launch holds at
    most 65535 (sample, group) blocks, so its samples go in chunks of 255. One step's gradients
    within 1e-5 of the cpu's for both forms (the tiled kernel's weight gradient, summed over 4,800
    positions, measured 9.5e-7 on the H100; the tensor-core products' 1.8e-5 before RESUM)."""
    if form == "tiled":
        monkeypatch.setenv("MPSCY_CUDA_CONVT_MMA", "0")
    build = lambda: [L.ConvTranspose2D(256, 2, stride=2, groups=256), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(5)]
    cpu, gpu = pair(build, (256, 4, 4), batch=300, opt=lambda: optim.SGD(0.01), input_gradients=True)
    x = rng.standard_normal((300, 256, 4, 4)).astype(np.float32)
    compare_gradients(cpu, gpu, x, rng.integers(0, 5, 300).astype(np.int32), tol=1e-5)


def _bn_accumulating():
    """A BatchNorm whose input also feeds an Add: its input gradient accumulates (dx += ...)."""
    inp = mpscy.Input((3, 12, 13))
    c = L.Conv2D(6, 3, padding=1)(inp)
    h = L.Add()([L.ReLU()(L.BatchNorm()(c)), c])
    return mpscy.Model(inp, L.Dense(5)(L.Flatten()(h)))


@cuda_only
@pytest.mark.parametrize("split", ["1", "0"])
def test_batchnorm_over_many_values_a_channel_matches_cpu(rng, monkeypatch, split):
    """BatchNorm over parts (the default, $MPSCY_CUDA_BN_SPLIT=1: a channel's values over several
    blocks, merged in part order) and with one block a channel (=0): 8 channels of 16 x 64 x 64 values (32 parts of 2,048 on an H100's 132
    multiprocessors; 10 at 5 rows), and a BatchNorm over 6 channels of 12 x 13 positions at a
    batch of 301 (22 parts of 2,135, which start inside a sample's positions; 9 of 2,132 at 123
    rows) whose input gradient accumulates. One step's gradients within 1e-5 of the cpu's, Adam
    steps on full and partial batches within 1e-4, predictions (running statistics) within 1e-5."""
    monkeypatch.setenv("MPSCY_CUDA_BN_SPLIT", split)
    build = lambda: [L.BatchNorm(), L.Conv2D(4, 3, padding=1), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(5)]  # noqa: E731
    cpu, gpu = pair(build, (8, 64, 64), batch=16, opt=lambda: optim.Adam(1e-3, eps=1e-6), input_gradients=True)
    x = rng.standard_normal((16, 8, 64, 64)).astype(np.float32) * 3 + 1
    compare_gradients(cpu, gpu, x, rng.integers(0, 5, 16).astype(np.int32), tol=1e-5)
    compare_training(cpu, gpu, rng, rows=[16, 5, 16])
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= FORWARD_TOL
    engines = [mpscy.Engine(_bn_accumulating(), optimizer=optim.Adam(1e-3, eps=1e-6), batch_size=301, device=d,
                            seed=3, input_gradients=True) for d in ("cpu", "cuda")]
    x = rng.standard_normal((301, 3, 12, 13)).astype(np.float32)
    compare_gradients(*engines, x, rng.integers(0, 5, 301).astype(np.int32), tol=1e-5)
    compare_gradients(*engines, x[:123], rng.integers(0, 5, 123).astype(np.int32), tol=1e-5)
    compare_training(*engines, rng, steps=6, rows=[301, 123])
    assert rel_err(engines[1].predict(x), engines[0].predict(x)) <= FORWARD_TOL


@cuda_only
def test_conv_long_k_with_odd_and_partial_batches_matches_cpu(rng):
    """b*OH*OW = 4500, 4275 and 1575 (partial batches of 19 and 7): the weight gradient's own
    split-K kernel, chosen at the built batch, with float4 loads and, for the odd counts, scalar
    ones; a 3x3 and a 5x5 col2im of each."""
    build = lambda: [_maybe("Conv2D")(20, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 5, padding=2), L.Flatten(),
                     L.Dense(5)]
    cpu, gpu = pair(build, (3, 15, 15), batch=20)
    compare_training(cpu, gpu, rng, rows=[20, 19, 20, 7])


@cuda_only
def test_conv_direct_k32_matches_cpu(rng):
    """The direct forward at its largest K (C 2, 4x4: 32 taps) with 70 output channels (channel
    blocks of 8, the last one partial): one step's gradients within 1e-5 and 20 SGD steps within
    1e-4 of the cpu. Not Adam: measured on the H200, this model's gradients agree to 1.9e-7 and 20
    SGD steps to 8e-8, but Adam's normalized step turned that into 1.9e-5 to 2.8e-4 on the conv
    weight, depending on the batches (elements whose gradient sums nearly cancel)."""
    build = lambda: [_maybe("Conv2D")(70, 4, padding=1), L.ReLU(), L.Flatten(), L.Dense(5)]
    cpu, gpu = pair(build, (2, 7, 7), opt=lambda: optim.SGD(0.05, momentum=0.9))
    x = rng.standard_normal((16, 2, 7, 7)).astype(np.float32)
    y = rng.integers(0, 5, 16).astype(np.int32)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= FORWARD_TOL
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    for k in gc:
        if k != "loss":
            assert rel_err(gg[k], gc[k]) <= 1e-5, k
    compare_training(cpu, gpu, rng, rows=[16, 16, 9])


@cuda_only
def test_conv_with_more_than_65535_output_channels_matches_cpu(rng):
    """65,543 output channels: conv_dz's grid has a block row a channel, and a grid's y is at most
    65,535, so it loops over the channels past that (it failed to launch before). Gradients
    within 1e-5 of the cpu's, then 3 SGD steps, one a partial batch."""
    build = lambda: [_maybe("Conv2D")(65543, 1), L.ReLU(), L.Flatten(), L.Dense(3)]
    cpu, gpu = pair(build, (2, 2, 2), opt=lambda: optim.SGD(0.01), batch=4)
    x = rng.standard_normal((4, 2, 2, 2)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int32)
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    for k in gc:
        if k != "loss":
            assert rel_err(gg[k], gc[k]) <= 1e-5, k
    compare_training(cpu, gpu, rng, steps=3, rows=[4, 3, 4])


@cuda_only
def test_small_product_with_more_than_65535_row_tiles_matches_cpu(rng):
    """Dense(1) on 4 features at a built batch of 2^21 rows: batch x out x in < 2^24, so the
    forward is gemm.cu's own product, whose grid had a block row per 32-row tile of x: 65,536
    rows of blocks, past a grid's y limit of 65,535 (building the engine failed with a
    DeviceError). Its tiles now run along grid x. Two SGD steps, one a partial batch (launched
    kernel by kernel), against the cpu."""
    b = 1 << 21
    cpu, gpu = pair(lambda: [L.Dense(1)], (4,), loss="mse", opt=lambda: optim.SGD(0.01), batch=b)
    compare_training(cpu, gpu, rng, steps=2, rows=[b, b - 3])


@cuda_only
def test_dense_mma_dx_with_more_than_65535_row_tiles_matches_cpu(rng):
    """The dx of Dense(16 -> 1) below a Tanh at 2^21 rows would run as dense.cu's 3xTF32 product
    (out <= 256, batch x in >= 65536), a block row per 32 rows of x: 65,536 rows of blocks, past a
    grid's y limit (building the engine failed). Past 32 x 65,535 rows it takes the general
    product instead. Two SGD steps, one a partial batch, against the cpu."""
    b = 1 << 21
    cpu, gpu = pair(lambda: [L.Dense(16), L.Tanh(), L.Dense(1)], (4,), loss="mse", opt=lambda: optim.SGD(0.01),
                    batch=b)
    compare_training(cpu, gpu, rng, steps=2, rows=[b, b - 3])


@cuda_only
def test_conv_direct_with_partial_batches_matches_cpu(rng):
    """The direct forward (3 -> 16, K = 27, fused ReLU) with its columns built on the side stream
    for the weight gradient: gradients with the input's of a partial batch, training over full
    and partial batches of 19 and 7 (launched one by one, not the captured graph), then
    prediction and evaluation of a partial batch, which build no columns."""
    build = lambda: [_maybe("Conv2D")(16, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 3, stride=2), L.Flatten(),
                     L.Dense(5)]
    cpu, gpu = pair(build, (3, 9, 9), batch=20, input_gradients=True)
    x = rng.standard_normal((13, 3, 9, 9)).astype(np.float32)
    y = rng.integers(0, 5, 13).astype(np.int32)
    compare_gradients(cpu, gpu, x, y)
    compare_training(cpu, gpu, rng, rows=[20, 19, 20, 7])
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL
    ec, eg = cpu.evaluate(x, y), gpu.evaluate(x, y)
    assert abs(eg["loss"] - ec["loss"]) <= 1e-3 * max(abs(ec["loss"]), 1e-3)


@cuda_only
def test_gradients_and_input_gradients_match_cpu(rng):
    cpu, gpu = pair(LAYER_MODELS["flatten"][0], (3, 4, 2), input_gradients=True)
    x = rng.standard_normal((9, 3, 4, 2)).astype(np.float32)
    y = rng.integers(0, 5, 9).astype(np.int32)
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    assert gc.keys() == gg.keys() and "input" in gg and gg["input"].shape == x.shape
    for k in gc:
        if k != "loss":
            assert rel_err(gg[k], gc[k]) <= PARAM_TOL, k
    assert abs(gg["loss"] - gc["loss"]) <= 1e-5 * abs(gc["loss"])
    # a GRAD step updates nothing
    before = gpu.get_parameters()
    gpu.gradients(x, y)
    after = gpu.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert gpu.get_optimizer_state()["step"] == 0


@cuda_only
@pytest.mark.parametrize("rows", [64, 40, 33])
@pytest.mark.parametrize("stride", [2, 1])
def test_convolution_gradients_match_cpu_past_32_rows(stride, rows, rng):
    """A 32-channel convolution and its ReLU, then a convolution (stride 2: dx by conv_s2; 1: by the
    implicit product) with its ReLU fused, at batch 64, full and partial (40 and 33 rows): every
    weight and bias gradient within 2e-5 of the cpu's. The inputs (multiples of 1/4 in [-1, 1])
    and the convolutions' parameters (multiples of 2^-6 and 2^-8) lie on binary grids on which
    every pre-activation of both convolutions is exact in fp32 and in 3xTF32, so both devices
    take the same ReLU masks and differ only by the backward's rounding. With arbitrary floats a
    pre-activation within ~1e-6 of the layer's spread of zero (the first convolution alone has
    2M of them at 64 rows) can round to opposite signs on the two devices, and that one position
    moves its channel's weight and bias gradients by up to 1e-2 (measured in the eleventh
    session, bench/cuda_notes.md)."""
    def build():
        return [L.Conv2D(32, 3, 1, 1), L.ReLU(), L.Conv2D(8, 3, stride, 1), L.ReLU(), L.Flatten(), L.Dense(10)]
    cpu, gpu = pair(build, (3, 32, 32), opt=lambda: optim.SGD(0.01), batch=64)
    grid = {"conv2d_0": 64, "conv2d_2": 256}
    p = {k: (np.round(v * grid[k.split(".")[0]]) / grid[k.split(".")[0]]).astype(np.float32)
         if k.split(".")[0] in grid else v for k, v in cpu.get_parameters().items()}
    cpu.set_parameters(p)
    gpu.set_parameters(p)
    x = (rng.integers(-4, 5, (rows, 3, 32, 32)) / 4).astype(np.float32)
    y = rng.integers(0, 10, rows).astype(np.int32)
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    errs = {k: rel_err(gg[k], gc[k]) for k in gc if k != "loss"}
    assert len(errs) == 6 and min(np.abs(gc[k]).max() for k in errs) > 0
    assert max(errs.values()) <= 2e-5, errs


# ----------------------------------------------------------------------------- sub-batches

# the convolution models that hold a Conv2D (ConvTranspose2D's own kernels are never split)
SPLIT_MODELS = sorted(k for k in LAYER_MODELS if (k.startswith("conv") or k == "batchnorm2d")
                      and any(isinstance(layer, L.Conv2D) for layer in LAYER_MODELS[k][0]()))


def _split_form(capfd):
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "convolutions over sub-batches" in ln]
    assert lines and len(set(lines)) == 1, lines
    return lines[0].split(": ", 2)[2]


@cuda_only
@pytest.mark.parametrize("samples", [3, 1])
@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_conv_over_sub_batches_matches_cpu(name, samples, monkeypatch, capfd, rng):
    """Every convolution of the layer table's models over sub-batches of 3 samples (the built batch
    of 16 as five and a tail of one; partial batches of 9 and 7) or of 1, as a convolution with a
    tensor of 2^31 - 1 or more elements runs ($MPSCY_CUDA_CONV_SPLIT forces it): im2col,
    cuBLASLt's products, the output scatter, dz and col2im a sub-batch at a time, the weight
    gradient added up over them, the bias gradient's chunk sums in one ordered sum. Against the
    cpu as test_layer_matches_cpu, over full and partial batches."""
    monkeypatch.setenv("MPSCY_CUDA_CONV_SPLIT", str(samples))
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    build, shape = LAYER_MODELS[name]
    cpu, gpu = pair(build, shape, opt=lambda: optim.Adam(1e-3, eps=ADAM_EPS.get(name, 1e-8)))
    convs = sum(isinstance(layer, L.Conv2D) for layer in build())
    assert _split_form(capfd) == f"{convs}, of {samples} samples at the fewest"
    x = rng.standard_normal((37,) + shape).astype(np.float32)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= FORWARD_TOL
    compare_training(cpu, gpu, rng, rows=[16, 9, 16, 7])
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL


MIXED_MODELS = sorted(k for k in SPLIT_MODELS if sum(isinstance(layer, L.Conv2D) for layer in LAYER_MODELS[k][0]()) > 1)


@cuda_only
@pytest.mark.parametrize("only", [0, 1])
@pytest.mark.parametrize("name", MIXED_MODELS)
def test_one_conv_over_sub_batches_among_others_matches_cpu(name, only, monkeypatch, capfd, rng):
    """One convolution over sub-batches of 3 samples (the first or the second:
    $MPSCY_CUDA_CONV_SPLIT_ONLY), the others on their own kernels, as a model with one
    convolution past 2^31 - 1 elements runs: a stride-2 dx product or a Dense above writing the split one's dz (masked by its
    ReLU), an implicit dx reading a split one's output gradient, the split one's col2im
    feeding a direct or implicit convolution below. Against the cpu as test_layer_matches_cpu."""
    monkeypatch.setenv("MPSCY_CUDA_CONV_SPLIT", "3")
    monkeypatch.setenv("MPSCY_CUDA_CONV_SPLIT_ONLY", str(only))
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    build, shape = LAYER_MODELS[name]
    cpu, gpu = pair(build, shape, opt=lambda: optim.Adam(1e-3, eps=ADAM_EPS.get(name, 1e-8)))
    assert _split_form(capfd) == "1, of 3 samples at the fewest"
    x = rng.standard_normal((37,) + shape).astype(np.float32)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= FORWARD_TOL
    compare_training(cpu, gpu, rng, rows=[16, 9, 16, 7])
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL


@cuda_only
@pytest.mark.parametrize("build", [_strided_residual, _implicit_residual])
def test_conv_over_sub_batches_adds_to_input_gradients(build, monkeypatch, rng):
    """Sub-batches of 2 samples where two convolutions of one tensor both add to its gradient (col2im
    accumulating a sub-batch's rows), with the model input's gradient, a partial batch of 13
    (six sub-batches and a tail of one), then training over full and partial batches."""
    monkeypatch.setenv("MPSCY_CUDA_CONV_SPLIT", "2")
    engines = [mpscy.Engine(build(), batch_size=16, device=d, seed=3, input_gradients=True) for d in ("cpu", "cuda")]
    shape = engines[0].model.input_shapes[0]
    x = rng.standard_normal((13,) + tuple(shape)).astype(np.float32)
    y = rng.integers(0, 5, 13).astype(np.int32)
    compare_gradients(*engines, x, y)
    compare_training(*engines, rng, rows=[16, 9, 16, 7])


@cuda_only
@pytest.mark.slow
def test_conv_past_2_31_elements_runs_over_sub_batches(monkeypatch, capfd, rng):
    """Conv2D(64, 1) on 1 x 256 x 256 at batch 512: its output has 64 * 65536 * 512 = 2^31
    elements, past the kernels' 32-bit indices (the engine was refused before). It runs over
    sub-batches of 64 samples (its columns within 1 GiB), and BatchNorm and MaxPool2D then take
    tensors of 2^31 elements (the first model on cuda with such tensors): two SGD steps, one a
    partial batch, and prediction against the cpu. Each engine holds about 45 GB (the large
    outputs and their gradients), within an H100's 80."""
    monkeypatch.setenv("MPSCY_CUDA_VERBOSE", "1")
    build = lambda: [L.Conv2D(64, 1, bias=False), L.BatchNorm(), L.MaxPool2D(2), L.GlobalAvgPool2D(), L.Dense(3)]
    cpu, gpu = pair(build, (1, 256, 256), opt=lambda: optim.SGD(0.1), batch=512)
    assert _split_form(capfd) == "1, of 64 samples at the fewest"
    compare_training(cpu, gpu, rng, steps=2, rows=[512, 300])
    x = rng.standard_normal((70, 1, 256, 256)).astype(np.float32)
    assert rel_err(gpu.predict(x), cpu.predict(x)) <= 10 * PARAM_TOL


@cuda_only
@pytest.mark.parametrize("conv, shape", [(lambda: L.Conv2D(32768, 1), (1, 256, 256)),
                                         (lambda: L.Conv2D(4, 3, padding=1), (512, 768, 768))])
def test_conv_whose_one_sample_passes_2_31_elements_is_refused(conv, shape):
    """One sample's output (a 32768-channel 1x1 convolution on 256 x 256: 2^31 elements) or im2col
    columns (512 channels, 3x3, on 768 x 768: 2.7e9) that no sub-batch brings under the kernels'
    32-bit indices: UnsupportedError at build, naming the layer (its name was read after the
    graph that held it was freed)."""
    model = mpscy.Sequential([conv()], input_shape=shape)
    with pytest.raises(mpscy.UnsupportedError, match=r"node 1 \(conv2d_0\): a Conv2D whose input, output or im2col "
                                                     r"columns have 2\^31 - 1 or more elements in one sample"):
        mpscy.Engine(model, loss="mse", batch_size=1, device="cuda")


# ----------------------------------------------------------------------------- losses

LOSS_CASES = {
    "sparse_cross_entropy": ([], "sparse_cross_entropy"),
    "sparse_ce_smoothing": ([], losses.SparseCrossEntropy(label_smoothing=0.1)),
    "cross_entropy": ([], losses.CrossEntropy(label_smoothing=0.05)),
    "categorical_cross_entropy": ([L.Softmax()], "categorical_cross_entropy"),
    "binary_cross_entropy": ([L.Sigmoid()], "binary_cross_entropy"),
    "bce_with_logits": ([], "bce_with_logits"),
    "mse": ([], "mse"),
    "mae": ([], "mae"),
    "huber": ([], losses.Huber(delta=0.5)),
    # class weights (torch's weight=): loss.cu's kernel, the loss-fused output Dense refused
    "sparse_ce_weighted": ([], losses.SparseCrossEntropy(weight=[0.5, 2.0, 1.0, 0.0, 3.0, 1.5], label_smoothing=0.1)),
    "cross_entropy_weighted": ([], losses.CrossEntropy(weight=[0.5, 2.0, 1.0, 0.0, 3.0, 1.5])),
    "bce_with_logits_pos_weight": ([], losses.BCEWithLogits(pos_weight=[0.5, 2.0, 1.0, 0.0, 3.0, 1.5])),
}


@cuda_only
@pytest.mark.parametrize("batch", [16, 64, 100])
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_loss_matches_cpu(name, batch, rng):
    """Every loss, its gradient and the accuracy against the cpu: training (the loss kernel's
    blocks of eight rows: two at 16 rows, eight at 64, thirteen at 100, the last one partial),
    then an evaluation of 45 rows."""
    tail, loss = LOSS_CASES[name]
    cpu, gpu = pair(lambda: [L.Dense(16), L.Tanh(), L.Dense(6)] + [type(t)() for t in tail], (10,), loss=loss,
                    batch=batch)
    compare_training(cpu, gpu, rng, steps=20 if batch == 16 else 6)
    x = rng.standard_normal((45, 10)).astype(np.float32)
    y = targets(rng, cpu.loss, 45, (6,))
    ec, eg = cpu.evaluate(x, y), gpu.evaluate(x, y)
    assert abs(eg["loss"] - ec["loss"]) <= 1e-5 * max(abs(ec["loss"]), 1e-3)
    if ec["accuracy"] is None:
        assert eg["accuracy"] is None
    else:
        assert abs(eg["accuracy"] - ec["accuracy"]) <= 1.0 / (45 * 6) + 1e-12


# ----------------------------------------------------------------------------- frozen layers

def _frozen(layers, *which):
    """layers with those at positions `which` frozen (Layer.trainable = False)."""
    for k in which:
        layers[k].trainable = False
    return layers


FROZEN_MODELS = {
    # the one-kernel MLP step's shape: a frozen layer sends it to the separate kernels
    "mlp_first_dense": (lambda: _frozen([L.Dense(128), L.ReLU(), L.Dense(64), L.ReLU(), L.Dense(10)], 0), (784,), 32,
                        {}),
    # a frozen convolution between trainable ones: its input gradient runs, its weight gradient
    # lands past the trainable slab; the norm's early partials skip it; clipping by norm acts
    "conv_middle": (lambda: _frozen([L.Conv2D(8, 3, padding=1, bias=False), L.BatchNorm(), L.ReLU(),
                                     L.Conv2D(16, 3, stride=2, padding=1), L.ReLU(), L.GlobalAvgPool2D(),
                                     L.Dense(10)], 3), (3, 16, 16), 16, {"clip_grad_norm": 0.05}),
    # a frozen BatchNorm (statistics still kept) and a frozen output Dense (the loss-fused head);
    # no bias before a BatchNorm, frozen or not: its gradient is zero up to rounding, which AdamW
    # amplifies (measured 3e-2 apart from the cpu with one, on an H100)
    "batchnorm_and_head": (lambda: _frozen([L.Conv2D(8, 3, padding=1, bias=False), L.BatchNorm(), L.ReLU(),
                                            L.Flatten(), L.Dense(32), L.ReLU(), L.Dense(10)], 1, 6), (3, 8, 8), 16,
                           {}),
    # a frozen stem: no backward below the first trainable layer
    "stem": (lambda: _frozen([L.Conv2D(8, 3, padding=1), L.ReLU(), L.Conv2D(8, 3, padding=1), L.ReLU(),
                              L.GlobalAvgPool2D(), L.Dense(10)], 0, 2), (3, 12, 12), 16, {}),
}


@cuda_only
@pytest.mark.parametrize("name", sorted(FROZEN_MODELS))
def test_frozen_layers_match_cpu(name, rng):
    build, shape, batch, kw = FROZEN_MODELS[name]
    # eps 1e-6: a normalized activation within rounding of 0 can fall either side of a ReLU, and a
    # weight whose gradient is that activation alone moves lr-sized under eps 1e-8 (batchnorm_and_head's
    # dense_4 measured 3.2e-4 from the cpu so, on an H100)
    cpu, gpu = pair(build, shape, opt=lambda: optim.AdamW(1e-3, weight_decay=0.1, eps=1e-6), batch=batch, **kw)
    before = cpu.get_parameters()
    compare_training(cpu, gpu, rng, rows=[batch, batch - 5])
    after = gpu.get_parameters()
    frozen = [k for k in before if k not in cpu.get_optimizer_state()["exp_avg"] and "running" not in k]
    assert frozen
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k])
    assert sorted(gpu.get_optimizer_state()["exp_avg"]) == sorted(cpu.get_optimizer_state()["exp_avg"])
