"""Shared by the tests/test_cuda_*.py files: the cuda backend against the cpu backend, same initial
weights and batches. Holds the skip mark (cuda not built or no GPU), the tolerances, the engine pair
and the training comparison, and the model tables more than one of those files uses. No tests here."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import losses, optim

from layer_refs import rel_err

HAVE_CUDA = "cuda" in mpscy.backends()
cuda_only = pytest.mark.skipif(not HAVE_CUDA, reason="cuda backend not built or no GPU here")

PARAM_TOL = 1e-4
FORWARD_TOL = 1e-5


# Adam's eps for a model whose comparison needs a larger one. Adam's first step is
# lr * g / (|g| + eps): a weight whose gradient is at float32's rounding level moves by a share of
# lr set by that rounding. With the suite's data, conv_implicit_pads' second convolution has such
# a weight (its first gradient -3.3e-9 in float64, 3e-7 of the largest): cpu runs with BLAS's and
# with gemm.c's products, with 1, 2 or 16 threads, and cuda all land 3-5e-4 from float64's
# parameters after 20 steps (torch in float64) and up to 1.9e-4 from each other (BLAS's 1 against
# 16 threads: 9.2e-5), so 1e-4 between two of them was chance. With eps = 1e-6 the same pairs
# agree within 1.6e-6 to 3.8e-6.
# eps 1e-6 where an element's gradient can sit within rounding of 0, which Adam under eps 1e-8
# turns into an lr-sized step either way: conv_s2_dgrad_wide measured 5.6e-4 from the cpu so on an
# H100, split or not, on the batches of test_one_conv_over_sub_batches_among_others_matches_cpu
# (with SGD 2.4e-7, eps 1e-6 3.6e-5, its gradients 1.2e-6)
ADAM_EPS = {"conv_implicit_pads": 1e-6, "conv_s2_dgrad_wide": 1e-6}


def pair(build, input_shape, loss="sparse_cross_entropy", opt=lambda: optim.Adam(1e-3), batch=16, **kw):
    """The same model on cpu and on cuda, with identical initial parameters."""
    out = []
    for dev in ("cpu", "cuda"):
        out.append(mpscy.Engine(mpscy.Sequential(build(), input_shape=input_shape), loss=loss, optimizer=opt(),
                                batch_size=batch, device=dev, seed=3, **kw))
    return out


def targets(rng, loss, n, out_shape):
    kind = losses.get(loss).kind
    if kind == "sparse_cross_entropy":
        return rng.integers(0, out_shape[0], size=n).astype(np.int32)
    if kind in ("cross_entropy", "categorical_cross_entropy"):
        z = rng.standard_normal((n,) + out_shape)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return p.astype(np.float32)
    if kind in ("binary_cross_entropy", "bce_with_logits"):
        t = rng.uniform(0, 1, (n,) + out_shape)
        t[: n // 2] = np.round(t[: n // 2])
        return t.astype(np.float32)
    return rng.standard_normal((n,) + out_shape).astype(np.float32)


def compare_training(cpu, gpu, rng, steps=20, rows=None, schedule=None):
    """Trains both engines on the same batches; checks losses, accuracies and every parameter."""
    shape = cpu.model.input_shapes[0]
    b = cpu.batch_size
    for s in range(steps):
        n = rows[s % len(rows)] if rows else b
        x = rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
        y = targets(rng, cpu.loss, n, tuple(cpu.model.output_shape))
        if schedule:
            cpu.learning_rate = gpu.learning_rate = schedule(s)
        rc, rg = cpu.step(x, y), gpu.step(x, y)
        assert rg.batch_size == n and rg.applied
        assert abs(rg.loss - rc.loss) <= 1e-4 * max(abs(rc.loss), 1e-3), (s, rc.loss, rg.loss)
        if rc.accuracy is not None:
            assert abs(rg.accuracy - rc.accuracy) <= 1.0 / (n * np.prod(cpu.model.output_shape)) + 1e-12
    pc, pg = cpu.get_parameters(), gpu.get_parameters()
    assert pc.keys() == pg.keys()
    worst = {k: rel_err(pg[k], pc[k]) for k in pc}
    assert max(worst.values()) <= PARAM_TOL, worst
    return worst


def compare_gradients(cpu, gpu, x, y, tol=PARAM_TOL):
    """One gradients() call on each engine (built with input_gradients): the same keys, the
    input's among them, and every gradient within tol of the cpu's."""
    gc, gg = cpu.gradients(x, y), gpu.gradients(x, y)
    assert gc.keys() == gg.keys() and "input" in gg
    for k in gc:
        if k != "loss":
            err = rel_err(gg[k], gc[k])
            assert err <= tol, (k, err)
    return gc, gg


def _maybe(name):
    if not hasattr(L, name):
        pytest.skip(f"layers.{name} is not in this mpscy")
    return getattr(L, name)


LAYER_MODELS = {
    "dense_relu": (lambda: [L.Dense(24), L.ReLU(), L.Dense(16), L.ReLU(), L.Dense(5)], (12,)),
    "dense_nobias_relu": (lambda: [L.Dense(24, bias=False), L.ReLU(), L.Dense(5, bias=False)], (12,)),
    "odd_sizes": (lambda: [L.Dense(7), L.ReLU(), L.Dense(3), L.Tanh(), L.Dense(5)], (13,)),  # unaligned biases
    "leakyrelu": (lambda: [L.Dense(20), L.LeakyReLU(0.1), L.Dense(5)], (12,)),
    "elu": (lambda: [L.Dense(20), L.ELU(0.7), L.Dense(5)], (12,)),
    "sigmoid": (lambda: [L.Dense(20), L.Sigmoid(), L.Dense(5)], (12,)),
    "tanh": (lambda: [L.Dense(20), L.Tanh(), L.Dense(5)], (12,)),
    "swish": (lambda: [L.Dense(20), L.Swish(), L.Dense(5)], (12,)),
    "gelu": (lambda: [L.Dense(20), L.GELU(), L.Dense(5)], (12,)),
    "gelu_tanh": (lambda: [L.Dense(20), L.GELU(approximate="tanh"), L.Dense(5)], (12,)),
    # (their kinks: test_layers.py's test_piecewise_activations_at_their_kinks, on every device)
    "relu6": (lambda: [L.Dense(20), _maybe("ReLU6")(), L.Dense(5)], (12,)),
    "hardsigmoid": (lambda: [L.Dense(20), _maybe("Hardsigmoid")(), L.Dense(5)], (12,)),
    "hardswish": (lambda: [L.Dense(20), _maybe("Hardswish")(), L.Dense(5)], (12,)),
    "softplus": (lambda: [L.Dense(20), _maybe("Softplus")(beta=2.0, threshold=1.0), L.Dense(5)], (12,)),
    "mish": (lambda: [L.Dense(20), _maybe("Mish")(), L.Dense(5)], (12,)),
    "relu_first": (lambda: [L.ReLU(), L.Dense(16), L.Softmax(), L.Dense(5)], (12,)),
    "flatten": (lambda: [L.Flatten(), L.Dense(16), L.ReLU(), L.Dense(5)], (3, 4, 2)),
    "dense_rank3_input": (lambda: [L.Dense(16), L.ReLU(), L.Dense(5)], (3, 4, 2)),
    # K >= 1024 (the small-GEMM kernel's split-K): with bias and fused ReLU; then K % 4 != 0, no
    # bias, and a partial last tile of outputs
    "dense_long_k": (lambda: [L.Dense(100), L.ReLU(), L.Dense(5)], (1100,)),
    "dense_long_k_odd": (lambda: [L.Dense(70, bias=False), L.Tanh(), L.Dense(5)], (1027,)),
    "softmax_inner_axis": (lambda: [L.Softmax(axis=1), L.Flatten(), L.Dense(5)], (3, 4)),
    "conv_pool": (lambda: [_maybe("Conv2D")(6, 3, 1, 1), L.ReLU(), _maybe("MaxPool2D")(2),
                           _maybe("Conv2D")(5, 3, 2, 1), _maybe("AvgPool2D")(2), L.Flatten(), L.Dense(5)], (3, 10, 10)),
    "conv_gap": (lambda: [_maybe("Conv2D")(4, 3), L.Tanh(), _maybe("GlobalAvgPool2D")(), L.Dense(5)], (2, 7, 7)),
    # nearest upsampling between convolutions (a decoder's shape): the input's gradient as well, and
    # unequal factors on a direct path to the head
    "upsample": (lambda: [_maybe("Conv2D")(6, 3, padding=1), L.ReLU(), _maybe("Upsample")(scale_factor=2),
                          _maybe("Conv2D")(4, 3, padding=1), L.Tanh(), _maybe("Upsample")(scale_factor=(1, 3)), L.Flatten(),
                          L.Dense(5)], (3, 5, 4)),
    "upsample_first": (lambda: [_maybe("Upsample")(scale_factor=(3, 2)), _maybe("Conv2D")(4, 3), L.ReLU(), L.Flatten(), L.Dense(5)],
                       (2, 4, 5)),
    # transposed convolutions: a decoder's (stride 2 with output_padding after a strided Conv2D, then a
    # 2x2 stride-2 one with groups and no bias), and one on the input (no input gradient), dilated
    "convtranspose": (lambda: [_maybe("Conv2D")(6, 3, stride=2, padding=1), L.ReLU(),
                               _maybe("ConvTranspose2D")(4, 3, stride=2, padding=1, output_padding=1), L.Tanh(),
                               _maybe("ConvTranspose2D")(4, 2, stride=2, groups=2, bias=False), L.Flatten(),
                               L.Dense(5)], (3, 6, 5)),
    "convtranspose_first": (lambda: [_maybe("ConvTranspose2D")(5, (3, 2), stride=(1, 2), dilation=(2, 1)), L.ReLU(),
                                     L.Flatten(), L.Dense(5)], (3, 4, 5)),
    # a generator's Dense -> Reshape -> ConvTranspose2D (the Reshape is the native Flatten, aliased)
    "reshape_generator": (lambda: [L.Dense(48), L.ReLU(), _maybe("Reshape")((3, 4, 4)),
                                   _maybe("ConvTranspose2D")(4, 4, stride=2, padding=1), L.Tanh(), L.Flatten(), L.Dense(5)],
                          (10,)),
    # bilinear: up by 2 between convolutions, then to a size that is no multiple (both
    # align_corners), then down to a smaller one before the head
    "bilinear": (lambda: [_maybe("Conv2D")(6, 3, padding=1), L.ReLU(), _maybe("Upsample")(scale_factor=2, mode="bilinear"),
                          _maybe("Conv2D")(4, 3, padding=1), L.Tanh(),
                          _maybe("Upsample")(size=(13, 7), mode="bilinear", align_corners=True),
                          _maybe("Upsample")(size=(5, 6), mode="bilinear"), L.Flatten(), L.Dense(5)], (3, 5, 4)),
    # no bias before BatchNorm: its gradient is zero up to rounding, which Adam would amplify
    "batchnorm": (lambda: [L.Dense(20, bias=False), _maybe("BatchNorm")(), L.ReLU(), L.Dense(5)], (12,)),
    "batchnorm2d": (lambda: [_maybe("Conv2D")(4, 3, 1, 1, bias=False), _maybe("BatchNorm")(), L.ReLU(), L.Flatten(),
                             L.Dense(5)], (2, 6, 6)),
    "layernorm": (lambda: [L.Dense(20), _maybe("LayerNorm")(20), L.GELU(), L.Dense(5)], (12,)),
    "dropout": (lambda: [L.Dense(20), L.ReLU(), _maybe("Dropout")(0.3), L.Dense(5)], (12,)),
    "conv_groups_dilation": (lambda: [_maybe("Conv2D")(4, 3, stride=2, padding=2, dilation=2, groups=2), L.ELU(),
                                      _maybe("MaxPool2D")(3, stride=2, padding=1), L.Flatten(), L.Dense(5)], (4, 9, 9)),
    "conv_relu_dense": (lambda: [_maybe("Conv2D")(5, 3, padding=1), L.ReLU(), L.Dense(16), L.ReLU(), L.Dense(5)],
                        (2, 5, 5)),
    # groups 1 and K = C*KH*KW <= 32: the forward is conv_direct_kernel (the README CNN's first
    # layer, 3 -> 32, 3x3, pad 1, fused ReLU); stride 2 with dilation 2 and no ReLU; K = 32 exactly
    # (C = 2, 4x4) with 70 channels (blocks of channel chunks, a partial last quad); K = 33 is
    # past the bound (im2col + the product)
    "conv_direct_relu": (lambda: [_maybe("Conv2D")(32, 3, padding=1), L.ReLU(), _maybe("MaxPool2D")(2), L.Flatten(),
                                  L.Dense(5)], (3, 10, 10)),
    "conv_direct_strided": (lambda: [_maybe("Conv2D")(6, 3, stride=2, dilation=2), L.Tanh(), L.Flatten(), L.Dense(5)],
                            (3, 11, 11)),
    "conv_k33_fallback": (lambda: [_maybe("Conv2D")(5, (1, 3), padding=(0, 1)), L.ReLU(), L.Flatten(), L.Dense(5)],
                          (11, 5, 5)),
    "avgpool_no_pad_count": (lambda: [_maybe("AvgPool2D")(3, stride=2, padding=1, count_include_pad=False), L.Flatten(),
                                      L.Dense(5)], (3, 8, 8)),
    "layernorm_2d": (lambda: [_maybe("LayerNorm")((4, 6)), L.Flatten(), L.Dense(5)], (3, 4, 6)),
    # b*OH*OW = 16384: the weight gradient split over K (conv_dw_kernel; cuBLASLt K chunks in tf32)
    "conv_long_k": (lambda: [_maybe("Conv2D")(4, 3, padding=1), L.ReLU(), _maybe("Conv2D")(3, 3, stride=2), L.Flatten(),
                             L.Dense(5)], (2, 32, 32)),
    # b*OH*OW = 4096 with tiles of both sizes, ragged at their edges, groups, and 3x3, 5x5 and 1x1
    # kernels (compiled-size im2col/col2im), then a 2x3 dilated one (the generic pair)
    "conv_long_k_tiles": (lambda: [_maybe("Conv2D")(40, 3, padding=1), L.ReLU(),
                                   _maybe("Conv2D")(36, 5, padding=2, groups=4), L.Tanh(),
                                   _maybe("Conv2D")(8, 1), L.ReLU(), _maybe("Conv2D")(6, (2, 3), dilation=(1, 2)),
                                   L.Flatten(), L.Dense(5)], (3, 16, 16)),
    # b*OH*OW = 144 and 64: small products (the small-GEMM kernel for the weight gradient)
    "conv_one_split": (lambda: [_maybe("Conv2D")(6, 3), L.ReLU(), _maybe("Conv2D")(4, 2), L.Flatten(), L.Dense(5)],
                       (3, 5, 5)),
    # a stride that is neither 1 nor 2 (col2im's runtime-stride form), unequal strides (generic)
    "conv_stride3": (lambda: [_maybe("Conv2D")(4, 3, padding=1), L.ReLU(), _maybe("Conv2D")(5, 3, stride=3, padding=1),
                              L.Tanh(), _maybe("Conv2D")(3, 3, stride=(1, 2)), L.Flatten(), L.Dense(5)], (2, 11, 11)),
    # forward grids under two blocks per SM with K of 288 and 400: the product split over K into
    # partials (conv_fwd_sum adds them, the bias and the fused ReLU; then without a ReLU)
    "conv_split_fwd": (lambda: [_maybe("Conv2D")(16, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 5, padding=2),
                                L.Tanh(), L.Flatten(), L.Dense(5)], (32, 8, 8)),
    # K = 130*3*3 = 1170 (37 K steps of the forward and dcol products), the longest of these models
    "conv_wide_k": (lambda: [_maybe("Conv2D")(8, 3, padding=1), L.ReLU(), L.Flatten(), L.Dense(5)], (130, 4, 4)),
    # 3x3 stride-2 pad-1 convolutions of even H and W: dx as conv_dgrad_s2's four parity products
    # (C = 8 -> 16, fused ReLU; then C = 64 > 32 on 6 x 10, no ReLU), and with odd H col2im's
    "conv_s2_dgrad": (lambda: [_maybe("Conv2D")(8, 3, padding=1), L.ReLU(), _maybe("Conv2D")(16, 3, 2, 1), L.ReLU(),
                               L.Flatten(), L.Dense(5)], (3, 8, 8)),
    "conv_s2_dgrad_wide": (lambda: [_maybe("Conv2D")(64, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 3, 2, 1),
                                    L.Tanh(), L.Flatten(), L.Dense(5)], (2, 6, 10)),
    "conv_s2_odd_h": (lambda: [_maybe("Conv2D")(4, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 3, 2, 1), L.Flatten(),
                               L.Dense(5)], (2, 7, 8)),
    # 3x3 convolutions whose output rows tile 64 columns (OW divides 64, OH*OW a multiple of 64):
    # the forward as conv_implicit.cu's product (no columns on the main stream), and with stride 1
    # dx too. C = 5 (one stage of 8 channels, 3 past C) -> 40 (a 64-row tile, 24 rows past OC),
    # then 40 -> 6 in 5 stages split over two partials (16 blocks), no fused ReLU, whose dx is
    # the implicit product of dz (6 channels) with W flipped
    "conv_implicit_s1": (lambda: [_maybe("Conv2D")(40, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 3, padding=1),
                                  L.Tanh(), L.Flatten(), L.Dense(5)], (5, 8, 8)),
    # dx with padding 0 (dz read with padding 2) and 2 (dz read with none); a forward with padding 2
    # and a partial second stage (C = 12); the other products on the im2col path (6 x 6, 10 x 10)
    "conv_implicit_pads": (lambda: [_maybe("Conv2D")(16, 3), L.ReLU(), _maybe("Conv2D")(12, 3), L.ReLU(),
                                    _maybe("Conv2D")(8, 3, padding=2), L.Tanh(), _maybe("Conv2D")(4, 3, padding=2),
                                    L.Flatten(), L.Dense(5)], (3, 10, 10)),
    # stride 2 with output rows of 32 (a patch of 5 x 65), and stride 1 with rows of 4 (16 rows a
    # tile, a patch of 18 x 6) with dx on 16 x 4
    "conv_implicit_s2_wide": (lambda: [_maybe("Conv2D")(10, 3, stride=2, padding=1), L.ReLU(), L.Flatten(),
                                       L.Dense(5)], (8, 4, 64)),
    "conv_implicit_narrow": (lambda: [_maybe("Conv2D")(10, 3, padding=1), L.ReLU(), _maybe("Conv2D")(6, 3, padding=1),
                                      L.Flatten(), L.Dense(5)], (9, 16, 4)),
}


FUSED_MODELS = {
    "dense_relu": (LAYER_MODELS["dense_relu"][0], (12,), 16),
    "no_bias": (LAYER_MODELS["dense_nobias_relu"][0], (12,), 16),
    "one_layer": (lambda: [L.Dense(5)], (12,), 16),
    # Dense after Dense without an activation, a 40-class head (three 16-wide logit chunks)
    "deep_linear_mix": (lambda: [L.Dense(64), L.ReLU(), L.Dense(48), L.Dense(33), L.ReLU(), L.Dense(40)], (50,), 24),
    "benchmark_mlp": (lambda: [L.Dense(128), L.ReLU(), L.Dense(64), L.ReLU(), L.Dense(10)], (784,), 32),
    # rows wider than a block's threads: d(input) element loops instead of thread groups
    "wide_rows": (lambda: [L.Dense(600), L.ReLU(), L.Dense(520), L.ReLU(), L.Dense(40)], (100,), 24),
    # the most layers the one-kernel step takes (8), ReLU on every other one
    "eight_layers": (lambda: [x for k in range(7) for x in ([L.Dense(20 + k), L.ReLU()] if k % 2 else [L.Dense(20 + k)])]
                     + [L.Dense(6)], (9,), 16),
    # more rows than the weight gradients' loads take at once (72: nine rounds of 8), on 13 and
    # 32 inputs (no 16-byte rows of x); 32 outputs take the gradients' 16-byte dz loads, 7 one float
    "long_batch": (lambda: [L.Dense(32), L.ReLU(), L.Dense(7)], (13,), 72),
}


def _train_step_form(capfd):
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("mpscy: cuda train step:")]
    assert len(lines) == 2 or len(lines) == 1, lines
    return lines[-1].split(": ", 2)[2]
