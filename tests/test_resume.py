"""Resumable optimizer state: an engine rebuilt from parameters + optimizer state taken after 20
steps reproduces the next 50 steps of the uninterrupted run bit for bit (losses and parameters),
for every optimizer; get/set round-trips; bad state is rejected before anything is written."""
import copy

import numpy as np
import pytest

import mpscy
from mpscy import optim

from optim_ref import CASES, digits_batches, mlp

OPTIMIZERS = {name: case[0] for name, case in CASES.items()}
OPTIMIZERS["lbfgs"] = optim.LBFGS(lr=0.5, max_iter=3, history_size=4)
OPTIMIZERS["lbfgs_strong_wolfe"] = optim.LBFGS(max_iter=3, history_size=4, line_search_fn="strong_wolfe", weight_decay=1e-3)


def _engine(opt, device, seed=7):
    return mpscy.Engine(mlp(), optimizer=opt, batch_size=32, device=device, seed=seed)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_after_20_steps_is_bitwise(device, name):
    opt = OPTIMIZERS[name]
    batches = digits_batches(32, 70)
    full = _engine(opt, device)
    losses = [full.step(x, y).loss for x, y in batches]

    first = _engine(opt, device)
    for x, y in batches[:20]:
        first.step(x, y)
    params, state = first.get_parameters(), copy.deepcopy(first.get_optimizer_state())
    assert state["step"] == 20 or name.startswith("lbfgs")
    first.close()

    resumed = _engine(opt, device, seed=99)          # other initial weights, overwritten below
    resumed.set_parameters(params)
    resumed.set_optimizer_state(state)
    again = [resumed.step(x, y).loss for x, y in batches[20:]]
    assert again == losses[20:]
    for k, v in full.get_parameters().items():
        np.testing.assert_array_equal(resumed.get_parameters()[k], v)
    s1, s2 = full.get_optimizer_state(), resumed.get_optimizer_state()
    assert s1.keys() == s2.keys() and s1["step"] == s2["step"]


@pytest.mark.parametrize("name", ["sgd_dampening", "adamw_amsgrad", "nadam", "lbfgs_strong_wolfe"])
def test_state_round_trips(name):
    e = _engine(OPTIMIZERS[name], "cpu")
    for x, y in digits_batches(32, 3):
        e.step(x, y)
    s = e.get_optimizer_state()
    other = _engine(OPTIMIZERS[name], "cpu", seed=1)
    other.set_optimizer_state(s)
    t = other.get_optimizer_state()
    assert s.keys() == t.keys()
    for k in s:
        a, b = s[k], t[k]
        if isinstance(a, dict):
            for p in a:
                np.testing.assert_array_equal(a[p], b[p])
        elif isinstance(a, list):
            assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))
        else:
            np.testing.assert_array_equal(a, b)


def test_bad_state_is_rejected_before_writing():
    e = _engine(optim.Adam(), "cpu")
    for x, y in digits_batches(32, 2):
        e.step(x, y)
    good = e.get_optimizer_state()
    bad_shape = copy.deepcopy(good)
    bad_shape["exp_avg_sq"]["dense_2.bias"] = np.zeros(3, np.float32)
    bad_step = dict(good, step=-1)
    with pytest.raises(mpscy.ShapeError, match="dense_2.bias"):
        e.set_optimizer_state(bad_shape)
    with pytest.raises(mpscy.InvalidArgumentError, match="step"):
        e.set_optimizer_state(bad_step)
    with pytest.raises(mpscy.InvalidArgumentError, match="missing"):
        e.set_optimizer_state({"step": 1})
    sgd_state = _engine(optim.SGD(momentum=0.9), "cpu").get_optimizer_state()
    with pytest.raises(mpscy.InvalidArgumentError, match="unexpected"):
        e.set_optimizer_state(sgd_state)
    after = e.get_optimizer_state()
    assert after["step"] == 2
    for slot in ("exp_avg", "exp_avg_sq"):
        for p in good[slot]:
            np.testing.assert_array_equal(after[slot][p], good[slot][p])


def test_bad_lbfgs_state_is_rejected():
    e = _engine(optim.LBFGS(history_size=2, max_iter=3), "cpu")
    x, y = digits_batches(32, 1)[0]
    for _ in range(3):
        e.step(x, y)
    good = e.get_optimizer_state()
    too_long = dict(good, old_dirs=good["old_dirs"] * 2, old_stps=good["old_stps"] * 2, ro=good["ro"] * 2)
    with pytest.raises(mpscy.InvalidArgumentError, match="history_size"):
        e.set_optimizer_state(too_long)
    with pytest.raises(mpscy.InvalidArgumentError, match="one length"):
        e.set_optimizer_state(dict(good, ro=good["ro"][:1]))
    with pytest.raises(mpscy.ShapeError, match="prev_flat_grad"):
        e.set_optimizer_state(dict(good, prev_flat_grad=np.zeros(3, np.float32)))
    after = e.get_optimizer_state()
    np.testing.assert_array_equal(after["d"], good["d"])
    assert after["n_iter"] == good["n_iter"] and len(after["old_dirs"]) == len(good["old_dirs"])
