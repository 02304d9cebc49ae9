"""memray helper for the no-allocation tests: runs `fn` n times under a Tracker (after warm-up)
and splits what memray saw by thread. The stepping thread is identified by a marker mapping of a
size nothing else makes; every other record belongs to some other thread (BLAS or CPU-pool
workers, a GPU driver's helper threads). A first, short tracked run absorbs what the Tracker
itself allocates once (CPython's line tables of the code objects it starts tracing)."""
import mmap
import os

MARKER_BYTES = 3_333_331  # an odd size, mapped once by the stepping thread (an mmap: one record)


def _is_alloc(rec, memray):
    kinds = memray.AllocatorType
    return rec.allocator not in (kinds.FREE, kinds.MUNMAP, kinds.PYMALLOC_FREE)


def _track(memray, path, fn, n):
    result = None
    if os.path.exists(path):
        os.remove(path)
    with memray.Tracker(path, native_traces=False):
        marker = mmap.mmap(-1, MARKER_BYTES)
        for _ in range(n):
            result = fn()
        marker.close()
    return result


def trace_steps(memray, fn, n, tmp_path):
    """Returns (allocation records on the stepping thread, on other threads, fn's last result)."""
    for _ in range(3):  # warm up through this very call path
        fn()
    _track(memray, os.path.join(tmp_path, "warm.bin"), fn, 3)
    path = os.path.join(tmp_path, "trace.bin")
    result = _track(memray, path, fn, n)
    reader = memray.FileReader(path)
    records = [r for r in reader.get_allocation_records() if _is_alloc(r, memray)]
    mine = [r for r in records if r.size == MARKER_BYTES]
    assert len(mine) == 1, "the marker mapping was not seen"
    tid = mine[0].tid
    on_thread = [r for r in records if r.tid == tid and r.size != MARKER_BYTES]
    elsewhere = [r for r in records if r.tid != tid]
    return on_thread, elsewhere, result


def describe(memray, records):
    """Each record's thread, allocator and size: what a failure message shows. A record's
    allocator is a plain int in memray 1.20's records (an AllocatorType value)."""
    return [f"{getattr(r, 'thread_name', '') or 'thread ' + str(r.tid)}: {memray.AllocatorType(int(r.allocator)).name} "
            f"{r.size} B" for r in records]
