#!/usr/bin/env python3
"""Why a long tensor-core sum strays (bench/cuda_notes.md, thirty-eighth session): a NumPy model
of mma.cuh's 3xTF32 products whose accumulator is rounded toward zero after each m16n8k8 (the
tensor cores' accumulation, not IEEE round-to-nearest), over K = 2,400 products of both signs,
as a depthwise ConvTranspose2D's weight gradient sums them; against the same with the
accumulator added into an IEEE fp32 sum every 32 products (mma.cuh's RESUM) and a sequential fp32
sum. Prints each one's error relative to the largest exact sum. No GPU needed.

    python bench/tc_rounding.py
"""
import numpy as np
rng = np.random.default_rng(0)
def rz(v):
    f = v.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(v)
    f[over] = np.nextafter(f[over], np.float32(0))
    return f
def split(a):
    a = a.astype(np.float32); bits = a.view(np.uint32)
    big = ((bits.astype(np.uint64) + 0x1000) & 0xffffe000).astype(np.uint32).view(np.float32)
    small = (a - big).astype(np.float32)
    return big.astype(np.float64), (small.view(np.uint32) & np.uint32(0xffffe000)).view(np.float32).astype(np.float64)
# one output element: sum over K of x*dy, K = 2400, many elements (1024) like the depthwise dW
E, K = 1024, 2400
x = rng.standard_normal((E, K)).astype(np.float32); d = (rng.standard_normal((E, K)) * 1e-4).astype(np.float32)
xb, xs = split(x); db, ds = split(d)
exact = (x.astype(np.float64) * d.astype(np.float64)).sum(1)
def run(resum):
    acc = np.zeros(E, np.float32); tot = np.zeros(E, np.float32)
    for k in range(0, K, 8):
        for (a, b) in ((xs, db), (xb, ds), (xb, db)):
            p = (a[:, k:k+8] * b[:, k:k+8]).sum(1)      # 8 exact-ish products summed
            acc = rz(acc.astype(np.float64) + p)
        if resum and (k + 8) % 32 == 0:
            tot = (tot + acc).astype(np.float32); acc[:] = 0
    return (tot + acc).astype(np.float32) if resum else acc
for resum in (False, True):
    got = run(resum).astype(np.float64)
    print("resum" if resum else "plain", "rel err (max/max):", np.abs(got - exact).max() / np.abs(exact).max())
ieee = np.zeros(E, np.float32)
for k in range(K): ieee = (ieee + x[:, k] * d[:, k]).astype(np.float32)
print("fp32 fma sequential:", np.abs(ieee.astype(np.float64) - exact).max() / np.abs(exact).max())
