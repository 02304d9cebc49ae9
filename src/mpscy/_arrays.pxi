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
        raise _errors.DTypeError(f"{what} must be a numpy array, got {type(obj).__name__}") from None
    return 0


cdef str _dtype_name(object obj):
    dt = getattr(obj, "dtype", None)
    return str(dt) if dt is not None else type(obj).__name__


cdef str _shape_str(const Py_buffer *v):
    return "(" + ", ".join(str(v.shape[d]) for d in range(v.ndim)) + ("," if v.ndim == 1 else "") + ")"


cdef int64_t _copy_finite(float *dst, const float *src, int64_t n) noexcept nogil:
    """Copies n floats; returns the index of the first NaN/Inf, or -1. The exponent-max scan
    vectorizes, so the check costs about as much as the copy."""
    cdef const uint32_t *bits = <const uint32_t *>src
    cdef uint32_t mx = 0, e
    cdef int64_t i
    memcpy(dst, src, <size_t>n * sizeof(float))
    for i in range(n):
        e = bits[i] & 0x7f800000u
        mx = e if e > mx else mx
    if mx != 0x7f800000u:
        return -1
    for i in range(n):
        if (bits[i] & 0x7f800000u) == 0x7f800000u:
            return i
    return -1


cdef int64_t _copy_labels_i64(int32_t *dst, const int64_t *src, int64_t n, int64_t classes) noexcept nogil:
    """int64 labels into the int32 staging buffer; returns the first out-of-range row or -1."""
    cdef int64_t i, bad = -1
    cdef int64_t v
    for i in range(n):
        v = src[i]
        if v < 0 or v >= classes:
            if bad < 0:
                bad = i
            v = 0
        dst[i] = <int32_t>v
    return bad


cdef int64_t _copy_labels_i32(int32_t *dst, const int32_t *src, int64_t n, int64_t classes) noexcept nogil:
    cdef int64_t i, bad = -1
    memcpy(dst, src, <size_t>n * sizeof(int32_t))
    for i in range(n):
        if src[i] < 0 or src[i] >= classes:
            return i
    return bad
