# _owed.pxi — included by _native.pyx after Graph: a training step's gradient norm that comes after
# its result. cuda's one-kernel step returns once its loss and decision are known, before its
# weight gradients are (mpscy_step_result.grad_norm_pending); the graph's next training step brings
# that norm along (prev_grad_norm), or mpscy_graph_grad_norm waits for it. The graph holds the
# owing StepResult weakly (Graph.owed), the result holds the graph until paid (StepResult._owed_by).


cdef _owed_paid(Graph g, double norm):
    """The owed result, if still alive, gets its norm; nothing is owed after."""
    cdef StepResult r = g.owed() if g.owed is not None else None
    g.owed = None
    if r is not None:
        r._grad_norm = norm
        r._owed_by = None


cdef _owed_pay(Graph g, StepResult r):
    """Waits for the norm r owes: r is the graph's last training step's result (a later step
    would have paid it)."""
    cdef double norm = 0.0
    cdef int st
    if r._owed_by is None:
        return
    if g.owed is None or g.owed() is not r:
        raise _errors.StateError("this step's gradient norm is no longer held by its engine")
    g._enter()
    try:
        with nogil:
            st = mpscy_graph_grad_norm(g.handle, &norm, g.err, ERR_LEN)
        _check(st, g.err)
    finally:
        g.busy = False
    _owed_paid(g, norm)


cdef _owed_settle(Graph g):
    """Before the graph is let go (Engine.close): the owed result, if any, gets its norm (NaN if
    the device failed), so that it does not keep the graph's device memory alive."""
    r = g.owed() if g.owed is not None else None
    if r is None:
        g.owed = None
        return
    try:
        _owed_pay(g, r)
    except _errors.Error:
        _owed_paid(g, float("nan"))
