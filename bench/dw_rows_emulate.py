"""NumPy emulation of conv_dw_rows (objc/cuda/conv_dw.cu, $MPSCY_CUDA_DW_ROWS, on by default): a
no-dx convolution's weight and bias gradients by whole output rows, with the kernel's own index
arithmetic: each lane's copy of dz into the (OW, 4 og + 4) staging (unwritten entries are NaN, so
reading one shows), x's patch under the row through the block's offsets table, each lane's column offsets (taps, the bias's row of
ones, the padding's zeros) and its 4 x CPL tile, then the partial's (output, column) order. The
result against the direct sums over im2col's windows, in float64.

    python bench/dw_rows_emulate.py        # prints each geometry checked, exits 1 on a mismatch
"""
import sys

import numpy as np


def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """(b, C, H, W) -> (C kh kw, b OH OW), zero in the padding: a convolution's columns."""
    b, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = np.zeros((b, c, h + 2 * ph, w + 2 * pw), x.dtype)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    col = np.empty((c, kh, kw, b, oh, ow), x.dtype)
    for ki in range(kh):
        for kj in range(kw):
            col[:, ki, kj] = xp[:, :, ki * dh:ki * dh + sh * (oh - 1) + 1:sh,
                                kj * dw:kj * dw + sw * (ow - 1) + 1:sw].transpose(1, 0, 2, 3)
    return col.reshape(c * kh * kw, b * oh * ow), oh, ow


def fits(c, oc, ow, kh, kw, bias):
    """dwr_plan_of's geometry test (without the shared-memory and patch bounds)."""
    if oc % 4 or ow % 4 or 32 % (ow // 4) or 32 % (oc // 4):
        return 0
    ng = 32 // (oc // 4)
    cpl = -(-(c * kh * kw + bias) // ng)
    return cpl if cpl <= 8 else 0


def emulate(x, dy, kh, kw, sh, sw, ph, pw, dh, dw, bias):
    b, c, h, w = x.shape
    _, oc, oh_n, ow_n = dy.shape
    kg, og_n = c * kh * kw, oc // 4
    ng_n = 32 // og_n
    cpl = fits(c, oc, ow_n, kh, kw, bias)
    pwid = (ow_n - 1) * sw + (kw - 1) * dw + 1
    npatch, sone, lo = c * kh * pwid, (ow_n - 1) * sw + 1, 4 * og_n + 4
    acc = np.zeros((32, 4, cpl))
    q4 = ow_n // 4
    ostep = 32 // q4
    for s in range(b):
        for oh in range(oh_n):
            dzs = np.full(ow_n * lo, np.nan)
            for lane in range(32):
                o0 = lane // q4
                w4 = lane - o0 * q4
                for o in range(o0, oc, ostep):
                    for j in range(4):
                        dzs[(4 * w4 + j) * lo + o] = dy[s, o, oh, 4 * w4 + j]
            pat, ih0, xs = np.zeros(npatch), oh * sh - ph, x.reshape(-1)
            for e in range(npatch):  # the offsets table (ptab), then the row's loads
                rr = e // pwid
                pc, ch = e - rr * pwid, rr // kh
                ki = rr - ch * kh
                iw = pc - pw
                t = ((ch * h + ki * dh) * w + iw if 0 <= iw < w else -1, ki * dh)
                if t[0] >= 0 and 0 <= ih0 + t[1] < h:
                    pat[e] = xs[s * c * h * w + ih0 * w + t[0]]
            room = np.concatenate([np.ones(sone), np.zeros(sone), pat])  # the ones, the zeros, then pat
            base = 2 * sone
            for lane in range(32):
                og = lane // ng_n
                ng = lane - og * ng_n
                off = []
                for k in range(cpl):
                    n = ng * cpl + k
                    if n < kg:
                        ch = n // (kh * kw)
                        r = n - ch * kh * kw
                        ki = r // kw
                        off.append((ch * kh + ki) * pwid + (r - ki * kw) * dw)
                    else:
                        off.append((0 if n == kg and bias else sone) - base)
                for u in range(ow_n):
                    z = dzs[u * lo + 4 * og:u * lo + 4 * og + 4]
                    acc[lane] += np.outer(z, [room[base + off[k] + u * sw] for k in range(cpl)])
    dwt, db = np.zeros((oc, kg)), np.zeros(oc)
    for o in range(oc):
        for n in range(kg + bias):
            v = acc[(o >> 2) * ng_n + n // cpl, o & 3, n % cpl]
            if n < kg:
                dwt[o, n] = v
            else:
                db[o] = v
    return dwt, db


def direct(x, dy, kh, kw, sh, sw, ph, pw, dh, dw):
    """The gradients from im2col's columns: dW = dz col^T, db = dz's sums."""
    col, _, _ = im2col(x, kh, kw, sh, sw, ph, pw, dh, dw)
    dz = dy.transpose(1, 0, 2, 3).reshape(dy.shape[1], -1)
    return dz @ col.T, dz.sum(axis=1)


GEOMETRIES = [  # c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, bias
    (3, 32, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1),   # the README's first layer: 7 columns a lane
    (3, 16, 16, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1),    # tests' rows_pool: 2 columns a lane
    (3, 32, 32, 16, 3, 3, 2, 2, 2, 2, 2, 2, 0),   # tests' rows_dilated_nobias: 27 columns of 32
    (2, 9, 16, 4, 2, 5, 1, 1, 0, 2, 1, 1, 1),     # 4 outputs (one group of 32 lanes): 1 column a lane
]


def main():
    rng = np.random.default_rng(0)
    bad = 0
    for c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, bias in GEOMETRIES:
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if not fits(c, oc, ow, kh, kw, bias):
            print(f"c={c} oc={oc} {oh}x{ow}: does not fit the rows form")
            bad += 1
            continue
        x, dy = rng.standard_normal((2, c, h, w)), rng.standard_normal((2, oc, oh, ow))
        got, gotb = emulate(x, dy, kh, kw, sh, sw, ph, pw, dh, dw, bias)
        want, wantb = direct(x, dy, kh, kw, sh, sw, ph, pw, dh, dw)
        err = max(np.abs(got - want).max(), np.abs(gotb - wantb).max() if bias else 0.0)
        print(f"c={c} {h}x{w} oc={oc} k={kh}x{kw} s={sh} p={ph},{pw} d={dh} bias={bias}: {oh}x{ow}, "
              f"max |error| {err:.1e}")
        bad += not err < 1e-9
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
