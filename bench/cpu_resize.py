#!/usr/bin/env python3
"""The cpu backend's Upsample (nearest and bilinear) against PyTorch's CPU kernels: one layer on
(64, 32, 32, 32) float32, forward and backward through `engine.gradients` (MAE loss, input
gradients) against torch's nn.Upsample (cpu_compare.py). Up by 2 (8M outputs) in each mode, and
bilinear down to 20 x 20. With torch installed, each row must be within TARGET of torch's time
measured in the same run.

    python bench/cpu_resize.py [--threads N]
"""
from mpscy import layers as L

from cpu_compare import main

TARGET = 3.0   # mpscy / torch for one layer's forward and backward, the call's own cost included


def _row(name, **kw):
    return (name, lambda: L.Upsample(**kw), (32, 32, 32), 64, lambda torch: torch.nn.Upsample(**kw), True)


ROWS = [_row("nearest x2", scale_factor=2), _row("bilinear x2", scale_factor=2, mode="bilinear"),
        _row("bilinear x2 align", scale_factor=2, mode="bilinear", align_corners=True),
        _row("bilinear to 20x20", size=(20, 20), mode="bilinear")]

if __name__ == "__main__":
    main(__doc__, "upsample", ROWS, "mae", TARGET)
