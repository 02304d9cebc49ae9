"""Float64 NumPy references for mpscy's layers and losses, written independently of the native
code (convolution tap by tap rather than by im2col, pooling window by window). Each layer is
`forward(x, params, opts) -> (y, cache)` and `backward(dy, cache) -> (dx, {param: grad})`; each
loss is `loss(out, target, opts) -> (value, d value / d out)`. The tests check every analytic
gradient here against central finite differences before comparing the native code with it."""
import math

import numpy as np

# ------------------------------------------------------------------ helpers


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to the array x (changed in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def rel_err(a, b):
    """max |a - b| / max |b| in float64 (0 for empty arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)) if b.size else 0.0


# ------------------------------------------------------------------ convolution


def _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
    """(ki, kj, view) for every kernel tap: the padded input seen by that tap, (N, C, OH, OW)."""
    for ki in range(kh):
        for kj in range(kw):
            h0, w0 = ki * dh, kj * dw
            yield ki, kj, (slice(h0, h0 + sh * (oh - 1) + 1, sh), slice(w0, w0 + sw * (ow - 1) + 1, sw))


def conv2d_forward(x, p, o):
    """o: kernel (kh, kw), stride, padding, dilation (pairs), groups."""
    w, b = p["weight"], p.get("bias")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = o["kernel"], o["stride"], o["padding"], o["dilation"], o["groups"]
    n, c, h, wd = x.shape
    oc = w.shape[0]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((n, oc, oh, ow))
    cg, ocg = c // g, oc // g
    for ki, kj, (hs, ws) in _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
        tap = xp[:, :, hs, ws]
        for gi in range(g):
            y[:, gi * ocg:(gi + 1) * ocg] += np.einsum("nchw,oc->nohw", tap[:, gi * cg:(gi + 1) * cg],
                                                       w[gi * ocg:(gi + 1) * ocg, :, ki, kj])
    if b is not None:
        y += b[None, :, None, None]
    return y, (x, xp, p, o, (oh, ow))


def conv2d_backward(dy, cache):
    x, xp, p, o, (oh, ow) = cache
    w = p["weight"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = o["kernel"], o["stride"], o["padding"], o["dilation"], o["groups"]
    n, c, h, wd = x.shape
    oc = w.shape[0]
    cg, ocg = c // g, oc // g
    dxp = np.zeros_like(xp)
    dw_ = np.zeros_like(w)
    for ki, kj, (hs, ws) in _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
        tap = xp[:, :, hs, ws]
        for gi in range(g):
            go, gc = slice(gi * ocg, (gi + 1) * ocg), slice(gi * cg, (gi + 1) * cg)
            dw_[go, :, ki, kj] += np.einsum("nohw,nchw->oc", dy[:, go], tap[:, gc])
            dxp[:, gc, hs, ws] += np.einsum("nohw,oc->nchw", dy[:, go], w[go, :, ki, kj])
    grads = {"weight": dw_}
    if p.get("bias") is not None:
        grads["bias"] = dy.sum((0, 2, 3))
    return dxp[:, :, ph:ph + h, pw:pw + wd], grads


def convtranspose2d_forward(x, p, o):
    """torch's ConvTranspose2d, written as its definition: every input pixel scatters weight[c, o]
    times itself onto the full output ((H - 1) s + d (k - 1) + 1 + output_padding rows), tap
    (ki, kj) at (i s + ki d, j s + kj d); then `padding` rows and columns cropped from the start
    and the output's size kept. o: kernel, stride, padding, dilation, output_padding (pairs),
    groups; weight (C, OC / groups, kh, kw)."""
    w, b = p["weight"], p.get("bias")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oph, opw), g = (o["kernel"], o["stride"], o["padding"], o["dilation"],
                                                            o["output_padding"], o["groups"])
    n, c, h, wd = x.shape
    ocg = w.shape[1]
    cg = c // g
    fh, fw = (h - 1) * sh + dh * (kh - 1) + 1 + oph, (wd - 1) * sw + dw * (kw - 1) + 1 + opw
    oh, ow = fh - 2 * ph, fw - 2 * pw
    full = np.zeros((n, g * ocg, fh, fw))
    for ki in range(kh):
        for kj in range(kw):
            hs = slice(ki * dh, ki * dh + sh * (h - 1) + 1, sh)
            ws = slice(kj * dw, kj * dw + sw * (wd - 1) + 1, sw)
            for gi in range(g):
                full[:, gi * ocg:(gi + 1) * ocg, hs, ws] += np.einsum(
                    "nchw,co->nohw", x[:, gi * cg:(gi + 1) * cg], w[gi * cg:(gi + 1) * cg, :, ki, kj])
    y = full[:, :, ph:ph + oh, pw:pw + ow].copy()
    if b is not None:
        y += b[None, :, None, None]
    return y, (x, p, o, (fh, fw))


def convtranspose2d_backward(dy, cache):
    x, p, o, (fh, fw) = cache
    w = p["weight"]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = o["kernel"], o["stride"], o["padding"], o["dilation"], o["groups"]
    n, c, h, wd = x.shape
    ocg, cg = w.shape[1], c // g
    dfull = np.zeros((n, dy.shape[1], fh, fw))
    dfull[:, :, ph:ph + dy.shape[2], pw:pw + dy.shape[3]] = dy
    dx, dw_ = np.zeros_like(x), np.zeros_like(w)
    for ki in range(kh):
        for kj in range(kw):
            hs = slice(ki * dh, ki * dh + sh * (h - 1) + 1, sh)
            ws = slice(kj * dw, kj * dw + sw * (wd - 1) + 1, sw)
            for gi in range(g):
                gc, go = slice(gi * cg, (gi + 1) * cg), slice(gi * ocg, (gi + 1) * ocg)
                tap = dfull[:, go, hs, ws]
                dx[:, gc] += np.einsum("nohw,co->nchw", tap, w[gc, :, ki, kj])
                dw_[gc, :, ki, kj] += np.einsum("nchw,nohw->co", x[:, gc], tap)
    grads = {"weight": dw_}
    if p.get("bias") is not None:
        grads["bias"] = dy.sum((0, 2, 3))
    return dx, grads


# ------------------------------------------------------------------ pooling


def _windows(h, w, o):
    (kh, kw), (sh, sw), (ph, pw) = o["kernel"], o["stride"], o["padding"]
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh - ph, j * sw - pw
            yield i, j, max(h0, 0), min(h0 + kh, h), max(w0, 0), min(w0 + kw, w)


def _pool_shape(x, o):
    (kh, kw), (sh, sw), (ph, pw) = o["kernel"], o["stride"], o["padding"]
    return (x.shape[0], x.shape[1], (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1)


def maxpool2d_forward(x, p, o):
    y = np.zeros(_pool_shape(x, o))
    arg = {}
    for i, j, h0, h1, w0, w1 in _windows(x.shape[2], x.shape[3], o):
        win = x[:, :, h0:h1, w0:w1].reshape(x.shape[0], x.shape[1], -1)
        k = win.argmax(-1)  # the first maximum, as PyTorch
        y[:, :, i, j] = np.take_along_axis(win, k[..., None], -1)[..., 0]
        arg[i, j] = (h0 + k // (w1 - w0), w0 + k % (w1 - w0))
    return y, (x.shape, arg)


def maxpool2d_backward(dy, cache):
    shape, arg = cache
    dx = np.zeros(shape)
    n, c = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for (i, j), (hi, wi) in arg.items():
        np.add.at(dx, (n, c, hi, wi), dy[:, :, i, j])
    return dx, {}


def avgpool2d_forward(x, p, o):
    y = np.zeros(_pool_shape(x, o))
    wins = []
    for i, j, h0, h1, w0, w1 in _windows(x.shape[2], x.shape[3], o):
        div = o["kernel"][0] * o["kernel"][1] if o.get("count_include_pad", True) else (h1 - h0) * (w1 - w0)
        y[:, :, i, j] = x[:, :, h0:h1, w0:w1].sum((2, 3)) / div
        wins.append((i, j, h0, h1, w0, w1, div))
    return y, (x.shape, wins)


def avgpool2d_backward(dy, cache):
    shape, wins = cache
    dx = np.zeros(shape)
    for i, j, h0, h1, w0, w1, div in wins:
        dx[:, :, h0:h1, w0:w1] += (dy[:, :, i, j] / div)[:, :, None, None]
    return dx, {}


def globalavgpool2d_forward(x, p, o):
    return x.mean((2, 3)), x.shape


def globalavgpool2d_backward(dy, shape):
    return np.broadcast_to(dy[:, :, None, None] / (shape[2] * shape[3]), shape).copy(), {}


def bilinear_matrix(n_in, n_out, align_corners):
    """(n_out, n_in): row o holds output o's two interpolation weights, torch's upsample_bilinear2d
    along one axis from the sizes (aten/src/ATen/native/UpSample.h), in float64."""
    a = np.zeros((n_out, n_in))
    for o in range(n_out):
        if align_corners:
            s = o * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        else:
            s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        l1 = min(max(s - i0, 0.0), 1.0)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        a[o, i0] += 1.0 - l1
        a[o, i1] += l1
    return a


def upsample2d_forward(x, p, o):
    """Nearest neighbour: each pixel repeated over an sh x sw block (torch's Upsample(mode="nearest"));
    bilinear (o["size"], o["align_corners"]): y = A_h x A_w^T with bilinear_matrix's A."""
    if "size" in o:
        ah = bilinear_matrix(x.shape[2], o["size"][0], o["align_corners"])
        aw = bilinear_matrix(x.shape[3], o["size"][1], o["align_corners"])
        return np.einsum("ai,ncij,bj->ncab", ah, x, aw), ("bilinear", ah, aw)
    sh, sw = o["scale"]
    return x.repeat(sh, axis=2).repeat(sw, axis=3), (x.shape, sh, sw)


def upsample2d_backward(dy, cache):
    if cache[0] == "bilinear":
        _, ah, aw = cache
        return np.einsum("ai,ncab,bj->ncij", ah, dy, aw), {}
    (n, c, h, w), sh, sw = cache
    return dy.reshape(n, c, h, sh, w, sw).sum((3, 5)), {}


# ------------------------------------------------------------------ normalization


def batchnorm_forward(x, p, o):
    """Train mode with batch statistics (o["train"]) or eval mode with p's running statistics."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    if o.get("train", True):
        mean, var = x.mean(axes), x.var(axes)
    else:
        mean, var = p["running_mean"], p["running_var"]
    inv = 1.0 / np.sqrt(var + o["eps"])
    xhat = (x - mean.reshape(shape)) * inv.reshape(shape)
    y = xhat
    if "weight" in p:
        y = xhat * p["weight"].reshape(shape) + p["bias"].reshape(shape)
    return y, (xhat, inv, p, axes, shape, x.size // x.shape[1])


def batchnorm_backward(dy, cache):
    """Train-mode backward (the batch statistics depend on x)."""
    xhat, inv, p, axes, shape, count = cache
    grads = {}
    g = dy
    if "weight" in p:
        grads = {"weight": (dy * xhat).sum(axes), "bias": dy.sum(axes)}
        g = dy * p["weight"].reshape(shape)
    dx = inv.reshape(shape) / count * (count * g - g.sum(axes).reshape(shape)
                                        - xhat * (g * xhat).sum(axes).reshape(shape))
    return dx, grads


def layernorm_forward(x, p, o):
    axes = tuple(range(x.ndim - o["dims"], x.ndim))
    mean = x.mean(axes, keepdims=True)
    inv = 1.0 / np.sqrt(x.var(axes, keepdims=True) + o["eps"])
    xhat = (x - mean) * inv
    y = xhat * p["weight"] + p["bias"] if "weight" in p else xhat
    return y, (xhat, inv, p, axes)


def layernorm_backward(dy, cache):
    xhat, inv, p, axes = cache
    grads = {}
    g = dy
    if "weight" in p:
        lead = tuple(range(dy.ndim - len(axes)))
        grads = {"weight": (dy * xhat).sum(lead), "bias": dy.sum(lead)}
        g = dy * p["weight"]
    m = g.mean(axes, keepdims=True)
    mx = (g * xhat).mean(axes, keepdims=True)
    return inv * (g - m - xhat * mx), grads


# ------------------------------------------------------------------ activations


_erfc = np.vectorize(math.erfc)


def _gelu_tanh_sigmoid(x):
    """GELU's tanh form: 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3), and
    sigmoid(2u) (1 - sigmoid(2u)), written so that neither cancels for negative x."""
    w = 2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    e = np.exp(-np.abs(w))
    s = np.where(w < 0, e / (1 + e), 1 / (1 + e))
    return s, e / (1 + e) ** 2


def activation_forward(x, p, o):
    k, r = o["kind"], o.get("r", 0.0)
    if k == "relu":
        y = np.maximum(x, 0)
    elif k == "leakyrelu":
        y = np.where(x > 0, x, r * x)
    elif k == "elu":
        y = np.where(x > 0, x, r * np.expm1(np.minimum(x, 0)))
    elif k == "sigmoid":
        y = 1 / (1 + np.exp(-x))
    elif k == "tanh":
        y = np.tanh(x)
    elif k == "swish":
        y = x / (1 + np.exp(-x))
    elif k == "gelu":
        y = 0.5 * x * _erfc(-x / math.sqrt(2))   # 1 + erf(x / sqrt 2), without its cancellation
    elif k == "gelu_tanh":
        y = x * _gelu_tanh_sigmoid(x)[0]
    elif k == "relu6":
        y = np.clip(x, 0, 6)
    elif k == "hardsigmoid":
        y = np.clip(x + 3, 0, 6) / 6
    elif k == "hardswish":
        y = x * np.clip(x + 3, 0, 6) / 6
    elif k == "softplus":
        beta, threshold = o.get("beta", 1.0), o.get("threshold", 20.0)
        y = np.where(beta * x > threshold, x, np.logaddexp(0.0, beta * x) / beta)
    elif k == "mish":
        y = x * np.tanh(np.logaddexp(0.0, x))
    elif k == "softmax":
        ax = o["axis"]
        e = np.exp(x - x.max(ax, keepdims=True))
        y = e / e.sum(ax, keepdims=True)
    elif k == "flatten":
        y = x.reshape(len(x), -1)
    elif k == "identity":
        y = x.copy()
    else:
        raise ValueError(k)
    return y, (x, y, o)


def activation_backward(dy, cache):
    x, y, o = cache
    k, r = o["kind"], o.get("r", 0.0)
    if k == "relu":
        d = dy * (x > 0)
    elif k == "leakyrelu":
        d = dy * np.where(x > 0, 1.0, r)
    elif k == "elu":
        d = dy * np.where(x > 0, 1.0, r * np.exp(np.minimum(x, 0)))
    elif k == "sigmoid":
        d = dy * y * (1 - y)
    elif k == "tanh":
        d = dy * (1 - y ** 2)
    elif k == "swish":
        s = 1 / (1 + np.exp(-x))
        d = dy * (s + x * s * (1 - s))
    elif k == "gelu":
        d = dy * (0.5 * _erfc(-x / math.sqrt(2)) + x * np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi))
    elif k == "gelu_tanh":
        s, ss = _gelu_tanh_sigmoid(x)
        d = dy * (s + x * ss * 2 * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x ** 2))
    elif k == "relu6":
        d = dy * ((x > 0) & (x < 6))
    elif k == "hardsigmoid":
        d = dy * ((x > -3) & (x < 3)) / 6
    elif k == "hardswish":
        d = dy * np.where(x <= -3, 0.0, np.where(x < 3, (2 * x + 3) / 6, 1.0))
    elif k == "softplus":
        beta, threshold = o.get("beta", 1.0), o.get("threshold", 20.0)
        d = dy * np.where(beta * x > threshold, 1.0, 1 / (1 + np.exp(-beta * x)))
    elif k == "mish":
        sp = np.logaddexp(0.0, x)
        t = np.tanh(sp)
        d = dy * (t + x * (1 - t ** 2) / (1 + np.exp(-x)))
    elif k == "softmax":
        d = y * (dy - (dy * y).sum(o["axis"], keepdims=True))
    elif k == "flatten":
        d = dy.reshape(x.shape)
    elif k == "identity":
        d = dy.copy()
    return d, {}


def reshape_forward(x, p, o):
    """The same elements, row-major, in the per-sample shape o["shape"]."""
    return x.reshape((x.shape[0],) + tuple(o["shape"])), x.shape


def reshape_backward(dy, shape):
    return dy.reshape(shape), {}


LAYERS = {
    "reshape": (reshape_forward, reshape_backward),
    "conv2d": (conv2d_forward, conv2d_backward),
    "convtranspose2d": (convtranspose2d_forward, convtranspose2d_backward),
    "maxpool2d": (maxpool2d_forward, maxpool2d_backward),
    "avgpool2d": (avgpool2d_forward, avgpool2d_backward),
    "globalavgpool2d": (globalavgpool2d_forward, globalavgpool2d_backward),
    "upsample2d": (upsample2d_forward, upsample2d_backward),
    "batchnorm": (batchnorm_forward, batchnorm_backward),
    "layernorm": (layernorm_forward, layernorm_backward),
    "activation": (activation_forward, activation_backward),
}


# ------------------------------------------------------------------ dropout mask (Philox4x32-10)


def philox_uniform(seed, counter, node, count):
    """mpscy_uniform of objc/common/rng.h for elements 0..count-1, in uint64 NumPy arithmetic."""
    M32 = np.uint64(0xFFFFFFFF)
    e = np.arange(count, dtype=np.uint64)
    c0 = e >> np.uint64(2)
    c1 = (np.uint64(node) ^ ((e >> np.uint64(34)) << np.uint64(16))) & M32
    c2 = np.full(count, counter & 0xFFFFFFFF, np.uint64)
    c3 = np.full(count, (counter >> 32) & 0xFFFFFFFF, np.uint64)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & M32
        hi1, lo1 = p1 >> np.uint64(32), p1 & M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    out = np.stack([c0, c1, c2, c3], 1)[np.arange(count), (e & np.uint64(3)).astype(np.int64)]
    return (out >> np.uint64(8)).astype(np.float64) / 2.0 ** 24


def dropout_keep(seed, counter, node, count, rate):
    """The kept elements of a dropout node, as the native code draws them (float32 keep)."""
    keep = np.float32(1.0) - np.float32(rate)
    return philox_uniform(seed, counter, node, count) < np.float64(keep)


# ------------------------------------------------------------------ losses


def _log_softmax(z):
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def weighted_ce_ref(kind, out, target, weight, smoothing=0.0):
    """(mean loss, d loss / d out) of F.cross_entropy(out, target, weight=weight,
    label_smoothing=smoothing). The value is torch's definition term by term: labels,
    (1 - s) sum_i w[y_i] nll_i / W + s / C sum_i sum_c w_c (-log p_ic) / W with W = sum_i w[y_i];
    probabilities, -sum_ic w_c q'_ic log p_ic / n with q' = (1 - s) t + s / C. The gradient is the
    closed form (p_ic sum_c a_ic - a_ic) / W (or / n) with a = w q' (checked by finite differences)."""
    out = np.asarray(out, np.float64)
    w = np.asarray(weight, np.float64)
    n, c = out.shape
    logp = _log_softmax(out)
    if kind == "sparse_cross_entropy":
        y = np.asarray(target)
        den = w[y].sum()
        value = ((1 - smoothing) * (w[y] * -logp[np.arange(n), y]).sum() / den
                 + smoothing / c * (w * -logp).sum() / den)
        q = np.zeros_like(out)
        q[np.arange(n), y] = 1.0
    else:
        den = n
        q = np.asarray(target, np.float64)
        value = -(w * ((1 - smoothing) * q + smoothing / c) * logp).sum() / n
    a = w * ((1 - smoothing) * q + smoothing / c)
    return value, (np.exp(logp) * a.sum(1, keepdims=True) - a) / den


def bce_pos_weight_ref(out, target, pos_weight):
    """(mean loss, d loss / d out) of F.binary_cross_entropy_with_logits(out, target,
    pos_weight=pos_weight) (pos_weight broadcast over the last axis): the value term by term as
    torch defines it, -[pw z log sigmoid(x) + (1 - z) log(1 - sigmoid(x))] (log sigmoid by
    logaddexp), the gradient in closed form, (sigmoid(x) (pw z + 1 - z) - pw z) / n."""
    x = np.asarray(out, np.float64)
    z = np.asarray(target, np.float64).reshape(x.shape)
    pw = np.broadcast_to(np.asarray(pos_weight, np.float64), x.shape)
    log_sig, log_one_minus = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
    value = -(pw * z * log_sig + (1 - z) * log_one_minus).mean()
    sig = 1.0 / (1.0 + np.exp(-x))
    return value, (sig * (pw * z + 1 - z) - pw * z) / x.size


def loss_ref(kind, out, target, smoothing=0.0, delta=1.0):
    """(mean loss, d loss / d out) as torch.nn.functional defines each loss."""
    out = np.asarray(out, np.float64)
    n = out.shape[0]
    if kind in ("sparse_cross_entropy", "cross_entropy"):
        c = out.shape[1]
        if kind == "sparse_cross_entropy":
            q = np.zeros_like(out)
            q[np.arange(n), target] = 1.0
        else:
            q = np.asarray(target, np.float64)
        q = (1 - smoothing) * q + smoothing / c
        logp = _log_softmax(out)
        return -(q * logp).sum() / n, (np.exp(logp) * q.sum(1, keepdims=True) - q) / n
    t = np.asarray(target, np.float64).reshape(out.shape)
    size = out.size
    if kind == "categorical_cross_entropy":
        q = (1 - smoothing) * t + smoothing / out.shape[1]
        p = np.maximum(out, 1e-7)
        return -(q * np.log(p)).sum() / n, np.where(out >= 1e-7, -q / p, 0.0) / n
    if kind == "binary_cross_entropy":
        lp = np.maximum(np.log(np.where(out > 0, out, 1.0)), -100.0)
        lp = np.where(out > 0, lp, -100.0)
        lq = np.maximum(np.log(np.where(out < 1, 1 - out, 1.0)), -100.0)
        lq = np.where(out < 1, lq, -100.0)
        grad = (out - t) / np.maximum(out * (1 - out), 1e-12) / size
        return -(t * lp + (1 - t) * lq).sum() / size, grad
    if kind == "bce_with_logits":
        loss = np.maximum(out, 0) - out * t + np.log1p(np.exp(-np.abs(out)))
        return loss.sum() / size, (1 / (1 + np.exp(-out)) - t) / size
    d = out - t
    if kind == "mse":
        return (d ** 2).sum() / size, 2 * d / size
    if kind == "mae":
        return np.abs(d).sum() / size, np.sign(d) / size
    if kind == "huber":
        a = np.abs(d)
        loss = np.where(a < delta, 0.5 * d ** 2, delta * (a - 0.5 * delta))
        return loss.sum() / size, np.where(a < delta, d, delta * np.sign(d)) / size
    raise ValueError(kind)
