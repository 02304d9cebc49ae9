# _desc.pxi — included by _native.pyx: names of the native enums for the Python side, and the
# filling of the C graph descriptor (layers, loss, optimizer) from the dicts the model builds.

LAYER_KINDS = {
    "input": MPSCY_LAYER_INPUT, "dense": MPSCY_LAYER_DENSE, "relu": MPSCY_LAYER_RELU,
    "conv2d": MPSCY_LAYER_CONV2D, "maxpool2d": MPSCY_LAYER_MAXPOOL2D,
    "avgpool2d": MPSCY_LAYER_AVGPOOL2D, "globalavgpool2d": MPSCY_LAYER_GLOBALAVGPOOL2D,
    "flatten": MPSCY_LAYER_FLATTEN, "batchnorm": MPSCY_LAYER_BATCHNORM,
    "layernorm": MPSCY_LAYER_LAYERNORM, "dropout": MPSCY_LAYER_DROPOUT,
    "leakyrelu": MPSCY_LAYER_LEAKYRELU, "elu": MPSCY_LAYER_ELU, "sigmoid": MPSCY_LAYER_SIGMOID,
    "tanh": MPSCY_LAYER_TANH, "swish": MPSCY_LAYER_SWISH, "gelu": MPSCY_LAYER_GELU,
    "softmax": MPSCY_LAYER_SOFTMAX, "add": MPSCY_LAYER_ADD, "concat": MPSCY_LAYER_CONCAT,
    "relu6": MPSCY_LAYER_RELU6, "hardsigmoid": MPSCY_LAYER_HARDSIGMOID, "hardswish": MPSCY_LAYER_HARDSWISH,
    "softplus": MPSCY_LAYER_SOFTPLUS, "mish": MPSCY_LAYER_MISH, "upsample2d": MPSCY_LAYER_UPSAMPLE2D,
    "convtranspose2d": MPSCY_LAYER_CONVTRANSPOSE2D,
}
LOSS_KINDS = {
    "sparse_cross_entropy": MPSCY_LOSS_SPARSE_CE, "cross_entropy": MPSCY_LOSS_CE,
    "binary_cross_entropy": MPSCY_LOSS_BCE, "bce_with_logits": MPSCY_LOSS_BCE_LOGITS,
    "categorical_cross_entropy": MPSCY_LOSS_CATEGORICAL_CE, "mse": MPSCY_LOSS_MSE,
    "mae": MPSCY_LOSS_MAE, "huber": MPSCY_LOSS_HUBER,
}
ACCURACY_KINDS = {"none": MPSCY_ACCURACY_NONE, "argmax": MPSCY_ACCURACY_ARGMAX,
                  "threshold": MPSCY_ACCURACY_THRESHOLD}
OPTIM_KINDS = {
    "sgd": MPSCY_OPTIM_SGD, "adam": MPSCY_OPTIM_ADAM, "adamw": MPSCY_OPTIM_ADAMW,
    "rmsprop": MPSCY_OPTIM_RMSPROP, "adagrad": MPSCY_OPTIM_ADAGRAD,
    "adadelta": MPSCY_OPTIM_ADADELTA, "nadam": MPSCY_OPTIM_NADAM, "lbfgs": MPSCY_OPTIM_LBFGS,
}
OPTIM_FLAGS = {"nesterov": MPSCY_OPTIM_NESTEROV, "amsgrad": MPSCY_OPTIM_AMSGRAD,
               "maximize": MPSCY_OPTIM_MAXIMIZE, "centered": MPSCY_OPTIM_CENTERED,
               "decoupled_weight_decay": MPSCY_OPTIM_DECOUPLED_WD}
LAYER_FLAGS = {"bias": MPSCY_FLAG_BIAS, "affine": MPSCY_FLAG_AFFINE, "frozen": MPSCY_FLAG_FROZEN}
_ROLES = {MPSCY_ROLE_PARAM: "param", MPSCY_ROLE_BUFFER: "buffer", MPSCY_ROLE_OPTIM: "optim",
          MPSCY_ROLE_GRAD: "grad"}
_DTYPES = {MPSCY_F32: np.float32, MPSCY_F64: np.float64, MPSCY_I64: np.int64}


cdef void _fill_layer(mpscy_layer_desc *d, dict L) except *:
    cdef int j
    d.kind = LAYER_KINDS[L["kind"]]
    d.flags = 0
    for f in L.get("flags", ()):
        d.flags |= LAYER_FLAGS[f]
    ins = L.get("inputs", ())
    if len(ins) > MPSCY_MAX_INPUTS:
        raise _errors.InvalidArgumentError(f"layer {L['name']} has {len(ins)} inputs; at most {MPSCY_MAX_INPUTS}")
    d.n_inputs = len(ins)
    for j, v in enumerate(ins):
        d.inputs[j] = v
    shape = L["shape"]
    if len(shape) > MPSCY_MAX_RANK:
        raise _errors.ShapeError(f"layer {L['name']} output rank {len(shape)} exceeds {MPSCY_MAX_RANK}")
    d.rank = len(shape)
    for j, v in enumerate(shape):
        d.shape[j] = v
    ints, reals = L.get("ints", ()), L.get("reals", ())
    # fixed arrays: ints[12], reals[4] (see mpscy_layer_desc)
    if len(ints) > 12 or len(reals) > 4:
        raise _errors.InvalidArgumentError(f"layer {L['name']} has {len(ints)} ints and {len(reals)} reals; "
                                           f"a descriptor holds at most 12 and 4")
    for j, v in enumerate(ints):
        d.ints[j] = v
    for j, v in enumerate(reals):
        d.reals[j] = v
    name = L["name"].encode()
    if len(name) >= MPSCY_NAME_LEN:
        raise _errors.InvalidArgumentError(f"layer name {L['name']!r} is longer than {MPSCY_NAME_LEN - 1} bytes")
    strncpy(d.name, name, MPSCY_NAME_LEN - 1)


cdef void _fill_loss(mpscy_loss_desc *d, dict L) except *:
    d.kind = LOSS_KINDS[L["kind"]]
    d.accuracy = ACCURACY_KINDS[L.get("accuracy", "none")]
    d.label_smoothing = L.get("label_smoothing", 0.0)
    d.delta = L.get("delta", 1.0)
    d.threshold = L.get("threshold", 0.5)
    ignore = L.get("ignore_index")
    d.ignore = ignore is not None
    d.ignore_index = ignore if ignore is not None else 0


cdef void _fill_optim(mpscy_optim_desc *d, dict o) except *:
    d.kind = OPTIM_KINDS[o["kind"]]
    d.flags = 0
    for f in o.get("flags", ()):
        d.flags |= OPTIM_FLAGS[f]
    d.lr = o.get("lr", 0.0)
    d.momentum = o.get("momentum", 0.0)
    d.dampening = o.get("dampening", 0.0)
    d.weight_decay = o.get("weight_decay", 0.0)
    d.beta1 = o.get("beta1", 0.9)
    d.beta2 = o.get("beta2", 0.999)
    d.eps = o.get("eps", 1e-8)
    d.alpha = o.get("alpha", 0.99)
    d.rho = o.get("rho", 0.9)
    d.lr_decay = o.get("lr_decay", 0.0)
    d.initial_accumulator_value = o.get("initial_accumulator_value", 0.0)
    d.momentum_decay = o.get("momentum_decay", 0.004)
    d.clip_grad_norm = o.get("clip_grad_norm", 0.0) or 0.0
    d.clip_grad_value = o.get("clip_grad_value", 0.0) or 0.0
    d.history_size = o.get("history_size", 100)
    d.max_iter = o.get("max_iter", 20)
    d.line_search = 1 if o.get("line_search_fn") == "strong_wolfe" else 0
    d.tolerance_grad = o.get("tolerance_grad", 1e-7)
    d.tolerance_change = o.get("tolerance_change", 1e-9)
