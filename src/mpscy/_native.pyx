# _native.pyx — the Cython bridge to objc/mpscy.h. Each cdef class owns exactly one native
# handle, frees it in __dealloc__ and keeps its parent alive. Batches are validated with the
# GIL held (dtype, rank, shape, contiguity, finiteness, label range) while they are copied
# straight into the graph's shared staging buffers; then exactly one ABI call runs, in
# `with nogil:`, and one _check() turns its status into an mpscy.Error. No pointer reaches Python.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_RECORDS_RO
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strncpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
cimport cython

from mpscy._abi cimport *


import weakref

import numpy as np

from mpscy import errors as _errors

ABI_VERSION = MPSCY_ABI_VERSION
LIBRARY_ABI_VERSION = mpscy_abi_version()
MAX_THREADS = MPSCY_MAX_THREADS  # the most worker threads an engine's pool runs
cdef enum:
    ERR_LEN = 512
    MAX_IO = 8

include "_desc.pxi"

_STATUS_ERRORS = {
    MPSCY_INVALID: _errors.InvalidArgumentError,
    MPSCY_SHAPE: _errors.ShapeError,
    MPSCY_OOM: _errors.OutOfMemoryError,
    MPSCY_DEVICE: _errors.DeviceError,
    MPSCY_UNSUPPORTED: _errors.UnsupportedError,
    MPSCY_NONFINITE: _errors.NonFiniteError,
}


cdef int _check(int status, const char *err) except -1:
    """Raises the mpscy.Error subclass of a non-OK status with the native message."""
    if status == MPSCY_OK:
        return 0
    cls = _STATUS_ERRORS.get(status, _errors.Error)
    raise cls((<bytes>err).decode("utf-8", "replace") or f"native status {status}")


include "_arrays.pxi"


include "_device.pxi"


# ----------------------------------------------------------------------- graph

@cython.no_gc_clear
cdef class Graph:
    """A built graph: the model, its loss and optimizer, planned once on a device.

    `layers` is a list of dicts (kind, name, inputs, shape, flags, ints, reals) in topological
    order; `spec` holds output, batch, target ("index"/"dense"), loss, optim, precision."""
    cdef mpscy_graph handle
    cdef readonly Device device
    cdef mpscy_step_args args
    cdef char err[ERR_LEN]
    cdef int n_inputs
    cdef float *in_ptr[MAX_IO]
    cdef int in_rank[MAX_IO]
    cdef int64_t in_shape[MAX_IO][6]
    cdef int64_t in_size[MAX_IO]
    cdef void *target_ptr
    cdef float *output_ptr
    cdef readonly int batch
    cdef readonly int64_t out_size
    cdef readonly tuple output_shape
    cdef int target_dense
    cdef bint target_unit  # BinaryCrossEntropy: targets in [0, 1], which torch checks too
    cdef int accuracy_kind
    cdef int64_t classes
    cdef int64_t positions   # the cross-entropies on logits over (C, d1, ...): d1 x ... (labels per row), else 1
    cdef tuple label_spatial       # integer labels' per-sample shape: (d1, ...) of a (C, d1, ...) cross entropy, else ()
    cdef int label_rank
    cdef int64_t label_dims[6]
    cdef bint ignore               # torch's ignore_index (sparse cross-entropy): labels equal to it are left out
    cdef int32_t ignore_index
    cdef int64_t last_valid        # the labels of the last staged batch that count (not ignore_index)
    cdef bint busy   # set while a native call is in flight (the GIL is released then)
    cdef int min_train_rows       # fewest rows a train-mode call accepts (2 with 1-D BatchNorm)
    cdef str min_rows_reason
    cdef mpscy_pool *stage_pool   # worker threads for staging large batches to a device, or NULL
    cdef bint defers              # the backend stages x itself (one large input: stage_min_bytes)
    cdef Py_buffer xview          # x, held from validation until the native call has returned
    cdef bint xheld
    cdef Py_ssize_t row0          # the batch's first row in the caller's array (error messages)
    cdef object owed              # a weak reference to the last training step's result while its gradient
                                  # norm is still to come (cuda), else None: a result keeps its graph, not back

    def __cinit__(self, Device device not None, list layers not None, dict spec not None):
        cdef int n = len(layers)
        cdef mpscy_layer_desc *descs = <mpscy_layer_desc *>PyMem_Calloc(max(n, 1), sizeof(mpscy_layer_desc))
        cdef mpscy_graph_desc d
        cdef int i, j, st
        cdef mpscy_buffer buf
        cdef void *host
        cdef size_t nbytes
        cdef float[::1] class_w      # the loss's class weights, alive until the build has copied them
        cdef float[::1] pos_w        # bce_with_logits's pos_weight, the same
        if descs == NULL:
            raise MemoryError("graph descriptor")
        self.device = device
        self.err[0] = 0
        try:
            memset(&d, 0, sizeof(d))
            for i, L in enumerate(layers):
                _fill_layer(&descs[i], L)
            d.n_layers = n
            d.layers = descs
            d.output = spec["output"]
            d.batch = spec["batch"]
            d.target = MPSCY_TARGET_DENSE if spec["target"] == "dense" else MPSCY_TARGET_INDEX
            d.precision = MPSCY_PRECISION_TF32 if spec.get("precision", "fp32") == "tf32" else MPSCY_PRECISION_FP32
            d.threads = spec.get("threads", 0)
            d.input_grad = 1 if spec.get("input_grad") else 0
            _fill_loss(&d.loss, spec["loss"])
            if spec["loss"].get("class_weight") is not None:
                class_w = np.ascontiguousarray(spec["loss"]["class_weight"], dtype=np.float32)
                d.loss.class_weight = &class_w[0]
            if spec["loss"].get("pos_weight") is not None:
                pos_w = np.ascontiguousarray(spec["loss"]["pos_weight"], dtype=np.float32)
                d.loss.pos_weight = &pos_w[0]
            _fill_optim(&d.optim, spec["optim"])
            with nogil:
                st = mpscy_graph_build(device.handle, &d, &self.handle, self.err, ERR_LEN)
            _check(st, self.err)
        finally:
            PyMem_Free(descs)

        self.batch = d.batch
        self.target_dense = d.target == MPSCY_TARGET_DENSE
        self.target_unit = d.loss.kind == MPSCY_LOSS_BCE
        self.accuracy_kind = d.loss.accuracy
        logits_ce = d.loss.kind == MPSCY_LOSS_SPARSE_CE or d.loss.kind == MPSCY_LOSS_CE
        self.ignore = d.loss.ignore != 0
        self.ignore_index = d.loss.ignore_index
        self.n_inputs = 0
        for i, L in enumerate(layers):
            if L["kind"] == "input":
                if self.n_inputs == MAX_IO:
                    raise _errors.InvalidArgumentError(f"at most {MAX_IO} model inputs are supported")
                k = self.n_inputs
                self.in_rank[k] = len(L["shape"])
                self.in_size[k] = 1
                for j, s in enumerate(L["shape"]):
                    self.in_shape[k][j] = s
                    self.in_size[k] *= s
                _check(mpscy_graph_io(self.handle, MPSCY_IO_INPUT, k, &buf, self.err, ERR_LEN), self.err)
                _check(mpscy_buffer_host_pointer(buf, &host, &nbytes, self.err, ERR_LEN), self.err)
                self.in_ptr[k] = <float *>host
                self.n_inputs += 1
        cdef mpscy_device_info dinfo
        _check(mpscy_device_info_get(device.handle, &dinfo, self.err, ERR_LEN), self.err)
        self.defers = (dinfo.stage_min_bytes > 0 and self.n_inputs == 1 and
                       self.in_size[0] * self.batch * 4 >= dinfo.stage_min_bytes)
        # large batches bound for a device's memory are staged by a few threads (_staging.h's
        # mpscy_stage_threads; $MPSCY_STAGE_THREADS overrides it). A backend that stages x itself
        # (cuda: while the step runs) has its own threads.
        cdef int64_t biggest = 0
        cdef int threads = 1
        for k in range(self.n_inputs):
            biggest = max(biggest, self.in_size[k] * self.batch * 4)
        if not self.defers:
            threads = _stage_threads(biggest, device.backend != "cpu")
        if threads > 1:
            _check(mpscy_pool_create(NULL, threads, &self.stage_pool), b"staging threads")
        out = layers[spec["output"]]["shape"]
        self.output_shape = tuple(out)
        self.out_size = 1
        for s in out:
            self.out_size *= s
        # torch's cross entropy over (n, C, d1, ...): C classes at each of d1 x ... positions
        self.classes = out[0] if logits_ce and len(out) > 1 else self.out_size
        self.positions = self.out_size // self.classes
        # torch's (n, d1, ...) labels of (n, C, d1, ...), (n, 1, 1) for (n, C, 1, 1) too
        self.label_spatial = tuple(out[1:]) if logits_ce and len(out) > 1 else ()
        self.label_rank = len(self.label_spatial)
        for i in range(self.label_rank):
            self.label_dims[i] = self.label_spatial[i]
        _check(mpscy_graph_io(self.handle, MPSCY_IO_TARGET, 0, &buf, self.err, ERR_LEN), self.err)
        _check(mpscy_buffer_host_pointer(buf, &self.target_ptr, &nbytes, self.err, ERR_LEN), self.err)
        _check(mpscy_graph_io(self.handle, MPSCY_IO_OUTPUT, 0, &buf, self.err, ERR_LEN), self.err)
        _check(mpscy_buffer_host_pointer(buf, &host, &nbytes, self.err, ERR_LEN), self.err)
        self.output_ptr = <float *>host
        o = spec["optim"]
        self.args.lr = o.get("lr", 0.0)
        self.args.momentum = o.get("momentum", 0.0)
        self.args.beta1 = o.get("beta1", 0.9)
        self.args.beta2 = o.get("beta2", 0.999)
        self.args.weight_decay = o.get("weight_decay", 0.0)
        self.args.seed = spec.get("seed", 0)
        self.args.counter = 0

    def __dealloc__(self):
        self._release_x()
        if self.stage_pool != NULL:
            mpscy_pool_destroy(self.stage_pool)
            self.stage_pool = NULL
        if self.handle != NULL:
            mpscy_graph_destroy(self.handle)
            self.handle = NULL

    # per-step values: read by the next native step, never a rebuild
    property lr:
        def __get__(self): return self.args.lr
        def __set__(self, double v): self.args.lr = v
    property momentum:
        def __get__(self): return self.args.momentum
        def __set__(self, double v): self.args.momentum = v
    property beta1:
        def __get__(self): return self.args.beta1
        def __set__(self, double v): self.args.beta1 = v
    property beta2:
        def __get__(self): return self.args.beta2
        def __set__(self, double v): self.args.beta2 = v
    property weight_decay:
        def __get__(self): return self.args.weight_decay
        def __set__(self, double v): self.args.weight_decay = v
    property seed:
        def __get__(self): return self.args.seed
        def __set__(self, uint64_t v): self.args.seed = v
    property counter:
        def __get__(self): return self.args.counter
        def __set__(self, uint64_t v): self.args.counter = v

    def set_min_train_rows(self, int rows, str reason):
        """Refuse train-mode batches of fewer rows, with `reason` as the message."""
        self.min_train_rows = rows
        self.min_rows_reason = reason

    cdef int _check_train_rows(self, int rows) except -1:
        if rows < self.min_train_rows:
            raise _errors.InvalidArgumentError(self.min_rows_reason)
        return 0

    cdef int _enter(self) except -1:
        if self.busy:
            raise _errors.StateError("this engine is already running a call in another thread; "
                                     "an engine is used by one thread at a time")
        self.busy = True
        self.row0 = 0
        return 0

    # ------------------------------------------------------------------ staging

    cdef int _release_x(self) except -1:
        """Lets go of the x a deferred call held (see _stage_one)."""
        self.args.x_src = NULL
        if self.xheld:
            self.xheld = False
            PyBuffer_Release(&self.xview)
        return 0

    cdef int _check_held(self, int status, bint x_bad) except -1:
        """_check for a call that may have staged the held x itself: a NaN or Inf it found there
        (x_bad) is raised as a staged one is, by _stage_one's message with the row counted in the
        caller's array, not as the backend words it, counted in this batch."""
        cdef int64_t bad = -1
        if status == MPSCY_NONFINITE and x_bad and self.xheld:
            with nogil:
                bad = _first_nonfinite(<const float *>self.xview.buf, self.xview.shape[0] * self.in_size[0])
            if bad >= 0:
                self._nonfinite("x", bad, 0, self.row0)
        return _check(status, self.err)

    cdef int _nonfinite(self, str what, int64_t bad, int k, Py_ssize_t row0) except -1:
        """NonFiniteError for element `bad` of input k's rows, named by its row in the caller's
        array (the rows start at row0 there)."""
        raise _errors.NonFiniteError(f"{what} contains NaN or Inf at row {bad // self.in_size[k] + row0}")

    # The rules of a batch, each stated once, for a step's staging and for check_input and
    # check_target (fit's check of a whole array before it trains). dst is where the values go:
    # NULL checks them only, over any number of rows, with nothing copied or allocated. A step
    # names a row of the caller's array (row0: its batch's first row there).

    cdef int _input_layout(self, Py_buffer *v, object x, int k, Py_ssize_t rows, str what,
                           bint batch) except -1:
        """Input k's dtype, shape and contiguity; with batch, the built batch's row limits."""
        cdef int d
        cdef bint fits
        if _kind_of(v) != K_F32:
            raise _errors.DTypeError(f"{what} must be float32, got {_dtype_name(x)} "
                                     f"(convert with .astype(np.float32))")
        fits = v.ndim == self.in_rank[k] + 1
        for d in range(self.in_rank[k] if fits else 0):
            fits = fits and v.shape[d + 1] == self.in_shape[k][d]
        if not fits:
            want = tuple(self.in_shape[k][j] for j in range(self.in_rank[k]))
            got = tuple(v.shape[d] for d in range(1, v.ndim))
            # Keras's layout: an (n, H, W, C) batch for (C, H, W) images
            hint = (" (a channels-last batch: np.ascontiguousarray(x.transpose(0, 3, 1, 2)) gives NCHW)"
                    if len(want) == 3 and got == (want[1], want[2], want[0]) else "")
            raise _errors.ShapeError(f"{what} has shape {_shape_str(v)}, expected (n, "
                                     f"{', '.join(str(d) for d in want)}){hint}")
        if batch and v.shape[0] == 0:
            raise _errors.ShapeError(f"{what} is an empty batch (0 rows)")
        if batch and v.shape[0] > self.batch:
            raise _errors.ShapeError(f"{what} has {v.shape[0]} rows, more than the built batch size {self.batch}")
        if rows >= 0 and v.shape[0] != rows:
            raise _errors.ShapeError(f"{what} has {v.shape[0]} rows, other inputs have {rows}")
        if not _c_contiguous(v):
            raise _errors.ShapeError(f"{what} is not C-contiguous (use np.ascontiguousarray)")
        return 0

    cdef int _input_values(self, const Py_buffer *v, int k, str what, Py_ssize_t row0, float *dst) except -1:
        """Input k's values copied to dst (NULL: checked only), NaN and Inf refused."""
        cdef int64_t bad
        cdef int64_t count = v.shape[0] * self.in_size[k]
        with nogil:
            bad = _copy_finite_pool(self.stage_pool, dst, <const float *>v.buf, count)
        if bad >= 0:
            self._nonfinite(what, bad, k, row0)
        return 0

    cdef int _stage_one(self, object x, int k, int rows, str what, bint defer=False) except -1:
        """Validates x against input k and copies it into the staging buffer; returns rows.
        With defer, x is only validated and held, and args.x_src points at its rows: the backend
        copies and checks them in the call (the caller ends with _release_x)."""
        cdef Py_buffer v
        cdef bint held = False
        _acquire(x, &v, what)
        try:
            self._input_layout(&v, x, k, rows, what, True)
            if defer:
                self._release_x()
                self.xview = v
                self.xheld = held = True
                self.args.x_src = <const float *>v.buf
                return <int>v.shape[0]
            self._input_values(&v, k, what, self.row0, self.in_ptr[k])
            return <int>v.shape[0]
        finally:
            if not held:
                PyBuffer_Release(&v)

    def check_input(self, x, int k, str what, bint values=True):
        """The rules a step applies to input k (dtype, shape, contiguity, NaN and Inf), over all
        of x's rows, nothing copied, rows named in x: fit's check before it trains (predict's,
        with values False: the layout only). The built batch's row limits are not a whole
        array's."""
        cdef Py_buffer v
        if not 0 <= k < self.n_inputs:
            raise _errors.InvalidArgumentError(f"no input {k}: this model has {self.n_inputs} inputs")
        _acquire(x, &v, what)
        try:
            self._input_layout(&v, x, k, -1, what, False)
            if values:
                self._input_values(&v, k, what, 0, NULL)
        finally:
            PyBuffer_Release(&v)

    cdef int _stage_inputs(self, object x, bint defer=False) except -1:
        """Stages x (or, with defer on a backend that stages it itself, validates and holds it).
        The last batch's label count is forgotten first: until this batch's labels are staged,
        `counted` is -1, so that a failure of x is not taken for a batch whose every label is
        ignored (fit skips those)."""
        cdef int k, rows = -1
        self.last_valid = -1
        if self.n_inputs == 1:
            return self._stage_one(x, 0, -1, "x", defer and self.defers)
        if not isinstance(x, (list, tuple)) or len(x) != self.n_inputs:
            raise _errors.InvalidArgumentError(f"this model has {self.n_inputs} inputs: pass x as a list of {self.n_inputs} "
                                               f"arrays")
        for k in range(self.n_inputs):
            rows = self._stage_one(x[k], k, rows, f"x[{k}]")
        return rows

    cdef int _target(self, object y, Py_ssize_t rows, str what, Py_ssize_t row0, void *dst) except -1:
        """y's rules for `rows` rows of x: labels int32/int64 (n,) in [0, classes), or dense
        float32 targets shaped like the output (or (n,) for one output), finite, and in [0, 1] for
        BinaryCrossEntropy; copied to dst, or with dst NULL checked only (a label's row is then
        named "of <what>", as fit's check words it)."""
        cdef Py_buffer v
        cdef _Kind kind
        cdef int64_t bad = -1, count, ignored = 0
        cdef int d
        cdef bint fits
        _acquire(y, &v, what)
        try:
            kind = _kind_of(&v)
            if not self.target_dense:
                if kind != K_I32 and kind != K_I64:
                    _refuse_label_dtype(self, y, &v, kind, what)
                fits = v.ndim == 1 + self.label_rank
                for d in range(self.label_rank if fits else 0):
                    fits = fits and v.shape[d + 1] == self.label_dims[d]
                # (n, 1) labels of (n, C) outputs (Keras's datasets give them, and Keras takes them):
                # the same bytes as (n,)
                fits = fits or (self.label_rank == 0 and v.ndim == 2 and v.shape[1] == 1)
                if not fits:
                    spatial = self.label_spatial
                    want = f"(n, {', '.join(map(str, spatial))})" if spatial else "(n,)"
                    raise _errors.ShapeError(f"{what} has shape {_shape_str(&v)}; labels must be shaped {want}"
                                             + (f", a class in [0, {self.classes}) at each position of the "
                                                f"output's {self.output_shape}" if spatial else "")
                                             + (f" (one-hot rows: {what}.argmax(1))" if _one_hot(self, &v) else ""))
                if v.shape[0] != rows:
                    raise _errors.ShapeError(f"{what} has {v.shape[0]} labels for {rows} rows of x")
                if not _c_contiguous(&v):
                    raise _errors.ShapeError(f"{what} is not C-contiguous (use np.ascontiguousarray)")
                count = rows * self.positions
                with nogil:
                    if self.ignore and kind == K_I64:
                        bad = _copy_labels_ign_i64(<int32_t *>dst, <const int64_t *>v.buf, count, self.classes,
                                                   self.ignore_index, &ignored)
                    elif self.ignore:
                        bad = _copy_labels_ign_i32(<int32_t *>dst, <const int32_t *>v.buf, count, self.classes,
                                                   self.ignore_index, &ignored)
                    elif kind == K_I64:
                        bad = _copy_labels_i64(<int32_t *>dst, <const int64_t *>v.buf, count, self.classes)
                    else:
                        bad = _copy_labels_i32(<int32_t *>dst, <const int32_t *>v.buf, count, self.classes)
                if bad >= 0:
                    _refuse_label_value(self, &v, kind, bad, what, row0, dst == NULL)
                if dst != NULL:
                    self.last_valid = count - ignored
                return 0
            if kind != K_F32:
                raise _errors.DTypeError(f"{what} must be float32 targets shaped like the output, got {_dtype_name(y)}")
            if v.ndim < 1 or v.shape[0] != rows:
                raise _errors.ShapeError(f"{what} has shape {_shape_str(&v)} for {rows} rows of x")
            ok = v.ndim == len(self.output_shape) + 1 and all(
                v.shape[d + 1] == self.output_shape[d] for d in range(len(self.output_shape)))
            if not ok and not (v.ndim == 1 and self.out_size == 1):
                raise _errors.ShapeError(f"{what} has shape {_shape_str(&v)}, expected (n, "
                                         f"{', '.join(map(str, self.output_shape))})")
            if not _c_contiguous(&v):
                raise _errors.ShapeError(f"{what} is not C-contiguous (use np.ascontiguousarray)")
            count = rows * self.out_size
            with nogil:
                bad = _copy_finite(<float *>dst, <const float *>v.buf, count)
            if bad >= 0:
                raise _errors.NonFiniteError(f"{what} contains NaN or Inf at row {bad // self.out_size + row0}")
            if self.target_unit:
                with nogil:
                    bad = _first_outside_unit(<const float *>v.buf, count)
                if bad >= 0:
                    raise _errors.InvalidArgumentError(
                        f"{what} holds {(<const float *>v.buf)[bad]!r} at row {bad // self.out_size + row0}; "
                        "BinaryCrossEntropy targets must be in [0, 1]")
            return 0
        finally:
            PyBuffer_Release(&v)

    cdef int _stage_target(self, object y, int rows) except -1:
        return self._target(y, rows, "y", self.row0, self.target_ptr)

    def check_target(self, y, str what, Py_ssize_t rows):
        """The rules a step applies to y, over all of its rows (`rows` of x), nothing copied,
        rows named in y: fit's check before it trains."""
        self._target(y, rows, what, 0, NULL)

    cdef object _accuracy(self, int64_t correct, int rows, int64_t valid=-1):
        """valid: the labels counted (not ignore_index) among the rows; -1: the last staged batch's"""
        if self.accuracy_kind == MPSCY_ACCURACY_NONE or correct < 0:
            return None
        if self.accuracy_kind == MPSCY_ACCURACY_THRESHOLD:
            return correct / <double>(rows * self.out_size)
        if self.ignore:   # over the labels that count; none: undefined
            if valid < 0:
                valid = self.last_valid
            return correct / <double>valid if valid > 0 else float("nan")
        return correct / <double>(rows * self.positions)   # per position for a (C, d1, ...) cross entropy

    # ------------------------------------------------------------------ the hot path

    def train_step(self, x, y):
        """One training step on (x, y): exactly one native call. Returns a StepResult."""
        cdef int64_t t0 = _now_ns()
        cdef mpscy_step_result res
        cdef int st, rows
        self._enter()
        try:
            rows = self._stage_inputs(x, True)
            self._check_train_rows(rows)
            self._stage_target(y, rows)
            self.args.batch = rows
            self.args.mode = MPSCY_MODE_TRAIN
            with nogil:
                st = mpscy_graph_step(self.handle, &self.args, &res, self.err, ERR_LEN)
            if st == MPSCY_OK or (st == MPSCY_NONFINITE and not res.x_nonfinite):
                self.args.counter += 1
            if res.prev_grad_norm_ready:
                _owed_paid(self, res.prev_grad_norm)
            self._check_held(st, res.x_nonfinite)
        finally:
            self._release_x()
            self.busy = False
        cdef StepResult r = StepResult.__new__(StepResult)
        r.loss = res.loss
        r.accuracy = self._accuracy(res.correct, rows)
        r.batch_size = rows
        r.applied = res.applied
        r._grad_norm = res.grad_norm
        if res.grad_norm_pending:
            r._owed_by = self
            self.owed = weakref.ref(r)
        r.step_time_ns = _now_ns() - t0
        return r

    def _pay_norm(self, StepResult r not None):
        """Waits for the gradient norm r still owes (StepResult.grad_norm: _owed.pxi)."""
        _owed_pay(self, r)

    def _settle_owed(self):
        """Pays the owed result its norm before the graph is let go (Engine.close: _owed.pxi)."""
        _owed_settle(self)

    cdef tuple _batch(self, x, y, int mode, Py_ssize_t offset=0):
        """One EVAL or GRAD call on (x, y): (mean loss, correct or -1, rows)."""
        cdef int rows
        cdef mpscy_step_result res
        cdef int st
        self._enter()
        try:
            self.row0 = offset
            rows = self._stage_inputs(x, mode == MPSCY_MODE_EVAL)
            if mode != MPSCY_MODE_EVAL:
                self._check_train_rows(rows)
            self._stage_target(y, rows)
            self.args.batch = rows
            self.args.mode = mode
            with nogil:
                st = mpscy_graph_step(self.handle, &self.args, &res, self.err, ERR_LEN)
            self._check_held(st, res.x_nonfinite)
        finally:
            self._release_x()
            self.busy = False
        return res.loss, res.correct, rows

    def eval_batch(self, x, y, Py_ssize_t offset=0):
        """Eval-mode loss and correct count of one batch: (mean loss, correct or -1, rows).
        offset: the batch's first row in the caller's array, for error messages."""
        return self._batch(x, y, MPSCY_MODE_EVAL, offset)

    def grad_batch(self, x, y):
        """Train-mode forward and backward of one batch, no update: (loss, correct, rows).
        Gradients are then readable as "<param>.grad" tensors (and input gradients through
        read_input_grad when the graph was built with input_grad)."""
        return self._batch(x, y, MPSCY_MODE_GRAD)

    def acquire(self):
        """Holds this graph for a sequence of calls (an L-BFGS step): other threads get
        StateError until release()."""
        self._enter()

    def release(self):
        self.busy = False

    def stage(self, x, y):
        """Validates and copies (x, y) into the staging buffers for the calls that follow
        (an L-BFGS step evaluates the same batch several times); returns the row count.
        The caller holds the graph (acquire)."""
        cdef int rows
        if not self.busy:
            raise _errors.StateError("stage() and lbfgs_call() need the graph held (acquire)")
        rows = self._stage_inputs(x)
        self._check_train_rows(rows)
        self._stage_target(y, rows)
        self.args.batch = rows
        return rows

    def lbfgs_call(self, int ops, int reg, int flat_reg, double t_prev, double t):
        """One MPSCY_MODE_LBFGS call on the staged batch (see mpscy.h): returns (loss, correct,
        grad_norm, applied, stopped, gtd, d_max, gtd_new, g_max, g_sum)."""
        cdef mpscy_step_result res
        cdef int st
        if not self.busy:
            raise _errors.StateError("stage() and lbfgs_call() need the graph held (acquire)")
        self.args.mode = MPSCY_MODE_LBFGS
        self.args.lbfgs_ops = ops
        self.args.lbfgs_reg = reg
        self.args.lbfgs_flat_reg = flat_reg
        self.args.lbfgs_t_prev = t_prev
        self.args.lbfgs_t = t
        with nogil:
            st = mpscy_graph_step(self.handle, &self.args, &res, self.err, ERR_LEN)
        self.args.lbfgs_ops = 0
        if (st == MPSCY_OK or st == MPSCY_NONFINITE) and (ops & MPSCY_LBFGS_EVAL):
            self.args.counter += 1
        _check(st, self.err)
        return (res.loss, res.correct, res.grad_norm, res.applied, res.lbfgs_stopped, res.lbfgs_gtd,
                res.lbfgs_d_max, res.lbfgs_gtd_new, res.lbfgs_g_max, res.lbfgs_g_sum)

    @property
    def counted(self):
        """The labels of the last staged batch that count (not the loss's ignore_index), or -1
        without an ignore_index (every label counts) or when that batch's staging failed before
        its labels."""
        return self.last_valid if self.ignore else -1

    def accuracy_of(self, int64_t correct, int rows, int64_t valid=-1):
        """The accuracy a step result reports for `correct` out of `rows` (None without one);
        valid: under ignore_index, the labels among them that count (-1: the last staged batch's)."""
        return self._accuracy(correct, rows, valid)

    def read_input_grad(self, int index, int rows, tuple shape):
        """Copy of d(loss)/d(input `index`) for the first `rows` rows of the last step."""
        cdef mpscy_buffer buf
        arr = np.empty((rows,) + shape, dtype=np.float32)
        cdef Py_buffer v
        _check(mpscy_graph_io(self.handle, MPSCY_IO_INPUT_GRAD, index, &buf, self.err, ERR_LEN), self.err)
        _acquire(arr, &v, "gradient")
        try:
            _check(mpscy_buffer_read(buf, 0, v.buf, <size_t>v.len, self.err, ERR_LEN), self.err)
        finally:
            PyBuffer_Release(&v)
        return arr

    def predict_batch(self, x, out, Py_ssize_t offset):
        """Eval-mode forward of one batch into rows [offset, offset + n) of `out` (float32)."""
        cdef int rows, st
        cdef Py_buffer v
        self._enter()
        try:
            self.row0 = offset
            rows = self._stage_inputs(x, True)
            _acquire(out, &v, "out")
            try:
                if _kind_of(&v) != K_F32 or not _c_contiguous(&v) or v.ndim < 1 or \
                        v.len < (offset + rows) * self.out_size * 4 or offset < 0:
                    raise _errors.ShapeError("out must be a C-contiguous float32 array with room for the rows")
                self.args.batch = rows
                with nogil:
                    st = mpscy_graph_predict(self.handle, &self.args, self.err, ERR_LEN)
                self._check_held(st, True)  # x is the one thing predict finds non-finite
                memcpy(<float *>v.buf + offset * self.out_size, self.output_ptr,
                       <size_t>(rows * self.out_size) * sizeof(float))
            finally:
                PyBuffer_Release(&v)
        finally:
            self._release_x()
            self.busy = False
        return rows

    # ------------------------------------------------------------------ tensors

    def tensors(self):
        """[(name, role, dtype, shape, offset)] of every parameter, buffer and optimizer slot."""
        cdef int32_t count = 0, i
        cdef mpscy_tensor_info info
        _check(mpscy_graph_tensor_count(self.handle, &count, self.err, ERR_LEN), self.err)
        out = []
        for i in range(count):
            _check(mpscy_graph_tensor_info(self.handle, i, &info, self.err, ERR_LEN), self.err)
            out.append((info.name.decode(), _ROLES[info.role], _DTYPES[info.dtype],
                        tuple(info.shape[d] for d in range(info.rank)), info.offset))
        return out

    def read_tensor(self, int index, object dtype, tuple shape):
        arr = np.empty(shape, dtype=dtype)
        cdef Py_buffer v
        self._enter()
        try:
            _acquire(arr, &v, "tensor")
            try:
                _check(mpscy_graph_tensor_read(self.handle, index, v.buf, <size_t>v.len, self.err, ERR_LEN), self.err)
            finally:
                PyBuffer_Release(&v)
        finally:
            self.busy = False
        return arr

    def write_tensor(self, int index, object arr):
        """arr: a C-contiguous array of the tensor's dtype and element count (checked natively)."""
        cdef Py_buffer v
        self._enter()
        try:
            _acquire(arr, &v, "tensor")
            try:
                if not _c_contiguous(&v):
                    raise _errors.ShapeError("tensor data must be C-contiguous")
                _check(mpscy_graph_tensor_write(self.handle, index, v.buf, <size_t>v.len, self.err, ERR_LEN), self.err)
            finally:
                PyBuffer_Release(&v)
        finally:
            self.busy = False


include "_labels.pxi"
include "_owed.pxi"
