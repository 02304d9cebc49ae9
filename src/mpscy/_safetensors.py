"""The safetensors container, written and read with NumPy alone (no extra dependency): a flat,
pickle-free standard format that any safetensors reader opens and can memory-map. Its JSON
header lists each tensor's dtype, shape and byte range, so a truncated file is detected exactly;
an optional SHA-256 of the tensor bytes in its string metadata refuses a corrupted one. Files are
written to a temporary name and renamed, so an interrupted write never leaves half a file.
checkpoint.py builds mpscy's checkpoints on it."""

import hashlib
import json
import math
import os
import struct

import numpy as np

from ._atomic import replaced
from .errors import CheckpointError, InvalidArgumentError

__all__ = ["write_safetensors", "read_safetensors"]

_MAX_HEADER = 100 << 20   # the reference implementation's limit on the JSON header
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def _path(path):
    """`path` as a str; anything but a str, bytes or os.PathLike is refused (open() would take
    an int as a file descriptor, and close it)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise InvalidArgumentError(f"a checkpoint path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(path)


def write_safetensors(path, tensors, metadata=None, checksum=False):
    """Writes {name: array} and string metadata as a safetensors file (little-endian,
    row-major, the header padded with spaces to 8 bytes), atomically. checksum=True adds the
    SHA-256 of the tensor bytes to the metadata as "sha256"."""
    path = _path(path)
    header, chunks, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        arr = arr if arr.flags.c_contiguous else arr.copy()  # ascontiguousarray would make 0-d 1-d
        key = arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == ">" else arr.dtype.str
        if key not in _NAMES:
            raise InvalidArgumentError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[key], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    metadata = dict(metadata or {})
    if checksum:
        h = hashlib.sha256()
        for c in chunks:
            h.update(c)
        metadata["sha256"] = h.hexdigest()
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with replaced(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for c in chunks:
            f.write(c)


def looks_like_safetensors(raw):
    """Whether the first bytes are a safetensors file's: an 8-byte little-endian header length
    within the reader's limit, then the JSON header's "{" (the ONNX import's hint for a
    checkpoint given to it; _other_format names the other way round)."""
    return len(raw) >= 9 and raw[8:9] == b"{" and int.from_bytes(raw[:8], "little") <= _MAX_HEADER


def _other_format(raw):
    """What a file that is no safetensors file looks like, from its first bytes, with what reads
    it; None when unknown. An ONNX ModelProto opens with its ir_version (field 1, a small
    varint), then field 2..8 (producer name ... opset imports)."""
    if raw[:1] == b"\x08" and raw[1] < 0x80 and raw[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42):
        return "an ONNX model (a protobuf): read it with mpscy.onnx.load"
    if raw[:4] == b"PK\x03\x04":
        return ("a zip archive (torch.save's format, or NumPy's .npz): mpscy reads its own checkpoints; "
                "a PyTorch model comes in through ONNX (torch.onnx.export, then mpscy.onnx.load)")
    # a pickle's PROTO opcode and version, then (protocol 4+) a FRAME or (2, 3) one of the opcodes
    # torch.save and pickle.dump start with: a safetensors header length has zeros there
    if raw[:1] == b"\x80" and raw[1] in (2, 3, 4, 5) and raw[2] in (0x95, 0x8A, 0x7D, 0x5D, 0x63, 0x28, 0x58):
        return "a Python pickle (an older torch.save): a PyTorch model comes in through ONNX (mpscy.onnx.load)"
    if raw[:8] == b"\x89HDF\r\n\x1a\n":
        return "an HDF5 file (Keras's .h5): a Keras model comes in through ONNX (tf2onnx, then mpscy.onnx.load)"
    return None


def read_safetensors(path):
    """({name: array}, metadata) from a safetensors file, every header field checked against the
    file; raises CheckpointError naming the first problem."""
    path = _path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from None
    if len(raw) < 8:
        raise CheckpointError(f"{path!r} is truncated: {len(raw)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        other = _other_format(raw)
        if other:
            raise CheckpointError(f"{path!r} is not an mpscy checkpoint: it looks like {other}")
        raise CheckpointError(f"{path!r} is truncated or not a safetensors file: header of {n} bytes "
                              f"announced, {len(raw) - 8} bytes present")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path!r} has a corrupted header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r} has a corrupted header: not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path!r} has a corrupted header: __metadata__ must map names to strings, "
                              f"got {str(metadata)[:80]}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{path!r} has a corrupted header: __metadata__[{k!r}] must be a string, "
                                  f"got {str(v)[:80]}")
    data = memoryview(raw)[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            shape = None
        if shape is None or not all(type(v) is int for v in (*shape, begin, end)):   # JSON integers, no bools
            raise CheckpointError(f"{path!r}: the header entry of {name!r} is malformed: {str(info)[:200]}")
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize:  # exact, no int64 wrap
            raise CheckpointError(f"{path!r}: tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, begin, end)
    spans.sort()
    expect = 0
    for begin, end, name in spans:
        if begin != expect:
            raise CheckpointError(f"{path!r}: tensor {name!r} starts at byte {begin}, expected {expect}")
        expect = end
    if len(data) < expect:
        raise CheckpointError(f"{path!r} is truncated: {expect} bytes of tensor data expected, {len(data)} present")
    if len(data) > expect:
        raise CheckpointError(f"{path!r} has {len(data) - expect} unexpected bytes after its tensor data")
    digest = metadata.get("sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path!r} is corrupted: the tensor data does not match its SHA-256")
    out = {name: np.frombuffer(data[b:e], dtype=dt).reshape(sh).astype(dt.newbyteorder("="), copy=True)
           for name, (dt, sh, b, e) in tensors.items()}
    return out, metadata
