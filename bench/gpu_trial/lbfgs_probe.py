"""Which L-BFGS run is off, when t6_misc's cuda and cpu engines differ by ~1e-4 (lr 1, no line
search, 2 steps x 5 iterations, a 20-32-32-3 MLP): every run against torch in float64, after 1..5
iterations of one step and after 2 steps, with the gradients at the start. python3 lbfgs_probe.py cuda"""
import copy
from common import *
import torch.nn as nn
import torch.nn.functional as F

rng = np.random.default_rng(4)


torch.manual_seed(0)
net = TMLP(20, 32, 3)
sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
xb = rng.standard_normal((64, 20)).astype(np.float32)
yb = rng.integers(0, 3, 64)


def torch_run(dtype, dev, iters, steps, ls):
    tn = copy.deepcopy(net).to(dev, dtype)
    o = torch.optim.LBFGS(tn.parameters(), lr=1, max_iter=iters, history_size=5, line_search_fn=ls)
    tx, ty = torch.from_numpy(xb).to(dev, dtype), torch.from_numpy(yb).to(dev)

    def cl():
        o.zero_grad()
        l = F.cross_entropy(tn(tx), ty)
        l.backward()
        return l
    for _ in range(steps):
        o.step(cl)
    return {k: v.detach().cpu().double().numpy() for k, v in tn.state_dict().items()}


def mp_run(dev, iters, steps, ls):
    e = mpscy.Engine(mmlp(20, 32, 3), optimizer=optim.LBFGS(lr=1, max_iter=iters, history_size=5, line_search_fn=ls),
                     batch_size=64, device=dev)
    e.set_parameters(sd)
    for _ in range(steps):
        e.step(xb, yb)
    return e.get_parameters()


def fro(a, b):
    return max(float(np.linalg.norm(np.asarray(a[k], np.float64) - b[k]) / np.linalg.norm(b[k])) for k in b)


g = {d: mpscy.Engine(mmlp(20, 32, 3), optimizer=optim.SGD(0.1), batch_size=64, device=d) for d in ("cpu", DEV)}
for e in g.values():
    e.set_parameters(sd)
gc, gd = g["cpu"].gradients(xb, yb), g[DEV].gradients(xb, yb)
info("gradients at the start, cuda vs cpu: " + " ".join(f"{k} {frel(gd[k], gc[k]):.1e}" for k in sd))
for ls in (None, "strong_wolfe"):
    for iters, steps in ((1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (5, 2)):
        ref = torch_run(torch.float64, "cpu", iters, steps, ls)
        row = {"mpscy-cpu": mp_run("cpu", iters, steps, ls), f"mpscy-{DEV}": mp_run(DEV, iters, steps, ls),
               "torch32-cpu": torch_run(torch.float32, "cpu", iters, steps, ls)}
        if TDEV != "cpu":
            row[f"torch32-{TDEV}"] = torch_run(torch.float32, TDEV, iters, steps, ls)
        info(f"ls={ls} iters={iters} steps={steps} vs float64: " + "  ".join(f"{k} {fro(v, ref):.2e}" for k, v in row.items()))
done()
