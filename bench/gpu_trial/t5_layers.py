"""Layers on DEV vs torch on the same device: forward (eval), train-mode gradients (params and input), 3 steps."""
import copy
from common import *
import torch.nn as nn
import torch.nn.functional as F

rng = np.random.default_rng(3)


class Lam(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


def run(name, mlayers, tlayers, in_shape, batch=8, steps=3, opt="adam", fwd_tol=1e-5, grad_tol=1e-4, par_tol=1e-4, n=None):
    """mlayers[i] gets name l{i}; torch nn.Sequential keys '{i}.x' -> 'l{i}.x'."""
    for i, l in enumerate(mlayers):
        l.name = f"l{i}"
    torch.manual_seed(0)
    tnet = nn.Sequential(*tlayers)
    keymap = lambda k: "l" + k
    sd = {keymap(k): v.detach().numpy().copy() for k, v in tnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    # perturb BN running stats and affine params so eval is non-trivial
    for k in list(sd):
        if k.endswith("running_var"):
            sd[k] = (rng.random(sd[k].shape) + 0.5).astype(np.float32)
        elif k.endswith("running_mean"):
            sd[k] = (rng.standard_normal(sd[k].shape) * 0.1).astype(np.float32)
    tnet.load_state_dict({k[1:]: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    tnet = tnet.to(TDEV)
    model = mpscy.Sequential(mlayers, input_shape=in_shape)
    out_shape = tuple(model.output_shape)
    mopt = optim.Adam(1e-3) if opt == "adam" else optim.SGD(0.05, momentum=0.9)
    e = mpscy.Engine(model, loss="mse", optimizer=mopt, batch_size=batch, device=DEV, seed=0, input_gradients=True)
    e.set_parameters(sd)
    n = n or batch
    x = rng.standard_normal((n,) + in_shape).astype(np.float32)
    t = rng.standard_normal((n,) + out_shape).astype(np.float32)
    tx = torch.from_numpy(x).to(TDEV)
    tt = torch.from_numpy(t).to(TDEV)
    # forward, eval mode
    tnet.eval()
    with torch.no_grad():
        ref = tnet(tx).cpu().numpy()
    out = e.predict(x)
    r_f = rel(out, ref)
    # gradients, train mode
    tg = copy.deepcopy(tnet).train()
    txg = tx.clone().requires_grad_()
    loss = F.mse_loss(tg(txg), tt)
    loss.backward()
    g = e.gradients(x, t)
    r_l = abs(g["loss"] - loss.item()) / max(abs(loss.item()), 1e-30)
    worst, wk = frel(g["input"], txg.grad.cpu().numpy()), "input"
    for k, p in tg.named_parameters():
        r = frel(g["l" + k], p.grad.cpu().numpy())
        if r > worst:
            worst, wk = r, "l" + k
    # steps
    tnet.train()
    topt = torch.optim.Adam(tnet.parameters(), lr=1e-3) if opt == "adam" else torch.optim.SGD(tnet.parameters(), lr=0.05, momentum=0.9)
    for s in range(steps):
        xs = rng.standard_normal((n,) + in_shape).astype(np.float32)
        ts_ = rng.standard_normal((n,) + out_shape).astype(np.float32)
        topt.zero_grad()
        l = F.mse_loss(tnet(torch.from_numpy(xs).to(TDEV)), torch.from_numpy(ts_).to(TDEV))
        l.backward()
        topt.step()
        e.step(xs, ts_)
    tp = {keymap(k): v for k, v in tparams(tnet).items()}
    mp = e.get_parameters()
    r_p, pk = 0.0, None
    for k, v in tp.items():
        r = frel(mp[k], v)
        if r > r_p:
            r_p, pk = r, k
    ok = r_f <= fwd_tol and r_l <= 1e-5 and worst <= grad_tol and r_p <= par_tol
    check(f"layer {name}", ok, f"fwd {r_f:.1e}, loss {r_l:.1e}, grad {worst:.1e} ({wk}), params after {steps} {opt} steps {r_p:.1e} ({pk})")
    return e


def cases():
    yield "Conv2D s2 p1", [L.Conv2D(6, 3, stride=2, padding=1)], [nn.Conv2d(4, 6, 3, stride=2, padding=1)], (4, 9, 11)
    yield "Conv2D dil2", [L.Conv2D(8, 3, dilation=2, padding=2)], [nn.Conv2d(4, 8, 3, dilation=2, padding=2)], (4, 12, 12)
    yield "Conv2D groups2", [L.Conv2D(8, 3, groups=2, padding=1)], [nn.Conv2d(4, 8, 3, groups=2, padding=1)], (4, 10, 10)
    yield "Conv2D depthwise", [L.Conv2D(8, 3, groups=8, padding=1)], [nn.Conv2d(8, 8, 3, groups=8, padding=1)], (8, 10, 10)
    yield "Conv2D depthwise x2 s2", [L.Conv2D(16, 3, groups=8, stride=2, padding=1)], [nn.Conv2d(8, 16, 3, groups=8, stride=2, padding=1)], (8, 11, 10)
    yield "Conv2D (3,5) s(2,1) nobias", [L.Conv2D(5, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)], [nn.Conv2d(3, 5, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)], (3, 13, 17)
    yield "Conv2D same k5", [L.Conv2D(6, 5, padding="same")], [nn.Conv2d(3, 6, 5, padding="same")], (3, 9, 9)
    yield "Conv2D 3x3 implicit s1", [L.Conv2D(16, 3, padding=1), L.ReLU(), L.Conv2D(16, 3, padding=1)], [nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)], (8, 16, 32)
    yield "Conv2D 3x3 implicit s2", [L.Conv2D(16, 3, padding=1), L.ReLU(), L.Conv2D(16, 3, stride=2, padding=1)], [nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1)], (8, 32, 64)
    yield "Conv2D 1x1 + 5x5 dil3 groups4", [L.Conv2D(8, 1), L.Conv2D(8, 5, dilation=3, groups=4, padding=6)], [nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 5, dilation=3, groups=4, padding=6)], (4, 14, 15)
    yield "Conv2D first-layer direct 3ch", [L.Conv2D(16, 3, padding=1), L.ReLU(), L.Conv2D(8, 3, stride=2, padding=1)], [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1)], (3, 32, 32)
    yield "ConvT s2 p1 op1", [L.ConvTranspose2D(6, 3, stride=2, padding=1, output_padding=1)], [nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)], (4, 7, 7)
    yield "ConvT k4 s2 p1 g2", [L.ConvTranspose2D(8, 4, stride=2, padding=1, groups=2)], [nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1, groups=2)], (4, 8, 8)
    yield "ConvT s2 dil2", [L.ConvTranspose2D(4, 3, stride=2, dilation=2, output_padding=1)], [nn.ConvTranspose2d(3, 4, 3, stride=2, dilation=2, output_padding=1)], (3, 5, 6)
    yield "ConvT 2x2 s2 nobias", [L.ConvTranspose2D(16, 2, stride=2, bias=False)], [nn.ConvTranspose2d(32, 16, 2, stride=2, bias=False)], (32, 16, 16)
    yield "BatchNorm2d", [L.Conv2D(8, 3, padding=1, bias=False), L.BatchNorm()], [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)], (3, 12, 12)
    yield "BatchNorm2d large split", [L.BatchNorm(momentum=0.3)], [nn.BatchNorm2d(16, momentum=0.3)], (16, 32, 32), 16
    yield "BatchNorm1d noaffine", [L.Dense(20, bias=False), L.BatchNorm(affine=False)], [nn.Linear(30, 20, bias=False), nn.BatchNorm1d(20, affine=False)], (30,)
    yield "LayerNorm CHW", [L.Conv2D(6, 3), L.LayerNorm((6, 8, 8))], [nn.Conv2d(3, 6, 3), nn.LayerNorm((6, 8, 8))], (3, 10, 10)
    yield "LayerNorm last", [L.Dense(50), L.LayerNorm(50), L.GELU()], [nn.Linear(30, 50), nn.LayerNorm(50), nn.GELU()], (30,)
    yield "MaxPool 3 s2 p1", [L.Conv2D(4, 1), L.MaxPool2D(3, stride=2, padding=1)], [nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1)], (3, 13, 12)
    yield "MaxPool 2 tiling", [L.Conv2D(4, 1), L.MaxPool2D(2)], [nn.Conv2d(3, 4, 1), nn.MaxPool2d(2)], (3, 16, 16)
    yield "AvgPool 3 s2 p1 incl", [L.Conv2D(4, 1), L.AvgPool2D(3, stride=2, padding=1)], [nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 2, 1)], (3, 13, 12)
    yield "AvgPool 3 s2 p1 excl", [L.Conv2D(4, 1), L.AvgPool2D(3, stride=2, padding=1, count_include_pad=False)], [nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 2, 1, count_include_pad=False)], (3, 13, 12)
    yield "GlobalAvgPool+Dense", [L.Conv2D(8, 3), L.GlobalAvgPool2D(), L.Flatten(), L.Dense(5)], [nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)], (3, 9, 9)
    yield "Upsample nearest 2", [L.Conv2D(4, 1), L.Upsample(scale_factor=2)], [nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2)], (3, 6, 7)
    yield "Upsample nearest (2,3)", [L.Conv2D(4, 1), L.Upsample(scale_factor=(2, 3))], [nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=(2, 3))], (3, 6, 7)
    yield "Upsample bilinear 2", [L.Conv2D(4, 1), L.Upsample(scale_factor=2, mode="bilinear")], [nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2, mode="bilinear")], (3, 6, 7)
    yield "Upsample bilinear ac", [L.Conv2D(4, 1), L.Upsample(scale_factor=2, mode="bilinear", align_corners=True)], [nn.Conv2d(3, 4, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)], (3, 6, 7)
    yield "Upsample bilinear size down", [L.Conv2D(4, 1), L.Upsample(size=(5, 11), mode="bilinear")], [nn.Conv2d(3, 4, 1), nn.Upsample(size=(5, 11), mode="bilinear")], (3, 8, 7)
    acts = [("ReLU6", L.ReLU6(), nn.ReLU6()), ("Hardsigmoid", L.Hardsigmoid(), nn.Hardsigmoid()), ("Hardswish", L.Hardswish(), nn.Hardswish()),
            ("Softplus b2", L.Softplus(beta=2.0, threshold=5.0), nn.Softplus(beta=2.0, threshold=5.0)), ("Mish", L.Mish(), nn.Mish()),
            ("GELU", L.GELU(), nn.GELU()), ("GELU tanh", L.GELU(approximate="tanh"), nn.GELU(approximate="tanh")),
            ("ELU", L.ELU(0.7), nn.ELU(0.7)), ("LeakyReLU", L.LeakyReLU(0.1), nn.LeakyReLU(0.1)), ("Swish", L.Swish(), nn.SiLU()),
            ("Sigmoid", L.Sigmoid(), nn.Sigmoid()), ("Tanh", L.Tanh(), nn.Tanh()), ("Softmax", L.Softmax(), nn.Softmax(-1))]
    for nm, ml, tl in acts:
        yield f"act {nm}", [L.Dense(24), ml, L.Dense(6)], [nn.Linear(12, 24), tl, nn.Linear(24, 6)], (12,)
    yield "act conv Hardswish", [L.Conv2D(8, 3, padding=1), L.Hardswish(), L.Conv2D(4, 3, padding=1), L.Mish()], [nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(), nn.Conv2d(8, 4, 3, padding=1), nn.Mish()], (3, 12, 12)
    yield "Reshape/Unflatten", [L.Dense(48), L.Reshape((3, 4, 4)), L.Conv2D(4, 3, padding=1)], [nn.Linear(10, 48), nn.Unflatten(1, (3, 4, 4)), nn.Conv2d(3, 4, 3, padding=1)], (10,)


@case
def layer_sweep():
    for c in cases():
        name, ml, tl, shape = c[:4]
        batch = c[4] if len(c) > 4 else 8
        try:
            run(name, ml, tl, shape, batch=batch)
        except Exception as ex:  # noqa
            check(f"layer {name}", False, f"EXC {type(ex).__name__}: {ex}")


@case
def layer_sweep_partial_and_sgd():
    for c in list(cases())[::3]:
        name, ml, tl, shape = c[:4]
        try:
            run(name + " [partial 5 of 8, SGD]", copy.deepcopy(ml), copy.deepcopy(tl), shape, batch=8, n=5, opt="sgd")
        except Exception as ex:  # noqa
            check(f"layer {name} partial", False, f"EXC {type(ex).__name__}: {ex}")


class TRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.a1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.abn1 = nn.BatchNorm2d(16)
        self.a2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.abn2 = nn.BatchNorm2d(16)
        self.b1 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bbn1 = nn.BatchNorm2d(32)
        self.bskip = nn.Conv2d(16, 32, 1, stride=2)
        self.side = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(32 + 8, 10)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        r = F.relu(self.abn1(self.a1(h)))
        h = F.relu(self.abn2(self.a2(r)) + h)
        s = F.max_pool2d(self.side(h), 2)
        h = F.relu(self.bbn1(self.b1(h)) + self.bskip(h))
        h = torch.cat([h, s], 1)
        return self.fc(h.mean((2, 3)))


def mres():
    x = mpscy.Input((3, 16, 16))
    h = L.ReLU()(L.BatchNorm(name="bn0")(L.Conv2D(16, 3, padding=1, bias=False, name="stem")(x)))
    r = L.ReLU()(L.BatchNorm(name="abn1")(L.Conv2D(16, 3, padding=1, bias=False, name="a1")(h)))
    h = L.ReLU()(L.Add()([L.BatchNorm(name="abn2")(L.Conv2D(16, 3, padding=1, bias=False, name="a2")(r)), h]))
    s = L.MaxPool2D(2)(L.Conv2D(8, 1, name="side")(h))
    h = L.ReLU()(L.Add()([L.BatchNorm(name="bbn1")(L.Conv2D(32, 3, stride=2, padding=1, bias=False, name="b1")(h)),
                          L.Conv2D(32, 1, stride=2, name="bskip")(h)]))
    h = L.Concatenate()([h, s])
    return mpscy.Model(x, L.Dense(10, name="fc")(L.GlobalAvgPool2D()(h)))


@case
def residual_dag():
    torch.manual_seed(0)
    net = TRes()
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    e = mpscy.Engine(mres(), optimizer=optim.SGD(0.05, momentum=0.9), batch_size=32, device=DEV, seed=0)
    e.set_parameters(sd)
    topt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for s in range(5):
        n = 32 if s != 3 else 19
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        y = rng.integers(0, 10, n)
        net.train()
        topt.zero_grad()
        l = F.cross_entropy(net(torch.from_numpy(x).to(TDEV)), torch.from_numpy(y).to(TDEV))
        l.backward()
        topt.step()
        r = e.step(x, y)
    cmp_params("residual DAG: 5 SGD steps (incl partial) params+BN stats == torch", e.get_parameters(), tparams(net), 1e-4)
    net.eval()
    x = rng.standard_normal((100, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x).to(TDEV)).cpu().numpy()
    check("residual DAG eval predict == torch", rel(e.predict(x), ref) < 1e-5, f"rel {rel(e.predict(x), ref):.2e}")


@case
def dropout_determinism():
    def mk():
        return mpscy.Sequential([L.Dense(64), L.ReLU(), L.Dropout(0.5), L.Dense(64), L.ReLU(), L.Dropout(0.25), L.Dense(10)], input_shape=(32,))
    x = rng.standard_normal((16, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    res = {}
    for dev in ("cpu", DEV):
        e = mpscy.Engine(mk(), optimizer=optim.SGD(0.1), batch_size=16, device=dev, seed=11)
        losses = [e.step(x, y).loss for _ in range(5)]
        g = e.gradients(x, y)
        res[dev] = (losses, e.get_parameters(), g)
    e2 = mpscy.Engine(mk(), optimizer=optim.SGD(0.1), batch_size=16, device=DEV, seed=11)
    l2 = [e2.step(x, y).loss for _ in range(5)]
    check("Dropout: same seed on DEV twice -> identical losses", l2 == res[DEV][0], f"{l2[:2]} vs {res[DEV][0][:2]}")
    r = rel(res[DEV][0], res["cpu"][0])
    check("Dropout: cpu and DEV draw the same masks (losses agree)", r < 1e-5, f"rel {r:.2e}: {np.round(res['cpu'][0], 6)} vs {np.round(res[DEV][0], 6)}")
    cmp_params("Dropout: cpu ~ DEV params after 5 steps", res[DEV][1], res["cpu"][1], 1e-4)
    e3 = mpscy.Engine(mk(), optimizer=optim.SGD(0.1), batch_size=16, device=DEV, seed=12)
    e3.set_parameters(mpscy.Engine(mk(), batch_size=16, device="cpu", seed=11).get_parameters())
    l3 = [e3.step(x, y).loss for _ in range(5)]
    check("Dropout: another seed gives other masks", l3 != res[DEV][0], "")
    # dropout mask rate
    e4 = mpscy.Engine(mpscy.Sequential([L.Dropout(0.3)], input_shape=(1000,)), loss="mse", batch_size=64, device=DEV, input_gradients=True)
    gi = e4.gradients(np.ones((64, 1000), np.float32), np.zeros((64, 1000), np.float32))["input"]
    kept = float((gi != 0).mean())
    check("Dropout(0.3) keeps ~70%", abs(kept - 0.7) < 0.01, f"kept {kept:.4f}")


done()
