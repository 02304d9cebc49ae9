"""NumPy emulation of conv_dw_small's PATCH staging (objc/cuda/conv_dw.cu, $MPSCY_CUDA_DW_PATCH=1):
for each tile of DWS_T positions, the columns formed from x's patch, with the kernel's own index
arithmetic, against the default form's: im2col's columns (plus the bias's ones). The PATCH form
stages dz with the default form's code and computes the same products over these tiles, so
equal tiles mean the same bits.

    python bench/dw_patch_emulate.py        # prints each geometry checked, exits 1 on a mismatch
"""
import sys

import numpy as np

DWS_T, DWS_THREADS, DWS_PATCH = 64, 256, 1024


def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw):
    """(b, C, H, W) -> (C kh kw, b OH OW), zero in the padding: the default form's columns."""
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


def fits(c, oh, ow, kh, kw, sh, dh, sw, dw, kg, bias, oc):
    """conv_dw_small's eligibility, then PATCH's (cu_conv_dw_small's host checks)."""
    if oc > 64 or kg + bias > 32:
        return None
    shift = max(0, (ow - 1).bit_length())
    pr = (DWS_T // ow - 1) * sh + (kh - 1) * dh + 1 if DWS_T % ow == 0 else 0
    pw_ = (ow - 1) * sw + (kw - 1) * dw + 1
    ok = (1 << shift) == ow and DWS_T % ow == 0 and (oh * ow) % DWS_T == 0 and c * pr * pw_ <= DWS_PATCH
    return (shift, pr, pw_) if ok else None


def check(b, c, h, w, oc, kh, kw, sh, sw, ph, pw, dh, dw, bias, rng):
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    col, oh, ow = im2col(x, kh, kw, sh, sw, ph, pw, dh, dw)
    kg, ohw = c * kh * kw, oh * ow
    geo = fits(c, oh, ow, kh, kw, sh, dh, sw, dw, kg, int(bias), oc)
    if geo is None:
        return f"not taken: C {c} {h}x{w} -> {oh}x{ow}, k {kh}x{kw}, OC {oc}"
    shift, pr, pw_ = geo
    ng = (kg + int(bias) + 3) // 4
    one = kg if bias else -1
    # the kernel's tap table: tap[n][2] = (c pr + ki dh) pw + kj dw for n < kg
    khw = kh * kw
    tap = [((n // khw) * pr + ((n % khw) // kw) * dh) * pw_ + ((n % khw) % kw) * dw if n < kg else -1
           for n in range(32)]
    n_pat = c * pr * pw_
    xf = x.ravel()
    nb = b * ohw
    for j0 in range(0, nb, DWS_T):
        s, i0 = j0 // ohw, j0 % ohw
        ih0 = (i0 >> shift) * sh - ph
        # x's patch: the tile-invariant offsets (xo, xpr), then load_patch and the store to pat
        pat = np.full(DWS_PATCH, np.nan, np.float32)
        for tid in range(DWS_THREADS):
            for m in range(DWS_PATCH // DWS_THREADS):
                e = tid + DWS_THREADS * m
                cc, rc = e // (pr * pw_), e % (pr * pw_)
                xpr = rc // pw_
                iw = rc - xpr * pw_ - pw
                xo = cc * h * w + iw if e < n_pat and 0 <= iw < w else -1
                ih = ih0 + xpr
                pat[e] = xf[s * c * h * w + xo + ih * w] if xo >= 0 and 0 <= ih < h else 0.0
        # form_columns: column n = lane, positions warp + 8 k
        nc = 4 * ng
        cols = np.full((DWS_T, nc), np.nan, np.float32)
        for tid in range(DWS_THREADS):
            lane = tid & 31
            if lane >= nc:
                continue
            for k in range(DWS_T // (DWS_THREADS // 32)):
                u = (tid >> 5) + (DWS_THREADS // 32) * k
                pos = (u >> shift) * sh * pw_ + (u & ((1 << shift) - 1)) * sw
                cols[u, lane] = pat[tap[lane] + pos] if lane < kg else (1.0 if lane == one else 0.0)
        # the default form's tiles
        ref_c = np.zeros((DWS_T, nc), np.float32)
        ref_c[:, :kg] = col[:, j0:j0 + DWS_T].T
        if bias:
            ref_c[:, kg] = 1.0
        if not np.array_equal(cols, ref_c):
            raise AssertionError(f"tile {j0}: C {c} {h}x{w}, k {kh}x{kw}, stride {sh}, pad {ph}, dil {dh}")
    return f"equal: C {c} {h}x{w} -> {oh}x{ow}, k {kh}x{kw}, s {sh}, p {ph}, d {dh}, OC {oc}, patch {pr}x{pw_}x{c}"


def main():
    rng = np.random.default_rng(0)
    cases = [  # b, C, H, W, OC, kh, kw, sh, sw, ph, pw, dh, dw, bias
        (2, 3, 32, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, True),     # the README CNN's first layer
        (2, 3, 32, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, False),
        (3, 3, 32, 32, 16, 3, 3, 2, 2, 1, 1, 1, 1, True),     # stride 2: 16 x 16
        (2, 1, 16, 16, 8, 5, 5, 1, 1, 2, 2, 1, 1, True),      # 5 x 5, one channel
        (2, 2, 16, 16, 13, 3, 3, 1, 1, 2, 2, 2, 2, True),    # dilation 2, OC not a multiple of 4
        (2, 3, 64, 64, 64, 3, 3, 1, 1, 1, 1, 1, 1, True),     # one row a tile, 64 outputs
        (2, 3, 8, 8, 4, 3, 3, 1, 1, 1, 1, 1, 1, True),        # eight rows a tile
        (2, 3, 30, 30, 8, 3, 3, 1, 1, 1, 1, 1, 1, True),      # 30 wide: not taken
    ]
    for case in cases:
        print(check(*case, rng=rng))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("MISMATCH", e)
        sys.exit(1)
