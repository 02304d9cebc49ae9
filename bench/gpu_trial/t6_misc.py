"""tf32 engines, ONNX export of a DEV-trained model, frozen layers, class weights, pos_weight, L-BFGS, clipping, schedules."""
import tempfile, pathlib, copy
from common import *
import torch.nn as nn
import torch.nn.functional as F

TMP = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(4)


def mcnn():
    return mpscy.Sequential([L.Conv2D(32, 3, padding=1, name="c1"), L.ReLU(), L.Conv2D(64, 3, padding=1, name="c2"), L.ReLU(),
                             L.MaxPool2D(2), L.Flatten(), L.Dense(10, name="fc")], input_shape=(16, 16, 16))


class TCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2).flatten(1))


@case
def tf32_accuracy():
    for nm, tcls, mk, shape, b in (("small MLP 64-128-128-10 b32 (one-kernel)", lambda: TMLP(64, 128, 10), lambda: mmlp(64, 128, 10), (64,), 32),
                                    ("MLP 256-512-512-10 b64", lambda: TMLP(256, 512, 10), lambda: mmlp(256, 512, 10), (256,), 64),
                                    ("MLP b512 (cuBLASLt)", lambda: TMLP(256, 512, 10), lambda: mmlp(256, 512, 10), (256,), 512),
                                    ("CNN 16ch", TCNN, mcnn, (16, 16, 16), 32)):
        torch.manual_seed(0)
        net = tcls()
        sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
        net64 = copy.deepcopy(net).double()
        x = rng.standard_normal((b,) + shape).astype(np.float32)
        y = rng.integers(0, 10, b)
        with torch.no_grad():
            ref = net64(torch.from_numpy(x).double()).numpy()
        outs = {}
        for prec in ("fp32", "tf32"):
            e = mpscy.Engine(mk(), batch_size=b, device=DEV, precision=prec, optimizer=optim.SGD(0.01))
            e.set_parameters(sd)
            outs[prec] = (e.predict(x), e.gradients(x, y))
        t64 = copy.deepcopy(net64)
        F.cross_entropy(t64(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
        gref = {k: p.grad.numpy() for k, p in t64.named_parameters()}
        net_t = net.to(TDEV)
        if TDEV == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        with torch.no_grad():
            tt = net_t(torch.from_numpy(x).to(TDEV)).cpu().numpy()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        gf = max(frel(outs["fp32"][1][k], v) for k, v in gref.items())
        gt = max(frel(outs["tf32"][1][k], v) for k, v in gref.items())
        info(f"{nm}: predict vs float64: fp32 {rel(outs['fp32'][0], ref):.1e}, tf32 {rel(outs['tf32'][0], ref):.1e}, "
             f"torch tf32 {rel(tt, ref):.1e}; grads fro-rel vs float64: fp32 {gf:.1e}, tf32 {gt:.1e}")
        check(f"{nm}: fp32 predict within 1e-5 of float64", rel(outs["fp32"][0], ref) < 1e-5, f"{rel(outs['fp32'][0], ref):.1e}")
        check(f"{nm}: tf32 predict within 1e-2 of float64", rel(outs["tf32"][0], ref) < 1e-2, f"{rel(outs['tf32'][0], ref):.1e}")


@case
def onnx_export_of_dev_trained():
    import onnxruntime as ort
    x = mpscy.Input((3, 16, 16))
    s = L.ReLU()(L.BatchNorm()(L.Conv2D(8, 3, padding=1, bias=False)(x)))
    h = L.MaxPool2D(2)(s)
    h = L.GELU()(L.Conv2D(16, 3, padding=1, groups=2)(h))
    h = L.ConvTranspose2D(8, 3, stride=2, padding=1, output_padding=1)(h)
    u = L.Upsample(scale_factor=2, mode="bilinear")(L.AvgPool2D(2)(s))
    h = L.Concatenate()([h, u])
    h = L.Dropout(0.2)(L.Hardswish()(L.LayerNorm((16, 16, 16))(h)))
    out = L.Conv2D(4, 1)(h)
    model = mpscy.Model(x, out)
    e = mpscy.Engine(model, loss="sparse_cross_entropy", optimizer=optim.Adam(1e-2), batch_size=16, device=DEV, seed=0)
    for _ in range(10):
        xb = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
        yb = rng.integers(0, 4, (16, 16, 16))
        e.step(xb, yb)
    xt = rng.standard_normal((37, 3, 16, 16)).astype(np.float32)
    want = e.predict(xt)
    for opset in (17, 20):
        path = str(TMP / f"m{opset}.onnx")
        mpscy.onnx.export(e, path, opset=opset)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: xt})[0]
        check(f"ONNX opset {opset} export of {DEV}-trained U-Net-ish: onnxruntime == predict", rel(got, want) < 1e-5, f"rel {rel(got, want):.2e}")
    back = mpscy.onnx.load(str(TMP / "m17.onnx"), loss="sparse_cross_entropy", batch_size=8, device=DEV)
    check("ONNX load back on DEV: predict", rel(back.predict(xt), want) < 1e-5, f"rel {rel(back.predict(xt), want):.2e}")
    back.step(xt[:8], rng.integers(0, 4, (8, 16, 16)))


@case
def frozen_layers_vs_torch():
    torch.manual_seed(0)
    net = TMLP(64, 64, 10)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    net.fc2.requires_grad_(False)
    m = mmlp(64, 64, 10)
    m.get_layer("fc2").trainable = False
    e = mpscy.Engine(m, optimizer=optim.Adam(1e-2, weight_decay=1e-2), batch_size=32, device=DEV, clip_grad_norm=0.5)
    e.set_parameters(sd)
    topt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-2)
    for _ in range(5):
        xb = rng.standard_normal((32, 64)).astype(np.float32)
        yb = rng.integers(0, 10, 32)
        topt.zero_grad()
        l = F.cross_entropy(net(torch.from_numpy(xb).to(TDEV)), torch.from_numpy(yb).to(TDEV))
        l.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 0.5)
        topt.step()
        e.step(xb, yb)
    cmp_params("frozen middle Dense + clip_grad_norm + Adam wd: params == torch", e.get_parameters(), tparams(net), 1e-4, fro=True)
    check("frozen weights unchanged", np.array_equal(e.get_parameters()["fc2.weight"], sd["fc2.weight"]), "")


@case
def class_weights_and_pos_weight():
    torch.manual_seed(0)
    w = (rng.random(10) + 0.1).astype(np.float32)
    net = TMLP(64, 64, 10)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    for ls in (0.0, 0.1):
        e = mpscy.Engine(mmlp(64, 64, 10), loss=losses.SparseCrossEntropy(weight=w, label_smoothing=ls), batch_size=32, device=DEV)
        e.set_parameters(sd)
        xb = rng.standard_normal((32, 64)).astype(np.float32)
        yb = rng.integers(0, 10, 32)
        tn = copy.deepcopy(net)
        l = F.cross_entropy(tn(torch.from_numpy(xb).to(TDEV)), torch.from_numpy(yb).to(TDEV), weight=torch.from_numpy(w).to(TDEV), label_smoothing=ls)
        l.backward()
        g = e.gradients(xb, yb)
        gr = max(frel(g[k], p.grad.cpu().numpy()) for k, p in tn.named_parameters())
        check(f"class-weighted CE (smoothing {ls}): loss and grads == torch", abs(g["loss"] - l.item()) < 1e-5 * l.item() and gr < 1e-5,
              f"loss {g['loss']:.7f} vs {l.item():.7f}, grad fro-rel {gr:.1e}")
        xe = rng.standard_normal((1000, 64)).astype(np.float32)
        ye = rng.integers(0, 10, 1000)
        with torch.no_grad():
            le = F.cross_entropy(net(torch.from_numpy(xe).to(TDEV)), torch.from_numpy(ye).to(TDEV), weight=torch.from_numpy(w).to(TDEV), label_smoothing=ls).item()
        ev = e.evaluate(xe, ye)["loss"]
        check(f"class-weighted evaluate over 1000 rows (smoothing {ls}) == torch", abs(ev - le) < 1e-5 * le, f"{ev:.7f} vs {le:.7f}")
    pw = (rng.random(5) * 3).astype(np.float32)
    torch.manual_seed(1)
    net = TMLP(64, 64, 5)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    e = mpscy.Engine(mmlp(64, 64, 5), loss=losses.BCEWithLogits(pos_weight=pw), batch_size=32, device=DEV)
    e.set_parameters(sd)
    xb = rng.standard_normal((32, 64)).astype(np.float32)
    tb = (rng.random((32, 5)) > 0.7).astype(np.float32)
    l = F.binary_cross_entropy_with_logits(net(torch.from_numpy(xb).to(TDEV)), torch.from_numpy(tb).to(TDEV), pos_weight=torch.from_numpy(pw).to(TDEV))
    l.backward()
    g = e.gradients(xb, tb)
    gr = max(frel(g[k], p.grad.cpu().numpy()) for k, p in net.named_parameters())
    check("BCEWithLogits pos_weight: loss and grads == torch", abs(g["loss"] - l.item()) < 1e-5 * l.item() and gr < 1e-5, f"{g['loss']:.7f} vs {l.item():.7f}, grad {gr:.1e}")


@case
def lbfgs_vs_torch():
    torch.manual_seed(0)
    net = TMLP(20, 32, 3)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    xb = rng.standard_normal((64, 20)).astype(np.float32)
    yb = rng.integers(0, 3, 64)
    for ls in (None, "strong_wolfe"):
        tn = copy.deepcopy(net)
        topt = torch.optim.LBFGS(tn.parameters(), lr=1, max_iter=5, history_size=5, line_search_fn=ls)
        es = {}
        for dev in ("cpu", "dev"):
            e = mpscy.Engine(mmlp(20, 32, 3), optimizer=optim.LBFGS(lr=1, max_iter=5, history_size=5, line_search_fn=ls), batch_size=64, device="cpu" if dev == "cpu" else DEV)
            e.set_parameters(sd)
            es[dev] = e
        tx, ty = torch.from_numpy(xb).to(TDEV), torch.from_numpy(yb).to(TDEV)

        def closure():
            topt.zero_grad()
            l = F.cross_entropy(tn(tx), ty)
            l.backward()
            return l
        for _ in range(2):
            topt.step(closure)
            r = [es[d].step(xb, yb) for d in ("cpu", "dev")]
        cmp_params(f"L-BFGS ({ls}) 2 steps x 5 iters == torch", es["dev"].get_parameters(), tparams(tn), 1e-3, fro=True)
        # against torch in float64: without a line search this problem carries float32 rounding up
        # to ~1e-4 (the cpu engine 6.9e-5 from float64, torch's float32 LBFGS 6.3e-5, cuda 1.2e-4
        # from the cpu), so each engine is held to within 4x torch float32's own distance
        t64 = copy.deepcopy(net).cpu().double()
        o64 = torch.optim.LBFGS(t64.parameters(), lr=1, max_iter=5, history_size=5, line_search_fn=ls)

        def closure64():
            o64.zero_grad()
            l = F.cross_entropy(t64(torch.from_numpy(xb).double()), torch.from_numpy(yb))
            l.backward()
            return l
        for _ in range(2):
            o64.step(closure64)
        ref = tparams(t64)
        t32 = max(frel(v, ref[k]) for k, v in tparams(tn).items())
        for dev in ("dev", "cpu"):
            got = es[dev].get_parameters()
            d = max(frel(got[k], ref[k]) for k in ref)
            check(f"L-BFGS ({ls}) 2 steps x 5 iters: {DEV if dev == 'dev' else 'cpu'} within 4x torch float32's distance "
                  f"of float64", d <= max(4 * t32, 1e-5), f"{d:.2e} (torch float32 {t32:.2e})")


class T2In(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fa = nn.Linear(8 * 32 * 32, 16)
        self.fb = nn.Linear(12, 16)
        self.out = nn.Linear(32, 5)

    def forward(self, a, b):
        ha = F.relu(self.fa(F.relu(self.conv(a)).flatten(1)))
        hb = torch.tanh(self.fb(b))
        return self.out(torch.cat([ha, hb], 1))


@case
def two_inputs_and_input_gradients():
    torch.manual_seed(0)
    net = T2In()
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    a = mpscy.Input((3, 64, 64), name="a")
    b = mpscy.Input((12,), name="b")
    ha = L.ReLU()(L.Dense(16, name="fa")(L.ReLU()(L.Conv2D(8, 3, stride=2, padding=1, name="conv")(a))))
    hb = L.Tanh()(L.Dense(16, name="fb")(b))
    m = mpscy.Model([a, b], L.Dense(5, name="out")(L.Concatenate()([ha, hb])))
    e = mpscy.Engine(m, batch_size=16, device=DEV, input_gradients=True, optimizer=optim.SGD(0.05, momentum=0.9))
    e.set_parameters(sd)
    topt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for n in (16, 9, 16):
        xa = rng.standard_normal((n, 3, 64, 64)).astype(np.float32)
        xb = rng.standard_normal((n, 12)).astype(np.float32)
        y = rng.integers(0, 5, n)
        ta = torch.from_numpy(xa).to(TDEV).requires_grad_()
        tb = torch.from_numpy(xb).to(TDEV).requires_grad_()
        tn = copy.deepcopy(net)
        F.cross_entropy(tn(ta, tb), torch.from_numpy(y).to(TDEV)).backward()
        g = e.gradients([xa, xb], y)
        ra, rb = frel(g["input"][0], ta.grad.cpu().numpy()), frel(g["input"][1], tb.grad.cpu().numpy())
        check(f"2-input model, n={n}: input gradients == torch", ra < 1e-5 and rb < 1e-5, f"{ra:.1e} {rb:.1e}")
        topt.zero_grad()
        F.cross_entropy(net(torch.from_numpy(xa).to(TDEV), torch.from_numpy(xb).to(TDEV)), torch.from_numpy(y).to(TDEV)).backward()
        topt.step()
        e.step([xa, xb], y)
    cmp_params("2-input model: 3 SGD steps == torch", e.get_parameters(), tparams(net), 1e-4)
    # large single input with input gradients (deferred staging)
    e1 = mpscy.Engine(mpscy.Sequential([L.Conv2D(4, 3, padding=1, name="c"), L.ReLU(), L.Flatten(), L.Dense(3, name="d")], input_shape=(3, 64, 64)),
                      batch_size=32, device=DEV, input_gradients=True)
    c1 = mpscy.Engine(mpscy.Sequential([L.Conv2D(4, 3, padding=1, name="c"), L.ReLU(), L.Flatten(), L.Dense(3, name="d")], input_shape=(3, 64, 64)),
                      batch_size=32, device="cpu", input_gradients=True)
    xa = rng.standard_normal((32, 3, 64, 64)).astype(np.float32)
    y = rng.integers(0, 3, 32)
    r = frel(e1.gradients(xa, y)["input"], c1.gradients(xa, y)["input"])
    check("large input (deferred staging) input gradients == cpu", r < 1e-5, f"{r:.1e}")


@case
def schedules_per_step_momentum():
    from mpscy.optim import schedules
    torch.manual_seed(0)
    net = TMLP(32, 32, 4)
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    topt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=0.2, total_steps=20)
    e = mpscy.Engine(mmlp(32, 32, 4), optimizer=optim.SGD(0.1, momentum=0.9), batch_size=16, device=DEV)
    e.set_parameters(sd)
    sch = schedules.OneCycleLR(e, max_lr=0.2, total_steps=20)
    for _ in range(20):
        xb = rng.standard_normal((16, 32)).astype(np.float32)
        yb = rng.integers(0, 4, 16)
        topt.zero_grad()
        F.cross_entropy(net(torch.from_numpy(xb).to(TDEV)), torch.from_numpy(yb).to(TDEV)).backward()
        topt.step()
        tsched.step() if _ < 19 else None
        e.step(xb, yb)
        sch.step() if _ < 19 else None
    cmp_params("OneCycleLR (lr+momentum cycling) SGD 20 steps == torch", e.get_parameters(), tparams(net), 1e-4)


done()
