"""fit on DEV vs cpu vs torch: arrays, validation, metrics, callbacks, per-step schedule; torch DataLoader."""
import tempfile, pathlib, copy, csv
from common import *
from mpscy.optim import schedules
import torch.nn as nn
import torch.nn.functional as F

x, y = mpscy.datasets.load_digits()
xtr, ytr, xte, yte = mpscy.datasets.train_test_split(x, y, 0.2, seed=0)
TMP = pathlib.Path(tempfile.mkdtemp())


def mlp_run(dev, tag):
    model = mpscy.Sequential([L.Dense(128), L.ReLU(), L.Dropout(0.2), L.Dense(10)], input_shape=(64,))
    e = mpscy.Engine(model, optimizer=optim.Adam(1e-3), batch_size=32, device=dev, seed=0)
    steps = -(-len(xtr) // 32)
    e.set_schedule(schedules.OneCycleLR(e, max_lr=1e-2, total_steps=12 * steps), per="step")
    seen = []

    class Spy(callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            seen.append((epoch, self.engine.evaluate(xte, yte)["loss"]))

    h = e.fit(xtr, ytr, epochs=12, validation_data=(xte, yte), metrics=["f1", "top3"],
              callbacks=[callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
                         callbacks.ModelCheckpoint(str(TMP / f"{tag}_best.mpscy"), save_best_only=True),
                         callbacks.CSVLogger(str(TMP / f"{tag}.csv")), Spy()], verbose=0)
    return e, h.history, seen


@case
def fit_arrays_cpu_vs_dev():
    ec, hc, sc = mlp_run("cpu", "cpu")
    ed, hd, sd = mlp_run(DEV, "dev")
    info(f"epochs run cpu {len(hc['loss'])} dev {len(hd['loss'])}; keys {sorted(hd)}")
    check("fit history same length", len(hc["loss"]) == len(hd["loss"]), f"{len(hc['loss'])} vs {len(hd['loss'])}")
    for k in sorted(hc):
        a, b = np.array(hc[k], float), np.array(hd.get(k, []), float)
        n = min(len(a), len(b))
        r = rel(b[:n], a[:n])
        tol = 2e-2 if "f1" in k or "acc" in k or "top" in k else 1e-4
        check(f"fit history[{k}] cpu~dev", r <= tol, f"rel {r:.2e}; cpu {a[:n].round(5).tolist()} dev {b[:n].round(5).tolist()}")
    cmp_params("fit final params cpu~dev", ed.get_parameters(), ec.get_parameters(), 1e-4, fro=True)
    # restore_best_weights: the final weights are the best epoch's
    best = min(hd["val_loss"])
    now = ed.evaluate(xte, yte)["loss"]
    check("EarlyStopping restore_best_weights (dev): evaluate == min val_loss", abs(now - best) <= 1e-5 * abs(best),
          f"evaluate {now:.7f} min val_loss {best:.7f}; per-epoch val_loss {np.round(hd['val_loss'], 6).tolist()}")
    # the per-epoch val_loss equals evaluate at that epoch's end
    r = rel([v for _, v in sd], hd["val_loss"][:len(sd)])
    check("val_loss == evaluate at epoch end (dev)", r < 1e-6, f"rel {r:.2e}")
    # ModelCheckpoint's best file
    for dev in ("cpu", DEV):
        e2 = mpscy.load(str(TMP / "dev_best.mpscy"), device=dev)
        l2 = e2.evaluate(xte, yte)["loss"]
        check(f"ModelCheckpoint best file loaded on {dev}: evaluate == min val_loss", abs(l2 - best) <= 1e-5 * best,
              f"{l2:.7f} vs {best:.7f}; epoch {e2.epoch}")
    rows = list(csv.DictReader(open(TMP / "dev.csv")))
    check("CSVLogger rows", len(rows) == len(hd["loss"]), f"{len(rows)} rows, keys {list(rows[0])}")


class TNet(nn.Module):
    def __init__(self):
        super().__init__()
        # no bias before the BatchNorm: its gradient is 0 but for rounding (~1e-9), which Adam
        # scales up to whole steps, so its bits differ between any two summation orders (cpu on
        # 1 and 2 threads too) and a parameter comparison would measure noise
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.c1(x))), 2)
        h = F.relu(self.c2(h)).mean((2, 3))
        return self.fc(h)


def mnet():
    return mpscy.Sequential([L.Conv2D(8, 3, padding=1, bias=False, name="c1"), L.BatchNorm(name="bn1"), L.ReLU(),
                             L.MaxPool2D(2), L.Conv2D(16, 3, padding=1, name="c2"), L.ReLU(),
                             L.GlobalAvgPool2D(), L.Dense(10, name="fc")], input_shape=(1, 8, 8))


@case
def fit_torch_dataloader_vs_torch():
    xi, yi = mpscy.datasets.load_digits(images=True)
    a, b, c, d = mpscy.datasets.train_test_split(xi, yi, 0.2, seed=0)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(a), torch.from_numpy(b.astype(np.int64)))
    vds = torch.utils.data.TensorDataset(torch.from_numpy(c), torch.from_numpy(d.astype(np.int64)))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    vloader = torch.utils.data.DataLoader(vds, batch_size=100, shuffle=False)
    torch.manual_seed(0)
    net = TNet()
    sd = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    net = net.to(TDEV)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    EPOCHS = 3
    tl = []
    for ep in range(EPOCHS):
        net.train()
        s, n = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(TDEV), yb.to(TDEV)
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            s += loss.item() * len(yb)
            n += len(yb)
        tl.append(s / n)
    net.eval()
    with torch.no_grad():
        tv = F.cross_entropy(net(torch.from_numpy(c).to(TDEV)), torch.from_numpy(d.astype(np.int64)).to(TDEV)).item()
    res = {}
    for dev in ("cpu", DEV):
        e = mpscy.Engine(mnet(), optimizer=optim.SGD(0.05, momentum=0.9), batch_size=32, device=dev, seed=0)
        e.set_parameters(sd)
        e.set_schedule(schedules.StepLR(e, step_size=20, gamma=0.5), per="step")
        h = e.fit(loader, epochs=EPOCHS, validation_data=vloader, verbose=0, shuffle=False)
        res[dev] = (e, h.history)
    e, hist = res[DEV]
    r = rel(hist["loss"], tl)
    check("fit(torch DataLoader) epoch loss == torch", r < 1e-4, f"rel {r:.2e} mpscy {np.round(hist['loss'], 6).tolist()} torch {np.round(tl, 6).tolist()}")
    check("fit(torch DataLoader) final val_loss == torch eval", abs(hist["val_loss"][-1] - tv) < 1e-4 * tv,
          f"{hist['val_loss'][-1]:.7f} vs {tv:.7f}")
    cmp_params("fit(torch DataLoader) params == torch", e.get_parameters(), tparams(net), 1e-4)
    cmp_params("fit(torch DataLoader) params cpu~dev", e.get_parameters(), res["cpu"][0].get_parameters(), 1e-4)
    check("lr logged per-step StepLR", abs(hist["lr"][-1] - sched.get_last_lr()[0]) < 1e-12,
          f"{hist['lr']} vs torch {sched.get_last_lr()}")


@case
def fit_loaders_workers_and_prefetch():
    xi, yi = mpscy.datasets.load_digits(images=True)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(xi), torch.from_numpy(yi.astype(np.int64)))
    res = {}
    for tag, dev, loader in (("cpu", "cpu", torch.utils.data.DataLoader(ds, batch_size=64)),
                             ("dev-workers", DEV, torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)),
                             ("dev-mpscy-prefetch", DEV, mpscy.data.DataLoader(mpscy.data.ArrayDataset(xi, yi), batch_size=64, shuffle=False, prefetch=3))):
        e = mpscy.Engine(mnet(), optimizer=optim.SGD(0.05, momentum=0.9), batch_size=64, device=dev, seed=0)
        h = e.fit(loader, epochs=2, verbose=0, validation_data=loader)
        res[tag] = (h.history, e.get_parameters())
    for tag in ("dev-workers", "dev-mpscy-prefetch"):
        r = rel(res[tag][0]["loss"], res["cpu"][0]["loss"])
        check(f"fit({tag}) losses == cpu", r < 1e-4, f"rel {r:.2e}")
        cmp_params(f"fit({tag}) params == cpu", res[tag][1], res["cpu"][1], 1e-4)


@case
def fit_resume_across_devices():
    """train 2 epochs on DEV, ModelCheckpoint each epoch; load the epoch-1 file on the other device and continue."""
    other = "cpu" if DEV != "cpu" else "cpu"
    def build(dev):
        return mpscy.Engine(mnet(), optimizer=optim.Adam(3e-3), batch_size=64, device=dev, seed=1)
    xi, yi = mpscy.datasets.load_digits(images=True)
    full = build(DEV)
    h = full.fit(xi, yi, epochs=4, verbose=0,
                 callbacks=[callbacks.ModelCheckpoint(str(TMP / "ep{epoch:02d}.mpscy"))])
    files = sorted(p.name for p in TMP.glob("ep*.mpscy"))
    info(f"checkpoint files {files}")
    for dev in (DEV, other):
        e = mpscy.load(str(TMP / "ep02.mpscy"), device=dev)
        h2 = e.fit(xi, yi, epochs=4, initial_epoch=e.epoch, verbose=0)
        r = rel(h2.history["loss"], h.history["loss"][2:])
        check(f"resume epoch-2 checkpoint (from {DEV}) on {dev}: losses", r < 1e-4,
              f"rel {r:.2e}: {np.round(h2.history['loss'], 6).tolist()} vs {np.round(h.history['loss'][2:], 6).tolist()}")
        cmp_params(f"resume on {dev}: params == uninterrupted {DEV} run", e.get_parameters(), full.get_parameters(), 1e-4, fro=True)


done()
