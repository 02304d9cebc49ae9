#!/usr/bin/env python3
"""The cpu backend's element-wise activations against PyTorch's CPU kernels: one activation layer
on (64, 32, 32, 32) float32 (2M elements), forward and backward through `engine.gradients` (MAE
loss, input gradients) against torch's module (cpu_compare.py). The flatten row (a copy each way)
is about mpscy's cost of the call itself (staging the batch and the target, the loss, the input
gradient's copy), which every other row includes. With torch installed, each activation's row
must be within TARGET of torch's time measured in the same run.

    python bench/cpu_activations.py [--threads N]
"""
from mpscy import layers as L

from cpu_compare import main

TARGET = 3.0   # mpscy / torch for one layer's forward and backward, the call's own cost included
SHAPE = (32, 32, 32)


def _row(name, make, torch_name, **torch_kw):
    # flatten: the call's own cost, for reference, not gated
    return (name, make, SHAPE, 64, lambda torch: getattr(torch.nn, torch_name)(**torch_kw), name != "flatten")


ROWS = [_row("flatten", L.Flatten, "Flatten"), _row("relu", L.ReLU, "ReLU"), _row("sigmoid", L.Sigmoid, "Sigmoid"),
        _row("tanh", L.Tanh, "Tanh"), _row("swish", L.Swish, "SiLU"), _row("elu", L.ELU, "ELU"),
        _row("gelu", L.GELU, "GELU"), _row("gelu_tanh", lambda: L.GELU(approximate="tanh"), "GELU", approximate="tanh"),
        _row("softplus", L.Softplus, "Softplus"), _row("mish", L.Mish, "Mish"), _row("relu6", L.ReLU6, "ReLU6"),
        _row("hardswish", L.Hardswish, "Hardswish")]

if __name__ == "__main__":
    main(__doc__, "activation", ROWS, "mae", TARGET)
