"""Zero allocations per step after the first — in native code (the backend's own counters), in
the whole process (memray counts every malloc/mmap, C frames included) and on the Python heap
(tracemalloc) — and exactly one ABI call per step and per predict batch."""
import gc
import os
import tracemalloc

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim


def make(device, loss="sparse_cross_entropy", batch=32):
    model = mpscy.Sequential([layers.Dense(64), layers.ReLU(), layers.Dense(32), layers.ReLU(), layers.Dense(10)],
                             input_shape=(48,))
    return mpscy.Engine(model, loss=loss, optimizer=optim.Adam(lr=1e-3, amsgrad=True), batch_size=batch,
                        device=device, seed=0)


def data(n=32, loss="sparse_cross_entropy"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 48)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int64) if loss != "mse" else rng.standard_normal((n, 10)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("loss", ["sparse_cross_entropy", "mse"])
def test_native_counters_one_call_and_no_allocation_per_step(device, loss):
    engine = make(device, loss)
    x, y = data(loss=loss)
    engine.step(x, y)
    before = engine.stats()
    for i in range(500):
        engine.step(x, y) if i % 5 else engine.step(x[:7], y[:7])  # partial batches too
    after = engine.stats()
    assert after["steps"] - before["steps"] == 500
    assert after["calls"] - before["calls"] == 500  # exactly one ABI call per step
    for k in ("allocations", "frees", "bytes_in_use", "peak_bytes"):
        assert after[k] == before[k], k


def test_one_call_per_predict_and_evaluate_batch(device):
    engine = make(device)
    x, y = data(100)
    before = engine.stats()
    engine.predict(x)  # 100 rows at batch 32: 4 native calls
    mid = engine.stats()
    assert mid["predicts"] - before["predicts"] == 4 and mid["calls"] - before["calls"] == 4
    engine.evaluate(x, y)
    after = engine.stats()
    assert after["calls"] - mid["calls"] == 4 and after["allocations"] == before["allocations"]


def test_synchronize_is_one_call_and_changes_nothing(device):
    """Engine.synchronize() waits for the device (on cuda, a training step's update may still run
    when the step returns): one ABI call, no allocation, and parameters and optimizer state read
    the same before and after it."""
    engine = make(device)
    x, y = data()
    engine.step(x, y)
    params = engine.get_parameters()
    before = engine.stats()
    assert engine.synchronize() is None
    after = engine.stats()
    assert after["calls"] - before["calls"] == 1 and after["allocations"] == before["allocations"]
    assert after["steps"] == before["steps"] == 1
    again = engine.get_parameters()
    assert all(np.array_equal(again[k], params[k]) for k in params)


def test_memray_counts_no_allocation_in_500_steps(device, tmp_path):
    """memray sees every malloc/mmap of the process. The thread that steps makes none in 500
    steps; on the CPU no other thread does either. A GPU driver's own helper threads may allocate
    on their own schedule (seen on an H100: one 88-byte block about once per thousand graph
    launches, on a driver thread; and once in a cpu engine's 500 steps on an H200's host, where
    the driver had been started by the backends' probe): counted separately, bounded, never on
    the stepping thread."""
    memray = pytest.importorskip("memray")
    from alloc_trace import describe, trace_steps
    engine = make(device)
    x, y = data()
    for _ in range(20):  # warm-up outside the tracked block
        engine.step(x, y)
    gc.collect()
    on_thread, elsewhere, r = trace_steps(memray, lambda: engine.step(x, y), 500, tmp_path)
    assert r.applied
    assert on_thread == [], f"{len(on_thread)} allocations on the stepping thread in 500 steps"
    seen = describe(memray, elsewhere)
    # a CUDA driver initialized in this process (cuda built and a GPU present: mpscy.backends()
    # probes it) runs helper threads of its own, whatever device this engine is on
    if device == "cpu" and "cuda" not in mpscy.backends():
        assert elsewhere == [], f"{len(elsewhere)} allocations on other threads in 500 steps: {seen}"
    else:
        assert len(elsewhere) <= 2, f"{len(elsewhere)} allocations on the driver's threads in 500 steps: {seen}"


def test_tracemalloc_shows_no_growth_over_2000_steps(device):
    engine = make(device)
    x, y = data()
    for _ in range(20):
        engine.step(x, y)
    gc.collect()
    tracemalloc.start()
    try:
        # the same loop shape before both readings, so loop variables and the last result
        # are alike at each: any difference is growth caused by the 2,000 steps between them
        for i in range(300):
            r = engine.step(x, y)
        start = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            r = engine.step(x, y)
        end = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert r.applied
    # One leaked object per step would be >= 2000 * 16 bytes; allow only free-list jitter.
    assert end - start < 512, f"Python heap grew by {end - start} bytes over 2000 steps"


def test_partial_batches_do_not_allocate(device):
    engine = make(device)
    x, y = data()
    engine.step(x, y)
    before = engine.stats()
    for rows in range(1, 33):
        engine.step(x[:rows], y[:rows])
    assert engine.stats()["allocations"] == before["allocations"]


def test_memray_records_are_described_by_thread_allocator_and_size():
    """The failure message of the test above (it crashed on the H200, where a driver thread's
    88-byte malloc was the record to show: memray 1.20 gives the allocator as an int)."""
    memray = pytest.importorskip("memray")
    from types import SimpleNamespace
    from alloc_trace import describe
    records = [SimpleNamespace(tid=2, allocator=int(memray.AllocatorType.MALLOC), size=88),
               SimpleNamespace(tid=7, thread_name="cuda-evt", allocator=memray.AllocatorType.MMAP, size=4096)]
    assert describe(memray, records) == ["thread 2: MALLOC 88 B", "cuda-evt: MMAP 4096 B"]


# both an attached schedule and a LearningRateScheduler drive the rate here (the schedule warns
# that it overwrites the callback's): what is tested is the references, not the rates
@pytest.mark.filterwarnings("ignore:StepLR.step:UserWarning")
def test_a_dropped_engine_is_freed_without_the_cycle_collector(device):
    """engine.history and an attached schedule point back at the engine; they hold it weakly, so
    dropping the last reference frees the engine (and its device memory) at once, as a torch
    module's, not whenever Python's cycle collector next runs. What fit returns outlives it."""
    import weakref
    from mpscy import callbacks
    from mpscy.optim import schedules
    x, y = data()
    gc.collect()
    gc.disable()
    try:
        engine = make(device)
        engine.set_schedule(schedules.StepLR(engine, step_size=1, gamma=0.5))
        history = engine.fit(x, y, epochs=2, verbose=0, callbacks=[
            callbacks.EarlyStopping(monitor="loss", patience=5, restore_best_weights=True),
            callbacks.LearningRateScheduler(lambda epoch: 0.01)])
        assert history.engine is engine and len(history.history["loss"]) == 2
        alive = weakref.ref(engine)
        del engine
        assert alive() is None, "the engine outlived its last reference (a reference cycle)"
        assert history.engine is None and len(history.history["loss"]) == 2
    finally:
        gc.enable()


def test_closing_an_engine_gives_back_every_native_byte(device):
    """The native counters of the engine's device, kept alive past close(): every byte the graph
    took (buffers, staging, partial-batch graphs, the runtime's workspaces) is given back, down to
    what a fresh device holds. On cuda a buffer counts as given back only once cudaFree or
    cudaFreeHost succeeded."""
    fresh = mpscy._native.Device(device).stats()
    engine = make(device)
    x, y = data()
    engine.step(x, y)
    engine.step(x[:5], y[:5])  # a partial batch's own graph
    engine.predict(np.concatenate([x, x, x[:3]]))
    engine.evaluate(x, y)
    dev = engine._device
    held = dev.stats()
    assert held["bytes_in_use"] > fresh["bytes_in_use"] and held["allocations"] > fresh["allocations"]
    engine.close()
    after = dev.stats()
    assert after["bytes_in_use"] == fresh["bytes_in_use"], (fresh, held, after)
    assert after["allocations"] - after["frees"] == fresh["allocations"] - fresh["frees"], (fresh, after)
