"""Staging large batches over worker threads (_staging.h: pieces claimed by a pool, the NaN/Inf
check in the same pass). Forced on the cpu backend with
$MPSCY_STAGE_THREADS so it runs everywhere: training must be bitwise what single-threaded
staging gives, and a NaN or Inf anywhere (first piece, a piece's edge, the tail) must be
reported at its row with nothing modified."""
import numpy as np
import pytest

import mpscy
from mpscy import layers as L
from mpscy import optim

FEATURES = 4099          # rows not a multiple of 16 floats: pieces and rows straddle alignment
BATCH = 40               # 656 KB per batch: 11 pieces of 16,384 floats (64 KB)


def _engine(monkeypatch, threads):
    monkeypatch.setenv("MPSCY_STAGE_THREADS", str(threads))
    return mpscy.Engine(mpscy.Sequential([L.Dense(8), L.ReLU(), L.Dense(3)], input_shape=(FEATURES,)),
                        optimizer=optim.Adam(1e-3), batch_size=BATCH, device="cpu", seed=5)


def test_threaded_staging_trains_bitwise_like_one_thread(monkeypatch, rng):
    one, many = _engine(monkeypatch, 1), _engine(monkeypatch, 3)
    for rows in (BATCH, 33, BATCH, 1):
        x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
        y = rng.integers(0, 3, rows).astype(np.int32)
        assert one.step(x, y).loss == many.step(x, y).loss
    p1, p3 = one.get_parameters(), many.get_parameters()
    assert all(np.array_equal(p1[k], p3[k]) for k in p1)
    assert np.array_equal(one.predict(x), many.predict(x))


@pytest.mark.parametrize("flat", [0, 16384 - 1, 16384, 16384 * 5 + 7, BATCH * FEATURES - 1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_threaded_staging_finds_every_non_finite(monkeypatch, rng, flat, bad):
    e = _engine(monkeypatch, 3)
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, 3, BATCH).astype(np.int32)
    e.step(x, y)
    before, state = e.get_parameters(), e.get_optimizer_state()
    x.reshape(-1)[flat] = bad
    with pytest.raises(mpscy.NonFiniteError, match=f"at row {flat // FEATURES}$"):
        e.step(x, y)
    after = e.get_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert e.get_optimizer_state()["step"] == state["step"]


def test_threaded_staging_allocates_nothing_per_step(monkeypatch, rng):
    e = _engine(monkeypatch, 3)
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, 3, BATCH).astype(np.int32)
    e.step(x, y)
    s0 = e.stats()
    for _ in range(50):
        e.step(x, y)
    s1 = e.stats()
    assert (s1["allocations"], s1["frees"], s1["bytes_in_use"]) == (s0["allocations"], s0["frees"], s0["bytes_in_use"])
    assert s1["calls"] - s0["calls"] == 50

