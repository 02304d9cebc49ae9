#!/usr/bin/env python3
"""The cpu backend's ConvTranspose2D (conv.c's convolution tasks in the transposed roles) against
PyTorch's CPU kernels: one layer's forward and backward (input, weight and bias gradients) through
`engine.gradients` (MSE loss) against torch's nn.ConvTranspose2d (cpu_compare.py). Shapes of a
DCGAN generator (4x4, stride 2, padding 1) and a U-Net's up-convolution (2x2, stride 2), as
bench/cuda_convt.py. With torch installed, each row must be within TARGET of torch's time measured
in the same run.

    python bench/cpu_convt.py [--threads N]
"""
from mpscy import layers as L

from cpu_compare import main

TARGET = 2.0   # mpscy / torch for one layer's forward and backward, the call's own cost included


def _row(name, shape, batch, filters, kernel_size, stride, padding=0):
    return (name, lambda: L.ConvTranspose2D(filters, kernel_size, stride, padding), shape, batch,
            lambda torch: torch.nn.ConvTranspose2d(shape[0], filters, kernel_size, stride, padding), True)


ROWS = [_row("dcgan 128->64, 8x8", (128, 8, 8), 64, 64, 4, 2, 1),
        _row("dcgan 64->32, 16x16", (64, 16, 16), 64, 32, 4, 2, 1),
        _row("unet 64->32, 32x32 2x2", (64, 32, 32), 32, 32, 2, 2)]

if __name__ == "__main__":
    main(__doc__, "layer", ROWS, "mse", TARGET)
