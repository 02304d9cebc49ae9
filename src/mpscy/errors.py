"""Exceptions raised by mpscy. Every native status maps to one class here (see `_native._check`);
each also derives from the built-in exception that fits, so ``except ValueError`` still works."""

__all__ = [
    "Error", "InvalidArgumentError", "ShapeError", "DTypeError", "OutOfMemoryError",
    "DeviceError", "UnsupportedError", "NonFiniteError", "StateError", "CheckpointError",
]


class Error(Exception):
    """Base class of every mpscy error."""


class InvalidArgumentError(Error, ValueError):
    """An argument or option is invalid (status MPSCY_INVALID): a label out of range, a bad option."""


class ShapeError(InvalidArgumentError):
    """Shapes or sizes do not agree (status MPSCY_SHAPE)."""


class DTypeError(Error, TypeError):
    """An array has the wrong dtype, or an argument is not an array at all."""


class OutOfMemoryError(Error, MemoryError):
    """Host or device memory could not be allocated (status MPSCY_OOM)."""


class DeviceError(Error, RuntimeError):
    """The device failed or is absent, or its backend was not built (status MPSCY_DEVICE)."""


class UnsupportedError(Error, NotImplementedError):
    """A valid request this backend does not implement (status MPSCY_UNSUPPORTED)."""


class NonFiniteError(Error, ValueError):
    """NaN or Inf in the inputs, the loss or the gradients. A step that raises it applied no update."""


class StateError(Error, RuntimeError):
    """The object is in a state that forbids the call (for example, the engine was closed)."""


class CheckpointError(Error, ValueError):
    """A checkpoint file is missing, truncated, corrupted, or not an mpscy checkpoint."""
