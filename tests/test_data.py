"""mpscy.data: every sample exactly once per epoch whatever the batch size, shuffle, drop_last
and prefetch depth; seeded, resumable orders; the background thread stops when a loop is left
early and hands its errors over; ImageFolder reads real PNG/JPEG/BMP files with Pillow."""
import os
import threading
import time

import numpy as np
import pytest

import mpscy
from mpscy import data


def _ids(loader):
    return np.concatenate([b[1] for b in loader])


@pytest.mark.parametrize("n,batch", [(100, 7), (64, 16), (5, 32), (1, 1)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_every_sample_once_per_epoch(n, batch, shuffle, prefetch):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    ds = data.ArrayDataset(x, np.arange(n))
    loader = data.DataLoader(ds, batch_size=batch, shuffle=shuffle, seed=3, prefetch=prefetch)
    assert len(loader) == -(-n // batch)
    for _ in range(3):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(b[0]) == batch for b in batches[:-1]) and 1 <= len(batches[-1][0]) <= batch
        ids = np.concatenate([b[1] for b in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(n))     # none lost, none repeated
        xs = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(xs, x[ids])                      # rows stay with their labels
        assert all(b[0].flags.c_contiguous and b[0].dtype == np.float32 for b in batches)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_drop_last(prefetch):
    ds = data.ArrayDataset(np.zeros((103, 2), np.float32), np.arange(103))
    loader = data.DataLoader(ds, batch_size=10, shuffle=True, drop_last=True, prefetch=prefetch)
    assert len(loader) == 10
    ids = _ids(loader)
    assert len(ids) == 100 and len(np.unique(ids)) == 100


def test_orders_are_seeded_per_epoch_and_resumable():
    ds = data.ArrayDataset(np.zeros((50, 1), np.float32), np.arange(50))
    a = data.DataLoader(ds, batch_size=8, shuffle=True, seed=11)
    e0, e1, e2 = _ids(a), _ids(a), _ids(a)
    assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2)
    b = data.DataLoader(ds, batch_size=8, shuffle=True, seed=11, prefetch=0)
    b.set_epoch(2)                                   # a resumed run picks up at epoch 2
    np.testing.assert_array_equal(_ids(b), e2)
    c = data.DataLoader(ds, batch_size=8, shuffle=True, seed=12)
    assert not np.array_equal(_ids(c), e0)
    plain = data.DataLoader(ds, batch_size=8)
    np.testing.assert_array_equal(_ids(plain), np.arange(50))


def test_multi_input_arrays():
    x1, x2 = np.arange(20, dtype=np.float32)[:, None], -np.arange(20, dtype=np.float32)[:, None]
    loader = data.DataLoader(data.ArrayDataset([x1, x2], np.arange(20)), batch_size=6, shuffle=True)
    for (a, b), y in loader:
        np.testing.assert_array_equal(a[:, 0], y)
        np.testing.assert_array_equal(b[:, 0], -y)


def _threads():
    return sum(t.name == "mpscy-data" for t in threading.enumerate())


def test_early_exit_stops_the_thread():
    ds = data.ArrayDataset(np.zeros((1000, 4), np.float32), np.arange(1000))
    loader = data.DataLoader(ds, batch_size=10, prefetch=2)
    before = _threads()
    it = iter(loader)
    next(it)
    assert _threads() == before + 1
    it.close()
    assert _threads() == before
    for i, _ in enumerate(loader):     # a `break` and garbage collection also stop it
        if i == 3:
            break
    deadline = time.monotonic() + 2.0
    while _threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == before


class _Faulty(data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        if i == 7:
            raise KeyError("sample 7 is broken")
        return np.zeros(2, np.float32), np.int64(i)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_worker_errors_reach_the_consumer(prefetch):
    loader = data.DataLoader(_Faulty(), batch_size=4, prefetch=prefetch)
    got = []
    with pytest.raises(KeyError, match="sample 7"):
        for b in loader:
            got.append(b)
    assert len(got) == 1            # batch 0 (samples 0..3) arrived; batch 1 holds sample 7
    assert _threads() == 0


class _Stops(data.Dataset):
    """sample 6 raises StopIteration (next() on an exhausted reader inside __getitem__)"""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        if i == 6:
            raise StopIteration
        return np.zeros(2, np.float32), np.int64(i)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_sample_raising_stopiteration_is_an_error_not_the_epoch_s_end(prefetch):
    """With prefetch, the worker's StopIteration reached the loop as the end of the epoch: 4 of 12
    samples, no error, and fit ran short epochs. Now as without prefetch (a generator's rule)."""
    got = []
    with pytest.raises(RuntimeError, match="generator raised StopIteration"):
        for b in data.DataLoader(_Stops(), batch_size=4, prefetch=prefetch):
            got.append(b)
    assert len(got) == 1 and _threads() == 0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_failed_fit_over_a_loader_frees_its_engine_at_once(prefetch):
    """A sample's error re-raised from the prefetching iterator held the iterator's frame, which held
    the exception, whose traceback held fit's frame and the engine: freed only by the cycle
    collector (10 failed fits kept 10 engines with the collector off)."""
    import gc
    import weakref

    def run(dataset):  # as a user's loop catches it (pytest.raises keeps the traceback, and with it the engine)
        engine = mpscy.Engine(mpscy.Sequential([mpscy.layers.Dense(16)], input_shape=(2,)), batch_size=4, device="cpu")
        ref = weakref.ref(engine)
        try:
            engine.fit(data.DataLoader(dataset, batch_size=4, prefetch=prefetch), epochs=1, verbose=0)
        except (KeyError, RuntimeError) as e:
            return ref, str(e)
        return ref, None
    gc.collect()
    gc.disable()
    try:
        for dataset, message in ((_Faulty(), "'sample 7 is broken'"), (_Stops(), "generator raised StopIteration")):
            ref, caught = run(dataset)
            assert caught == message and ref() is None, message
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["evaluate", "validation"])
def test_a_step_error_over_a_prefetching_loader_leaves_no_thread_behind(how):
    """A batch's step error (a label out of range) in evaluate or validation, its exception kept
    (as a REPL or pytest.raises keeps it): the loader's iterator was a local of the frame the
    traceback holds, so its prefetch thread ran on, refilling its queue, until the exception went."""
    engine = mpscy.Engine(mpscy.Sequential([mpscy.layers.Dense(3)], input_shape=(2,)), batch_size=4, device="cpu")
    y = np.zeros(400, np.int64)   # 100 batches: the thread is still filling its queue at batch 1
    y[5] = 7
    loader = data.DataLoader(data.ArrayDataset(np.zeros((400, 2), np.float32), y), batch_size=4, prefetch=2)
    with pytest.raises(mpscy.InvalidArgumentError, match="batch 1: label 7") as kept:
        if how == "evaluate":
            engine.evaluate(loader)
        else:
            engine.fit(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), validation_data=loader, epochs=1,
                       verbose=0)
    deadline = time.monotonic() + 2.0   # the iterator's release stops the thread within a poll (50 ms)
    while _threads() > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kept.value is not None and _threads() == 0


def test_generic_dataset_is_stacked():
    loader = data.DataLoader(_Faulty(), batch_size=3, drop_last=True, prefetch=0)
    it = iter(loader)
    xb, yb = next(it)
    assert xb.shape == (3, 2) and yb.tolist() == [0, 1, 2]


def test_bad_arguments():
    with pytest.raises(mpscy.ShapeError, match="row counts"):
        data.ArrayDataset(np.zeros((3, 2)), np.zeros(4))
    ds = data.ArrayDataset(np.zeros((3, 2)))
    for kw in ({"batch_size": 0}, {"prefetch": -1}, {"batch_size": 2.5}, {"seed": -1}):
        with pytest.raises(mpscy.InvalidArgumentError):
            data.DataLoader(ds, **kw)
    with pytest.raises(mpscy.InvalidArgumentError, match="empty"):
        data.DataLoader(data.ArrayDataset(np.zeros((0, 2))))


# ----------------------------------------------------------------------------- images
@pytest.fixture
def image_root(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    pixels = {}
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / cls).mkdir()
        for k, ext in enumerate(["png", "bmp", "png"]):
            a = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            path = tmp_path / cls / f"{k}.{ext}"
            Image.fromarray(a).save(path)
            pixels[str(path)] = a
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    jpg = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(jpg).save(tmp_path / "dog" / "big.jpg", quality=95)
    return tmp_path, pixels


def test_image_folder_reads_and_normalizes(image_root):
    root, pixels = image_root
    ds = data.ImageFolder(str(root), image_size=(6, 5), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    assert ds.classes == ["cat", "dog"] and len(ds) == 7     # .txt skipped
    assert [s[1] for s in ds.samples] == [0, 0, 0, 1, 1, 1, 1]
    for i, (path, label) in enumerate(ds.samples):
        x, y = ds[i]
        assert x.shape == (3, 6, 5) and x.dtype == np.float32 and y == label
        if path in pixels:   # lossless formats: exact
            ref = (pixels[path].transpose(2, 0, 1) / 255.0 - np.array([0.5, 0.4, 0.3])[:, None, None]) \
                / np.array([0.2, 0.25, 0.5])[:, None, None]
            np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    loader = data.DataLoader(ds, batch_size=3, shuffle=True, seed=1)
    xs, ys = zip(*loader)
    assert sum(len(b) for b in ys) == 7 and xs[0].shape == (3, 3, 6, 5)
    np.testing.assert_array_equal(np.sort(np.concatenate(ys)), [0, 0, 0, 1, 1, 1, 1])


def test_image_folder_grayscale_and_size_errors(image_root):
    root, _ = image_root
    gray = data.ImageFolder(str(root), image_size=4, channels=1)
    assert gray[0][0].shape == (1, 4, 4)
    mixed = data.ImageFolder(str(root))          # sizes differ (the jpg is 12x10): clear error
    with pytest.raises(mpscy.ShapeError, match="image_size"):
        [mixed[i] for i in range(len(mixed))]
    with pytest.raises(mpscy.InvalidArgumentError, match="not a directory"):
        data.ImageFolder(str(root / "missing"))


def test_augmentations_are_seeded(image_root):
    root, _ = image_root
    aug = [data.RandomCrop(2), data.RandomHorizontalFlip(0.5)]
    a = data.ImageFolder(str(root), image_size=6, augment=aug, seed=5)
    b = data.ImageFolder(str(root), image_size=6, augment=aug, seed=5)
    plain = data.ImageFolder(str(root), image_size=6)
    xa = [a[i][0] for i in range(len(a))]
    xb = [b[i][0] for i in range(len(b))]
    for u, v in zip(xa, xb):
        np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(u, plain[i][0]) for i, u in enumerate(xa))
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_array_equal(data.RandomHorizontalFlip(1.0)(x, np.random.default_rng(0)), x[:, :, ::-1])


def test_augmentations_are_drawn_by_epoch_and_sample_so_a_resumed_loader_replays_them(image_root):
    """Sample i's augmentation in epoch e comes from PCG64([seed, e, i]): a loader started at
    epoch 2 (what fit does after mpscy.load) gives the uninterrupted loader's epoch-2 batches bit
    for bit, with or without prefetching, and through a Subset; epochs differ. One generator
    drawn from in sample order replayed epoch 0's crops on epoch 2's order. Found by a user trial."""
    root, _ = image_root
    aug = [data.RandomCrop(2), data.RandomHorizontalFlip(0.5)]

    def loader(prefetch, epoch=0, subset=False):
        ds = data.ImageFolder(str(root), image_size=6, augment=aug, seed=5)
        if subset:
            ds = data.Subset(ds, np.arange(len(ds))[::-1])
        dl = data.DataLoader(ds, batch_size=3, shuffle=True, seed=1, prefetch=prefetch)
        dl.set_epoch(epoch)
        return dl

    for subset in (False, True):
        full = loader(2, subset=subset)
        epochs = [[x for x, _ in full] for _ in range(3)]
        assert any(not np.array_equal(u, v) for u, v in zip(epochs[0], epochs[2]))
        for prefetch in (0, 2):
            resumed = [x for x, _ in loader(prefetch, 2, subset)]
            assert len(resumed) == len(epochs[2])
            for u, v in zip(resumed, epochs[2]):
                np.testing.assert_array_equal(u, v)
    ds = data.ImageFolder(str(root), image_size=6, augment=aug, seed=5)
    first = ds[0][0]
    np.testing.assert_array_equal(ds[0][0], first)          # the same epoch draws the same
    ds.set_epoch(1)
    assert any(not np.array_equal(ds[i][0], data.ImageFolder(str(root), image_size=6, augment=aug, seed=5)[i][0])
               for i in range(len(ds)))
    with pytest.raises(mpscy.InvalidArgumentError, match="ImageFolder seed"):
        data.ImageFolder(str(root), seed=-1)


class _Slow(data.Dataset):
    """Each batch takes 4 ms to build (as decoding images would), without holding the GIL."""

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return np.zeros(2, np.float32), np.int64(i)

    def get_batch(self, indices):
        time.sleep(0.004)
        return data.Dataset.get_batch(self, indices)


def test_prefetch_overlaps_batch_building_with_the_step():
    """With a 4 ms batch build and a 4 ms "step" (which, like the native step, releases the
    GIL), the prefetching loader takes about half the time of the synchronous one."""
    def run(prefetch):
        loader = data.DataLoader(_Slow(), batch_size=3, prefetch=prefetch)
        t0 = time.perf_counter()
        for _ in loader:
            time.sleep(0.004)
        return time.perf_counter() - t0

    sync, ahead = min(run(0) for _ in range(2)), min(run(2) for _ in range(2))
    assert sync > 20 * 0.008 * 0.9          # 20 batches, build + step each
    assert ahead < 0.75 * sync, (sync, ahead)


def test_train_test_split_checks_its_arguments():
    """test_fraction must be a number in (0, 1) that leaves a row on each side, and x and y must
    have as many rows. Before, -0.1 returned a 1-row training split, 1.5 an empty one, a shorter
    y a bare IndexError, and a longer y was silently cut to x's length."""
    from mpscy.datasets import train_test_split
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    for bad in (-0.1, 0, 0.0, 1.0, 1.5, float("nan"), "0.2", None, True):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"test_fraction must be a number in \(0, 1\)"):
            train_test_split(x, y, bad)
    for bad in (0.01, 0.99):
        with pytest.raises(mpscy.InvalidArgumentError, match="at least one row"):
            train_test_split(x, y, bad)
    for ny in (5, 20):
        with pytest.raises(mpscy.ShapeError, match=f"y has {ny} rows for 10 rows of x"):
            train_test_split(x, np.arange(ny), 0.2)
    with pytest.raises(mpscy.ShapeError, match="x must have a row dimension"):
        train_test_split(np.float32(1.0), y, 0.2)
    x_train, y_train, x_test, y_test = train_test_split(x, y, 0.2, seed=1)
    assert x_train.shape == (8, 2) and y_test.shape == (2,)
    assert sorted(np.concatenate([y_train, y_test])) == list(range(10))
    assert np.array_equal(x_train[:, 0], 2.0 * y_train)


# ----------------------------------------------------------------------------- review fixes
def _png(path, a):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(a).save(path)


def test_image_folder_follows_symlinked_folders_as_torchvision(tmp_path):
    """A class folder's sub-folder that is a symbolic link (images shared between datasets) is
    walked, as torchvision's make_dataset walks with followlinks=True; it was skipped."""
    pytest.importorskip("PIL")
    shared = tmp_path / "shared"
    shared.mkdir()
    _png(shared / "s.png", np.zeros((4, 4, 3), np.uint8))
    root = tmp_path / "root"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        _png(root / cls / "a.png", np.zeros((4, 4, 3), np.uint8))
    os.symlink(shared, root / "dog" / "more")
    ds = data.ImageFolder(str(root))
    assert [(os.path.relpath(p, root), y) for p, y in ds.samples] == [
        ("cat/a.png", 0), ("dog/a.png", 1), (os.path.join("dog", "more", "s.png"), 1)]


def test_image_folder_takes_one_extension_string(tmp_path):
    """extensions=".png" is one extension, as in torchvision. Before, the string was taken as the
    characters ('.', 'p', 'n', 'g'), so .svg, .jpg and .log files were read as images too."""
    pytest.importorskip("PIL")
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        _png(tmp_path / cls / "a.png", np.zeros((4, 4, 3), np.uint8))
        _png(tmp_path / cls / "b.jpg", np.zeros((4, 4, 3), np.uint8))
        for junk in ("c.svg", "d.log", "e.g"):
            (tmp_path / cls / junk).write_text("not an image")
    ds = data.ImageFolder(str(tmp_path), extensions=".png")
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == ["a.png", "a.png"]
    assert len(data.ImageFolder(str(tmp_path), extensions=(".PNG", ".jpg"))) == 4
    for bad in ([".png", 3], "", [], None, 5, [".png", ""]):
        with pytest.raises(mpscy.InvalidArgumentError, match="extensions must be"):
            data.ImageFolder(str(tmp_path), extensions=bad)


def test_16_bit_gray_images_keep_their_range(tmp_path):
    """16-bit gray images ("I;16" PNG, "I;16B"/"I;16" TIFF, 16-bit PGM read as "I") are scaled by
    65535 to [0, 1], the gray repeated for channels=3; 32-bit "I" and float "F" images are refused
    naming the file and mode. Before, convert("L") clipped them: [0, 1, 1, ..., 1]."""
    Image = pytest.importorskip("PIL.Image")
    a = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3449)          # 0 .. 65531
    want = a.astype(np.float32) / np.float32(65535.0)
    files = {"I;16": tmp_path / "g.png", "I;16B": tmp_path / "gb.tif", "I;16L": tmp_path / "gl.tif"}
    Image.fromarray(a).save(files["I;16"])
    Image.frombytes("I;16B", (5, 4), a.astype(">u2").tobytes()).save(files["I;16B"])
    Image.frombytes("I;16L", (5, 4), a.astype("<u2").tobytes()).save(files["I;16L"])
    files["I"] = tmp_path / "g.pgm"
    files["I"].write_bytes(b"P5\n5 4\n65535\n" + a.astype(">u2").tobytes())
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode in (mode, "I;16"), (mode, im.mode)   # Pillow reads little-endian TIFF as I;16
        gray = data.load_image(str(path), channels=1)
        assert gray.shape == (1, 4, 5) and gray.dtype == np.float32
        np.testing.assert_allclose(gray[0], want, rtol=0, atol=1e-7, err_msg=mode)
        rgb = data.load_image(str(path), channels=3, invert=True)
        assert rgb.shape == (3, 4, 5)
        for c in range(3):
            np.testing.assert_allclose(rgb[c], 1.0 - want, rtol=0, atol=1e-6, err_msg=mode)
    small = data.load_image(str(files["I;16"]), image_size=(2, 3), channels=1)
    assert small.shape == (1, 2, 3) and 0.05 < small.min() and small.max() < 0.95   # not clipped to 1
    assert len(np.unique(small)) == 6
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "i32.tif")
    Image.fromarray(want).save(tmp_path / "f32.tif")
    for name, mode in (("i32.tif", "'I'"), ("f32.tif", "'F'")):
        with pytest.raises(mpscy.InvalidArgumentError, match=f"{name}.*{mode}.*no defined pixel range"):
            data.load_image(str(tmp_path / name), channels=1)


def test_8_bit_images_are_unchanged(tmp_path):
    """8-bit images keep the exact float32 pixels / 255 (after Pillow's own resize) they had."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    rgb, gray = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), rng.integers(0, 256, (6, 7), dtype=np.uint8)
    _png(tmp_path / "rgb.png", rgb)
    _png(tmp_path / "gray.png", gray)
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "rgb.png")),
                                  rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "gray.png"), channels=1)[0],
                                  gray.astype(np.float32) / np.float32(255.0))
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "gray.png"), channels=3),
                                  np.repeat(gray[None], 3, 0).astype(np.float32) / np.float32(255.0))
    with Image.open(tmp_path / "rgb.png") as im:
        resized = np.asarray(im.convert("RGB").resize((3, 4), Image.BILINEAR), dtype=np.float32) / np.float32(255.0)
    np.testing.assert_array_equal(data.load_image(str(tmp_path / "rgb.png"), image_size=(4, 3)),
                                  resized.transpose(2, 0, 1))


def test_load_image_refuses_bad_mean_and_std_before_reading(tmp_path):
    """A zero, NaN or Inf in std or mean, or the wrong number of values, is an InvalidArgumentError
    naming the argument, raised before the file is opened (the path here does not exist). Before,
    std=0 returned NaN/Inf with only a numpy RuntimeWarning, and a wrong length was only noticed
    after reading the file."""
    pytest.importorskip("PIL")
    missing = str(tmp_path / "missing.png")
    cases = [({"std": 0}, "std must be non-zero"), ({"std": [0.5, 0.0, 0.5]}, "std must be non-zero"),
             ({"std": 0.0, "channels": 1}, "std must be non-zero"), ({"std": float("nan")}, "std must be finite"),
             ({"mean": [0.0, np.inf, 0.0]}, "mean must be finite"), ({"std": 1e300}, "std must be finite"),
             ({"std": [0.5, 0.5]}, "std needs 1 or 3 values"),
             ({"mean": [0.5] * 3, "channels": 1}, "mean needs 1 or 1"),
             ({"mean": "abc"}, "mean must be a number")]
    for kw, msg in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=msg):
            data.load_image(missing, **kw)
    with pytest.raises(mpscy.InvalidArgumentError, match="cannot read image"):
        data.load_image(missing, std=[0.5, 0.25, 1.0])


def test_image_folder_checks_its_arguments_at_construction(image_root):
    """channels other than 1 or 3, a non-positive or non-integer image_size and a bad mean/std fail
    when the ImageFolder is built. Before, channels=2 and std=0 were accepted (the first fails at the
    first image, the second gives NaN), image_size="32" became (3, 2), 2.5 a bare TypeError."""
    root, _ = image_root
    for kw in ({"channels": 2}, {"channels": 0}, {"channels": "3"}, {"channels": True}, {"channels": 3.5}):
        with pytest.raises(mpscy.InvalidArgumentError, match="channels must be 1"):
            data.ImageFolder(str(root), **kw)
    for size in (0, -1, (4, 0), 2.5, "32", True, (4, 4, 4), [4, None]):
        with pytest.raises(mpscy.InvalidArgumentError, match="image_size must be"):
            data.ImageFolder(str(root), image_size=size)
    for kw in ({"std": 0}, {"std": [1, 2]}, {"mean": float("nan")}, {"channels": 1, "std": [1, 1, 1]}):
        with pytest.raises(mpscy.InvalidArgumentError, match="mean|std"):
            data.ImageFolder(str(root), **kw)
    ds = data.ImageFolder(str(root), image_size=[6.0, np.int64(5)], channels=np.int64(1), std=0.5)
    assert ds.image_size == (6, 5) and ds.channels == 1 and ds[0][0].shape == (1, 6, 5)


def test_image_folder_refuses_empty_class_folders(image_root):
    """A class folder without images is an error naming it (as for a missing root, an
    InvalidArgumentError). Before, it was kept as a class that no sample ever had."""
    root, _ = image_root
    (root / "bird").mkdir()
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"'bird', 'emu'.*hold no .jpg/.jpeg/.png/.bmp images"):
        data.ImageFolder(str(root))
    _png(root / "bird" / "a.png", np.zeros((2, 2), np.uint8))
    (root / "emu" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"'bird', 'cat', 'dog'.*hold no .gif images"):
        data.ImageFolder(str(root), extensions=".gif")
    ds = data.ImageFolder(str(root), extensions=(".gif", ".png", ".jpg", ".bmp"))
    assert ds.classes == ["bird", "cat", "dog", "emu"] and len(ds) == 9


class _ListSamples(data.Dataset):
    def __init__(self, ragged=False):
        self.ragged = ragged

    def __len__(self):
        return 5

    def __getitem__(self, i):
        x = np.full(3 + (self.ragged and i == 3), i, np.float32)
        return [x, np.int64(i)]


def test_list_samples_are_taken_as_tuples():
    """A sample [x, y] batches as (x, y) (as torch's default_collate does); samples that cannot be
    stacked name the (x, y) tuples expected. Before, [x, y] gave numpy's "setting an array element
    with a sequence ... inhomogeneous shape"."""
    xb, yb = next(iter(data.DataLoader(_ListSamples(), batch_size=4, prefetch=0)))
    assert xb.shape == (4, 3) and yb.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(xb[:, 0], [0, 1, 2, 3])
    with pytest.raises(mpscy.ShapeError, match=r"item 0 .*tuples such as \(x, y\)"):
        list(data.DataLoader(_ListSamples(ragged=True), batch_size=5, prefetch=2))


def test_bad_subset_indices_and_array_dataset_items_are_named():
    """Subset(ds, ['a']) raised int()'s ValueError, and a bool mask or float indices were cast
    (a mask read as indices 0 and 1, 1.7 truncated to 1); ArrayDataset([x, 5], y) raised
    len()'s TypeError."""
    x, y = np.zeros((5, 2), np.float32), np.arange(5)
    ds = data.ArrayDataset(x, y)
    for indices in (["a"], [1.7], [True, False], [[1, 2], [3]], None, [10**400]):
        with pytest.raises(mpscy.InvalidArgumentError, match=r"^Subset indices must be integers, got "):
            data.Subset(ds, indices)
    assert len(data.Subset(ds, [])) == 0 and data.Subset(ds, np.array([4, 0], np.uint8))[0][1] == 4
    with pytest.raises(mpscy.ShapeError, match=r"^ArrayDataset arrays need a first \(row\) dimension; array 0\[1\] "
                                               r"is array\(5\)$"):
        data.ArrayDataset([x, 5], y)
    with pytest.raises(mpscy.ShapeError, match=r"array 1 is array\(3\)$"):
        data.ArrayDataset(x, 3)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^ArrayDataset array 0\[1\] is not an array: "):
        data.ArrayDataset([x, [[1, 2], [3]]], y)   # ragged


def test_arguments_of_the_wrong_kind_are_named_in_data():
    """None for a path, a dataset or a flip probability, and a str epoch, are mpscy errors (they
    were an AttributeError, TypeErrors and ValueErrors); p is checked to lie in [0, 1]."""
    cases = [(lambda: data.load_image(None), r"image path must be a path \(a non-empty str or os.PathLike\), got None"),
             (lambda: data.ImageFolder(None), "ImageFolder root must be a path"),
             (lambda: data.Subset(None, [0]), r"Subset takes a dataset \(with __len__ and __getitem__\), got NoneType"),
             (lambda: data.RandomHorizontalFlip("x"), "RandomHorizontalFlip p must be a number, got 'x'"),
             (lambda: data.RandomHorizontalFlip(2), r"RandomHorizontalFlip p must be in \[0, 1\], got 2"),
             (lambda: data.DataLoader(data.ArrayDataset(np.arange(3)), batch_size=2).set_epoch("a"),
              "epoch must be a non-negative integer, got 'a'")]
    for call, message in cases:
        with pytest.raises(mpscy.InvalidArgumentError, match=message):
            call()


def test_evaluate_takes_a_dataloader(device):
    """engine.evaluate(loader): the row-weighted means over the loader's (x, y) batches, equal to
    evaluate over the same arrays (fit's validation over a loader computes the same); y passed
    beside a loader, no y at all, an empty loader and a bad batch are named."""
    x, y = mpscy.datasets.load_digits()
    engine = mpscy.Engine(mpscy.Sequential([mpscy.layers.Dense(10)], input_shape=(64,)), batch_size=64,
                          device=device, seed=0)
    whole = engine.evaluate(x, y)
    loader = data.DataLoader(data.ArrayDataset(x, y), batch_size=50)   # 36 batches, the last of 47 rows
    got = engine.evaluate(loader)
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-6) and got["accuracy"] == whole["accuracy"]
    with pytest.raises(mpscy.InvalidArgumentError, match="pass y inside the DataLoader"):
        engine.evaluate(loader, y)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"evaluate needs y, or x a DataLoader of \(x, y\) batches"):
        engine.evaluate(x)
    with pytest.raises(mpscy.InvalidArgumentError, match="the DataLoader yielded no batch"):
        engine.evaluate(iter([]))
    bad = data.DataLoader(data.ArrayDataset(x[:20], np.full(20, 10, np.int32)), batch_size=8)
    with pytest.raises(mpscy.InvalidArgumentError, match="batch 0.*label 10"):
        engine.evaluate(bad)


def test_random_crop_takes_a_padding_below_the_image():
    """RandomCrop's argument is the padding: an integer >= 0 (-3 was a silent no-op, 2.7 padded
    2), below the image's height and width (torchvision's RandomCrop(32) means a 32 x 32 crop;
    here it padded a 32 x 32 image by 32, so most crops were zeros)."""
    for bad in (-3, 2.7, "4", None):
        with pytest.raises(mpscy.InvalidArgumentError, match="RandomCrop padding"):
            data.RandomCrop(bad)
    img = np.arange(3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)
    rng = np.random.default_rng(0)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"RandomCrop padding 32 is not below the image's 32 x 32"):
        data.RandomCrop(32)(img, rng)
    out = data.RandomCrop(4)(img, rng)
    assert out.shape == img.shape and np.count_nonzero(out) >= 28 * 28 * 3 - 1
    assert data.RandomCrop(0)(img, rng) is img
