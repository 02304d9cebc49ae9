"""mpscy.data: every sample exactly once per epoch whatever the batch size, shuffle, drop_last
and prefetch depth; seeded, resumable orders; the background thread stops when a loop is left
early and hands its errors over; ImageFolder reads real PNG/JPEG/BMP files with Pillow."""
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
