"""Data input for `Engine.fit`: `ArrayDataset` (arrays in memory), `ImageFolder` (a folder per
class of JPEG/PNG/BMP files, read with Pillow, an optional extra) and `DataLoader`, which
batches a dataset in a seeded order and builds the next batches on a background thread while
the native step runs. A loader yields every sample exactly once per epoch (the last batch may be
short unless drop_last). Nothing here touches the engine or native memory."""

import os
import queue
import threading

import numpy as np

from ._checks import host_array, nonneg_int, number, path as _path
from .errors import InvalidArgumentError, ShapeError

__all__ = ["Dataset", "ArrayDataset", "Subset", "DataLoader", "ImageFolder", "RandomHorizontalFlip",
           "RandomCrop", "load_image", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class Dataset:
    """Base class: `len(ds)` samples; `ds[i]` is one sample (a tuple, e.g. (x, y); a list counts as one);
    `ds.get_batch(indices)` stacks samples into contiguous arrays (override it when a
    vectorized gather is cheaper, as ArrayDataset does)."""

    def __len__(self):
        raise NotImplementedError

    def __getitem__(self, i):
        raise NotImplementedError

    def get_batch(self, indices):
        """The samples at `indices` (a sequence or a slice) stacked into batch arrays: (x, y),
        or x alone for a dataset without labels. Subclasses may return them faster."""
        if isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        samples = [self[int(i)] for i in indices]
        if not isinstance(samples[0], (tuple, list)):
            return np.ascontiguousarray(np.stack(samples))
        # a list sample [x, y] is taken as (x, y), as torch's default_collate does
        if any(not isinstance(s, (tuple, list)) or len(s) != len(samples[0]) for s in samples):
            raise InvalidArgumentError(f"{type(self).__name__} samples must all be tuples such as (x, y) of one "
                                       f"length; the first has {len(samples[0])} items, another differs")
        out = []
        for k in range(len(samples[0])):
            try:
                out.append(np.ascontiguousarray(np.stack([s[k] for s in samples])))
            except ValueError as e:
                raise ShapeError(f"item {k} of the samples of {type(self).__name__} cannot be stacked into a batch "
                                 f"(samples must be tuples such as (x, y) of equally shaped arrays): {e}") from None
        return tuple(out)


class ArrayDataset(Dataset):
    """Rows of equally long arrays, e.g. ``ArrayDataset(x, y)``; an element may be a list of
    arrays (the inputs of a multi-input model). Arrays are used as given (no copy)."""

    def __init__(self, *arrays):
        if not arrays:
            raise InvalidArgumentError("ArrayDataset needs at least one array")
        lengths = set()
        self.arrays = []
        for i, a in enumerate(arrays):
            if isinstance(a, (list, tuple)):
                group = [_row_array(v, f"array {i}[{j}]") for j, v in enumerate(a)]
                lengths.update(len(v) for v in group)
                self.arrays.append(group)
            else:
                a = _row_array(a, f"array {i}")
                lengths.add(len(a))
                self.arrays.append(a)
        if len(lengths) != 1:
            raise ShapeError(f"ArrayDataset arrays have different row counts: {sorted(lengths)}")
        self._n = lengths.pop()

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        return tuple([v[i] for v in a] if isinstance(a, list) else a[i] for a in self.arrays)

    def get_batch(self, indices):
        def take(a):
            if isinstance(indices, slice):
                return np.ascontiguousarray(a[indices])
            return np.take(a, indices, axis=0)  # a fresh, contiguous copy
        return tuple([take(v) for v in a] if isinstance(a, list) else take(a) for a in self.arrays)


def _row_array(a, what):
    """np.asarray(a) with a first (row) dimension, or an error naming the argument."""
    try:
        a = host_array(a)
    except (TypeError, ValueError) as e:  # a ragged list, an object numpy cannot convert
        raise InvalidArgumentError(f"ArrayDataset {what} is not an array: {e}") from None
    if a.ndim == 0:
        raise ShapeError(f"ArrayDataset arrays need a first (row) dimension; {what} is {a!r}")
    return a


class Subset(Dataset):
    """The samples of `dataset` at `indices` (integers), in that order (e.g. a held-out split)."""

    def __init__(self, dataset, indices):
        try:
            idx = np.asarray(indices).reshape(-1)
        except (TypeError, ValueError):
            idx = None
        if idx is not None and idx.size == 0:
            idx = idx.astype(np.int64)
        if idx is None or idx.dtype.kind not in "iu":  # floats are not truncated, a bool mask not taken for indices
            raise InvalidArgumentError(f"Subset indices must be integers, got {indices!r}")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise InvalidArgumentError(f"Subset takes a dataset (with __len__ and __getitem__), got "
                                       f"{type(dataset).__name__}")
        self.dataset = dataset
        self.indices = idx.astype(np.int64)
        if self.indices.size and (idx.min() < 0 or idx.max() >= len(dataset)):
            raise InvalidArgumentError(f"Subset indices must lie in [0, {len(dataset)})")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def set_epoch(self, epoch):
        """Passed on to the dataset (an ImageFolder's augmentation draws by epoch)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def get_batch(self, indices):
        picked = self.indices[indices]
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(picked)
        return Dataset.get_batch(self.dataset, picked)


class DataLoader:
    """Batches of `dataset` in a seeded order, prepared `prefetch` batches ahead on a
    background thread (prefetch=0: in the calling thread).

    The order of epoch e is a permutation drawn from PCG64([seed, e]) when shuffle is on, so
    it does not depend on how earlier epochs were consumed; each iteration advances the epoch
    (`set_epoch` picks it, as after a resumed checkpoint). Breaking out of a loop stops the
    thread. Errors raised while building a batch re-raise in the consuming thread.

    Example::

        loader = DataLoader(ArrayDataset(x, y), batch_size=64, shuffle=True, seed=0)
        engine.fit(loader, epochs=5)
    """

    def __init__(self, dataset, batch_size=32, shuffle=False, drop_last=False, seed=0, prefetch=2):
        if not hasattr(dataset, "__len__") or not (hasattr(dataset, "get_batch") or hasattr(dataset, "__getitem__")):
            raise InvalidArgumentError("dataset must have __len__ and __getitem__ (or get_batch)")
        for name, v, lo in (("batch_size", batch_size, 1), ("prefetch", prefetch, 0), ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {v!r}")
        if len(dataset) == 0:
            raise InvalidArgumentError("the dataset is empty")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.prefetch = int(prefetch)
        self.epoch = 0

    def __len__(self):
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch):
        """The epoch whose order the next iteration uses."""
        self.epoch = nonneg_int(epoch, "epoch")

    def indices(self, epoch=None):
        """The list of index arrays (or slices) making up the batches of `epoch`."""
        epoch = self.epoch if epoch is None else int(epoch)
        n, b = len(self.dataset), self.batch_size
        stop = n - n % b if self.drop_last else n
        if not self.shuffle:
            return [slice(i, min(i + b, stop)) for i in range(0, stop, b)]
        order = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)
        return [order[i:min(i + b, stop)] for i in range(0, stop, b)]

    def _get(self, idx):
        ds = self.dataset
        return ds.get_batch(idx) if hasattr(ds, "get_batch") else Dataset.get_batch(ds, idx)

    def __iter__(self):
        batches = self.indices()
        if hasattr(self.dataset, "set_epoch"):   # e.g. an ImageFolder's augmentation, drawn by epoch
            self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        if self.prefetch == 0:
            return (self._get(idx) for idx in batches)
        return _Prefetcher(self, batches)

    def __repr__(self):
        return (f"DataLoader({type(self.dataset).__name__} of {len(self.dataset)}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last}, seed={self.seed}, prefetch={self.prefetch})")


_DONE = object()


def _put(q, stop, item):
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _stop_error(e):
    """the RuntimeError a generator raises for a StopIteration inside it, caused by e"""
    err = RuntimeError("generator raised StopIteration")
    err.__cause__ = e
    return err


def _work(get, batches, q, stop):
    # A plain function: the thread must not hold the iterator, or an abandoned loop would
    # keep it alive and its __del__ (which stops this thread) would never run.
    try:
        for idx in batches:
            if not _put(q, stop, ("ok", get(idx))):
                return
    except StopIteration as e:  # raised by a sample's loading: as a generator's would be, not the epoch's end
        _put(q, stop, ("error", _stop_error(e)))   # no local of this frame holds it: e's traceback holds the frame
        return
    except BaseException as e:  # noqa: B902 - handed to the consumer, which re-raises it
        _put(q, stop, ("error", e))
        return
    _put(q, stop, ("ok", _DONE))


class _Prefetcher:
    """Iterator over a loader's batches, built ahead by one daemon thread into a bounded queue."""

    def __init__(self, loader, batches):
        self._queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_work, args=(loader._get, batches, self._queue, self._stop),
                                        name="mpscy-data", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, item = self._queue.get()
        if kind == "error":
            self.close()
            try:
                raise item
            finally:  # this frame holds the exception, whose traceback holds this frame (and the caller's
                del item  # engine): a cycle only the collector would free
        if item is _DONE:
            self.close()
            raise StopIteration
        return item

    def close(self):
        """Stops the thread (also when the loop was left early) and waits for it."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


# ----------------------------------------------------------------------------- images
def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading images needs Pillow: pip install 'mpscy[images]'") from None
    return Image


def _as_int(v):
    """v as an int when it is an integer (or an integral float), else None; bools are not."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return None


def _pair_size(size, what):
    if size is None:
        return None
    pair = (size, size) if _as_int(size) is not None else size
    try:
        pair = tuple(_as_int(s) for s in pair) if not isinstance(pair, str) else ()
    except TypeError:
        pair = ()
    if len(pair) != 2 or None in pair or min(pair) < 1:
        raise InvalidArgumentError(f"{what} must be a positive int or (height, width), got {size!r}")
    return pair


def _check_channels(channels):
    c = _as_int(channels)
    if c not in (1, 3):
        raise InvalidArgumentError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return c


def _channel_values(v, channels, what, default):
    try:
        with np.errstate(over="ignore"):  # 1e300 becomes inf, refused below
            v = np.full(channels, default, np.float32) if v is None else np.asarray(v, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what} must be a number or {channels} numbers, got {v!r}") from None
    if v.size == 1:
        v = np.full(channels, v[0], np.float32)
    if v.size != channels:
        raise InvalidArgumentError(f"{what} needs 1 or {channels} values for {channels} channel(s), got {v.size}")
    if not np.isfinite(v).all():
        raise InvalidArgumentError(f"{what} must be finite float32 values, got {v.tolist()}")
    if what == "std" and (v == 0).any():
        raise InvalidArgumentError(f"std must be non-zero in every channel (it divides the pixels), got {v.tolist()}")
    return v.reshape(channels, 1, 1)


# Pillow modes holding 16-bit gray samples: "I;16*", and "I" read from PNG (older Pillow widened
# 16-bit PNGs to "I") or PGM (Pillow rescales maxval > 255 to 0..65535). Other "I" (32-bit TIFF)
# and "F" have no defined range, so they are refused rather than guessed.
_WIDE_FORMATS = ("PNG", "PPM")


def _pixels(im, path, channels, size, Image):
    """float32 (H, W) or (H, W, 3) in [0, 1], resized to size (H, W) when given."""
    mode = im.mode
    if mode.startswith("I;16") or (mode == "I" and im.format in _WIDE_FORMATS):
        # convert("L") would clip these at 255; scale the full range and resize as float
        g = Image.fromarray(np.asarray(im, dtype=np.float32) / np.float32(65535.0))
        if size is not None and g.size != (size[1], size[0]):
            g = g.resize((size[1], size[0]), Image.BILINEAR)
        a = np.asarray(g, dtype=np.float32)
        return a if channels == 1 else np.repeat(a[:, :, None], 3, axis=2)
    if mode in ("I", "F"):
        kind = " ".join(filter(None, ("32-bit integer" if mode == "I" else "32-bit float", im.format)))
        raise InvalidArgumentError(f"cannot read image {path}: Pillow mode {mode!r} ({kind}) has no defined "
                                   f"pixel range; mpscy reads 8- and 16-bit images, so convert it first")
    im = im.convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def load_image(path, image_size=None, channels=3, mean=None, std=None, invert=False):
    """One image as float32 (channels, H, W): pixels scaled to [0, 1] (1 - that with
    invert=True), resized (bilinear) to image_size=(H, W) when given, then (x - mean) / std per
    channel. 8-bit images are divided by 255; 16-bit grayscale ones (PNG/TIFF "I;16", PGM) by
    65535, their gray channel repeated when channels=3. 32-bit "I" and float "F" images are
    refused: their range is not defined. Arguments are checked before the file is read."""
    Image = _pil()
    size = _pair_size(image_size, "image_size")
    channels = _check_channels(channels)
    mean = _channel_values(mean, channels, "mean", 0.0)
    std = _channel_values(std, channels, "std", 1.0)
    if not hasattr(path, "read"):  # a file object, as Image.open takes; else a path
        path = _path(path, "image path")
    try:
        with Image.open(path) as im:
            a = _pixels(im, path, channels, size, Image)
    except OSError as e:
        raise InvalidArgumentError(f"cannot read image {path}: {e}") from None
    a = a[None] if channels == 1 else a.transpose(2, 0, 1)
    if invert:
        a = 1.0 - a
    a = (a - mean) / std
    return np.ascontiguousarray(a, dtype=np.float32)


class RandomHorizontalFlip:
    """Mirrors an image (C, H, W) left-right with probability p."""

    def __init__(self, p=0.5):
        self.p = number(p, "RandomHorizontalFlip p")
        if not 0.0 <= self.p <= 1.0:
            raise InvalidArgumentError(f"RandomHorizontalFlip p must be in [0, 1], got {p!r}")

    def __call__(self, x, rng):
        return x[:, :, ::-1] if rng.random() < self.p else x


class RandomCrop:
    """Pads an image (C, H, W) with `padding` zeros per side and crops back to (H, W) at a
    random offset (the usual CIFAR augmentation). Its argument is the padding, an integer >= 0
    below the image's height and width (torchvision's RandomCrop(size, padding) takes the size
    first: RandomCrop(32) here would pad a 32 x 32 image by 32, and is refused)."""

    def __init__(self, padding=4):
        self.padding = nonneg_int(padding, "RandomCrop padding")

    def __call__(self, x, rng):
        p = self.padding
        if p <= 0:
            return x
        c, h, w = x.shape
        if p >= min(h, w):
            raise InvalidArgumentError(f"RandomCrop padding {p} is not below the image's {h} x {w}: a crop could "
                                       "hold no pixel of it (the argument is the padding, not torchvision's size)")
        padded = np.zeros((c, h + 2 * p, w + 2 * p), dtype=x.dtype)
        padded[:, p:p + h, p:p + w] = x
        i, j = rng.integers(0, 2 * p + 1, size=2)
        return padded[:, i:i + h, j:j + w]


def _extensions(extensions):
    """A tuple of lower-case name endings; one string is one extension (as torchvision takes it)."""
    items = (extensions,) if isinstance(extensions, str) else extensions
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if not items or any(not isinstance(e, str) or not e for e in items):
        raise InvalidArgumentError(f"extensions must be a non-empty string such as '.png' or a sequence of them, "
                                   f"got {extensions!r}")
    return tuple(e.lower() for e in items)


class ImageFolder(Dataset):
    """Images in one sub-folder per class (``root/cat/001.jpg``), classes in sorted order.

    Each sample is (float32 (channels, H, W), int label): pixels scaled to [0, 1], resized to
    image_size when given (else every image must already have one size), normalized with
    per-channel mean/std, then passed through `augment` (a callable f(x, rng) or a list of
    them, e.g. [RandomCrop(4), RandomHorizontalFlip()]), whose draws for sample i in epoch e come
    from PCG64([seed, e, i]): new ones each epoch, and the same ones whatever the batches'
    order, the prefetching or where a run was stopped, so that a resumed fit augments as the
    uninterrupted one did. A DataLoader sets the epoch (set_epoch) as it starts one. Files are
    picked by `extensions` (one string such as ".png", or a sequence of them); a class folder
    without such files is an error, as are bad channels, image_size, mean or std, all checked
    here. Needs Pillow (``pip install 'mpscy[images]'``)."""

    def __init__(self, root, image_size=None, mean=None, std=None, augment=None, channels=3,
                 seed=0, invert=False, extensions=IMAGE_EXTENSIONS):
        _pil()
        root = _path(root, "ImageFolder root")
        if not os.path.isdir(root):
            raise InvalidArgumentError(f"ImageFolder root {root!r} is not a directory")
        self.root = root
        self.image_size = _pair_size(image_size, "image_size")
        self._resize = self.image_size
        self.channels = _check_channels(channels)
        _channel_values(mean, self.channels, "mean", 0.0)  # checked now, not at the first image
        _channel_values(std, self.channels, "std", 1.0)
        self.mean, self.std, self.invert = mean, std, bool(invert)
        exts = _extensions(extensions)
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise InvalidArgumentError(f"ImageFolder root {root!r} has no class sub-folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):  # as torchvision
                for f in sorted(files):
                    if f.lower().endswith(exts):
                        self.samples.append((os.path.join(dirpath, f), self.class_to_idx[c]))
        if not self.samples:
            raise InvalidArgumentError(f"no {'/'.join(exts)} images under {root!r}")
        # an empty class would still take a label and an output unit, and never be seen
        empty = sorted(set(self.classes) - {self.classes[label] for _, label in self.samples})
        if empty:
            raise InvalidArgumentError(f"ImageFolder class folder(s) {', '.join(map(repr, empty))} under {root!r} "
                                       f"hold no {'/'.join(exts)} images; add images or remove the folder(s)")
        if augment is None:
            augment = []
        self.augment = list(augment) if isinstance(augment, (list, tuple)) else [augment]
        for a in self.augment:
            if not callable(a):
                raise InvalidArgumentError(f"augment items must be callables f(x, rng), got {type(a).__name__}")
        self.seed = nonneg_int(seed, "ImageFolder seed")
        self.epoch = 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        x = load_image(path, self._resize, self.channels, self.mean, self.std, self.invert)
        if self.image_size is None:
            self.image_size = x.shape[1:]  # the first image fixes the size of all others
        elif x.shape[1:] != tuple(self.image_size):
            raise ShapeError(f"image {path} is {x.shape[2]}x{x.shape[1]}, others are "
                             f"{self.image_size[1]}x{self.image_size[0]}; pass image_size to resize")
        if self.augment:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, int(i)]))
            for a in self.augment:
                x = a(x, rng)
        return np.ascontiguousarray(x, dtype=np.float32), np.int64(label)

    def set_epoch(self, epoch):
        """The epoch whose augmentation the next samples draw (a DataLoader sets it)."""
        self.epoch = nonneg_int(epoch, "epoch")

    def preprocessing(self):
        """What `load_image` needs to prepare new images like these (stored in checkpoints)."""
        as_list = (lambda v: None if v is None else np.asarray(v, dtype=np.float64).reshape(-1).tolist())
        return {"image_size": list(self.image_size) if self.image_size else None, "channels": self.channels,
                "mean": as_list(self.mean), "std": as_list(self.std), "invert": self.invert,
                "classes": list(self.classes)}
