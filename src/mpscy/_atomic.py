"""`replaced(path)`: a file written whole or not at all (checkpoints, ONNX exports)."""

import contextlib
import errno
import os


@contextlib.contextmanager
def replaced(path, suffix=""):
    """Yields a temporary name beside `path` (ending in `suffix`) to write to; renames it over
    `path` once the block ends without error, and removes it either way, so an interrupted or
    failed write leaves no partial file. An OSError of the write or the rename names `path`,
    not the temporary file (a folder at `path`, say); a missing folder is named as such (as
    torch.save does), not created: FileNotFoundError, before anything is written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "the folder to write into does not exist (create it first)", folder)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
