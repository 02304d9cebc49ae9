# _device.pxi — included by _native.pyx: the Device and Buffer handles (each frees its native
# object in __dealloc__ and keeps its parent alive) and StepResult, what a training step returns.

# ----------------------------------------------------------------------- device and buffer

cdef class Device:
    """One native device of a backend ("cpu", "cuda", "metal")."""
    cdef mpscy_device handle
    cdef readonly str backend

    def __cinit__(self, str backend):
        cdef char err[ERR_LEN]
        err[0] = 0
        b = backend.encode()
        cdef const char *name = b
        cdef int st
        with nogil:
            st = mpscy_device_create(name, &self.handle, err, ERR_LEN)
        _check(st, err)
        self.backend = backend

    def __dealloc__(self):
        if self.handle != NULL:
            mpscy_device_destroy(self.handle)
            self.handle = NULL

    def info(self):
        cdef mpscy_device_info info
        cdef char err[ERR_LEN]
        err[0] = 0
        _check(mpscy_device_info_get(self.handle, &info, err, ERR_LEN), err)
        return {"backend": info.backend.decode(), "name": info.name.decode("utf-8", "replace"),
                "unified_memory": bool(info.unified_memory), "threads": info.threads,
                "memory_bytes": info.memory_bytes}

    def synchronize(self):
        cdef char err[ERR_LEN]
        cdef int st
        err[0] = 0
        with nogil:
            st = mpscy_device_synchronize(self.handle, err, ERR_LEN)
        _check(st, err)

    def stats(self):
        cdef mpscy_stats s
        cdef char err[ERR_LEN]
        err[0] = 0
        _check(mpscy_device_stats(self.handle, &s, err, ERR_LEN), err)
        return {"allocations": s.allocations, "frees": s.frees, "bytes_in_use": s.bytes_in_use,
                "peak_bytes": s.peak_bytes, "steps": s.steps, "predicts": s.predicts,
                "calls": s.calls}


# no_gc_clear: when the cycle collector frees a buffer or graph together with its device, it
# must not drop the device reference first; __dealloc__ still needs the device alive.
@cython.no_gc_clear
cdef class Buffer:
    """A standalone native buffer (shared or private storage), copied through bytes."""
    cdef mpscy_buffer handle
    cdef Device device
    cdef readonly size_t nbytes

    def __cinit__(self, Device device not None, size_t nbytes, bint shared=True):
        cdef char err[ERR_LEN]
        err[0] = 0
        self.device = device
        _check(mpscy_buffer_create(device.handle, nbytes,
                                   MPSCY_STORAGE_SHARED if shared else MPSCY_STORAGE_PRIVATE,
                                   &self.handle, err, ERR_LEN), err)
        self.nbytes = nbytes

    def __dealloc__(self):
        if self.handle != NULL:
            mpscy_buffer_destroy(self.handle)
            self.handle = NULL

    def write(self, const unsigned char[::1] data not None, size_t offset=0):
        cdef char err[ERR_LEN]
        err[0] = 0
        _check(mpscy_buffer_write(self.handle, offset, &data[0] if data.shape[0] else NULL,
                                  <size_t>data.shape[0], err, ERR_LEN), err)

    def read(self, size_t nbytes, size_t offset=0):
        out = bytearray(nbytes)
        cdef unsigned char[::1] view = out
        cdef char err[ERR_LEN]
        err[0] = 0
        _check(mpscy_buffer_read(self.handle, offset, &view[0] if nbytes else NULL, nbytes,
                                 err, ERR_LEN), err)
        return bytes(out)

    def host_visible(self):
        cdef void *p = NULL
        cdef size_t n = 0
        cdef char err[ERR_LEN]
        err[0] = 0
        return mpscy_buffer_host_pointer(self.handle, &p, &n, err, ERR_LEN) == MPSCY_OK


# ----------------------------------------------------------------------- step result

cdef class StepResult:
    """What one training step reports. `accuracy` is None for losses without one."""
    cdef readonly double loss
    cdef readonly object accuracy
    cdef readonly int batch_size
    cdef readonly int64_t step_time_ns
    cdef readonly bint applied
    cdef double _grad_norm
    cdef object _owed_by  # the Graph whose step returned before this norm was known, until paid
    cdef object __weakref__

    @property
    def grad_norm(self):
        """The global L2 norm of the gradients, before clipping. On cuda a one-kernel training
        step returns once its loss and its decision are known, before its weight gradients are; the
        engine's next training step brings this norm along, and reading it before that waits for
        the step to finish (from another thread while the engine runs a call, it raises StateError,
        as any call on the engine would)."""
        if self._owed_by is not None:
            self._owed_by._pay_norm(self)
        return self._grad_norm

    @property
    def _norm_owed(self):
        """True while grad_norm is still to come from the device (tests)."""
        return self._owed_by is not None

    def __repr__(self):
        acc = "None" if self.accuracy is None else f"{self.accuracy:.4f}"
        return (f"StepResult(loss={self.loss:.6g}, accuracy={acc}, batch_size={self.batch_size}, "
                f"step_time_ns={self.step_time_ns}, applied={self.applied}, grad_norm={self.grad_norm:.6g})")

    def __reduce__(self):
        return (_make_result, (self.loss, self.accuracy, self.batch_size, self.step_time_ns,
                               self.applied, self.grad_norm))


def _make_result(loss, accuracy, batch_size, step_time_ns, applied, grad_norm):
    cdef StepResult r = StepResult.__new__(StepResult)
    r.loss, r.accuracy, r.batch_size = loss, accuracy, batch_size
    r.step_time_ns, r.applied, r._grad_norm = step_time_ns, applied, grad_norm
    return r


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
