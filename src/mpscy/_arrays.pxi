# _arrays.pxi — included by _native.pyx: buffer-protocol checks of batch arrays (dtype, rank,
# contiguity) and the copies into staging buffers that also test finiteness and label range.
# No allocation; nothing here touches a native handle.

cdef enum _Kind:
    K_OTHER = 0
    K_F32 = 1
    K_I32 = 2
    K_I64 = 3


cdef _Kind _kind_of(const Py_buffer *v) noexcept:
    cdef const char *f = v.format
    if f == NULL:
        return K_OTHER
    if f[0] == b'@' or f[0] == b'=' or f[0] == b'<':
        f += 1
    if f[0] == 0 or f[1] != 0:
        return K_OTHER
    if f[0] == b'f' and v.itemsize == 4:
        return K_F32
    if (f[0] == b'i' or f[0] == b'l' or f[0] == b'q') and v.itemsize == 4:
        return K_I32
    if (f[0] == b'i' or f[0] == b'l' or f[0] == b'q') and v.itemsize == 8:
        return K_I64
    return K_OTHER


cdef bint _c_contiguous(const Py_buffer *v) noexcept:
    cdef Py_ssize_t expect = v.itemsize
    cdef int d
    if v.strides == NULL:
        return True
    for d in range(v.ndim - 1, -1, -1):
        if v.shape[d] > 1 and v.strides[d] != expect:
            return False
        expect *= v.shape[d]
    return True


cdef int _acquire(object obj, Py_buffer *view, str what) except -1:
    if obj is None:
        raise _errors.DTypeError(f"{what} is None; expected a numpy array")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    except Exception:
        if isinstance(obj, np.ndarray):  # a dtype that exports no buffer (datetime64, timedelta64, ...)
            raise _errors.DTypeError(f"{what} must be a float32 array (int32/int64 for class labels), "
                                     f"got dtype {obj.dtype}") from None
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if type(obj).__module__ == "builtins":
            kind = type(obj).__name__
        hint = " (convert it with .numpy(), or np.asarray)" if hasattr(obj, "__array__") else ""
        raise _errors.DTypeError(f"{what} must be a numpy array, got {kind}{hint}") from None
    return 0


cdef str _dtype_name(object obj):
    dt = getattr(obj, "dtype", None)
    return str(dt) if dt is not None else type(obj).__name__


cdef str _shape_str(const Py_buffer *v):
    return "(" + ", ".join(str(v.shape[d]) for d in range(v.ndim)) + ("," if v.ndim == 1 else "") + ")"


cdef extern from "_staging.h" nogil:
    # one pass per copy: the check rides along with the copy (see _staging.h)
    ctypedef struct mpscy_pool:
        pass
    int mpscy_pool_create(mpscy_stats *stats, int32_t threads, mpscy_pool **out)
    void mpscy_pool_destroy(mpscy_pool *p)
    int _stage_threads "mpscy_stage_threads" (int64_t bytes, int device_bound)
    int64_t _copy_finite "mpscy_copy_finite" (float *dst, const float *src, int64_t n)
    int64_t _first_outside_unit "mpscy_first_outside_unit" (const float *src, int64_t n)
    int64_t _first_nonfinite "mpscy_first_nonfinite" (const float *src, int64_t n)
    int64_t _copy_finite_pool "mpscy_copy_finite_pool" (mpscy_pool *pool, float *dst, const float *src, int64_t n)
    int64_t _copy_labels_i64 "mpscy_copy_labels_i64" (int32_t *dst, const int64_t *src, int64_t n, int64_t classes)
    int64_t _copy_labels_i32 "mpscy_copy_labels_i32" (int32_t *dst, const int32_t *src, int64_t n, int64_t classes)
    int64_t _copy_labels_ign_i64 "mpscy_copy_labels_ign_i64" (int32_t *dst, const int64_t *src, int64_t n,
                                                               int64_t classes, int32_t ign, int64_t *ignored)
    int64_t _copy_labels_ign_i32 "mpscy_copy_labels_ign_i32" (int32_t *dst, const int32_t *src, int64_t n,
                                                               int64_t classes, int32_t ign, int64_t *ignored)
