"""Layer specifications. A layer here holds options only: it infers its output shape, names and
initializes its parameters (PyTorch's default initializers, from the engine's seeded generator)
and describes itself to the native graph builder. All computation happens in the backend.

Shapes are per sample (batch excluded) and follow PyTorch/ONNX layouts: images are (C, H, W),
Dense weights (out, in), Conv2D weights (out_c, in_c / groups, kh, kw), ConvTranspose2D's
(in_c, out_c / groups, kh, kw). One module per family, as the backends' files: base (Layer,
Dense, activations, Reshape, Dropout), conv (convolution, pooling and upsampling), norm
(BatchNorm, LayerNorm), merge (Add, Concatenate)."""

from .base import (ELU, GELU, Activation, Dense, Dropout, Flatten, Hardsigmoid, HardSigmoid, Hardswish, HardSwish,
                   Layer, LeakyReLU, Mish, ReLU, ReLU6, Reshape, Sigmoid, SiLU, Softmax, Softplus, Swish, Tanh,
                   Unflatten, kaiming_uniform)
from .conv import (AveragePooling2D, AvgPool2D, Conv2D, ConvTranspose2D, GlobalAveragePooling2D, GlobalAvgPool2D,
                   MaxPool2D, MaxPooling2D, Upsample, UpSampling2D)
from .merge import Add, Concatenate
from .norm import BatchNorm, LayerNorm

__all__ = [
    "Layer", "Activation", "Dense", "ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh", "Swish", "SiLU", "GELU",
    "ReLU6", "Hardsigmoid", "HardSigmoid", "Hardswish", "HardSwish", "Softplus", "Mish",
    "Softmax", "Flatten", "Reshape", "Unflatten", "Conv2D", "ConvTranspose2D", "MaxPool2D", "AvgPool2D",
    "GlobalAvgPool2D", "BatchNorm", "LayerNorm", "Dropout", "Add", "Concatenate", "Upsample", "UpSampling2D",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
]
