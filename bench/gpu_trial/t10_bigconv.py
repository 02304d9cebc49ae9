"""A VGG-sized convolution whose im2col columns pass 2^31 elements at the built batch (sub-batch path) vs torch."""
import os
os.environ.setdefault("MPSCY_CUDA_VERBOSE", "1")
from common import *
import torch.nn as nn
import torch.nn.functional as F


@case
def vgg_conv_sub_batches():
    if DEV != "cuda":
        B, C, H = 4, 8, 32   # tiny stand-in on cpu
    else:
        B, C, H = 80, 64, 224  # columns 64*9*224*224*80 = 2.31e9 > 2^31 - 1
    rng = np.random.default_rng(10)
    torch.manual_seed(0)
    conv = nn.Conv2d(C, 64, 3, padding=1)
    fc = nn.Linear(64, 10)
    sd = {"c.weight": conv.weight.detach().numpy().copy(), "c.bias": conv.bias.detach().numpy().copy(),
          "d.weight": fc.weight.detach().numpy().copy(), "d.bias": fc.bias.detach().numpy().copy()}
    conv, fc = conv.to(TDEV), fc.to(TDEV)
    t = time.time()
    e = mpscy.Engine(mpscy.Sequential([L.Conv2D(64, 3, padding=1, name="c"), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(10, name="d")],
                                      input_shape=(C, H, H)), batch_size=B, device=DEV, optimizer=optim.SGD(0.1))
    e.set_parameters(sd)
    info(f"built in {time.time() - t:.1f}s, bytes_in_use {e.stats()['bytes_in_use'] / 2**30:.2f} GiB")
    x = rng.standard_normal((B, C, H, H), dtype=np.float32)
    y = rng.integers(0, 10, B)
    tx = torch.from_numpy(x).to(TDEV)
    ty = torch.from_numpy(y).to(TDEV)
    out = fc(F.relu(conv(tx)).mean((2, 3)))
    loss = F.cross_entropy(out, ty)
    loss.backward()
    t = time.time()
    g = e.gradients(x, y)
    info(f"gradients() {time.time() - t:.2f}s")
    check("sub-batched conv: loss == torch", abs(g["loss"] - loss.item()) < 1e-5 * loss.item(), f"{g['loss']:.7f} vs {loss.item():.7f}")
    for k, p in (("c.weight", conv.weight), ("c.bias", conv.bias), ("d.weight", fc.weight)):
        r = frel(g[k], p.grad.cpu().numpy())
        check(f"sub-batched conv: grad {k} == torch", r < 1e-4, f"fro-rel {r:.2e}")
    with torch.no_grad():
        ref = out.detach().cpu().numpy()
    p = e.predict(x[:B // 2 + 3])
    check("sub-batched conv: predict == torch", rel(p, ref[:B // 2 + 3]) < 1e-5, f"rel {rel(p, ref[:B // 2 + 3]):.2e}")
    r = e.step(x, y)
    r2 = e.step(x[:B - 7], y[:B - 7])
    check("sub-batched conv: full and partial steps finite", np.isfinite(r.loss) and np.isfinite(r2.loss), f"{r.loss:.5f} {r2.loss:.5f}")


done()
