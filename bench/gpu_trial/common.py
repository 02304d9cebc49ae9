"""Shared helpers for the GPU trial scripts: device from argv[1] (or $DEV), torch device, checks."""
import os, sys, time, traceback, functools, faulthandler
faulthandler.enable()
import numpy as np

DEV = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DEV", "cpu")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
import torch
TDEV = "cuda" if DEV == "cuda" and torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.deterministic = True
import mpscy
from mpscy import layers as L, optim, callbacks, losses
import warnings
warnings.simplefilter("ignore")

_T0 = time.time()
COUNTS = {"PASS": 0, "FAIL": 0, "EXC": 0}


class TMLP(torch.nn.Module):
    """torch's i-h-h-k MLP with ReLUs, its layers named as mmlp's (fc1, fc2, fc3)."""

    def __init__(self, i, h, k):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(i, h), torch.nn.Linear(h, h), torch.nn.Linear(h, k)

    def forward(self, x):
        relu = torch.nn.functional.relu
        return self.fc3(relu(self.fc2(relu(self.fc1(x)))))


def mmlp(i, h, k):
    """mpscy's TMLP."""
    return mpscy.Sequential([L.Dense(h, name="fc1"), L.ReLU(), L.Dense(h, name="fc2"), L.ReLU(), L.Dense(k, name="fc3")],
                            input_shape=(i,))


def torch_step(net, opt, x, y):
    """One cross-entropy step of torch's on TDEV over NumPy x and labels y; its loss as a float."""
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x).to(TDEV)),
                                             torch.from_numpy(np.asarray(y, np.int64)).to(TDEV))
    loss.backward()
    opt.step()
    return loss.item()


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.max(np.abs(a - b)) if a.size else 0.0
    s = np.max(np.abs(b)) if b.size else 0.0
    return float(d / max(s, 1e-30))


def check(name, ok, detail=""):
    tag = "PASS" if ok else "FAIL"
    COUNTS[tag] += 1
    print(f"{tag} {name} :: {detail}", flush=True)
    return ok


def info(msg):
    print(f"INFO {msg}", flush=True)


def case(fn):
    """Run a test function now, catching and reporting exceptions."""
    t = time.time()
    try:
        fn()
    except Exception as e:  # noqa
        COUNTS["EXC"] += 1
        print(f"EXC {fn.__name__}: {type(e).__module__}.{type(e).__name__}: {e}", flush=True)
        traceback.print_exc(limit=4, file=sys.stdout)
    print(f"  ({fn.__name__}: {time.time() - t:.2f}s)", flush=True)
    return fn


def expect_raises(name, fn, exc, match=None):
    try:
        fn()
    except exc as e:
        ok = match is None or match.lower() in str(e).lower()
        return check(name, ok, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa
        return check(name, False, f"wrong exception {type(e).__module__}.{type(e).__name__}: {e}")
    return check(name, False, "no exception raised")


def tparams(net):
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def frel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cmp_params(name, mp, tp, tol=1e-4, keymap=lambda k: k, fro=False):
    worst, wk, wmax, wmk = 0.0, None, 0.0, None
    for k, v in tp.items():
        mk = keymap(k)
        if mk not in mp:
            continue
        r = frel(mp[mk], v)
        m = rel(mp[mk], v)
        if r > worst:
            worst, wk = r, mk
        if m > wmax:
            wmax, wmk = m, mk
    val = worst if fro else wmax
    return check(name, val <= tol, f"worst fro-rel {worst:.2e} at {wk}; worst max-rel {wmax:.2e} at {wmk} "
                                   f"(checked {'fro' if fro else 'max'} <= {tol:g})")


def done():
    print(f"SUMMARY {os.path.basename(sys.argv[0])} dev={DEV} tdev={TDEV}: {COUNTS} in {time.time() - _T0:.1f}s",
          flush=True)


def gpu_free():
    if TDEV == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]
    return 0
