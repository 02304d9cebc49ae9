# _labels.pxi — included by _native.pyx after Graph: what a refused batch of class labels is told
# (Graph._target states the rules; these build the messages, on the error paths only).


cdef bint _one_hot(Graph g, const Py_buffer *v):
    """Whether refused labels are shaped as one row of class scores a sample: one-hot (Keras's
    to_categorical) or soft targets."""
    return g.label_rank == 0 and v.ndim == 2 and v.shape[1] == g.classes and g.classes > 1


cdef int _refuse_label_dtype(Graph g, object y, const Py_buffer *v, _Kind kind, str what) except -1:
    """DTypeError for labels that are not int32/int64, with the likely fix: argmax of one-hot rows,
    or a cast of whole-number floats."""
    floats = kind == K_F32 or _dtype_name(y) in ("float64", "float16")
    if floats and _one_hot(g, v):
        hint = (f" ({what} looks one-hot, a row of {g.classes} class scores a sample: "
                f"{what}.argmax(1) gives its labels, or loss=\"cross_entropy\" takes "
                "probabilities as targets)")
    else:
        hint = f" (whole-number floats: {what}.astype(np.int64))" if floats else ""
    raise _errors.DTypeError(f"{what} must be int32 or int64 class labels, got {_dtype_name(y)}{hint}")


cdef int _refuse_label_value(Graph g, const Py_buffer *v, _Kind kind, int64_t bad, str what, Py_ssize_t row0,
                             bint checking) except -1:
    """InvalidArgumentError for label element `bad`, outside [0, classes): its row in the caller's
    array (row0: the batch's first row there; checking: fit's check of the whole array, the row
    named "of <what>"), its position in a per-pixel label map, and the likely cause."""
    value = (<const int64_t *>v.buf)[bad] if kind == K_I64 else (<const int32_t *>v.buf)[bad]
    of = f" of {what}" if checking else ""
    at = ""
    if g.label_rank:
        pos = np.unravel_index(bad % g.positions, g.label_spatial)
        at = f" at position {tuple(int(i) for i in pos)}"
    if g.ignore:
        hint = f" and is not the loss's ignore_index {g.ignore_index}"
    elif value == g.classes:
        hint = (f": the model's output has {g.classes} classes, one fewer than such labels "
                "need (its last layer's width); a label to leave out takes the loss's "
                "ignore_index")
    elif value < 0 or g.label_rank:
        hint = (f"; to leave such labels out (torch's default ignore_index is -100), give the loss "
                f"ignore_index: SparseCrossEntropy(ignore_index={value})")
    else:
        hint = ""
    raise _errors.InvalidArgumentError(
        f"label {value} at row {bad // g.positions + row0}{at}{of} is outside [0, {g.classes}){hint}")
