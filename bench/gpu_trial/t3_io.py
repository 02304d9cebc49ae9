"""Partial batches, odd batch sizes, large predict/evaluate, input kinds (float64, strided, torch CUDA tensors)."""
from common import *
import torch.nn as nn
import torch.nn.functional as F

rng = np.random.default_rng(1)


class TCNN(nn.Module):
    def __init__(self, c=3, k=10):
        super().__init__()
        self.c1 = nn.Conv2d(c, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, k)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def mcnn():
    return mpscy.Sequential([L.Conv2D(16, 3, padding=1, name="c1"), L.ReLU(), L.Conv2D(32, 3, stride=2, padding=1, name="c2"),
                             L.ReLU(), L.Flatten(), L.Dense(64, name="fc1"), L.ReLU(), L.Dense(10, name="fc2")],
                            input_shape=(3, 16, 16))


def tmlp():
    return TMLP(100, 64, 10)


def mlp():
    return mmlp(100, 64, 10)


def torch_pair(tnet_cls, mk, built, opt="adam", seed=0, **kw):
    torch.manual_seed(seed)
    net = tnet_cls()
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    if opt == "adam":
        topt = torch.optim.Adam(net.parameters(), lr=1e-3)
        mopt = optim.Adam(1e-3)
    else:
        topt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        mopt = optim.SGD(0.05, momentum=0.9)
    e = mpscy.Engine(mk(), optimizer=mopt, batch_size=built, device=DEV, seed=0, **kw)
    e.set_parameters(sd)
    return net, topt, e


def run_sizes(name, tnet_cls, mk, shape, built, sizes, opt="adam"):
    net, topt, e = torch_pair(tnet_cls, mk, built, opt)
    worst = 0.0
    for n in sizes:
        xb = rng.standard_normal((n,) + shape).astype(np.float32)
        yb = rng.integers(0, 10, n).astype(np.int32)
        lt = torch_step(net, topt, xb, yb)
        r = e.step(xb, yb)
        worst = max(worst, abs(r.loss - lt) / abs(lt))
        assert r.batch_size == n, (r.batch_size, n)
    check(f"{name}: step losses == torch over sizes {sizes}", worst < 1e-4, f"worst rel loss {worst:.2e}")
    cmp_params(f"{name}: params == torch after {len(sizes)} steps", e.get_parameters(), tparams(net), 1e-4, fro=opt == "adam")
    return net, e


@case
def mlp_partial_batches():
    run_sizes("MLP b32 (one-kernel path)", tmlp, mlp, (100,), 32, [32, 1, 7, 31, 32, 13, 2, 32])


@case
def mlp_batch1_engine():
    run_sizes("MLP built b1", tmlp, mlp, (100,), 1, [1] * 6, opt="sgd")


@case
def mlp_prime_and_big():
    run_sizes("MLP built b97", tmlp, mlp, (100,), 97, [97, 53, 97, 1])
    run_sizes("MLP built b257 (past one-kernel limit)", tmlp, mlp, (100,), 257, [257, 256, 100])
    run_sizes("MLP built b1000", tmlp, mlp, (100,), 1000, [1000, 999, 3])


@case
def cnn_partial_batches():
    run_sizes("CNN b64", TCNN, mcnn, (3, 16, 16), 64, [64, 63, 1, 17, 64, 2])
    run_sizes("CNN built b1", TCNN, mcnn, (3, 16, 16), 1, [1] * 4, opt="sgd")
    run_sizes("CNN built b13", TCNN, mcnn, (3, 16, 16), 13, [13, 5, 13])


@case
def cnn_large_predict_evaluate():
    net, topt, e = torch_pair(TCNN, mcnn, 64)
    xb = rng.standard_normal((10000, 3, 16, 16)).astype(np.float32)
    yb = rng.integers(0, 10, 10000).astype(np.int64)
    net.eval()
    with torch.no_grad():
        tout = net(torch.from_numpy(xb).to(TDEV)).cpu().numpy()
        tl = F.cross_entropy(torch.from_numpy(tout), torch.from_numpy(yb)).item()
    t = time.time()
    out = e.predict(xb)
    dt = time.time() - t
    check("predict 10000 rows == torch", rel(out, tout) < 1e-5, f"rel {rel(out, tout):.2e} ({dt*1e3:.0f} ms)")
    ev = e.evaluate(xb, yb)
    acc = float((tout.argmax(1) == yb).mean())
    check("evaluate 10000 rows == torch", abs(ev["loss"] - tl) < 1e-5 * tl and abs(ev["accuracy"] - acc) < 1e-9,
          f"{ev} vs loss {tl:.7f} acc {acc}")
    # float64, strided, Fortran, torch tensors (CPU and CUDA)
    x64 = xb[:300].astype(np.float64)
    check("predict float64", rel(e.predict(x64), tout[:300]) < 1e-5, f"rel {rel(e.predict(x64), tout[:300]):.2e}")
    big = rng.standard_normal((600, 3, 16, 32)).astype(np.float32)
    strided = big[::2, :, :, ::2]
    with torch.no_grad():
        ts = net(torch.from_numpy(np.ascontiguousarray(strided)).to(TDEV)).cpu().numpy()
    check("predict strided view", rel(e.predict(strided), ts) < 1e-5, f"rel {rel(e.predict(strided), ts):.2e}")
    xf = np.asfortranarray(xb[:200])
    check("predict Fortran-order", rel(e.predict(xf), tout[:200]) < 1e-5, f"rel {rel(e.predict(xf), tout[:200]):.2e}")
    tx = torch.from_numpy(xb[:500]).to(TDEV)
    check(f"predict torch {TDEV} tensor", rel(e.predict(tx), tout[:500]) < 1e-5, f"rel {rel(e.predict(tx), tout[:500]):.2e}")
    ty = torch.from_numpy(yb[:500]).to(TDEV)
    ev2 = e.evaluate(tx, ty)
    check(f"evaluate torch {TDEV} tensors", abs(ev2["loss"] - F.cross_entropy(torch.from_numpy(tout[:500]), torch.from_numpy(yb[:500])).item()) < 1e-5,
          f"{ev2}")
    tnc = torch.from_numpy(big).to(TDEV)[::2, :, :, ::2]
    check(f"predict non-contiguous torch {TDEV} tensor", rel(e.predict(tnc), ts) < 1e-5, f"rel {rel(e.predict(tnc), ts):.2e}")
    th = torch.from_numpy(xb[:100]).to(TDEV).half()
    check("predict torch float16 tensor", rel(e.predict(th), tout[:100]) < 5e-3, f"rel {rel(e.predict(th), tout[:100]):.2e}")
    tg = torch.from_numpy(xb[:100]).to(TDEV).requires_grad_()
    check("predict requires_grad tensor", rel(e.predict(tg), tout[:100]) < 1e-5, "")
    # fit with torch CUDA tensors
    h = e.fit(tx, ty, epochs=1, verbose=0)
    check(f"fit(torch {TDEV} tensors)", len(h.history["loss"]) == 1, f"{h.history}")
    # step with a torch tensor: documented as numpy only -> clear error
    try:
        e.step(tx[:64], ty[:64])
        check("step(torch tensor) (README: numpy only)", True, "accepted")
    except mpscy.Error as ex:
        check("step(torch tensor) refused clearly", "numpy" in str(ex), f"{type(ex).__name__}: {ex}")
    # empty predict
    try:
        o = e.predict(np.zeros((0, 3, 16, 16), np.float32))
        check("predict 0 rows returns empty", o.shape == (0, 10), f"shape {o.shape}")
    except Exception as ex:
        check("predict 0 rows", False, f"{type(ex).__name__}: {ex}")
    expect_raises("step with more rows than built", lambda: e.step(xb[:65], yb[:65]), mpscy.ShapeError, "built batch")
    expect_raises("fit batch_size > built", lambda: e.fit(xb[:200], yb[:200], batch_size=128, verbose=0), mpscy.Error)


@case
def evaluate_partial_last_batch():
    net, topt, e = torch_pair(tmlp, mlp, 32)
    xb = rng.standard_normal((1001, 100)).astype(np.float32)
    yb = rng.integers(0, 10, 1001)
    net.eval()
    with torch.no_grad():
        tout = net(torch.from_numpy(xb).to(TDEV)).cpu()
    tl = F.cross_entropy(tout, torch.from_numpy(yb)).item()
    ev = e.evaluate(xb, yb)
    check("MLP evaluate 1001 rows (partial last batch) == torch", abs(ev["loss"] - tl) < 1e-5 * tl, f"{ev['loss']:.7f} vs {tl:.7f}")
    check("MLP predict 1001 rows == torch", rel(e.predict(xb), tout.numpy()) < 1e-5, f"rel {rel(e.predict(xb), tout.numpy()):.2e}")


@case
def large_deferred_input_steps():
    """batches >= 64 KiB are staged while the step runs: big MLP input, compare with torch"""
    net, topt, e = torch_pair(lambda: TMLP(3072, 256, 10), lambda: mmlp(3072, 256, 10), 128)
    worst = 0.0
    for n in (128, 128, 77, 128, 6, 128):
        xb = rng.standard_normal((n, 3072)).astype(np.float32)
        yb = rng.integers(0, 10, n)
        lt = torch_step(net, topt, xb, yb)
        r = e.step(xb, yb)
        worst = max(worst, abs(r.loss - lt) / lt)
    check("deferred-staging MLP 3072 in: losses == torch", worst < 1e-4, f"worst {worst:.2e}")
    cmp_params("deferred-staging MLP: params == torch", e.get_parameters(), tparams(net), 1e-4, fro=True)


done()
