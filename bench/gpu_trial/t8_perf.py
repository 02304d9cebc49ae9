"""Rough speed sanity on DEV vs torch eager (same device): not a benchmark, looking for cliffs."""
from common import *
import torch.nn as nn
import torch.nn.functional as F

rng = np.random.default_rng(6)


def tsync():
    if TDEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, n):
    fn()
    fn()
    tsync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    tsync()
    return (time.perf_counter() - t) / n * 1e6


@case
def cnn_step_and_predict():
    b = 128
    m = mpscy.Sequential([L.Conv2D(32, 3, padding=1), L.BatchNorm(), L.ReLU(), L.Conv2D(64, 3, stride=2, padding=1), L.BatchNorm(), L.ReLU(),
                          L.Conv2D(64, 3, padding=1), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(10)], input_shape=(3, 32, 32))
    e = mpscy.Engine(m, batch_size=b, device=DEV, optimizer=optim.Adam(1e-3))
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                        nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10)).to(TDEV)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, b)

    def mstep():
        return e.step(x, y).loss
    n = 30 if TDEV == "cuda" else 3
    info(f"CNN b128 train step: mpscy {bench(mstep, n):.0f} us, torch eager {bench(lambda: torch_step(net, opt, x, y), n):.0f} us")
    xb = rng.standard_normal((10000, 3, 32, 32)).astype(np.float32)

    def tpred():
        with torch.no_grad():
            return net.eval()(torch.from_numpy(xb).to(TDEV)).cpu().numpy()
    n = 3
    info(f"CNN predict 10000 rows: mpscy {bench(lambda: e.predict(xb), n) / 1e3:.1f} ms (built batch 128), torch eager {bench(tpred, n) / 1e3:.1f} ms")


@case
def mlp_wide():
    b = 1024
    m = mpscy.Sequential([L.Dense(1024), L.ReLU(), L.Dense(1024), L.ReLU(), L.Dense(10)], input_shape=(784,))
    e = mpscy.Engine(m, batch_size=b, device=DEV)
    x = rng.standard_normal((b, 784)).astype(np.float32)
    y = rng.integers(0, 10, b)
    n = 30 if TDEV == "cuda" else 3
    t_m = bench(lambda: e.step(x, y).loss, n)
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(TDEV)
    opt = torch.optim.Adam(net.parameters(), 1e-3)

    info(f"MLP 784-1024-1024-10 b1024 step: mpscy {t_m:.0f} us, torch eager {bench(lambda: torch_step(net, opt, x, y), n):.0f} us")
    # fit throughput on 60000 rows
    xs = rng.standard_normal((60000, 784)).astype(np.float32)
    ys = rng.integers(0, 10, 60000)
    t = time.perf_counter()
    e.fit(xs, ys, epochs=1, verbose=0, batch_size=1024)
    info(f"fit 1 epoch of 60000x784 at b1024: {(time.perf_counter() - t) * 1e3:.0f} ms")


done()
