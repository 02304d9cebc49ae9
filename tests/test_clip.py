"""Gradient clipping inside the native step: by global L2 norm (torch.nn.utils.clip_grad_norm_'s
formula), by value, and both (norm first). The update after clipping equals the reference update
with the clipped gradient; StepResult.grad_norm is the norm before clipping."""
import numpy as np
import pytest

import mpscy
from mpscy import layers, optim

from optim_ref import RefAdam, RefSGD, digits_batches, max_rel_err, mlp


def _clip(g, max_norm=None, max_value=None):
    """Reference clipping of a dict of float64 gradients; returns (clipped, norm before)."""
    norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values())))
    out = {k: v.astype(np.float64) for k, v in g.items()}
    if max_norm is not None:
        coef = min(1.0, max_norm / (norm + 1e-6))
        out = {k: v * coef for k, v in out.items()}
    if max_value is not None:
        out = {k: np.clip(v, -max_value, max_value) for k, v in out.items()}
    return out, norm


def _pair(opt, device, **clip):
    """An engine that clips and one (same weights) that reads gradients without updating."""
    kw = dict(loss="sparse_cross_entropy", batch_size=32, device=device, seed=4)
    return mpscy.Engine(mlp(), optimizer=opt, **kw, **clip), mpscy.Engine(mlp(), optimizer=optim.SGD(), **kw)


@pytest.mark.parametrize("clip", [dict(clip_grad_norm=0.05), dict(clip_grad_value=2e-3),
                                  dict(clip_grad_norm=0.05, clip_grad_value=1e-3), dict(clip_grad_norm=1e3)])
@pytest.mark.parametrize("which", ["sgd_momentum", "adam"])
def test_update_uses_the_clipped_gradient(device, clip, which):
    opt, ref = {"sgd_momentum": (optim.SGD(lr=0.1, momentum=0.9), RefSGD(lr=0.1, momentum=0.9)),
                "adam": (optim.Adam(lr=1e-2, weight_decay=1e-3), RefAdam(lr=1e-2, weight_decay=1e-3))}[which]
    e, probe = _pair(opt, device, **clip)
    clipped_any = False
    for x, y in digits_batches(32, 5):
        probe.set_parameters(e.get_parameters())
        g = {k: v for k, v in probe.gradients(x, y).items() if k != "loss"}
        cg, norm = _clip(g, clip.get("clip_grad_norm"), clip.get("clip_grad_value"))
        clipped_any |= any(not np.allclose(cg[k], g[k], rtol=0, atol=0) for k in g)
        p = {k: v.astype(np.float64) for k, v in e.get_parameters().items()}
        ref.step(p, cg)                          # the reference update from the same point
        r = e.step(x, y)
        assert r.grad_norm == pytest.approx(norm, rel=1e-6)     # before clipping
        assert max_rel_err(e.get_parameters(), p) <= 1e-6
    assert clipped_any == (clip != dict(clip_grad_norm=1e3))


def test_large_model_threaded_norm_clip_and_update(device):
    """76,810 parameters: past the sizes (65,536 and 32,768) from which the cpu backend splits the
    gradient norm and the optimizer update over its worker threads, which the 1,210-parameter MLP
    of every other optimizer test never reaches. grad_norm, the clipped update and every element
    of it equal the reference from the same point, step after step."""
    def big():
        return mpscy.Sequential([layers.Dense(1024), layers.Tanh(), layers.Dense(10)], input_shape=(64,))

    kw = dict(loss="sparse_cross_entropy", batch_size=32, device=device, seed=4)
    e = mpscy.Engine(big(), optimizer=optim.Adam(lr=1e-2), clip_grad_norm=0.05, **kw)
    probe = mpscy.Engine(big(), optimizer=optim.SGD(), **kw)
    assert sum(v.size for v in e.get_parameters().values()) == 76810
    ref = RefAdam(lr=1e-2)
    for x, y in digits_batches(32, 3):
        probe.set_parameters(e.get_parameters())
        g = {k: v for k, v in probe.gradients(x, y).items() if k != "loss"}
        cg, norm = _clip(g, 0.05)
        assert norm > 0.05                                      # clipping is active
        p = {k: v.astype(np.float64) for k, v in e.get_parameters().items()}
        ref.step(p, cg)
        r = e.step(x, y)
        assert r.grad_norm == pytest.approx(norm, rel=1e-6)
        assert max_rel_err(e.get_parameters(), p) <= 1e-5     # a skipped element is off by ~1e-1


def test_clipping_changes_the_update(device):
    """Without clipping the same steps land elsewhere: clipping is really applied."""
    x, y = digits_batches(32, 1)[0]
    a, _ = _pair(optim.SGD(lr=0.5), device, clip_grad_norm=0.01)
    b, _ = _pair(optim.SGD(lr=0.5), device)
    p0 = a.get_parameters()
    ra, rb = a.step(x, y), b.step(x, y)
    assert ra.grad_norm == rb.grad_norm > 0.01
    moved_a = np.sqrt(sum(((a.get_parameters()[k] - p0[k]).astype(np.float64) ** 2).sum() for k in p0))
    assert moved_a == pytest.approx(0.5 * 0.01 * ra.grad_norm / (ra.grad_norm + 1e-6), rel=1e-4)
    assert max_rel_err(a.get_parameters(), b.get_parameters()) > 1e-3


def test_reference_clipping_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    g = {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=3)}
    for max_norm, max_value in ((1.0, None), (None, 0.3), (2.0, 0.5)):
        ts = [torch.zeros(v.shape, dtype=torch.float64, requires_grad=True) for v in g.values()]
        for t, v in zip(ts, g.values()):
            t.grad = torch.tensor(v)
        if max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        if max_value is not None:
            torch.nn.utils.clip_grad_value_(ts, max_value)
        cg, norm = _clip(g, max_norm, max_value)
        if max_norm is not None:
            assert norm == pytest.approx(float(total), rel=1e-12)
        for t, k in zip(ts, g):
            np.testing.assert_allclose(t.grad.numpy(), cg[k], rtol=1e-12)


def test_bad_clip_values():
    for kw in (dict(clip_grad_norm=0), dict(clip_grad_value=-1.0)):
        with pytest.raises(mpscy.InvalidArgumentError, match="clip_grad"):
            mpscy.Engine(mlp(), optimizer=optim.SGD(), batch_size=4, device="cpu", **kw)
