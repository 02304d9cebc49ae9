"""Every layer of issue 3 against the float64 references in layer_refs.py: the references'
gradients against central finite differences, then the native float32 forward (train-mode loss
and eval-mode predict) and every gradient (parameters and input) against the references, over
awkward shapes; BatchNorm running statistics and modes; dropout masks; option and shape errors;
PyTorch itself where it is installed."""
import copy
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

import layer_refs as R

# ------------------------------------------------------------------ cases

# id -> (layer factory, reference kind, reference options, per-sample input shape, rows)
CASES = {
    # convolution: odd sizes, non-square kernels and strides, dilation, groups, batch 1, 1x1,
    # channels that are not multiples of 8, "same", a kernel as large as the input
    "conv_3x3_pad1": (lambda: layers.Conv2D(4, 3, padding=1), "conv2d",
                      dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1), (3, 7, 9), 3),
    "conv_2x3_stride2_pad": (lambda: layers.Conv2D(6, (2, 3), stride=2, padding=(1, 2)), "conv2d",
                             dict(kernel=(2, 3), stride=(2, 2), padding=(1, 2), dilation=(1, 1), groups=1), (3, 8, 9), 2),
    "conv_dilation2": (lambda: layers.Conv2D(5, 3, dilation=2, padding=2), "conv2d",
                       dict(kernel=(3, 3), stride=(1, 1), padding=(2, 2), dilation=(2, 2), groups=1), (2, 9, 7), 2),
    "conv_groups2": (lambda: layers.Conv2D(6, 3, groups=2, padding=1), "conv2d",
                     dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2), (4, 6, 5), 3),
    "conv_depthwise_3x1_stride12": (lambda: layers.Conv2D(10, (3, 1), groups=5, stride=(1, 2)), "conv2d",
                                    dict(kernel=(3, 1), stride=(1, 2), padding=(0, 0), dilation=(1, 1), groups=5),
                                    (5, 7, 8), 2),
    # one filter a channel (groups = C = OC); at stride 1 the cpu's direct stencil (conv.c's depthwise_plane)
    "conv_depthwise_3x3_p1": (lambda: layers.Conv2D(6, 3, groups=6, padding=1), "conv2d",
                              dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=6),
                              (6, 7, 9), 3),
    "conv_depthwise_3x5_dil21_p21": (lambda: layers.Conv2D(4, (3, 5), groups=4, padding=(2, 1), dilation=(2, 1),
                                                           bias=False), "conv2d",
                                     dict(kernel=(3, 5), stride=(1, 1), padding=(2, 1), dilation=(2, 1), groups=4),
                                     (4, 9, 8), 2),
    "conv_depthwise_3x3_s2_p1": (lambda: layers.Conv2D(5, 3, groups=5, stride=2, padding=1), "conv2d",
                                 dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=5),
                                 (5, 9, 8), 3),
    "conv_depthwise_5x3_dil21_s12": (lambda: layers.Conv2D(4, (5, 3), groups=4, stride=(1, 2), padding=(2, 1),
                                                           dilation=(2, 1), bias=False), "conv2d",
                                     dict(kernel=(5, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=4),
                                     (4, 11, 10), 2),
    "conv_batch1_nobias_c13": (lambda: layers.Conv2D(7, 3, stride=(2, 1), bias=False), "conv2d",
                               dict(kernel=(3, 3), stride=(2, 1), padding=(0, 0), dilation=(1, 1), groups=1),
                               (13, 9, 7), 1),
    "conv_1x1": (lambda: layers.Conv2D(9, 1), "conv2d",
                 dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1), (5, 4, 6), 3),
    "conv_same_5x5": (lambda: layers.Conv2D(3, 5, padding="same"), "conv2d",
                      dict(kernel=(5, 5), stride=(1, 1), padding=(2, 2), dilation=(1, 1), groups=1), (2, 7, 7), 2),
    "conv_kernel_is_input": (lambda: layers.Conv2D(3, (7, 9)), "conv2d",
                             dict(kernel=(7, 9), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1), (2, 7, 9), 2),
    "conv_stride2_dil2_groups": (lambda: layers.Conv2D(4, 3, stride=2, padding=3, dilation=2, groups=2), "conv2d",
                                 dict(kernel=(3, 3), stride=(2, 2), padding=(3, 3), dilation=(2, 2), groups=2),
                                 (6, 11, 8), 3),
    # many samples: several chunks per worker thread and a partial batch (built for 48)
    "conv_chunked_40_of_48": (lambda: layers.Conv2D(12, 3, padding=1), "conv2d",
                              dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                              (8, 16, 16), 40),
    # the AVX-512 products (objc/cpu/gemm.c) at their edges: 11 filters (row blocks of 8, 2
    # and 1), 3 samples a chunk of 143 positions (429 columns: 13 masked at the right, and a
    # weight gradient over 429 = 26 * 16 + 13), K = 45 for dx's columns (8 * 5 + 4 + 1 rows);
    # then groups, whose products start inside the matrices
    "conv_fma_edges": (lambda: layers.Conv2D(11, 3, padding=1), "conv2d",
                       dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                       (5, 13, 11), 6),
    "conv_fma_groups": (lambda: layers.Conv2D(6, 3, groups=2, padding=1), "conv2d",
                        dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2),
                        (4, 12, 12), 5),
    # K = 288: two blocks of k (256 and 32) summed into each output
    "conv_fma_long_k": (lambda: layers.Conv2D(10, 3, padding=1), "conv2d",
                        dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                        (32, 6, 6), 4),
    # pooling
    "maxpool_2": (lambda: layers.MaxPool2D(2), "maxpool2d", dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0)),
                  (3, 8, 8), 3),
    "maxpool_3_s2_p1_odd": (lambda: layers.MaxPool2D(3, 2, 1), "maxpool2d",
                            dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1)), (3, 9, 7), 2),
    "maxpool_2x3_s12": (lambda: layers.MaxPool2D((2, 3), stride=(1, 2)), "maxpool2d",
                        dict(kernel=(2, 3), stride=(1, 2), padding=(0, 0)), (2, 5, 9), 2),
    "avgpool_3_s2_p1": (lambda: layers.AvgPool2D(3, 2, 1), "avgpool2d",
                        dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1)), (3, 9, 7), 2),
    "avgpool_exclude_pad": (lambda: layers.AvgPool2D(3, 2, 1, count_include_pad=False), "avgpool2d",
                            dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), count_include_pad=False), (3, 9, 7), 2),
    "avgpool_3x2_s21_batch1": (lambda: layers.AvgPool2D((3, 2), stride=(2, 1)), "avgpool2d",
                               dict(kernel=(3, 2), stride=(2, 1), padding=(0, 0)), (4, 7, 6), 1),
    "globalavgpool": (lambda: layers.GlobalAvgPool2D(), "globalavgpool2d", {}, (5, 3, 7), 3),
    # reshapes (the native Flatten with a target shape): features to an image, an inferred axis,
    # torch's Unflatten of the first and of the last axis
    "reshape_to_image": (lambda: layers.Reshape((2, 3, 4)), "reshape", dict(shape=(2, 3, 4)), (24,), 3),
    "reshape_inferred": (lambda: layers.Reshape((-1, 6)), "reshape", dict(shape=(10, 6)), (3, 4, 5), 2),
    "unflatten_first": (lambda: layers.Unflatten(1, (2, -1)), "reshape", dict(shape=(2, 4, 3)), (8, 3), 2),
    "unflatten_last": (lambda: layers.Unflatten(-1, (3, 2)), "reshape", dict(shape=(4, 3, 2)), (4, 6), 1),
    # transposed convolution: a decoder's stride 2 (with and without output_padding), unequal
    # kernels, strides and padding, dilation, groups, no bias, batch 1, a 1x1, and a large one
    "convt_3x3_s2_op1": (lambda: layers.ConvTranspose2D(4, 3, stride=2, padding=1, output_padding=1), "convtranspose2d",
                         dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), output_padding=(1, 1),
                              groups=1), (3, 5, 6), 3),
    "convt_4x4_s2_p1": (lambda: layers.ConvTranspose2D(5, 4, stride=2, padding=1), "convtranspose2d",
                        dict(kernel=(4, 4), stride=(2, 2), padding=(1, 1), dilation=(1, 1), output_padding=(0, 0),
                             groups=1), (3, 4, 4), 2),
    "convt_2x3_s21_pad": (lambda: layers.ConvTranspose2D(6, (2, 3), stride=(2, 1), padding=(0, 1)), "convtranspose2d",
                          dict(kernel=(2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 1), output_padding=(0, 0),
                               groups=1), (4, 5, 7), 2),
    "convt_dilation_groups": (lambda: layers.ConvTranspose2D(6, 3, stride=3, dilation=2, groups=2,
                                                             output_padding=(2, 1), bias=False), "convtranspose2d",
                              dict(kernel=(3, 3), stride=(3, 3), padding=(0, 0), dilation=(2, 2), output_padding=(2, 1),
                                   groups=2), (4, 3, 4), 2),
    # output_padding at or above the stride but below the dilation, as torch allows
    "convt_outpad_dilation": (lambda: layers.ConvTranspose2D(3, 3, output_padding=(1, 0), dilation=(2, 3)),
                              "convtranspose2d", dict(kernel=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(2, 3),
                                                      output_padding=(1, 0), groups=1), (2, 4, 3), 2),
    "convt_1x1_batch1": (lambda: layers.ConvTranspose2D(3, 1), "convtranspose2d",
                         dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), output_padding=(0, 0),
                              groups=1), (5, 4, 3), 1),
    "convt_2x2_s2_large": (lambda: layers.ConvTranspose2D(16, 2, stride=2), "convtranspose2d",
                           dict(kernel=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), output_padding=(0, 0),
                                groups=1), (24, 20, 18), 3),
    # upsampling (nearest): square and unequal factors, Keras's name, and a plane large enough to be split
    "upsample_2": (lambda: layers.Upsample(scale_factor=2), "upsample2d", dict(scale=(2, 2)), (3, 4, 5), 3),
    "upsample_1x3": (lambda: layers.UpSampling2D((1, 3)), "upsample2d", dict(scale=(1, 3)), (2, 5, 4), 2),
    "upsample_3x2": (lambda: layers.Upsample(scale_factor=(3, 2)), "upsample2d", dict(scale=(3, 2)), (2, 3, 7), 1),
    "upsample_2_large": (lambda: layers.Upsample(scale_factor=2.0), "upsample2d", dict(scale=(2, 2)), (8, 48, 40), 2),
    # torch's size= (the output's (H, W)) and its "nearest-exact", the same for whole factors; numpy factors
    "upsample_size": (lambda: layers.Upsample(size=(12, 5), mode="nearest-exact"), "upsample2d", dict(scale=(3, 1)),
                      (2, 4, 5), 2),
    "upsample_numpy": (lambda: layers.Upsample(scale_factor=np.array([2, 3])), "upsample2d", dict(scale=(2, 3)), (2, 3, 3), 2),
    # bilinear: whole factors, both align_corners, sizes that are no multiple (up and down), a side
    # of 1 (in and out), Keras's name, a recomputed fractional factor, and a plane large enough to be split
    "bilinear_2": (lambda: layers.Upsample(scale_factor=2, mode="bilinear"), "upsample2d",
                   dict(size=(8, 10), align_corners=False), (3, 4, 5), 3),
    "bilinear_2_align": (lambda: layers.Upsample(scale_factor=2, mode="bilinear", align_corners=True), "upsample2d",
                         dict(size=(8, 10), align_corners=True), (3, 4, 5), 2),
    "bilinear_size_up_down": (lambda: layers.Upsample(size=(11, 3), mode="bilinear"), "upsample2d",
                              dict(size=(11, 3), align_corners=False), (2, 4, 7), 2),
    "bilinear_size_align": (lambda: layers.Upsample(size=(5, 13), mode="bilinear", align_corners=True), "upsample2d",
                            dict(size=(5, 13), align_corners=True), (2, 7, 4), 2),
    "bilinear_side_1": (lambda: layers.Upsample(size=(1, 6), mode="bilinear"), "upsample2d",
                        dict(size=(1, 6), align_corners=False), (2, 5, 1), 2),
    "bilinear_side_1_align": (lambda: layers.Upsample(size=(1, 6), mode="bilinear", align_corners=True), "upsample2d",
                              dict(size=(1, 6), align_corners=True), (2, 5, 1), 2),
    "bilinear_keras": (lambda: layers.UpSampling2D((3, 2), interpolation="bilinear"), "upsample2d",
                       dict(size=(9, 8), align_corners=False), (2, 3, 4), 2),
    "bilinear_half_align": (lambda: layers.Upsample(scale_factor=(0.5, 1.75), mode="bilinear", align_corners=True),
                            "upsample2d", dict(size=(3, 12), align_corners=True), (2, 7, 7), 2),
    "bilinear_recompute": (lambda: layers.Upsample(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True),
                           "upsample2d", dict(size=(7, 10), align_corners=False), (2, 5, 7), 2),
    "bilinear_2_large": (lambda: layers.Upsample(scale_factor=2, mode="bilinear"), "upsample2d",
                         dict(size=(96, 80), align_corners=False), (8, 48, 40), 2),
    # normalization (train-mode loss and gradients; predict in eval mode)
    "batchnorm_features": (lambda: layers.BatchNorm(), "batchnorm", dict(eps=1e-5), (7,), 6),
    "batchnorm_channels": (lambda: layers.BatchNorm(momentum=0.3, eps=1e-3), "batchnorm", dict(eps=1e-3),
                           (5, 3, 4), 3),
    "batchnorm_no_affine": (lambda: layers.BatchNorm(affine=False), "batchnorm", dict(eps=1e-5), (3, 5, 5), 2),
    "batchnorm_channels_batch1": (lambda: layers.BatchNorm(), "batchnorm", dict(eps=1e-5), (4, 3, 3), 1),
    "layernorm_features": (lambda: layers.LayerNorm(6), "layernorm", dict(dims=1, eps=1e-5), (6,), 4),
    "layernorm_chw": (lambda: layers.LayerNorm((3, 4, 5)), "layernorm", dict(dims=3, eps=1e-5), (3, 4, 5), 3),
    "layernorm_last2": (lambda: layers.LayerNorm((4, 5)), "layernorm", dict(dims=2, eps=1e-5), (3, 4, 5), 2),
    "layernorm_last2_plain": (lambda: layers.LayerNorm((4, 5), eps=1e-3, elementwise_affine=False), "layernorm",
                              dict(dims=2, eps=1e-3), (3, 4, 5), 2),
    # activations (small, and large enough to be split over the worker threads)
    "relu": (lambda: layers.ReLU(), "activation", dict(kind="relu"), (3, 5, 4), 5),
    "relu_large": (lambda: layers.ReLU(), "activation", dict(kind="relu"), (16, 32, 32), 3),
    "leakyrelu": (lambda: layers.LeakyReLU(0.2), "activation", dict(kind="leakyrelu", r=0.2), (3, 5, 4), 5),
    "leakyrelu_default": (lambda: layers.LeakyReLU(), "activation", dict(kind="leakyrelu", r=0.01), (11,), 4),
    "elu": (lambda: layers.ELU(0.7), "activation", dict(kind="elu", r=0.7), (3, 5, 4), 5),
    "sigmoid": (lambda: layers.Sigmoid(), "activation", dict(kind="sigmoid"), (3, 5, 4), 5),
    "tanh": (lambda: layers.Tanh(), "activation", dict(kind="tanh"), (3, 5, 4), 5),
    "swish": (lambda: layers.Swish(), "activation", dict(kind="swish"), (3, 5, 4), 5),
    "swish_large": (lambda: layers.SiLU(), "activation", dict(kind="swish"), (40000,), 2),
    "gelu": (lambda: layers.GELU(), "activation", dict(kind="gelu"), (3, 5, 4), 5),
    "gelu_tanh": (lambda: layers.GELU(approximate="tanh"), "activation", dict(kind="gelu_tanh"), (3, 5, 4), 5),
    "gelu_large": (lambda: layers.GELU(), "activation", dict(kind="gelu"), (8, 64, 64), 1),
    "relu6": (lambda: layers.ReLU6(), "activation", dict(kind="relu6"), (3, 5, 4), 5),
    "hardsigmoid": (lambda: layers.Hardsigmoid(), "activation", dict(kind="hardsigmoid"), (3, 5, 4), 5),
    "hardswish": (lambda: layers.Hardswish(), "activation", dict(kind="hardswish"), (3, 5, 4), 5),
    "hardswish_large": (lambda: layers.HardSwish(), "activation", dict(kind="hardswish"), (40000,), 2),
    "softplus": (lambda: layers.Softplus(), "activation", dict(kind="softplus"), (3, 5, 4), 5),
    "softplus_beta": (lambda: layers.Softplus(beta=2.5, threshold=1.5), "activation",
                      dict(kind="softplus", beta=2.5, threshold=1.5), (3, 5, 4), 5),
    "mish": (lambda: layers.Mish(), "activation", dict(kind="mish"), (3, 5, 4), 5),
    "softmax_last": (lambda: layers.Softmax(), "activation", dict(kind="softmax", axis=-1), (9,), 4),
    "softmax_channels": (lambda: layers.Softmax(axis=1), "activation", dict(kind="softmax", axis=1), (3, 4, 5), 3),
    "softmax_channels_large": (lambda: layers.Softmax(axis=1), "activation", dict(kind="softmax", axis=1),
                               (6, 64, 64), 2),
    "flatten": (lambda: layers.Flatten(), "activation", dict(kind="flatten"), (3, 4, 5), 2),
}

SMALL = [k for k in CASES if not k.endswith(("_large", "chunked_40_of_48"))]
# cases the metal backend refuses at build, with the reason
METAL_REFUSED = {"convt_outpad_dilation": "output padding at or above the stride is not implemented on metal"}


def ref_params(engine_params, node):
    """{suffix: float64} of one node's parameters and buffers."""
    return {k.split(".", 1)[1]: v.astype(np.float64) for k, v in engine_params.items() if k.startswith(node + ".")}


def random_params(kind, layer, in_shape, rng):
    """Reference parameters for the finite-difference check (random, not the initializers)."""
    shapes = dict(layer.parameters([in_shape]))
    p = {k: rng.standard_normal(s) for k, s in shapes.items()}
    if "running_var" in p:
        p["running_var"] = np.abs(p["running_var"]) + 0.5
    return p


# ------------------------------------------------------------------ the references are right


@pytest.mark.parametrize("case", SMALL)
def test_reference_gradients_match_finite_differences(case, rng):
    """Each reference's analytic gradient (input and every parameter) agrees with central
    differences of the reference forward to 1e-6 relative, in float64."""
    factory, kind, opts, in_shape, rows = CASES[case]
    layer = factory()
    fwd, bwd = R.LAYERS[kind]
    rows = max(rows, 2) if kind == "batchnorm" and len(in_shape) == 1 else rows
    x = rng.standard_normal((rows,) + in_shape)
    p = {k: v for k, v in random_params(kind, layer, in_shape, rng).items() if not k.startswith("running")}
    y, _ = fwd(x, p, opts)
    weight = rng.standard_normal(y.shape)  # f = sum(weight * y), so d f / d y = weight

    def f():
        return float((fwd(x, p, opts)[0] * weight).sum())

    dx, grads = bwd(weight, fwd(x, p, opts)[1])
    assert R.rel_err(dx, R.numeric_grad(f, x)) < 1e-6
    assert set(grads) == set(p)
    for name in p:
        assert R.rel_err(grads[name], R.numeric_grad(f, p[name])) < 1e-6, name


# ------------------------------------------------------------------ native against references


def build(device, layer, in_shape, batch, seed=3, **kw):
    model = mpscy.Sequential([layer], input_shape=in_shape)
    return mpscy.Engine(model, loss="mse", batch_size=batch, device=device, seed=seed, input_gradients=True, **kw)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] == "maxpool2d"])
def test_maxpool_ties_send_the_gradient_to_the_first_maximum(device, rng, case):
    """Inputs drawn from {0, 1, 2} tie in almost every window: each window's gradient goes to its
    first maximum in row-major order, as torch's (and the reference's) argmax, not to the last
    (a mutation the normal-valued cases could not see)."""
    factory, kind, opts, in_shape, rows = CASES[case]
    engine = build(device, factory(), in_shape, rows)
    x = rng.integers(0, 3, (rows,) + in_shape).astype(np.float32)
    y, cache = R.maxpool2d_forward(x.astype(np.float64), {}, dict(opts, train=True))
    t = rng.standard_normal(y.shape).astype(np.float32)
    _, dy = R.loss_ref("mse", y, t)
    dx, _ = R.maxpool2d_backward(dy, cache)
    assert R.rel_err(engine.gradients(x, t)["input"], dx) < 1e-6


BANDED = {  # (channels, H, W), Conv2D options, batch: one sample's columns past twice L2 on the cpu
    "3x3": ((16, 96, 80), dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1), 3),
    "stride 2, odd": ((32, 131, 127), dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=1), 2),
    "5x5 dilated, groups": ((16, 80, 72), dict(kernel=(5, 5), stride=(1, 1), padding=(4, 4), dilation=(2, 2), groups=2),
                            2),
}


@pytest.mark.parametrize("case", list(BANDED))
def test_convolution_in_bands_of_output_rows_matches_reference(device, rng, case):
    """Convolutions whose one sample's im2col columns exceed L2 (K x OH x OW past 2^20 floats) run
    in bands of output rows on the cpu, forward and backward (a stride's phase planes, groups and
    dilation, dx summed across two bands): loss, every gradient and d loss / d x within 1e-5 of
    the float64 reference, the input's gradient accumulating into a second consumer's; y and dx
    the same bits on 1 and 3 threads."""
    shape, o, rows = BANDED[case]
    inp = mpscy.Input(shape)
    conv = lambda name: layers.Conv2D(8, o["kernel"], stride=o["stride"], padding=o["padding"],  # noqa: E731
                                      dilation=o["dilation"], groups=o["groups"], name=name)
    model = mpscy.Model(inp, layers.Add()([conv("a")(inp), conv("b")(inp)]))  # x's gradient: b's adds to a's
    x = rng.standard_normal((rows,) + shape).astype(np.float32)
    runs = {}
    for threads in (1, 3) if device == "cpu" else (0,):
        engine = mpscy.Engine(model, loss="mse", batch_size=rows, device=device, seed=2, input_gradients=True,
                              threads=threads)
        P = engine.get_parameters()
        (ya, ca), (yb, cb) = (R.conv2d_forward(x.astype(np.float64), {k.split(".", 1)[1]: v.astype(np.float64)
                                                                      for k, v in P.items() if k[0] == n}, o)
                              for n in "ab")
        t = rng.standard_normal(ya.shape).astype(np.float32) if not runs else next(iter(runs.values()))[2]
        loss, dy = R.loss_ref("mse", ya + yb, t)
        (dxa, ga), (dxb, gb) = R.conv2d_backward(dy, ca), R.conv2d_backward(dy, cb)
        g = engine.gradients(x, t)
        assert abs(g["loss"] - loss) <= 1e-5 * loss
        assert R.rel_err(engine.predict(x), ya + yb) < 1e-5
        assert R.rel_err(g["input"], dxa + dxb) < 1e-5
        for n, grads in (("a", ga), ("b", gb)):
            for k, v in grads.items():
                assert R.rel_err(g[f"{n}.{k}"], v) < 1e-5, f"{n}.{k}"
        runs[threads] = (engine.predict(x), g["input"], t)
    if device == "cpu":
        assert np.array_equal(runs[1][0], runs[3][0]) and np.array_equal(runs[1][1], runs[3][1])


def test_avgpool_over_a_window_of_two_to_the_32_taps(device):
    """AvgPool2D(65536, stride 1, padding 32768) over a 1x1 plane, count_include_pad: every one
    of the 2x2 outputs divides the one pixel by 2^32 taps (a count that wraps to 0 in 32-bit
    arithmetic: inf), and the pixel's gradient sums the four outputs' shares."""
    engine = build(device, layers.AvgPool2D(65536, stride=1, padding=32768), (3, 1, 1), 2)
    x = np.array([1.0, -3.0, 2.0**20, 7.0, 0.5, -1.0], np.float32).reshape(2, 3, 1, 1)
    y = engine.predict(x)
    assert y.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(y, np.broadcast_to(x * np.float32(2.0**-32), y.shape))
    t = np.zeros(y.shape, np.float32)
    dy = 2.0 * y.astype(np.float64) / y.size                 # mse's gradient
    want = dy.sum(axis=(2, 3), keepdims=True) * 2.0**-32
    assert R.rel_err(engine.gradients(x, t)["input"], want) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_reference(device, rng, case):
    """Train-mode loss and every gradient (parameters and d loss / d x) within 1e-4 relative of
    the float64 reference; eval-mode predict within 1e-5."""
    if device == "metal" and case in METAL_REFUSED:
        with pytest.raises(mpscy.UnsupportedError, match=METAL_REFUSED[case]):
            build(device, CASES[case][0](), CASES[case][3], CASES[case][4])
        return
    factory, kind, opts, in_shape, rows = CASES[case]
    layer = factory()
    batch = 48 if case == "conv_chunked_40_of_48" else rows
    engine = build(device, layer, in_shape, batch)
    node = engine.model.nodes[1].name
    P = engine.get_parameters()
    p = ref_params(P, node)
    if kind == "batchnorm":  # random affine parameters and running statistics
        p = {k: (np.abs(v) + 0.5 if k == "running_var" else v) for k, v in
             random_params(kind, layer, in_shape, rng).items()}
        engine.set_parameters({f"{node}.{k}": v.astype(np.float32) for k, v in p.items()})
        p = ref_params(engine.get_parameters(), node)
    fwd, bwd = R.LAYERS[kind]
    x = rng.standard_normal((rows,) + in_shape).astype(np.float32)
    train_opts = dict(opts, train=True)
    y, cache = fwd(x.astype(np.float64), {k: v for k, v in p.items() if not k.startswith("running")}, train_opts)
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dx, grads = bwd(dy, cache)

    before = engine.get_parameters()
    g = engine.gradients(x, t)
    assert abs(g["loss"] - loss) <= 1e-5 * abs(loss)
    assert g["input"].shape == x.shape
    assert R.rel_err(g["input"], dx) < 1e-4
    param_names = [k for k in P if k.startswith(node + ".") and not k.split(".")[1].startswith("running")]
    assert sorted(k.split(".", 1)[1] for k in param_names) == sorted(grads)
    for name in param_names:
        assert R.rel_err(g[name], grads[name.split(".", 1)[1]]) < 1e-4, name

    y_eval, _ = fwd(x.astype(np.float64), p, dict(opts, train=False))
    out = engine.predict(x)
    assert out.shape == y_eval.shape and out.dtype == np.float32
    assert R.rel_err(out, y_eval) < 1e-5
    # gradients() changed nothing: parameters and running statistics are as they were
    after = engine.get_parameters()
    for k, v in before.items():
        assert np.array_equal(after[k], v), k


def test_elu_gradient_keeps_its_precision_far_below_zero(device):
    """ELU's d(input) is alpha * exp(x) for x <= 0, as torch's elu_backward takes it from the
    input: each element within 1e-5 of float64 down to x = -80. From the output (y + alpha)
    it cancels: 1.5e-2 relative off at x = -12 and exactly 0 below x = -17.4."""
    x = np.concatenate([-np.linspace(0.5, 80.0, 60), np.linspace(0.1, 3.0, 4)]).astype(np.float32).reshape(4, 16)
    engine = build(device, layers.ELU(0.7), (16,), 4)
    y = np.where(x > 0, x, 0.7 * np.expm1(x.astype(np.float64)))
    t = (y - 1.0).astype(np.float32)  # y - t = 1: d loss / d y is 2 / n exactly, no cancellation
    g = engine.gradients(x, t)
    x64 = x.astype(np.float64)
    want = (2.0 / x.size) * np.where(x64 > 0, 1.0, 0.7 * np.exp(x64))
    err = np.abs(g["input"] - want) / np.abs(want)
    assert err.max() < 1e-5, (x.flat[err.argmax()], err.max())
    assert (g["input"] > 0).all()  # no element flushed to 0 (expf(-80) = 1.8e-35 is a normal float)


SMOOTH = {"sigmoid": (layers.Sigmoid, {}), "tanh": (layers.Tanh, {}), "swish": (layers.Swish, {}),
          "elu": (lambda: layers.ELU(0.7), dict(r=0.7)), "softplus": (layers.Softplus, {}), "mish": (layers.Mish, {}),
          "gelu": (layers.GELU, {}), "gelu_tanh": (lambda: layers.GELU(approximate="tanh"), {})}


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_smooth_activations_against_float64_on_a_grid(device, name):
    """Forward within 4e-7 of float64 elementwise on the cpu (2e-6 on other devices, whose
    libm-like functions are only bounded to 2 ulp; plus the least normal float times |x|, for
    results that underflow in float32's own formula, as sigmoid(-96) = 1 / (1 + inf) = 0) over
    [-100, 100] in steps of 0.005, [-1, 1] in steps of 1e-4, around 0, around the switches of the
    cpu's own exp, expm1 and tanh (cpu/vmath.h: +-0.5, +-0.625, 88.72) and through the subnormals
    down to -104.5, where exp reaches 0; d(input) within 2e-6 relative plus 1e-6 of the largest (a float32 sigmoid or tanh of
    16.6 is 1, so its gradient is 0 from y (1 - y), as torch's). torch's float32 kernels measure
    1.4e-7 (sigmoid), 5.8e-8 (tanh), 2.6e-7 (swish), 1.1e-7 (ELU), 1.1e-7 (Softplus) and 2.6e-7
    (Mish) on the same grid, this cpu backend 1.4e-7, 1.3e-7, 2.6e-7, 1.4e-7, 1.8e-7 and 2.6e-7.
    GELU and its tanh form, relative down to the subnormals: this cpu backend 2.7e-7 and 2.1e-7;
    torch's 2.7e-7 and 2.6e-7 over x >= -1, 1.6e-4 and 1.1e-5 over x >= -3, and no digit left below
    about x = -5.5 (1 + erf(x / sqrt 2) and 1 + tanh(u) cancel in its float32)."""
    make, opts = SMOOTH[name]
    x = np.concatenate([np.linspace(-100, 100, 40001), np.linspace(-1, 1, 20001), np.linspace(-1e-3, 1e-3, 2001),
                        np.linspace(-104.5, -86.5, 3601),
                        [-88.8, -87.34, -87.33, -87.3, 88.7, 88.72, 88.73, 90.0, -0.5, 0.5, -0.625, 0.625,
                         1e-30, -1e-30, 0.0]]).astype(np.float32)
    x = np.concatenate([x, np.zeros(-len(x) % 16, np.float32)]).reshape(16, -1)
    engine = mpscy.Engine(mpscy.Sequential([make()], input_shape=(x.shape[1],)), loss="mae", batch_size=16,
                          device=device, input_gradients=True)
    y, cache = R.activation_forward(x.astype(np.float64), {}, dict(kind=name, **opts))
    got = engine.predict(x).astype(np.float64)
    rel = 4e-7 if device == "cpu" else 2e-6
    keep = np.ones(x.shape, bool)
    if device == "metal" and name.startswith("gelu"):
        # MPSGraph has no erfc: its exact GELU's 1 + erf cancels as torch's float32 does (5e-7 of the
        # value at x = -1.5); its tanh form rounds 2u in float, |2u| 1.2e-7 of the value (8e-7 at x = -3)
        keep = x >= (-1.5 if name == "gelu" else -3.0)
    bad = keep & (np.abs(got - y) > rel * np.abs(y) + 1.2e-38 * np.maximum(1.0, np.abs(x)))
    assert not bad.any(), (x[bad][:5], got[bad][:5], y[bad][:5])
    if name == "softplus" and device == "cpu":  # log1p(exp(x)) = exp(x) there: the cpu's exp in the subnormals
        sub = x < -87.5
        assert np.all(np.abs(got[sub] - y[sub]) <= 1.5e-45 + 4e-7 * np.abs(y[sub])) and (got[x < -103.5] <= 1.5e-45).all()
    g = engine.gradients(x, (got - 1.0).astype(np.float32))["input"].astype(np.float64)  # d mae / d y = 1 / n
    want, _ = R.activation_backward(np.full(x.shape, 1.0 / x.size), cache)
    bad = keep & (np.abs(g - want) > 2e-6 * np.abs(want) + 1e-6 * np.abs(want).max())
    assert not bad.any(), (x[bad][:5], g[bad][:5], want[bad][:5])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_at_large_inputs_is_x_or_zero_with_slope_one_or_zero(device, approximate):
    """GELU(x) = x and d/dx = 1 for large positive x, -0 and 0 for large negative x, up to 1e30 (x^2
    overflows float32 past 1.8e19): the tanh form's slope once grew as 8e-45 x^3 (8100 at 1e16) and
    its value as 3.7e-44 x, from exp(-|2u|) clamped where it was not yet 0. MAE against targets
    below the outputs: each input's gradient is d/dx / n."""
    big = np.array([20.0, 30.0, 1e4, 1e12, 1e15, 1e16, 1e19, 2e19, 1e30], np.float32)
    x = np.concatenate([big, -big, [0.0] * 14]).astype(np.float32).reshape(2, 16)
    engine = mpscy.Engine(mpscy.Sequential([layers.GELU(approximate=approximate)], input_shape=(16,)), loss="mae",
                          batch_size=2, device=device, input_gradients=True)
    y = engine.predict(x)
    pos, neg = x > 5, x < -5
    np.testing.assert_array_equal(y[pos], x[pos])
    assert np.all(np.abs(y[neg]) <= 1e-30), y[neg]
    target = (np.minimum(y, 0.0) - 1.0).astype(np.float32)
    g = engine.gradients(x, target)["input"] * x.size
    np.testing.assert_array_equal(g[pos], np.ones(pos.sum(), np.float32))
    np.testing.assert_array_equal(np.abs(g[neg]), np.zeros(neg.sum(), np.float32))


KINKS = np.array([-8.0, -3.5, -3.0, -2.999, -0.5, -0.0, 0.0, 0.5, 2.999, 3.0, 3.5, 5.999, 6.0, 6.5, 8.0, 25.0],
                 np.float32)


@pytest.mark.parametrize("name", ["relu6", "hardsigmoid", "hardswish", "softplus", "softplus_beta", "mish"])
def test_piecewise_activations_at_their_kinks(device, name):
    """Values and gradients on both sides of and exactly at every kink (0 and 6; -3 and 3;
    Softplus's threshold at 20, and at 0.5 for beta 2 and threshold 1: x itself only past it), as
    torch's kernels take them: ReLU6's gradient is 0 at 0 and 6,
    Hardsigmoid's 0 at -3 and 3, Hardswish's 0 at -3 and 1 at 3 (x/3 + 1/2 strictly between);
    checked against torch itself when installed."""
    layer = {"relu6": layers.ReLU6(), "hardsigmoid": layers.Hardsigmoid(), "hardswish": layers.Hardswish(),
             "softplus": layers.Softplus(), "softplus_beta": layers.Softplus(beta=2.0, threshold=1.0),
             "mish": layers.Mish()}[name]
    x = np.tile(np.concatenate([KINKS, [0.49, 0.5, 0.51, 19.99, 20.0, 20.01]]).astype(np.float32), (2, 1))
    engine = build(device, layer, (x.shape[1],), 2)
    opts = dict(kind="softplus", beta=2.0, threshold=1.0) if name == "softplus_beta" else dict(kind=name)
    y, cache = R.activation_forward(x.astype(np.float64), {}, opts)
    t = (y - 1.0).astype(np.float32)  # y - t = 1: d loss / d y is 2 / n
    g = engine.gradients(x, t)
    want, _ = R.activation_backward(np.full(x.shape, 2.0 / x.size), cache)
    np.testing.assert_allclose(engine.predict(x), y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g["input"], want, rtol=1e-5, atol=1e-9)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        module = {"relu6": torch.nn.ReLU6(), "hardsigmoid": torch.nn.Hardsigmoid(), "hardswish": torch.nn.Hardswish(),
                  "softplus": torch.nn.Softplus(), "softplus_beta": torch.nn.Softplus(beta=2.0, threshold=1.0),
                  "mish": torch.nn.Mish()}[name]
        xt = torch.tensor(x, requires_grad=True)
        (module(xt) * torch.tensor(np.full(x.shape, 2.0 / x.size, np.float32))).sum().backward()
        np.testing.assert_allclose(engine.predict(x), module(torch.tensor(x)).detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g["input"], xt.grad.numpy(), rtol=1e-5, atol=1e-9)


def test_output_shapes_of_strided_padded_dilated_layers():
    """Shape rules match torch.nn's floor formulas (and Keras's for padding="same")."""
    cases = [
        (layers.Conv2D(8, 3, stride=2, padding=1), (3, 32, 32), (8, 16, 16)),
        (layers.Conv2D(8, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), (3, 17, 19), (8, 8, 7)),
        (layers.Conv2D(4, 3, padding="same", dilation=3), (2, 10, 11), (4, 10, 11)),
        (layers.Conv2D(4, 3, padding="valid"), (2, 10, 11), (4, 8, 9)),
        (layers.MaxPool2D(3, 2, 1), (5, 9, 7), (5, 5, 4)),
        (layers.MaxPool2D(2), (5, 9, 7), (5, 4, 3)),
        (layers.AvgPool2D((2, 3), stride=1), (5, 9, 7), (5, 8, 5)),
        (layers.MaxPool2D(3, stride=1, padding="same"), (2, 6, 5), (2, 6, 5)),
        (layers.GlobalAvgPool2D(), (5, 9, 7), (5,)),
        (layers.Flatten(), (5, 9, 7), (315,)),
    ]
    for layer, inp, out in cases:
        assert mpscy.Sequential([layer], input_shape=inp).output_shape == out, layer


# ------------------------------------------------------------------ BatchNorm modes and statistics


def test_batchnorm_momentum_in_keras_s_range_warns(recwarn):
    """momentum is PyTorch's (the new batch's weight): 0.9 or more, Keras's usual values (the old
    statistics' weight there), warns with the value meant; smaller ones do not."""
    layers.BatchNorm(momentum=0.99)
    got = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert got == ["BatchNorm momentum=0.99 is PyTorch's: the new batch's weight in the running statistics, which "
                   "then follow the last batch almost alone; Keras's momentum=0.99 is momentum=0.01 here"]
    recwarn.clear()
    layers.BatchNorm()
    layers.BatchNorm(momentum=0.5)
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []


def test_batchnorm_running_statistics_closed_form(device, rng):
    """After several train steps (one of them a partial batch) the running statistics equal the
    closed-form update with PyTorch's convention: running = (1 - m) running + m batch, unbiased
    batch variance; predict and evaluate then normalize with them (eval mode)."""
    m, eps = 0.25, 1e-3
    model = mpscy.Sequential([layers.BatchNorm(momentum=m, eps=eps)], input_shape=(4, 3, 2))
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(lr=0.0), batch_size=6, device=device, seed=0)
    weight, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    engine.set_parameters({"batchnorm_0.weight": weight, "batchnorm_0.bias": bias}, strict=False)
    rm, rv = np.zeros(4), np.ones(4)
    for k, rows in enumerate([6, 6, 4, 6, 5]):
        x = (rng.standard_normal((rows, 4, 3, 2)) * (1 + k) + k).astype(np.float32)
        engine.step(x, np.zeros_like(x))
        x64 = x.astype(np.float64)
        rm = (1 - m) * rm + m * x64.mean((0, 2, 3))
        rv = (1 - m) * rv + m * x64.var((0, 2, 3), ddof=1)
    P = engine.get_parameters()
    assert np.abs(P["batchnorm_0.running_mean"] - rm).max() < 1e-5 * np.abs(rm).max()
    assert np.abs(P["batchnorm_0.running_var"] - rv).max() < 1e-5 * np.abs(rv).max()

    x = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    shape = (1, 4, 1, 1)
    expect = ((x - P["batchnorm_0.running_mean"].reshape(shape).astype(np.float64))
              / np.sqrt(P["batchnorm_0.running_var"].reshape(shape).astype(np.float64) + eps)
              * weight.reshape(shape) + bias.reshape(shape))
    assert R.rel_err(engine.predict(x), expect) < 1e-5
    t = rng.standard_normal(x.shape).astype(np.float32)
    assert abs(engine.evaluate(x, t)["loss"] - ((expect - t) ** 2).mean()) < 1e-5
    # evaluation and prediction leave the running statistics alone
    assert np.array_equal(engine.get_parameters()["batchnorm_0.running_mean"], P["batchnorm_0.running_mean"])


def test_batchnorm_features_running_statistics_and_train_mode(device, rng):
    """(F,) inputs: statistics over the batch rows; the step itself normalizes with the batch."""
    model = mpscy.Sequential([layers.BatchNorm()], input_shape=(5,))
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.SGD(lr=0.0), batch_size=8, device=device, seed=0)
    x = (rng.standard_normal((8, 5)) * 3 + 2).astype(np.float32)
    t = np.zeros_like(x)
    r = engine.step(x, t)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    assert abs(r.loss - (xhat ** 2).mean()) < 1e-5  # train mode: batch statistics (mean of xhat^2 ~ 1)
    P = engine.get_parameters()
    assert np.allclose(P["batchnorm_0.running_mean"], 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)
    assert np.allclose(P["batchnorm_0.running_var"], 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)


def test_batchnorm_nonfinite_step_leaves_running_statistics(device, rng):
    """A step whose loss is not finite raises NonFiniteError and commits nothing: parameters,
    optimizer state and running statistics stay exactly as they were."""
    model = mpscy.Sequential([layers.Conv2D(3, 3, padding=1), layers.BatchNorm(), layers.ReLU(),
                              layers.Dense(4)], input_shape=(2, 5, 5))
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", batch_size=8, device=device, seed=0)
    x = rng.standard_normal((8, 2, 5, 5)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    for _ in range(3):
        engine.step(x, y)
    big = engine.get_parameters()
    big["batchnorm_1.weight"] = np.full(3, 3e38, np.float32)  # finite, but the output overflows
    engine.set_parameters(big)
    before, state = engine.get_parameters(), engine.get_optimizer_state()
    with pytest.raises(mpscy.NonFiniteError):
        engine.step(x, y)
    after = engine.get_parameters()
    for k in before:
        assert np.array_equal(after[k], before[k]), k
    assert engine.get_optimizer_state()["step"] == state["step"]
    assert np.array_equal(after["batchnorm_1.running_mean"], before["batchnorm_1.running_mean"])
    # a later finite step commits again
    big["batchnorm_1.weight"] = np.ones(3, np.float32)
    engine.set_parameters(big)
    engine.step(x, y)
    assert not np.array_equal(engine.get_parameters()["batchnorm_1.running_mean"], before["batchnorm_1.running_mean"])


def test_batchnorm_one_value_per_channel_is_refused(device, rng):
    model = mpscy.Sequential([layers.Dense(4), layers.BatchNorm()], input_shape=(3,))
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device=device)
    x = rng.standard_normal((1, 3)).astype(np.float32)
    before = engine.get_parameters()
    with pytest.raises(mpscy.InvalidArgumentError, match="more than 1 value per channel"):
        engine.step(x, np.zeros((1, 4), np.float32))
    with pytest.raises(mpscy.InvalidArgumentError, match="more than 1 value per channel"):
        engine.gradients(x, np.zeros((1, 4), np.float32))
    assert engine.stats()["steps"] == 0
    assert np.array_equal(engine.get_parameters()["batchnorm_1.running_var"], before["batchnorm_1.running_var"])
    assert engine.predict(x).shape == (1, 4)  # eval mode is fine with one row


def test_batchnorm_parameters_named_like_pytorch(device):
    model = mpscy.Sequential([layers.Conv2D(6, 3), layers.BatchNorm(), layers.Flatten(),
                              layers.BatchNorm(affine=False)], input_shape=(2, 5, 5))
    engine = mpscy.Engine(model, loss="mse", batch_size=2, device=device)
    P = engine.get_parameters()
    assert {k: v.shape for k, v in P.items() if k.startswith("batchnorm")} == {
        "batchnorm_1.weight": (6,), "batchnorm_1.bias": (6,), "batchnorm_1.running_mean": (6,),
        "batchnorm_1.running_var": (6,), "batchnorm_3.running_mean": (54,), "batchnorm_3.running_var": (54,)}
    assert np.array_equal(P["batchnorm_1.weight"], np.ones(6)) and np.array_equal(P["batchnorm_1.bias"], np.zeros(6))
    assert np.array_equal(P["batchnorm_1.running_var"], np.ones(6))
    assert np.array_equal(P["batchnorm_3.running_mean"], np.zeros(54))
    # a torch state_dict's step counters of these BatchNorms are passed over; any other unknown name is not
    state = {k: v + 0.5 for k, v in P.items()}
    engine.set_parameters({**state, "batchnorm_1.num_batches_tracked": np.array(7),
                           "batchnorm_3.num_batches_tracked": np.array(7)})
    assert all(np.array_equal(engine.get_parameters()[k], v) for k, v in state.items())
    with pytest.raises(mpscy.InvalidArgumentError,
                       match=r"unknown parameter name\(s\): \['conv2d_0.num_batches_tracked'\]"):
        engine.set_parameters({**state, "conv2d_0.num_batches_tracked": np.array(7)})


# ------------------------------------------------------------------ dropout


def dropout_engine(device, rate, shape=(4000,), seed=7, batch=4):
    model = mpscy.Sequential([layers.Dropout(rate)], input_shape=shape)
    return mpscy.Engine(model, loss="mse", optimizer=optim.SGD(lr=0.0), batch_size=batch, device=device,
                        seed=seed, input_gradients=True)


def kept_and_scale(engine, x):
    """With target 0, d loss / d x = 2 x mask^2 / n: non-zero exactly where kept, and the
    kept elements' mask equals sqrt(grad * n / (2 x))."""
    g = engine.gradients(x, np.zeros_like(x))["input"].astype(np.float64)
    kept = g != 0
    scale = np.sqrt(g[kept] * x.size / (2 * x[kept].astype(np.float64)))
    return kept, scale, g


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_keeps_within_bounds_and_scales(device, rng, rate):
    """The kept fraction of 16,000 elements is within 5 standard deviations of 1 - rate, kept
    values are scaled by 1 / (1 - rate), dropped ones are 0, and the loss says the same."""
    engine = dropout_engine(device, rate)
    x = (np.abs(rng.standard_normal((4, 4000))) + 0.5).astype(np.float32)
    kept, scale, _ = kept_and_scale(engine, x)
    n, p = kept.size, 1 - rate
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert np.allclose(scale, 1 / (1 - rate), rtol=1e-5)
    expect_loss = ((x * kept / (1 - rate)).astype(np.float64) ** 2).mean()
    assert abs(engine.gradients(x, np.zeros_like(x))["loss"] - expect_loss) < 1e-5 * expect_loss


def test_dropout_mask_is_the_shared_philox_stream(device, rng):
    """The mask is exactly the Philox4x32-10 stream of common/rng.h keyed by (seed, step counter,
    node index, element index): what every backend must draw. The counter advances per step."""
    engine = dropout_engine(device, 0.3, shape=(3, 5, 7), seed=123456789012, batch=6)
    x = (np.abs(rng.standard_normal((6, 3, 5, 7))) + 0.5).astype(np.float32)
    for counter in range(3):
        kept, _, _ = kept_and_scale(engine, x)
        assert np.array_equal(kept.ravel(), R.dropout_keep(123456789012, counter, 1, x.size, 0.3))
        engine.step(x, np.zeros_like(x))  # advances the counter


def test_dropout_same_seed_same_masks_and_eval_identity(device, rng):
    x = (np.abs(rng.standard_normal((4, 500))) + 0.5).astype(np.float32)
    a, b, c = dropout_engine(device, 0.5, (500,), seed=1), dropout_engine(device, 0.5, (500,), seed=1), \
        dropout_engine(device, 0.5, (500,), seed=2)
    ka, kb, kc = (kept_and_scale(e, x)[0] for e in (a, b, c))
    assert np.array_equal(ka, kb)
    assert not np.array_equal(ka, kc)
    for e in (a, b):
        e.step(x, np.zeros_like(x))
    k2a, k2b = kept_and_scale(a, x)[0], kept_and_scale(b, x)[0]
    assert np.array_equal(k2a, k2b) and not np.array_equal(k2a, ka)  # a new mask per step
    assert np.array_equal(a.predict(x), x)  # eval mode: the identity
    assert abs(a.evaluate(x, np.zeros_like(x))["loss"] - (x.astype(np.float64) ** 2).mean()) < 1e-6


def test_dropout_rate_zero_is_identity_in_train_mode(device, rng):
    engine = dropout_engine(device, 0.0, (50,))
    x = rng.standard_normal((4, 50)).astype(np.float32)
    g = engine.gradients(x, np.zeros_like(x))
    assert np.allclose(g["input"], 2 * x / x.size, rtol=1e-6)


# ------------------------------------------------------------------ options and shapes


@pytest.mark.parametrize("make,error,match", [
    (lambda: layers.Conv2D(0, 3), mpscy.InvalidArgumentError, "filters"),
    (lambda: layers.Conv2D(4, (3, 0)), mpscy.InvalidArgumentError, "kernel_size"),
    (lambda: layers.Conv2D(4, 3, stride=0), mpscy.InvalidArgumentError, "stride"),
    (lambda: layers.Conv2D(4, 3, padding=-1), mpscy.InvalidArgumentError, "padding"),
    (lambda: layers.Conv2D(4, 3, padding="full"), mpscy.InvalidArgumentError, "padding"),
    (lambda: layers.Conv2D(5, 3, groups=2), mpscy.InvalidArgumentError, "divisible by groups"),
    (lambda: layers.Conv2D(4, 3, dilation=(1, 0)), mpscy.InvalidArgumentError, "dilation"),
    (lambda: layers.MaxPool2D(2, padding=2), mpscy.InvalidArgumentError, "half the pool size"),
    (lambda: layers.AvgPool2D(0), mpscy.InvalidArgumentError, "pool_size"),
    (lambda: layers.BatchNorm(momentum=1.5), mpscy.InvalidArgumentError, "momentum"),
    (lambda: layers.BatchNorm(eps=0), mpscy.InvalidArgumentError, "eps"),
    (lambda: layers.LayerNorm(0), mpscy.InvalidArgumentError, "normalized_shape"),
    (lambda: layers.Dropout(1.0), mpscy.InvalidArgumentError, "rate"),
    (lambda: layers.Dropout(-0.1), mpscy.InvalidArgumentError, "rate"),
    (lambda: layers.GELU(approximate="fast"), mpscy.InvalidArgumentError, "approximate"),
    (lambda: layers.Softplus(beta=0.0), mpscy.InvalidArgumentError, r"Softplus beta must be in \(0.0, inf\)"),
    (lambda: layers.Softplus(beta=1e-50), mpscy.InvalidArgumentError, "does not fit float32 as a normal number"),
    (lambda: layers.Softplus(beta=1e39), mpscy.InvalidArgumentError, "does not fit float32 as a normal number"),
    (lambda: layers.Softplus(threshold=1e39), mpscy.InvalidArgumentError, r"threshold 1e\+39 does not fit float32"),
    (lambda: layers.Concatenate(axis=1.5), mpscy.InvalidArgumentError, "axis"),
    (lambda: layers.Reshape((0, 3)), mpscy.InvalidArgumentError,
     r"Reshape target_shape must be 1 to 6 positive ints \(at most one of them -1\) per sample, without the batch, "
     r"got \(0, 3\)"),
    (lambda: layers.Reshape((-1, -1)), mpscy.InvalidArgumentError, r"got \(-1, -1\)"),
    (lambda: layers.Reshape("3x4"), mpscy.InvalidArgumentError, "got '3x4'"),
    (lambda: layers.Reshape((1,) * 7), mpscy.InvalidArgumentError, "Reshape target_shape must be 1 to 6"),
    (lambda: layers.Unflatten(0, (2, 2)), mpscy.InvalidArgumentError, r"Unflatten dim must be a nonzero int \(0 is the batch\)"),
    (lambda: layers.ConvTranspose2D(4, 3, stride=2, output_padding=2), mpscy.InvalidArgumentError,
     r"ConvTranspose2D output_padding \(2, 2\) must be smaller than the stride \(2, 2\)"),
    (lambda: layers.ConvTranspose2D(4, 3, output_padding=(0, 2), dilation=2), mpscy.InvalidArgumentError,
     r"output_padding \(0, 2\) must be smaller than the stride \(1, 1\) or the dilation \(2, 2\)"),
    (lambda: layers.ConvTranspose2D(4, 3, padding="same"), mpscy.InvalidArgumentError,
     "ConvTranspose2D padding must be an integer >= 0 or a pair of them, got 'same'"),
    (lambda: layers.ConvTranspose2D(5, 3, groups=2), mpscy.InvalidArgumentError,
     "ConvTranspose2D filters 5 must be divisible by groups 2"),
    (lambda: layers.ConvTranspose2D(4, 0), mpscy.InvalidArgumentError, "ConvTranspose2D kernel_size must be"),
    (lambda: layers.Upsample(scale_factor=0), mpscy.InvalidArgumentError,
     r"Upsample scale_factor must be a whole number >= 1 or a pair of them \(nearest-neighbour upsampling repeats "
     r"each pixel a whole number of times\), got 0"),
    (lambda: layers.Upsample(scale_factor=1.5), mpscy.InvalidArgumentError, "got 1.5"),
    (lambda: layers.Upsample(scale_factor="2"), mpscy.InvalidArgumentError, "got '2'"),
    (lambda: layers.Upsample((2, 2, 2)), mpscy.InvalidArgumentError, r"Upsample size must be .*got \(2, 2, 2\)"),
    (lambda: layers.Upsample(scale_factor=True), mpscy.InvalidArgumentError, "scale_factor"),
    (lambda: layers.Upsample(scale_factor=2, mode="bicubic"), mpscy.InvalidArgumentError,
     "Upsample mode 'bicubic' is not available: one of 'nearest', 'nearest-exact', 'bilinear'"),
    (lambda: layers.Upsample(scale_factor=2, align_corners=False), mpscy.InvalidArgumentError,
     "align_corners applies to interpolating modes only .*mode='nearest'"),
    (lambda: layers.Upsample(scale_factor=2, mode="bilinear", align_corners=1.0), mpscy.InvalidArgumentError,
     "align_corners must be None, False or True, got 1.0"),
    # a fractional factor: torch interpolates by 1 / s, which is not the sizes' ratio; recomputed (or
    # with align_corners, where torch's ratio is the sizes' whatever the factor), it is
    (lambda: layers.Upsample(scale_factor=1.5, mode="bilinear"), mpscy.InvalidArgumentError,
     r"Upsample scale_factor must be a whole number >= 1 or a pair of them \(a factor that is not whole needs "
     r"recompute_scale_factor=True .* or size=\), got 1.5"),
    (lambda: layers.Upsample(scale_factor=(2, -1.5), mode="bilinear", recompute_scale_factor=True),
     mpscy.InvalidArgumentError, r"scale_factor must be a number > 0 or a pair of them, got \(2, -1.5\)"),
    (lambda: layers.Upsample(scale_factor=float("nan"), mode="bilinear", recompute_scale_factor=True),
     mpscy.InvalidArgumentError, "got nan"),
    (lambda: layers.UpSampling2D((1.5, 1.5), interpolation="bilinear"), mpscy.InvalidArgumentError,
     r"UpSampling2D size must be a whole number >= 1 or a pair of them \(Keras's UpSampling2D repeats or "
     r"interpolates by whole factors\), got \(1.5, 1.5\)"),
    (lambda: layers.Upsample((8, 8), mode="bilinear", recompute_scale_factor=True), mpscy.InvalidArgumentError,
     "recompute_scale_factor=True applies to scale_factor, not to an explicit size"),
    (lambda: layers.Upsample((0, 4), mode="bilinear"), mpscy.InvalidArgumentError,
     r"Upsample size must be a whole number >= 1 or a pair of them \(the output's \(H, W\)\), got \(0, 4\)"),
    (lambda: layers.Upsample(), mpscy.InvalidArgumentError, "either scale_factor or size, not neither"),
    (lambda: layers.Upsample(8, scale_factor=2), mpscy.InvalidArgumentError, "not both"),
    (lambda: layers.UpSampling2D(0), mpscy.InvalidArgumentError, r"UpSampling2D size must be .*, got 0"),
    (lambda: layers.UpSampling2D(2, data_format="channels_last"), mpscy.InvalidArgumentError,
     r"channels-first \(C, H, W\), batches NCHW \(np.ascontiguousarray\(x.transpose\(0, 3, 1, 2\)\)"),
    (lambda: layers.UpSampling2D(2, interpolation="bicubic"), mpscy.InvalidArgumentError,
     "UpSampling2D interpolation 'bicubic' is not available: one of 'nearest', 'bilinear'"),
])
def test_bad_options_are_refused_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("stack,shape,error,match", [
    ([layers.Conv2D(4, 3)], (10,), mpscy.ShapeError, r"\(C, H, W\)"),
    ([layers.MaxPool2D(2)], (3, 4), mpscy.ShapeError, r"\(C, H, W\)"),
    ([layers.GlobalAvgPool2D()], (3,), mpscy.ShapeError, r"\(C, H, W\)"),
    ([layers.Upsample(scale_factor=2)], (3, 4), mpscy.ShapeError, r"Upsample needs \(C, H, W\) inputs"),
    ([layers.Upsample(scale_factor=2 ** 30, mode="bilinear")], (1, 4, 1), mpscy.ShapeError,
     r"Upsample scale_factor \(1073741824, 1073741824\) makes the input's \(H, W\) = \(4, 1\) an image of "
     r"\(4294967296, 1073741824\): each side must be 1 to 2\*\*31 - 1"),
    ([layers.Reshape((5,))], (2, 3), mpscy.ShapeError,
     r"Reshape cannot reshape a per-sample input of shape \(2, 3\) \(6 elements\) to \(5,\)"),
    ([layers.Reshape((-1, 4))], (2, 3), mpscy.ShapeError, r"to \(-1, 4\)"),
    ([layers.Unflatten(3, (2, 2))], (4,), mpscy.ShapeError, r"Unflatten dim 3 is outside a per-sample input of shape"),
    ([layers.Unflatten(1, (3, -1))], (4,), mpscy.ShapeError, r"Unflatten cannot split dim 1 of size 4 into \(3, -1\)"),
    ([layers.ConvTranspose2D(4, 3, groups=2)], (3, 5, 5), mpscy.ShapeError,
     "ConvTranspose2D groups 2 must divide the 3 input channels"),
    ([layers.ConvTranspose2D(4, 1, padding=1)], (3, 2, 5), mpscy.ShapeError,
     r"ConvTranspose2D input \(C, H, W\) = \(3, 2, 5\) gives an output of \(0, 3\): padding \(1, 1\) crops more"),
    # torch's order: a positional argument is the output size, as in nn.Upsample((64, 64))
    ([layers.Upsample((64, 64))], (3, 16, 24), mpscy.ShapeError,
     r"Upsample size \(64, 64\) is not a whole multiple of the input's \(H, W\) = \(16, 24\)"),
    ([layers.Upsample(size=(9, 8))], (3, 4, 4), mpscy.ShapeError,
     r"Upsample size \(9, 8\) is not a whole multiple of the input's \(H, W\) = \(4, 4\)"),
    ([layers.Conv2D(4, 5)], (1, 4, 8), mpscy.ShapeError, "smaller than"),
    ([layers.MaxPool2D(3)], (1, 2, 8), mpscy.ShapeError, "smaller than"),
    ([layers.Conv2D(4, 3, groups=2)], (3, 8, 8), mpscy.ShapeError, "groups 2 must divide"),
    ([layers.Conv2D(4, 3, stride=2, padding="same")], (3, 8, 8), mpscy.InvalidArgumentError,
     r"cannot be split evenly: padding=1 on both sides gives the same 4 outputs, one row off Keras's \(which pads 0 "
     r"before and 1 after\)"),
    ([layers.Conv2D(4, 2, padding="same")], (3, 8, 8), mpscy.InvalidArgumentError, "cannot be split"),
    # an even kernel: no symmetric padding keeps the size, and the message says what each gives
    ([layers.Conv2D(4, 4, padding="same")], (3, 8, 8), mpscy.InvalidArgumentError,
     r"3 rows of padding along height \(input 8, kernel 4, stride 1\), which cannot be split evenly: no padding "
     r"on both sides alike gives 8 outputs \(padding=1 gives 7, padding=2 gives 9\)"),
    # Keras's channels-last shape where it cannot be an image: the message says so
    ([layers.Conv2D(4, 3)], (8, 8, 1), mpscy.ShapeError,
     r"\(8, 8, 1\) looks like a channels-last \(H, W, C\) image: mpscy's images are \(C, H, W\), "
     r"input_shape=\(1, 8, 8\), batches NCHW: np.ascontiguousarray\(x.transpose\(0, 3, 1, 2\)\)"),
    ([layers.MaxPool2D(2)], (9, 9, 1), mpscy.ShapeError, "smaller than the pool window.*looks like a channels-last"),
    # a feature map deeper in that happens to end in 4: no channels-last hint (the input is right)
    ([layers.Conv2D(16, 3), layers.MaxPool2D(2), layers.Conv2D(32, 5)], (3, 20, 10), mpscy.ShapeError,
     r"layer 2 \(Conv2D\): Conv2D input \(C, H, W\) = \(16, 9, 4\) is smaller than its dilated kernel \(5, 5\) "
     r"with padding \(0, 0\)$"),
    ([layers.BatchNorm()], (3, 4), mpscy.ShapeError, r"\(F,\) or \(C, H, W\)"),
    ([layers.LayerNorm((4, 5))], (3, 5, 4), mpscy.ShapeError, "trailing dims"),
    ([layers.LayerNorm((2, 3, 4, 5))], (3, 4, 5), mpscy.ShapeError, "trailing dims"),
    ([layers.Softmax(axis=3)], (4, 5), mpscy.ShapeError, "axis"),
])
def test_bad_shapes_are_refused_before_native(stack, shape, error, match):
    with pytest.raises(error, match=match):
        mpscy.Sequential(stack, input_shape=shape)


def test_a_channels_last_batch_is_told_how_to_transpose():
    """An (n, H, W, C) batch for an engine of (C, H, W) images is refused saying it is channels-last
    and how to make it NCHW, by every call and by fit; another wrong shape is refused plainly."""
    engine = mpscy.Engine(mpscy.Sequential([layers.Conv2D(2, 3), layers.Flatten()], input_shape=(3, 8, 6)),
                          loss="mse", batch_size=4, device="cpu")
    nhwc = np.zeros((4, 8, 6, 3), np.float32)
    for call in (engine.predict, lambda x: engine.step(x, np.zeros((4, 48), np.float32)),
                 lambda x: engine.fit(x, np.zeros((4, 48), np.float32), verbose=0)):
        with pytest.raises(mpscy.ShapeError, match=r"x has shape \(4, 8, 6, 3\), expected \(n, 3, 8, 6\) \(a "
                                                   r"channels-last batch: np.ascontiguousarray\(x.transpose\(0, 3, 1, 2\)\) gives NCHW\)"):
            call(nhwc)
    with pytest.raises(mpscy.ShapeError, match=r"x has shape \(4, 6, 8, 3\), expected \(n, 3, 8, 6\)$"):
        engine.predict(np.zeros((4, 6, 8, 3), np.float32))


def test_a_shape_error_deeper_in_names_a_channels_last_looking_input():
    """Keras's most common model on a (28, 28, 1) input: the Conv2D builds (and would warn), then the
    MaxPooling2D finds (32, 28, 1) too small for its window; its error says the model's input looks
    channels-last, with the (C, H, W) shape to use."""
    with pytest.raises(mpscy.ShapeError, match=r"MaxPooling2D input \(C, H, W\) = \(32, 28, 1\) is smaller than.*"
                                               r"\(\(28, 28, 1\) looks like a channels-last \(H, W, C\) image: .*"
                                               r"input_shape=\(1, 28, 28\)"):
        mpscy.Sequential([layers.Conv2D(32, 3, padding="same"), layers.ReLU(), layers.MaxPooling2D(2)],
                         input_shape=(28, 28, 1))


def test_an_image_layer_on_a_channels_last_looking_input_warns(recwarn):
    """A Conv2D or pooling layer straight on an input shaped like Keras's (H, W, C) image (last
    dim 1, 3 or 4, the others 16 or more) builds (it may be meant) but warns, naming the layer, the
    input and the (C, H, W) shape; a (C, H, W) image, a smaller such shape (9 channels of 16 x 4
    images: a cuda test's), a 1-D signal (C, L, 1) read through windows 1 wide, or a layer that is
    no image layer does not."""
    mpscy.Sequential([layers.Conv2D(16, 3, padding=1), layers.ReLU(), layers.Flatten(), layers.Dense(10)],
                     input_shape=(32, 32, 3))
    x = mpscy.Input((28, 28, 3), name="pixels")
    mpscy.Model(x, layers.Dense(2)(layers.Flatten()(layers.AvgPool2D(2)(x))))
    got = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert len(got) == 2, got
    assert got[0].startswith("Conv2D 'conv2d_0' reads input 'input' as (C, H, W) ((32, 32, 3) looks like a "
                             "channels-last (H, W, C) image: mpscy's images are (C, H, W), input_shape=(3, 32, 32)")
    assert got[1].startswith("AvgPool2D 'avgpool2d_0' reads input 'pixels' as (C, H, W) ((28, 28, 3) looks like")
    recwarn.clear()
    mpscy.Sequential([layers.Conv2D(3, 3, padding=1), layers.Conv2D(4, 1)], input_shape=(1, 32, 32))
    mpscy.Sequential([layers.Conv2D(4, 3)], input_shape=(8, 32, 32))
    mpscy.Sequential([layers.Conv2D(4, 3, padding=1)], input_shape=(9, 16, 4))
    # a 1-D signal (C, L, 1) through windows 1 wide (there is no Conv1D): not an image at all
    mpscy.Sequential([layers.Conv2D(8, (5, 1)), layers.MaxPool2D((2, 1))], input_shape=(22, 1000, 1))
    mpscy.Sequential([layers.Dense(4)], input_shape=(32, 32, 3))  # no image layer: a plain tensor
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []
    # a 1-D signal (C, L, 1) upsampled along L only, or averaged over L: no image either
    mpscy.Sequential([layers.Upsample(scale_factor=(2, 1))], input_shape=(22, 1000, 1))
    mpscy.Sequential([layers.GlobalAvgPool2D()], input_shape=(22, 1000, 1))
    assert [w for w in recwarn if issubclass(w.category, UserWarning)] == []
    # Keras's UpSampling2D and a GlobalAvgPool2D straight on such an input warn as well
    mpscy.Sequential([layers.UpSampling2D(2)], input_shape=(32, 32, 3))
    mpscy.Sequential([layers.GlobalAvgPool2D()], input_shape=(32, 32, 3))
    got = [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]
    assert len(got) == 2 and got[0].startswith("UpSampling2D 'upsample2d_0' reads input 'input' as (C, H, W)"), got
    assert got[1].startswith("GlobalAvgPool2D 'global_avgpool2d_0' reads input 'input' as (C, H, W)"), got


def test_layer_configs_round_trip():
    conv = layers.Conv2D(8, (3, 5), stride=2, padding="same", dilation=1, groups=2, bias=False)
    assert conv.config() == {"filters": 8, "kernel_size": (3, 5), "stride": (2, 2), "padding": "same",
                             "dilation": (1, 1), "groups": 2, "bias": False}
    assert layers.MaxPool2D(3).config() == {"pool_size": (3, 3), "stride": (3, 3), "padding": (0, 0)}
    assert layers.AvgPool2D(2, 1, count_include_pad=False).config()["count_include_pad"] is False
    assert layers.Reshape([3, -1]).config() == {"target_shape": (3, -1)}
    assert layers.Unflatten(-1, (2, 3)).config() == {"dim": -1, "unflattened_size": (2, 3)}
    assert layers.ConvTranspose2D(8, 4, 2, 1, 1, bias=False).config() == {
        "filters": 8, "kernel_size": (4, 4), "stride": (2, 2), "padding": (1, 1), "output_padding": (1, 1),
        "groups": 1, "bias": False, "dilation": (1, 1)}
    assert layers.BatchNorm().config() == {"momentum": 0.1, "eps": 1e-5, "affine": True}
    assert layers.LayerNorm(4).config() == {"normalized_shape": (4,), "eps": 1e-5, "elementwise_affine": True}
    assert layers.Dropout(0.25).config() == {"rate": 0.25}
    assert layers.LeakyReLU().config() == {"negative_slope": 0.01}
    assert layers.ELU().config() == {"alpha": 1.0}
    assert layers.Upsample(scale_factor=2.0).config() == {"scale_factor": (2, 2), "mode": "nearest"}
    assert layers.UpSampling2D((1, 3)).config() == {"size": (1, 3), "interpolation": "nearest"}
    assert layers.Upsample(size=8).config() == {"size": (8, 8), "mode": "nearest"}
    assert layers.Upsample(size=(5, 7), mode="bilinear").config() == {"size": (5, 7), "mode": "bilinear",
                                                                       "align_corners": False}
    assert layers.Upsample(scale_factor=(1.5, 2.0), mode="bilinear", align_corners=True,
                           recompute_scale_factor=True).config() == {
        "scale_factor": (1.5, 2), "mode": "bilinear", "align_corners": True, "recompute_scale_factor": True}
    assert layers.UpSampling2D(3, interpolation="bilinear").config() == {"size": (3, 3), "interpolation": "bilinear"}
    assert mpscy.Sequential([layers.Upsample((64, 64))], input_shape=(3, 16, 32)).output_shape == (3, 64, 64)
    assert repr(layers.Dropout(0.5)) == "Dropout(rate=0.5)"


def test_convtranspose_initialization_is_pytorch_default(device):
    """torch's ConvTranspose2d draws weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = weight.size(1) * kh * kw, its out channels per group (not the input's)."""
    model = mpscy.Sequential([layers.ConvTranspose2D(12, (3, 5), groups=3)], input_shape=(6, 9, 9))
    engine = mpscy.Engine(model, loss="mse", batch_size=1, device=device, seed=5)
    P = engine.get_parameters()
    bound = 1 / np.sqrt(4 * 3 * 5)
    assert P["convtranspose2d_0.weight"].shape == (6, 4, 3, 5) and P["convtranspose2d_0.bias"].shape == (12,)
    for k in ("convtranspose2d_0.weight", "convtranspose2d_0.bias"):
        assert np.abs(P[k]).max() <= bound and np.abs(P[k]).max() > 0.8 * bound


@pytest.mark.parametrize("frozen", [False, True])
def test_convtranspose_sharing_its_input_sums_the_gradient(device, rng, frozen):
    """x feeds a ConvTranspose2D (stride 2) and a nearest Upsample by 2, the two added: x's gradient
    adds the transposed convolution's (accumulated into one buffer) to the Upsample's, against
    float64 NumPy; frozen, the layer's weight and bias get no gradient and x's is the same."""
    opts = dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), output_padding=(1, 1), groups=1)
    x_in = mpscy.Input((3, 4, 5))
    ct = layers.ConvTranspose2D(3, 3, stride=2, padding=1, output_padding=1, name="ct")
    out = layers.Add()([ct(x_in), layers.Upsample(scale_factor=2)(x_in)])
    ct.trainable = not frozen
    model = mpscy.Model(x_in, out)
    with warnings.catch_warnings():  # frozen: "every layer with parameters is frozen", as it should be
        warnings.simplefilter("ignore" if frozen else "error")
        engine = mpscy.Engine(model, loss="mse", batch_size=2, device=device, seed=2, input_gradients=True)
    P = {k.split(".", 1)[1]: v.astype(np.float64) for k, v in engine.get_parameters().items()}
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    t = rng.standard_normal((2, 3, 8, 10)).astype(np.float32)
    yc, cache = R.convtranspose2d_forward(x.astype(np.float64), P, opts)
    y = yc + x.astype(np.float64).repeat(2, axis=2).repeat(2, axis=3)
    dy = 2 * (y - t) / y.size
    dxc, grads = R.convtranspose2d_backward(dy, cache)
    g = engine.gradients(x, t)
    assert abs(g["loss"] - np.mean((y - t) ** 2)) <= 1e-5 * g["loss"]
    assert R.rel_err(g["input"], dxc + dy.reshape(2, 3, 4, 2, 5, 2).sum((3, 5))) < 1e-5
    if frozen:
        assert not any(k.startswith("ct.") for k in g), sorted(g)
    else:
        assert R.rel_err(g["ct.weight"], grads["weight"]) < 1e-5 and R.rel_err(g["ct.bias"], grads["bias"]) < 1e-5


@pytest.mark.parametrize("kind", ["ConvTranspose2D", "Conv2D"])
def test_conv_bias_gradient_over_many_positions_is_float64_close(device, rng, kind):
    """A convolution's bias gradient sums dy over the batch's positions: under GlobalAvgPool2D,
    131,072 (32 x 64 x 64) values a channel, each sample's 4,096 of them equal. Against float64
    NumPy from the model's logits: within 1e-6 where the sums run in double (the cpu's, whose 16
    float lanes were 3.6e-5 and 5.3e-6 off here, and cuda's ConvTranspose2D, 2.5e-6 in float on
    an H100), 4e-6 for cuda's Conv2D, whose kernels sum partials in float (1.2e-6 measured)."""
    if kind == "ConvTranspose2D":
        conv, shape = layers.ConvTranspose2D(6, 2, stride=2), (4, 32, 32)
    else:
        conv, shape = layers.Conv2D(6, 3, padding=1), (3, 64, 64)
    model = mpscy.Sequential([conv, layers.GlobalAvgPool2D(), layers.Dense(5)], input_shape=shape)
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", batch_size=32, device=device, seed=4)
    x = rng.standard_normal((32,) + shape).astype(np.float32) + 0.5
    y = rng.integers(0, 5, 32).astype(np.int32)
    z = engine.predict(x).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    d = p / p.sum(1, keepdims=True)
    d[np.arange(32), y] -= 1
    d /= 32
    P = engine.get_parameters()
    g = engine.gradients(x, y)
    name = f"{type(conv).__name__.lower()}_0.bias"
    assert R.rel_err(g["dense_2.bias"], d.sum(0)) < 1e-6
    tol = 4e-6 if device == "cuda" and kind == "Conv2D" else 1e-6
    assert R.rel_err(g[name], (d @ P["dense_2.weight"].astype(np.float64)).sum(0)) < tol


def test_torch_positional_arguments_past_mpscy_s_own_are_refused():
    """torch.nn.AvgPool2d's fourth positional argument is ceil_mode, nn.LeakyReLU's and nn.ELU's
    second inplace, nn.MaxPool2d's fourth dilation: given by position here they would land on
    count_include_pad or the layer's name. AvgPool2D takes count_include_pad by keyword only (more
    positional arguments are refused naming torch's ceil_mode), and a name that is not a string is
    refused naming the cause."""
    for extra in ((False,), (True, False)):
        with pytest.raises(mpscy.InvalidArgumentError, match=rf"padding by position, got {len(extra)} more .*ceil_mode"):
            layers.AvgPool2D(3, 1, 1, *extra)
    assert layers.AvgPool2D(3, 1, 1, count_include_pad=False).count_include_pad is False
    for make in (lambda: layers.LeakyReLU(0.2, True), lambda: layers.ELU(1.0, True), lambda: layers.MaxPool2D(3, 2, 1, 1)):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"name must be a string, got (True|1): a PyTorch argument "
                                                             r"passed by position"):
            make()


def test_keras_activation_names_give_the_layers():
    """Activation("relu") and Keras 3's other names build the layer that computes them, with
    Keras's defaults where they differ from torch's (leaky_relu's slope 0.2); LeakyReLU takes Keras
    2's alpha=; unknown names and 'linear' (no layer) are refused listing the names."""
    assert [type(layers.Activation(k)).__name__ for k in ("relu", "Sigmoid", "silu", "hard_sigmoid", "gelu")] == [
        "ReLU", "Sigmoid", "Swish", "Hardsigmoid", "GELU"]
    assert layers.Activation("gelu").approximate == "none"
    assert layers.Activation("leaky_relu", name="act").config() == {"negative_slope": 0.2}
    assert layers.LeakyReLU(alpha=0.3).negative_slope == 0.3 and layers.LeakyReLU().negative_slope == 0.01
    with pytest.raises(mpscy.InvalidArgumentError, match="LeakyReLU got both negative_slope= and Keras's alpha="):
        layers.LeakyReLU(0.1, alpha=0.3)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Activation 'linear' is not available \('linear' is no "
                                                         r"layer at all: leave it out\): one of elu, gelu"):
        layers.Activation("linear")
    with pytest.raises(mpscy.InvalidArgumentError, match="Activation 'selu' is not available: one of"):
        layers.Activation("selu")


def test_conv2d_takes_keras_s_argument_names():
    """Conv2D(32, 3, strides=2, padding="same", use_bias=False, dilation_rate=1,
    data_format="channels_first") is Conv2D(32, 3, stride=2, ...): the same config; both spellings
    of one argument, a channels-last data_format, and an activation are refused by name."""
    keras = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, dilation_rate=(1, 1),
                          data_format="channels_first", activation="linear")
    assert keras.config() == layers.Conv2D(32, 3, stride=2, padding="same", bias=False).config()
    assert layers.Conv2D(8, 3).config()["stride"] == (1, 1) and layers.Conv2D(8, 3).bias is True
    with pytest.raises(mpscy.InvalidArgumentError, match="Conv2D got both stride= and Keras's strides=; give one"):
        layers.Conv2D(8, 3, stride=1, strides=2)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Conv2D activation='relu': .*layers.ReLU\(\)"):
        layers.Conv2D(8, 3, activation="relu")
    with pytest.raises(mpscy.InvalidArgumentError, match="Conv2D data_format 'channels_last'"):
        layers.Conv2D(8, 3, data_format="channels_last")


def test_dense_takes_keras_s_use_bias_and_refuses_an_activation():
    """Dense(10, use_bias=False) is Dense(10, bias=False) (the same config, which a checkpoint
    rebuilds); both spellings at once and activation="relu" are refused by name."""
    assert layers.Dense(10, use_bias=False).config() == layers.Dense(10, bias=False).config()
    assert layers.Dense(10).bias is True and layers.Dense(10, activation="linear").bias is True
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^Dense use_bias must be True or False, got 1$"):
        layers.Dense(4, use_bias=1)
    with pytest.raises(mpscy.InvalidArgumentError, match="Dense got both bias= and Keras's use_bias=; give one"):
        layers.Dense(10, bias=True, use_bias=False)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Dense activation='relu': .*layers.ReLU\(\)"):
        layers.Dense(10, activation="relu")


def test_conv_initialization_is_pytorch_default(device):
    """Weights and bias uniform in +-1/sqrt(fan_in), fan_in = C / groups * kh * kw."""
    model = mpscy.Sequential([layers.Conv2D(64, (3, 5), groups=2)], input_shape=(8, 9, 9))
    engine = mpscy.Engine(model, loss="mse", batch_size=1, device=device, seed=5)
    P = engine.get_parameters()
    bound = 1 / np.sqrt(4 * 3 * 5)
    assert P["conv2d_0.weight"].shape == (64, 4, 3, 5)
    for k in ("conv2d_0.weight", "conv2d_0.bias"):
        assert np.abs(P[k]).max() <= bound and np.abs(P[k]).max() > 0.9 * bound
    assert abs(P["conv2d_0.weight"].std() - bound / np.sqrt(3)) < 0.05 * bound


# ------------------------------------------------------------------ PyTorch itself


def torch_module(torch, case):
    nn = torch.nn
    layer = CASES[case][0]()
    in_c = CASES[case][3][0]
    if isinstance(layer, layers.Conv2D):
        return nn.Conv2d(in_c, layer.filters, layer.kernel_size, layer.stride,
                         layer._pads(CASES[case][3]), layer.dilation, layer.groups, layer.bias)
    if isinstance(layer, layers.Unflatten):
        return nn.Unflatten(layer.dim, layer.unflattened_size)
    if isinstance(layer, layers.Reshape):
        return nn.Sequential(nn.Flatten(), nn.Unflatten(1, layer.target_shape))   # x.view(n, *target_shape)
    if isinstance(layer, layers.ConvTranspose2D):
        return nn.ConvTranspose2d(in_c, layer.filters, layer.kernel_size, layer.stride, layer.padding,
                                  layer.output_padding, layer.groups, layer.bias, layer.dilation)
    if isinstance(layer, layers.MaxPool2D):
        return nn.MaxPool2d(layer.pool_size, layer.stride, layer.padding)
    if isinstance(layer, layers.AvgPool2D):
        return nn.AvgPool2d(layer.pool_size, layer.stride, layer.padding, count_include_pad=layer.count_include_pad)
    if isinstance(layer, layers.BatchNorm):
        cls = nn.BatchNorm1d if len(CASES[case][3]) == 1 else nn.BatchNorm2d
        return cls(in_c, eps=layer.eps, momentum=layer.momentum, affine=layer.affine)
    if isinstance(layer, layers.LayerNorm):
        return nn.LayerNorm(layer.normalized_shape, layer.eps, layer.elementwise_affine)
    if isinstance(layer, layers.Upsample):
        return nn.Upsample(size=layer.size, scale_factor=None if layer.scale_factor is None else
                           tuple(float(f) for f in layer.scale_factor), mode=layer.mode,
                           align_corners=layer.align_corners, recompute_scale_factor=layer.recompute_scale_factor)
    return {"relu": nn.ReLU(), "leakyrelu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7), "sigmoid": nn.Sigmoid(),
            "tanh": nn.Tanh(), "swish": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "softmax_last": nn.Softmax(-1), "softmax_channels": nn.Softmax(1), "flatten": nn.Flatten(),
            "relu6": nn.ReLU6(), "hardsigmoid": nn.Hardsigmoid(), "hardswish": nn.Hardswish(), "softplus": nn.Softplus(),
            "softplus_beta": nn.Softplus(beta=2.5, threshold=1.5), "mish": nn.Mish()}.get(case)


@pytest.mark.parametrize("case", [k for k in SMALL if not k.startswith(("globalavgpool", "leakyrelu_default"))])
def test_layer_matches_pytorch(device, rng, case):
    """The same layer in torch (float64, train mode): forward, d loss / d x and parameter grads."""
    if device == "metal" and case in METAL_REFUSED:
        with pytest.raises(mpscy.UnsupportedError, match=METAL_REFUSED[case]):
            build(device, CASES[case][0](), CASES[case][3], CASES[case][4])
        return
    torch = pytest.importorskip("torch")
    factory, kind, opts, in_shape, rows = CASES[case]
    tm = torch_module(torch, case)
    assert tm is not None, case
    engine = build(device, factory(), in_shape, rows)
    node = engine.model.nodes[1].name
    P = engine.get_parameters()
    tm = tm.double()
    with torch.no_grad():
        for k, v in P.items():
            getattr(tm, k.split(".", 1)[1]).copy_(torch.from_numpy(v.astype(np.float64)))
    x = rng.standard_normal((rows,) + in_shape).astype(np.float32)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    tm.train()
    y = tm(xt)
    t = rng.standard_normal(tuple(y.shape)).astype(np.float32)
    loss = torch.nn.functional.mse_loss(y, torch.from_numpy(t.astype(np.float64)))
    loss.backward()
    g = engine.gradients(x, t)
    assert abs(g["loss"] - loss.item()) <= 1e-5 * loss.item()
    assert R.rel_err(g["input"], xt.grad.numpy()) < 1e-4
    for k in P:
        if k.startswith(node + ".") and not k.split(".")[1].startswith("running"):
            assert R.rel_err(g[k], getattr(tm, k.split(".", 1)[1]).grad.numpy()) < 1e-4, k
    if kind == "batchnorm":  # torch updated its running statistics in train mode; one mpscy step does too
        engine.set_parameters({k: v for k, v in P.items()})
        engine.learning_rate = 0.0
        engine.step(x, t)
        after = engine.get_parameters()
        assert R.rel_err(after[f"{node}.running_mean"], tm.running_mean.numpy()) < 1e-5
        assert R.rel_err(after[f"{node}.running_var"], tm.running_var.numpy()) < 1e-5
    tm.eval()
    with torch.no_grad():
        expect = tm(torch.from_numpy(x.astype(np.float64))).numpy()
    if kind != "batchnorm":
        assert R.rel_err(engine.predict(x), expect) < 1e-5


# ------------------------------------------------------------------ Conv2D followed by ReLU


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("stride,rows", [(1, 3), (2, 2), (1, 40)])
def test_conv_relu_matches_reference(device, rng, stride, rows, shared, depthwise):
    """Conv2D -> ReLU (which the CPU backend computes inside the convolution when the ReLU is the
    convolution's only consumer) and the same with the convolution also feeding an Add (no
    fusion): loss, every gradient and predict against the composed references; also depthwise
    (groups = C = OC = 5: at stride 1 the cpu's direct stencil, its bias and ReLU after it)."""
    oc, groups = (5, 5) if depthwise else (6, 1)
    x_in = mpscy.Input((5, 9, 8))
    c = layers.Conv2D(oc, 3, stride=stride, padding=1, groups=groups, name="c")(x_in)
    h = layers.ReLU(name="r")(c)
    out = layers.Add(name="sum")([h, c]) if shared else h
    engine = mpscy.Engine(mpscy.Model(x_in, out), loss="mse", batch_size=rows, device=device, seed=4,
                          input_gradients=True)
    P = ref_params(engine.get_parameters(), "c")
    P["bias"] = rng.standard_normal(oc) * 0.1  # about half the outputs on each side of 0
    engine.set_parameters({"c.weight": P["weight"].astype(np.float32), "c.bias": P["bias"].astype(np.float32)})
    P = ref_params(engine.get_parameters(), "c")
    x = rng.standard_normal((rows, 5, 9, 8)).astype(np.float32)
    opts = dict(kernel=(3, 3), stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=groups)
    yc, cc = R.conv2d_forward(x.astype(np.float64), P, opts)
    yr, cr = R.activation_forward(yc, {}, dict(kind="relu"))
    y = yr + yc if shared else yr
    t = rng.standard_normal(y.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", y, t)
    dyc = R.activation_backward(dy, cr)[0] + (dy if shared else 0)
    dx, grads = R.conv2d_backward(dyc, cc)
    g = engine.gradients(x, t)
    assert abs(g["loss"] - loss) <= 1e-5 * loss
    assert R.rel_err(g["input"], dx) < 1e-4
    assert R.rel_err(g["c.weight"], grads["weight"]) < 1e-4 and R.rel_err(g["c.bias"], grads["bias"]) < 1e-4
    assert R.rel_err(engine.predict(x), y) < 1e-5


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_engine_keeps_working_in_a_forked_child(device, rng):
    """A child forked after the engine started its worker threads has none of them: it must
    compute the same gradients (on one thread) instead of waiting for workers forever."""
    if device == "cuda":
        pytest.skip("a CUDA context does not survive fork(): the child cannot use the parent's GPU engine")
    import os
    import pickle
    import select
    import signal
    model = mpscy.Sequential([layers.Conv2D(8, 3, padding=1), layers.ReLU(), layers.Dense(3)], input_shape=(3, 9, 9))
    engine = mpscy.Engine(model, loss="sparse_cross_entropy", batch_size=16, device=device, seed=0)
    x = rng.standard_normal((16, 3, 9, 9)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    engine.step(x, y)
    expect = engine.gradients(x, y)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.write(write, pickle.dumps(engine.gradients(x, y)))
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    data = b""
    while ready:
        chunk = os.read(read, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    assert ready, "the forked child hung"
    got = pickle.loads(data)
    for k, v in expect.items():
        assert R.rel_err(got[k], v) < 1e-5, k


@pytest.mark.parametrize("fill", ["constant", "normal"])
def test_global_avgpool_of_a_large_plane_is_the_exact_mean(device, fill):
    """GlobalAvgPool2D over 2 x 224 x 224 planes: within 2 float32 ulps (2.4e-7 relative) of
    the float64 mean of the same float32 values, as torch's pairwise sum (a float running sum
    was 5e-4 off for a constant 0.1 on the cpu)."""
    rng = np.random.default_rng(3)
    x = (np.full((3, 2, 224, 224), 0.1, np.float32) if fill == "constant"
         else (rng.standard_normal((3, 2, 224, 224)) + 1.0).astype(np.float32))
    engine = mpscy.Engine(mpscy.Sequential([layers.GlobalAvgPool2D()], input_shape=(2, 224, 224)), loss="mse",
                          batch_size=3, device=device)
    ref = x.astype(np.float64).mean(axis=(2, 3))
    np.testing.assert_allclose(engine.predict(x), ref, rtol=2.4e-7, atol=0)


def test_batchnorm_normalizes_values_whose_float_variance_overflows(device):
    """A channel holding 1e20 (its variance, 2.5e39 in double, is inf as a float): the train-mode
    output is normalized from the double variance, as torch's invstd, to 1e-5 of a float64
    reference (it collapsed to beta, the float inv being 0); the step applies and the running
    variance becomes inf, as torch's does."""
    x = np.array([[1e20, 1.0, 2.0], [0.0, 2.0, 3.0], [0.0, 3.0, 5.0], [0.0, 4.0, 7.0]], np.float32)
    engine = mpscy.Engine(mpscy.Sequential([layers.BatchNorm()], input_shape=(3,)), loss="mse",
                          optimizer=optim.SGD(0.0), batch_size=4, device=device)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    g = engine.gradients(x, np.zeros_like(x))
    r = engine.step(x, np.zeros_like(x))
    assert np.isfinite(r.loss) and abs(r.loss - np.mean(ref ** 2)) <= 1e-5 * np.mean(ref ** 2)
    assert np.isfinite(g["batchnorm_0.weight"]).all()
    np.testing.assert_allclose(g["batchnorm_0.weight"], 2 * (ref ** 2).sum(0) / ref.size, rtol=1e-5)
    rv = engine.get_parameters()["batchnorm_0.running_var"]
    assert np.isinf(rv[0]) and np.isfinite(rv[1:]).all()


@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (2, 1)])
def test_strided_convs_sharing_an_input_sum_its_gradient(device, rng, stride):
    """Two strided Conv2Ds reading one input (odd H and W; the CPU backend splits such an input
    into its stride phases) whose outputs are added: the input's gradient is the sum of both
    convolutions' input gradients, each checked with the weights against float64 references."""
    x_in = mpscy.Input((3, 11, 9))
    a = layers.Conv2D(4, 3, stride=stride, padding=1, name="a")(x_in)
    b = layers.Conv2D(4, 3, stride=stride, padding=1, name="b")(x_in)
    engine = mpscy.Engine(mpscy.Model(x_in, layers.Add()([a, b])), loss="mse", batch_size=3, device=device,
                          seed=2, input_gradients=True)
    P = engine.get_parameters()
    pa, pb = ref_params(P, "a"), ref_params(P, "b")
    x = rng.standard_normal((3, 3, 11, 9)).astype(np.float32)
    opts = dict(kernel=(3, 3), stride=stride, padding=(1, 1), dilation=(1, 1), groups=1)
    ya, ca = R.conv2d_forward(x.astype(np.float64), pa, opts)
    yb, cb = R.conv2d_forward(x.astype(np.float64), pb, opts)
    t = rng.standard_normal(ya.shape).astype(np.float32)
    loss, dy = R.loss_ref("mse", ya + yb, t)
    (dxa, ga), (dxb, gb) = R.conv2d_backward(dy, ca), R.conv2d_backward(dy, cb)
    g = engine.gradients(x, t)
    assert abs(g["loss"] - loss) <= 1e-5 * loss
    assert R.rel_err(g["input"], dxa + dxb) < 1e-4
    for name, want in [("a.weight", ga["weight"]), ("b.weight", gb["weight"]), ("a.bias", ga["bias"])]:
        assert R.rel_err(g[name], want) < 1e-4, name


def test_normalization_and_pooling_do_not_depend_on_the_thread_count(rng):
    """BatchNorm, LayerNorm and the poolings split their channels, rows or planes over the cpu
    engine's threads (each pass here is large enough to be split) and sum each one in a fixed
    order: gradients, three Adam steps and predictions are bit-identical on 1, 2 and 3 threads."""
    x = (rng.standard_normal((16, 8, 16, 16)) * 3 + 1).astype(np.float32)
    y = rng.integers(0, 10, 16)

    def run(threads):
        inp = mpscy.Input((8, 16, 16))
        h = layers.Add()([layers.LayerNorm(16, name="ln")(layers.BatchNorm(name="bn")(inp)), inp])
        pooled = layers.Add()([layers.MaxPool2D(3, stride=2, padding=1)(h),
                               layers.AvgPool2D(3, stride=2, padding=1)(h)])
        feats = layers.Concatenate()([layers.GlobalAvgPool2D()(h), layers.GlobalAvgPool2D()(pooled)])
        out = layers.Dense(10, name="fc")(feats)
        e = mpscy.Engine(mpscy.Model(inp, out), loss="sparse_cross_entropy", optimizer=optim.Adam(lr=0.01),
                         batch_size=16, device="cpu", seed=1, threads=threads, input_gradients=True)
        g = e.gradients(x, y)
        for _ in range(3):
            e.step(x, y)
        return g, e.get_parameters(), e.predict(x)

    one = run(1)
    for threads in (2, 3):
        other = run(threads)
        assert sorted(one[0]) == sorted(other[0]) and len(one[0]) == 8
        for k in one[0]:
            assert np.array_equal(one[0][k], other[0][k]), (threads, k)
        for k in one[1]:
            assert np.array_equal(one[1][k], other[1][k]), (threads, k)
        assert np.array_equal(one[2], other[2])


def test_own_products_agree_with_blas():
    """On a CPU with AVX-512 and FMA the convolutions' products and small Dense products are
    objc/cpu/gemm.c's; MPSCY_CPU_GEMM=0 hands them to BLAS. A strided and a stride-1
    convolution (each chunk's products over hundreds of columns, so the kernels run where they
    can) and a Dense over 1701 inputs train three Adam steps in both, and their gradients,
    parameters and predictions agree within 2e-5 relative (different summation orders, the
    same products)."""
    code = textwrap.dedent("""
        import sys, numpy as np, mpscy
        from mpscy import layers, optim
        rng = np.random.default_rng(0)
        x = rng.standard_normal((12, 5, 18, 18)).astype(np.float32)
        y = rng.integers(0, 10, 12)
        model = mpscy.Sequential([layers.Conv2D(13, 3, stride=2, padding=1), layers.ReLU(),
                                  layers.Conv2D(21, 3, padding=1), layers.ReLU(), layers.Flatten(),
                                  layers.Dense(10)], input_shape=(5, 18, 18))
        e = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(lr=0.01), batch_size=12,
                         device="cpu", seed=3, input_gradients=True)
        out = {"g." + k: v for k, v in e.gradients(x, y).items() if k != "loss"}
        for _ in range(3):
            e.step(x, y)
        out.update(e.get_parameters())
        out["predict"] = e.predict(x)
        np.savez(sys.argv[1], name=e.device_info()["name"], **out)
    """)

    def run(tmp, **env):
        path = os.path.join(tmp, f"{len(env)}.npz")
        subprocess.run([sys.executable, "-c", code, path], env={**os.environ, **env}, check=True)
        return dict(np.load(path))

    with tempfile.TemporaryDirectory() as tmp:
        blas, default = run(tmp, MPSCY_CPU_GEMM="0"), run(tmp)
    assert "AVX-512" not in str(blas.pop("name"))
    if "AVX-512" not in str(default.pop("name")):
        pytest.skip("this CPU has no AVX-512 with FMA: BLAS does every product either way")
    assert sorted(blas) == sorted(default) and len(blas) == 14
    for k in blas:
        assert R.rel_err(default[k], blas[k]) < 2e-5, k
    assert any(not np.array_equal(default[k], blas[k]) for k in blas)  # two paths did run


def test_dense_layers_sharing_an_input_sum_its_gradient(device, rng):
    """Two Dense layers reading one hidden layer (48 wide, so on the cpu every product here runs
    in objc/cpu/gemm.c's kernels where the CPU has them) and added: the hidden layer's gradient
    and the model input's are sums over both readers, checked with every weight gradient
    against float64 NumPy (shown to fail when the kernels' accumulation into dx is dropped)."""
    x_in = mpscy.Input((40,))
    h = layers.Dense(48, name="h")(x_in)
    out = layers.Add()([layers.Dense(24, name="a")(h), layers.Dense(24, name="b")(h)])
    engine = mpscy.Engine(mpscy.Model(x_in, out), loss="mse", batch_size=20, device=device, seed=4,
                          input_gradients=True)
    P = {k: v.astype(np.float64) for k, v in engine.get_parameters().items()}
    x = rng.standard_normal((20, 40)).astype(np.float32)
    t = rng.standard_normal((20, 24)).astype(np.float32)
    x64 = x.astype(np.float64)
    h64 = x64 @ P["h.weight"].T + P["h.bias"]
    y = h64 @ P["a.weight"].T + P["a.bias"] + h64 @ P["b.weight"].T + P["b.bias"]
    dy = 2 * (y - t) / y.size
    dh = dy @ P["a.weight"] + dy @ P["b.weight"]
    want = {"input": dh @ P["h.weight"], "h.weight": dh.T @ x64, "h.bias": dh.sum(0),
            "a.weight": dy.T @ h64, "b.weight": dy.T @ h64, "a.bias": dy.sum(0)}
    g = engine.gradients(x, t)
    assert abs(g["loss"] - np.mean((y - t) ** 2)) <= 1e-5 * g["loss"]
    for name, w in want.items():
        assert R.rel_err(g[name], w) < 1e-5, name


def test_new_activations_survive_a_checkpoint(tmp_path):
    model = mpscy.Sequential([layers.Dense(8), layers.ReLU6(), layers.Hardsigmoid(), layers.Dense(8), layers.Hardswish(),
                              layers.Softplus(beta=2.0, threshold=5.0), layers.Mish(), layers.Dense(3)],
                             input_shape=(4,))
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device="cpu", seed=1)
    engine.save(tmp_path / "act.mpscy")
    loaded = mpscy.load(tmp_path / "act.mpscy", device="cpu")
    assert [repr(layer) for layer in loaded.model.layers] == [repr(layer) for layer in model.layers]
    assert repr(loaded.model.layers[5]) == "Softplus(beta=2.0, threshold=5.0)"
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 4
    np.testing.assert_array_equal(loaded.predict(x), engine.predict(x))
    with pytest.raises(mpscy.InvalidArgumentError, match=r"Softplus beta must be in \(0.0, inf\), got 0"):
        layers.Softplus(beta=0)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_and_a_convolution_sharing_an_input_sum_its_gradient(device, rng, mode):
    """x feeds an Upsample and a 1x1 Conv2D whose output is upsampled too, the two added: x's
    gradient adds Upsample's gradient to the convolution's (accumulated into one buffer), against
    float64 NumPy (layer_refs' upsampling)."""
    opts = dict(scale=(2, 3)) if mode == "nearest" else dict(size=(8, 15), align_corners=False)
    x_in = mpscy.Input((2, 4, 5))
    c = layers.Conv2D(2, 1, name="c")(x_in)
    out = layers.Add()([layers.Upsample(scale_factor=(2, 3), mode=mode)(x_in),
                        layers.Upsample(scale_factor=(2, 3), mode=mode)(c)])
    engine = mpscy.Engine(mpscy.Model(x_in, out), loss="mse", batch_size=3, device=device, seed=2,
                          input_gradients=True)
    P = {k: v.astype(np.float64) for k, v in engine.get_parameters().items()}
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    t = rng.standard_normal((3, 2, 8, 15)).astype(np.float32)
    x64 = x.astype(np.float64)
    w = P["c.weight"][:, :, 0, 0]
    cy = np.einsum("oc,nchw->nohw", w, x64) + P["c.bias"][None, :, None, None]
    fwd, bwd = R.LAYERS["upsample2d"]
    y, cache = fwd(x64 + cy, {}, opts)
    dy = 2 * (y - t) / y.size
    dup = bwd(dy, cache)[0]
    want = {"input": dup + np.einsum("oc,nohw->nchw", w, dup),
            "c.weight": np.einsum("nohw,nchw->oc", dup, x64)[:, :, None, None], "c.bias": dup.sum((0, 2, 3))}
    g = engine.gradients(x, t)
    assert abs(g["loss"] - np.mean((y - t) ** 2)) <= 1e-5 * g["loss"]
    for name, v in want.items():
        assert R.rel_err(g[name], v) < 1e-5, name


def test_keras_pooling_names_are_the_same_layers(tmp_path):
    """MaxPooling2D, AveragePooling2D (the padding left out of each average, as Keras) and
    GlobalAveragePooling2D with Keras's arguments compute as MaxPool2D, AvgPool2D(count_include_pad=
    False) and GlobalAvgPool2D, survive a checkpoint under their own names, and refuse a
    channels-last data_format and keepdims=True by name."""
    def stack(keras):
        if keras:
            return [layers.MaxPooling2D(), layers.AveragePooling2D(3, strides=1, padding="same"),
                    layers.GlobalAveragePooling2D()]
        return [layers.MaxPool2D(2), layers.AvgPool2D(3, 1, 1, count_include_pad=False), layers.GlobalAvgPool2D()]
    x = np.random.default_rng(0).standard_normal((3, 2, 8, 6)).astype(np.float32)
    a, b = (mpscy.Engine(mpscy.Sequential(stack(k), input_shape=(2, 8, 6)), loss="mse", batch_size=3, device="cpu")
            for k in (True, False))
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    a.save(tmp_path / "k.mpscy")
    back = mpscy.load(tmp_path / "k.mpscy", device="cpu")
    assert [type(n.layer).__name__ for n in back.model.nodes[1:]] == ["MaxPooling2D", "AveragePooling2D",
                                                                      "GlobalAveragePooling2D"]
    np.testing.assert_array_equal(back.predict(x), a.predict(x))
    for make in (lambda: layers.MaxPooling2D(data_format="channels_last"),
                 lambda: layers.AveragePooling2D(data_format="channels_last"),
                 lambda: layers.GlobalAveragePooling2D(data_format="channels_last")):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"data_format 'channels_last': mpscy's images are "
                                                             r"channels-first \(C, H, W\)"):
            make()
    with pytest.raises(mpscy.InvalidArgumentError, match="keepdims=True is not available"):
        layers.GlobalAveragePooling2D(keepdims=True)


def test_dcgan_generator_trains_as_torch_does(device):
    """A DCGAN generator, Dense -> Reshape -> ConvTranspose2D (4x4, stride 2, padding 1) ->
    BatchNorm -> ReLU -> ConvTranspose2D -> Tanh, takes torch's state_dict as it is (its
    num_batches_tracked passed over) and matches torch's: the loss, every gradient within 1e-4,
    and five Adam steps (parameters and running statistics) within 1e-4."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    tm = nn.Sequential()
    tm.add_module("fc", nn.Linear(8, 16 * 4 * 4))
    tm.add_module("view", nn.Unflatten(1, (16, 4, 4)))
    tm.add_module("up1", nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False))
    tm.add_module("bn", nn.BatchNorm2d(8))
    tm.add_module("act", nn.ReLU())
    tm.add_module("up2", nn.ConvTranspose2d(8, 3, 4, 2, 1))
    tm.add_module("out", nn.Tanh())
    model = mpscy.Sequential([layers.Dense(16 * 4 * 4, name="fc"), layers.Reshape((16, 4, 4), name="view"),
                              layers.ConvTranspose2D(8, 4, 2, 1, bias=False, name="up1"), layers.BatchNorm(name="bn"),
                              layers.ReLU(name="act"), layers.ConvTranspose2D(3, 4, 2, 1, name="up2"),
                              layers.Tanh(name="out")], input_shape=(8,))
    engine = mpscy.Engine(model, loss="mse", optimizer=optim.Adam(2e-3), batch_size=6, device=device)
    engine.set_parameters({k: v.numpy() for k, v in tm.state_dict().items()})
    rng = np.random.default_rng(1)
    z, target = rng.standard_normal((6, 8)).astype(np.float32), rng.uniform(-1, 1, (6, 3, 16, 16)).astype(np.float32)
    probe = copy.deepcopy(tm)   # its train-mode forward moves its running statistics; tm's stay
    loss = nn.functional.mse_loss(probe(torch.from_numpy(z)), torch.from_numpy(target))
    loss.backward()
    g = engine.gradients(z, target)
    assert abs(g["loss"] - loss.item()) <= 1e-5 * loss.item()
    for k, p in probe.named_parameters():
        assert R.rel_err(g[k], p.grad.numpy()) < 1e-4, k
    topt = torch.optim.Adam(tm.parameters(), lr=2e-3)
    for _ in range(5):
        topt.zero_grad()
        nn.functional.mse_loss(tm(torch.from_numpy(z)), torch.from_numpy(target)).backward()
        topt.step()
        engine.step(z, target)
    after = engine.get_parameters()
    for k, v in tm.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert R.rel_err(after[k], v.numpy()) < 1e-4, k


@pytest.mark.parametrize("frozen", [False, True])
def test_depthwise_convolution_gradients_against_torch(device, rng, frozen):
    """A depthwise Conv2D at stride 1 (the cpu's direct stencil, both ways) whose input also feeds
    an Add (its input gradient added to another), dilated and padded, through a fused ReLU, frozen
    or not: every gradient against torch in float64."""
    torch = pytest.importorskip("torch")
    x_in = mpscy.Input((6, 10, 9))
    h = layers.Conv2D(6, 1, name="pre")(x_in)
    d = layers.ReLU()(layers.Conv2D(6, 3, groups=6, padding=2, dilation=2, name="dw")(h))
    out = layers.Dense(3, name="fc")(layers.Flatten()(layers.Add()([d, h])))
    model = mpscy.Model(x_in, out)
    if frozen:
        model.nodes[2].layer.trainable = False
    engine = mpscy.Engine(model, loss="mse", batch_size=4, device=device, seed=2, input_gradients=True)
    P = engine.get_parameters()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Conv2d(6, 6, 1)
            self.dw = torch.nn.Conv2d(6, 6, 3, groups=6, padding=2, dilation=2)
            self.fc = torch.nn.Linear(6 * 10 * 9, 3)

        def forward(self, x):
            h = self.pre(x)
            return self.fc(torch.flatten(torch.relu(self.dw(h)) + h, 1))

    net = Net().double()
    net.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in P.items()})
    x = rng.standard_normal((4, 6, 10, 9)).astype(np.float32)
    t = rng.standard_normal((4, 3)).astype(np.float32)
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    torch.nn.functional.mse_loss(net(xt), torch.from_numpy(t.astype(np.float64))).backward()
    g = engine.gradients(x, t)
    assert R.rel_err(g["input"], xt.grad.numpy()) < 1e-5
    for name, p in net.named_parameters():
        if frozen and name.startswith("dw."):
            assert name not in g
            continue
        assert R.rel_err(g[name], p.grad.numpy()) < 1e-5, name


def test_depthwise_weight_gradient_ignores_inputs_no_output_reads(device):
    """A depthwise convolution dilated past its output's width (1 x 2 taps 4 apart over 5 columns:
    one output column, reading input columns 0 and 4) whose input holds an Inf in a column no
    output reads (from a 1x1 convolution of 3e38 by 10): the weight gradient took the unread
    column times 0 and was NaN; the loss and every gradient are finite, as torch's and the
    columns' path are, and match torch float64."""
    torch = pytest.importorskip("torch")
    x_in = mpscy.Input((2, 2, 5))
    d = layers.Conv2D(2, (1, 2), groups=2, dilation=(1, 4), name="dw")(layers.Conv2D(2, 1, bias=False, name="pre")(x_in))
    engine = mpscy.Engine(mpscy.Model(x_in, layers.Flatten()(d)), loss="mse", batch_size=1, device=device,
                          input_gradients=True)
    engine.set_parameters({"pre.weight": 10 * np.eye(2, dtype=np.float32).reshape(2, 2, 1, 1)}, strict=False)
    x = np.full((1, 2, 2, 5), 0.5, np.float32)
    x[0, 0, 0, 2] = 3e38
    g = engine.gradients(x, np.zeros((1, 4), np.float32))
    pre = torch.nn.Conv2d(2, 2, 1, bias=False).double()
    dw = torch.nn.Conv2d(2, 2, (1, 2), groups=2, dilation=(1, 4)).double()
    P = engine.get_parameters()
    with torch.no_grad():
        pre.weight.copy_(torch.from_numpy(P["pre.weight"].astype(np.float64)))
        dw.weight.copy_(torch.from_numpy(P["dw.weight"].astype(np.float64)))
        dw.bias.copy_(torch.from_numpy(P["dw.bias"].astype(np.float64)))
    loss = (dw(pre(torch.from_numpy(x.astype(np.float64)))) ** 2).mean()
    loss.backward()
    assert np.isfinite(g["loss"]) and abs(g["loss"] - loss.item()) <= 1e-6 * loss.item()
    assert R.rel_err(g["dw.weight"], dw.weight.grad.numpy()) < 1e-6
    assert R.rel_err(g["dw.bias"], dw.bias.grad.numpy()) < 1e-6


def test_dense_forward_in_packed_panels_bits_and_values():
    """A Dense forward in a graph built for 64 rows or more takes x W^T in panels of W^T packed
    16 x 16 at a time (objc/cpu/gemm.c's gemm512_ntp, on a CPU with AVX-512 and FMA). Shapes
    with every edge: 37 outputs (a full panel of 32 and a masked one), 531 inputs (two k-blocks
    of 256 and 19 more, of which 3 past the last 16), 67 rows (8-row blocks and 3 over). Its
    outputs are within 1e-6 of float64 NumPy; a row's bits are the same in a full batch and in a
    partial one (the form is the graph's, not the call's), and on 1, 2 and 3 threads, also for a
    784 -> 1000 layer at 64 rows, past 2^25 multiply-adds on one thread but not on two (its parts
    had gone to BLAS on one thread and to the panels on two); the dot form (MPSCY_CPU_NT_PACK=0)
    agrees within 1e-6 and differs in bits (both forms ran)."""
    code = textwrap.dedent("""
        import sys, numpy as np, mpscy
        from mpscy import layers
        rng = np.random.default_rng(5)
        x = rng.standard_normal((67 + 30, 531)).astype(np.float32)
        out = {}
        for t in (1, 2, 3):
            e = mpscy.Engine(mpscy.Sequential([layers.Dense(37)], input_shape=(531,)), loss="mse",
                             batch_size=67, device="cpu", seed=2, threads=t)
            out[f"full{t}"] = e.predict(x[:67])
            out[f"mixed{t}"] = e.predict(x[37:])  # rows 37..96: one partial batch of 60
            # past 2^25 multiply-adds on one thread (784 -> 1000 at 64 rows), not on two: the form
            # is still the graph's (it had gone to BLAS on one thread, to the panels on two)
            big = mpscy.Engine(mpscy.Sequential([layers.Dense(1000)], input_shape=(784,)), loss="mse",
                               batch_size=64, device="cpu", seed=3, threads=t)
            xb = np.ascontiguousarray(np.tile(x[:, :392], (1, 2))[:70])
            out[f"bigfull{t}"], out[f"bigpart{t}"] = big.predict(xb[:64]), big.predict(xb[54:70])
        p = e.get_parameters()
        np.savez(sys.argv[1], name=e.device_info()["name"], w=p["dense_0.weight"], b=p["dense_0.bias"], x=x, **out)
    """)

    def run(tmp, **env):
        path = os.path.join(tmp, f"{len(env)}.npz")
        subprocess.run([sys.executable, "-c", code, path], env={**os.environ, **env}, check=True)
        return dict(np.load(path))

    with tempfile.TemporaryDirectory() as tmp:
        packed, dot = run(tmp), run(tmp, MPSCY_CPU_NT_PACK="0")
    if "AVX-512" not in str(packed["name"]):
        pytest.skip("this CPU has no AVX-512 with FMA: BLAS does every product either way")
    x = packed["x"].astype(np.float64)
    want = x @ packed["w"].astype(np.float64).T + packed["b"]
    for got in (packed, dot):
        assert R.rel_err(got["full1"], want[:67]) < 1e-6
        assert R.rel_err(got["mixed1"], want[37:]) < 1e-6
        for t in (2, 3):
            assert np.array_equal(got[f"full{t}"], got["full1"]) and np.array_equal(got[f"mixed{t}"], got["mixed1"])
        assert np.array_equal(got["mixed1"][:30], got["full1"][37:])  # the same rows, full batch and partial
    for t in (1, 2, 3):
        assert np.array_equal(packed[f"bigfull{t}"], packed["bigfull1"])
        assert np.array_equal(packed[f"bigpart{t}"][:10], packed["bigfull1"][54:])
    assert not np.array_equal(packed["full1"], dot["full1"])
