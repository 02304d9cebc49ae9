"""The host side of staging a 3.2 MB batch on a GPU machine, measured with NumPy and PyTorch:
np.copyto into pinned memory on 1-8 Python threads, NumPy's isfinite scan, and the host-to-device
copy of the same bytes from pinned and from pageable memory (what PyTorch's CUDA-graph step pays).

    python bench/host_staging.py
"""
import time, numpy as np, torch, concurrent.futures as cf, os
n = 1024 * 784
x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
pin = torch.empty(n, dtype=torch.float32, pin_memory=True)
dst = pin.numpy()
dev = torch.empty(n, dtype=torch.float32, device="cuda")
def t(f, k=50):
    f()
    t0 = time.perf_counter()
    for _ in range(k): f()
    return (time.perf_counter() - t0) / k * 1e6
print("cores", os.cpu_count())
print("copyto pinned 1 thread us", t(lambda: np.copyto(dst, x)))
print("isfinite scan us", t(lambda: np.isfinite(x).all()))
for T in (2, 4, 8):
    pool = cf.ThreadPoolExecutor(T)
    ch = np.array_split(np.arange(n), T)
    bounds = [(c[0], c[-1] + 1) for c in ch]
    def par():
        list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], x[b[0]:b[1]]), bounds))
    print(f"copyto pinned {T} threads us", t(par))
def h2d():
    dev.copy_(pin, non_blocking=True); torch.cuda.synchronize()
print("H2D 3.2MB pinned us", t(h2d))
def h2d_pageable():
    dev.copy_(torch.from_numpy(x)); torch.cuda.synchronize()
print("H2D 3.2MB pageable us", t(h2d_pageable))
