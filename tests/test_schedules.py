"""Learning-rate schedules: each against its closed form over 100 steps (and against
torch.optim.lr_scheduler when torch is installed), shown to change the native parameter updates
exactly as setting the same rates by hand does, and resumable through state_dict()."""
import math
import re
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import callbacks, data, layers, optim
from mpscy.optim import schedules as S

from optim_ref import digits_batches, mlp

BASE = 0.1
STEPS = 100


def _engine(opt=None, device="cpu"):
    return mpscy.Engine(mlp(), optimizer=opt or optim.SGD(lr=BASE, momentum=0.9), batch_size=16,
                        device=device, seed=5)


def _cos(base, eta, e, T):
    return eta + (base - eta) * (1 + math.cos(math.pi * e / T)) / 2


def _sgdr(e, T0, mult, eta):
    T, start = T0, 0
    while e >= start + T:
        start, T = start + T, T * mult
    return _cos(BASE, eta, e - start, T)


def _one_cycle(e, total, max_lr, pct, div, final_div, lo_m, hi_m):
    init, low = max_lr / div, max_lr / div / final_div
    up = pct * total - 1
    if e <= up:
        p = e / up
        return _ann(init, max_lr, p), _ann(hi_m, lo_m, p)
    p = (e - up) / (total - 1 - up)
    return _ann(max_lr, low, p), _ann(lo_m, hi_m, p)


def _three_phase_linear(e):
    """max_lr 0.3, 105 steps, pct_start 0.4, div 10, final_div 100, momentum 0.8..0.9."""
    init, top, low = 0.03, 0.3, 0.0003
    ends = [0.4 * 105 - 1, 2 * 0.4 * 105 - 2, 104]
    phases = [(0.0, ends[0], init, top, 0.9, 0.8), (ends[0], ends[1], top, init, 0.8, 0.9),
              (ends[1], ends[2], init, low, 0.9, 0.9)]
    for start, end, l0, l1, m0, m1 in phases:
        if e <= end or end == ends[2]:
            p = (e - start) / (end - start)
            return l0 + (l1 - l0) * p, m0 + (m1 - m0) * p


def _ann(a, b, p):
    return b + (a - b) / 2 * (math.cos(math.pi * p) + 1)


# name -> (builder(engine), closed form lr(epoch), closed form momentum(epoch) or None, torch builder)
CASES = {
    "step": (lambda e: S.StepLR(e, step_size=3, gamma=0.5),
             lambda k: BASE * 0.5 ** (k // 3), None,
             lambda t, o: t.StepLR(o, step_size=3, gamma=0.5)),
    "multistep": (lambda e: S.MultiStepLR(e, milestones=[60, 10, 30, 30], gamma=0.3),
                  lambda k: BASE * 0.3 ** sum(m <= k for m in (10, 30, 30, 60)), None,
                  lambda t, o: t.MultiStepLR(o, milestones=[60, 10, 30, 30], gamma=0.3)),
    "exponential": (lambda e: S.ExponentialLR(e, gamma=0.97),
                    lambda k: BASE * 0.97 ** k, None,
                    lambda t, o: t.ExponentialLR(o, gamma=0.97)),
    "cosine": (lambda e: S.CosineAnnealingLR(e, T_max=40, eta_min=1e-3),
               lambda k: _cos(BASE, 1e-3, k, 40), None,
               lambda t, o: t.CosineAnnealingLR(o, T_max=40, eta_min=1e-3)),
    "warm_restarts": (lambda e: S.CosineAnnealingWarmRestarts(e, T_0=7, T_mult=2, eta_min=1e-3),
                      lambda k: _sgdr(k, 7, 2, 1e-3), None,
                      lambda t, o: t.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=1e-3)),
    "warmup": (lambda e: S.LinearWarmup(e, warmup_steps=10, start_factor=0.1),
               lambda k: BASE * (0.1 + 0.9 * min(k, 10) / 10), None,
               lambda t, o: t.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10)),
    "warmup_then_cosine": (lambda e: S.LinearWarmup(e, 10, 0.1, then=S.CosineAnnealingLR(e, T_max=90, eta_min=1e-3)),
                           lambda k: BASE * (0.1 + 0.09 * k) if k < 10 else _cos(BASE, 1e-3, k - 10, 90), None,
                           lambda t, o: t.SequentialLR(o, [t.LinearLR(o, 0.1, 1.0, 10), t.CosineAnnealingLR(o, 90, 1e-3)], [10])),
    "one_cycle": (lambda e: S.OneCycleLR(e, max_lr=0.2, total_steps=STEPS + 1),
                  lambda k: _one_cycle(k, STEPS + 1, 0.2, 0.3, 25.0, 1e4, 0.85, 0.95)[0],
                  lambda k: _one_cycle(k, STEPS + 1, 0.2, 0.3, 25.0, 1e4, 0.85, 0.95)[1],
                  lambda t, o: t.OneCycleLR(o, max_lr=0.2, total_steps=STEPS + 1)),
    "one_cycle_options": (lambda e: S.OneCycleLR(e, max_lr=0.3, epochs=5, steps_per_epoch=21, pct_start=0.4,
                                                 anneal_strategy="linear", base_momentum=0.8, max_momentum=0.9,
                                                 div_factor=10.0, final_div_factor=100.0, three_phase=True),
                          lambda k: _three_phase_linear(k)[0], lambda k: _three_phase_linear(k)[1],
                          lambda t, o: t.OneCycleLR(o, max_lr=0.3, epochs=5, steps_per_epoch=21, pct_start=0.4,
                                                    anneal_strategy="linear", base_momentum=0.8, max_momentum=0.9,
                                                    div_factor=10.0, final_div_factor=100.0, three_phase=True)),
}


def _run(sched, engine, steps=STEPS):
    lrs, moms = [engine.learning_rate], [engine.momentum]
    assert sched.get_last_lr() == engine.learning_rate
    for _ in range(steps):
        sched.step()
        assert sched.get_last_lr() == engine.learning_rate
        lrs.append(engine.learning_rate)
        moms.append(engine.momentum)
    return np.array(lrs), np.array(moms)


@pytest.mark.parametrize("case", sorted(CASES))
def test_closed_form(case):
    build, lr_of, mom_of, _ = CASES[case]
    e = _engine()
    lrs, moms = _run(build(e), e)
    want = np.array([lr_of(k) for k in range(STEPS + 1)])
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=0)
    assert len(set(np.round(lrs, 12))) > 3          # the rate really changes
    if mom_of is not None:
        np.testing.assert_allclose(moms, [mom_of(k) for k in range(STEPS + 1)], rtol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch(case):
    torch = pytest.importorskip("torch")
    build, _, _, tbuild = CASES[case]
    e = _engine()
    lrs, moms = _run(build(e), e)
    w = torch.zeros(1, requires_grad=True)
    o = torch.optim.SGD([w], lr=BASE, momentum=0.9)
    ts = tbuild(torch.optim.lr_scheduler, o)
    tl, tm = [o.param_groups[0]["lr"]], [o.param_groups[0]["momentum"]]
    for _ in range(STEPS):
        o.step()
        ts.step()
        tl.append(o.param_groups[0]["lr"])
        tm.append(o.param_groups[0]["momentum"])
    np.testing.assert_allclose(lrs, tl, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(moms, tm, rtol=1e-12)


def test_one_cycle_cycles_beta1_of_adam():
    e = _engine(optim.Adam(lr=1e-3, betas=(0.9, 0.98)))
    s = S.OneCycleLR(e, max_lr=0.01, total_steps=50)
    betas = [e.betas]
    for _ in range(49):
        s.step()
        betas.append(e.betas)
    b1 = [b[0] for b in betas]
    assert b1[0] == pytest.approx(0.95) and min(b1) == pytest.approx(0.85, abs=1e-3)
    assert all(b[1] == pytest.approx(0.98) for b in betas)
    with pytest.raises(mpscy.InvalidArgumentError, match="total_steps"):
        s.step()
        s.step()
    with pytest.raises(mpscy.InvalidArgumentError, match="momentum"):
        S.OneCycleLR(_engine(optim.Adagrad()), max_lr=0.1, total_steps=10)
    S.OneCycleLR(_engine(optim.Adagrad()), max_lr=0.1, total_steps=10, cycle_momentum=False)


def test_reduce_on_plateau_closed_form():
    """min mode, rel threshold 10%, patience 2, cooldown 1, factor 0.5, min_lr 0.02."""
    e = _engine()
    s = S.ReduceLROnPlateau(e, factor=0.5, patience=2, threshold=0.1, cooldown=1, min_lr=0.02)
    assert e.learning_rate == BASE
    metrics = [10, 8, 7.5, 7.4, 7.3, 7.2, 7.1, 7.0, 6.9, 6.8, 6.0, 5.9, 5.8, 5.7, 5.6, 5.5, 5.4, 5.3]
    # best 10 -> 8; 7.5, 7.4, 7.3 are bad (not below 8 * 0.9): the third exceeds patience,
    # lr 0.05 at index 4; cooldown swallows index 5; 7.1 < 7.2 is the new best; 7.0, 6.9, 6.8
    # bad: lr 0.025 at index 9; 6.0 best; 5.9, 5.8, 5.7 bad: max(0.0125, min_lr) = 0.02 at
    # index 13; cooldown 14; 5.5, 5.4 bad; 5.3 < 5.4 is the new best.
    want = [0.1] * 4 + [0.05] * 5 + [0.025] * 4 + [0.02] * 5
    got = []
    for m in metrics:
        s.step(m)
        got.append(e.learning_rate)
        assert s.get_last_lr() == e.learning_rate
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_reduce_on_plateau_modes_thresholds_and_eps_closed_form():
    """Mode "max", threshold_mode "abs" and eps by hand (the torch comparison skips without
    torch). max/abs 0.05: 1.04 is not above best 1.0 + 0.05, 1.06 is; 1.22 and 1.24 are not above
    1.2 + 0.05 (patience 1: the second cuts). max/rel 0.1: 2.1 is not above 2.0 * 1.1 (patience 0:
    cut), 2.3 is. min/abs 0.5: 9.6 is not below 10 - 0.5 (cut), 9.0 is (and rel 0.5 would refuse
    it). eps 0.03: the cut 0.05 -> 0.025 is smaller than eps, so it is skipped."""
    def run(metrics, **kw):
        e = _engine()
        s = S.ReduceLROnPlateau(e, factor=0.5, **kw)
        return [s.step(m) or e.learning_rate for m in metrics]
    np.testing.assert_allclose(run([1.0, 1.04, 1.06, 1.2, 1.22, 1.24, 1.3], mode="max", threshold_mode="abs",
                                   threshold=0.05, patience=1), [0.1] * 5 + [0.05] * 2, rtol=1e-15)
    np.testing.assert_allclose(run([2.0, 2.1, 2.3, 2.3], mode="max", threshold=0.1, patience=0),
                               [0.1, 0.05, 0.05, 0.025], rtol=1e-15)
    np.testing.assert_allclose(run([10.0, 9.6, 9.0, 8.9], mode="min", threshold_mode="abs", threshold=0.5, patience=0),
                               [0.1, 0.05, 0.05, 0.025], rtol=1e-15)
    np.testing.assert_allclose(run([1.0, 1.0, 1.0, 1.0], patience=0, eps=0.03), [0.1, 0.05, 0.05, 0.05], rtol=1e-15)


@pytest.mark.parametrize("kw", [dict(mode="max", threshold_mode="abs", threshold=0.05, patience=3, factor=0.7),
                                dict(mode="min", threshold_mode="abs", threshold=0.01, cooldown=2, patience=1, min_lr=0.03),
                                dict(mode="max", threshold_mode="rel", threshold=0.02, eps=0.003, factor=0.9, patience=0)])
def test_reduce_on_plateau_matches_torch(kw):
    torch = pytest.importorskip("torch")
    metrics = np.random.default_rng(1).normal(size=STEPS).cumsum() * 0.1
    e = _engine()
    s = S.ReduceLROnPlateau(e, **kw)
    w = torch.zeros(1, requires_grad=True)
    o = torch.optim.SGD([w], lr=BASE)
    ts = torch.optim.lr_scheduler.ReduceLROnPlateau(o, **kw)
    for m in metrics:
        s.step(m)
        ts.step(m)
        assert e.learning_rate == o.param_groups[0]["lr"]
    assert e.learning_rate < BASE


@pytest.mark.parametrize("case", sorted(CASES) + ["plateau"])
def test_schedule_drives_the_native_updates(device, case):
    """A scheduled run equals, bit for bit, a run whose rate (and momentum) are set by hand to
    the schedule's values before each step, and differs from a constant-rate run."""
    batches = digits_batches(16, 12)
    metrics = [5, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 3]
    if case == "plateau":
        def build(e):
            return S.ReduceLROnPlateau(e, factor=0.5, patience=1)
    else:
        build = CASES[case][0]
    a, b, c = _engine(device=device), _engine(device=device), _engine(device=device)
    sched = build(a)
    ref_engine = _engine()                # a schedule holds its engine weakly: keep it alive
    ref_sched = build(ref_engine)         # the same values, computed on a separate engine
    values = [(ref_sched.engine.learning_rate, ref_sched.engine.momentum)]
    for m in metrics[:len(batches)]:
        ref_sched.step(m) if case == "plateau" else ref_sched.step()
        values.append((ref_sched.engine.learning_rate, ref_sched.engine.momentum))
    assert len({v[0] for v in values}) >= 2          # the rate changes within the run
    for (x, y), (lr, mom), m in zip(batches, values, metrics):
        a.step(x, y)
        sched.step(m) if case == "plateau" else sched.step()
        b.learning_rate, b.momentum = lr, mom
        b.step(x, y)
        c.step(x, y)
    pa, pb, pc = a.get_parameters(), b.get_parameters(), c.get_parameters()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    assert max(np.abs(pa[k] - pc[k]).max() for k in pa) > 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_resumes(case):
    build = CASES[case][0]
    e1 = _engine()
    s1 = build(e1)
    for _ in range(37):
        s1.step()
    state = s1.state_dict()
    assert "engine" not in state
    e2 = _engine()
    s2 = build(e2)
    s2.load_state_dict(state)
    assert (e2.learning_rate, e2.momentum) == (e1.learning_rate, e1.momentum)
    for _ in range(20):
        s1.step()
        s2.step()
        assert (e2.learning_rate, e2.momentum) == (e1.learning_rate, e1.momentum)
    with pytest.raises(mpscy.InvalidArgumentError, match="lacks"):
        s2.load_state_dict({"no_such_field": 1})


def test_plateau_state_dict_resumes():
    e1, e2 = _engine(), _engine()
    s1 = S.ReduceLROnPlateau(e1, patience=1, factor=0.5)
    for m in (3, 2, 2, 2, 2):
        s1.step(m)
    s2 = S.ReduceLROnPlateau(e2, patience=1, factor=0.5)
    s2.load_state_dict(s1.state_dict())
    assert e2.learning_rate == e1.learning_rate == BASE * 0.5     # 2, 2 after best 2: one cut
    for m in (2, 2, 1, 1, 1):
        s1.step(m)
        s2.step(m)
        assert e2.learning_rate == e1.learning_rate


def test_bad_arguments():
    e = _engine()
    with pytest.raises(mpscy.InvalidArgumentError, match="step_size"):
        S.StepLR(e, step_size=0)
    with pytest.raises(mpscy.InvalidArgumentError, match="Engine"):
        S.StepLR(object(), step_size=2)
    with pytest.raises(mpscy.InvalidArgumentError, match="factor"):
        S.ReduceLROnPlateau(e, factor=1.0)
    with pytest.raises(mpscy.InvalidArgumentError, match="then"):
        S.LinearWarmup(e, 5, then=S.ReduceLROnPlateau(e))
    with pytest.raises(mpscy.InvalidArgumentError, match="total_steps"):
        S.OneCycleLR(e, max_lr=0.1)


def test_warm_restarts_fractional_epochs_match_torch():
    torch = pytest.importorskip("torch")
    e = _engine()
    s = S.CosineAnnealingWarmRestarts(e, T_0=5, T_mult=3, eta_min=0.01)
    w = torch.zeros(1, requires_grad=True)
    o = torch.optim.SGD([w], lr=BASE)
    ts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=3, eta_min=0.01)
    for epoch in np.arange(0, 60, 0.37):
        s.step(float(epoch))
        with warnings.catch_warnings():       # torch deprecates step(epoch); mpscy keeps it
            warnings.simplefilter("ignore")
            ts.step(float(epoch))
        assert e.learning_rate == pytest.approx(o.param_groups[0]["lr"], rel=1e-12)
    with pytest.raises(mpscy.InvalidArgumentError, match="epoch"):
        s.step(-1.0)


def test_a_step_past_the_end_changes_nothing():
    """A OneCycleLR stepped past total_steps raises (as torch) and leaves its position, its state
    and the engine's rate and momentum as they were (torch advances last_epoch anyway); so does
    the same OneCycleLR as a LinearWarmup's `then`."""
    for composed in (False, True):
        e = _engine(optim.SGD(0.1, momentum=0.9))
        one = S.OneCycleLR(e, max_lr=1.0, total_steps=2)
        s = S.LinearWarmup(e, 1, then=one) if composed else one
        steps = 3 if composed else 2
        for _ in range(steps):
            s.step()
        before, lr, mom = s.state_dict(), e.learning_rate, e.momentum
        for _ in range(2):
            with pytest.raises(mpscy.InvalidArgumentError, match="total_steps is 2"):
                s.step()
        assert s.state_dict() == before and s.last_epoch == steps
        assert e.learning_rate == lr and e.momentum == mom


def test_a_refused_one_cycle_changes_nothing():
    """A OneCycleLR refused at construction leaves the engine as it was: it had recorded its
    initial rate (max_lr / div_factor) as the engine's initial rate first, so the next schedule
    built started from that instead of the engine's rate; a beta1 cycled to 1 had set the rate
    before it was refused; a phase of no steps raised ZeroDivisionError."""
    e = _engine(optim.Adagrad(lr=0.5))
    with pytest.raises(mpscy.InvalidArgumentError, match="momentum"):
        S.OneCycleLR(e, max_lr=10.0, total_steps=100)
    assert S.StepLR(e, step_size=10).base_lr == 0.5 and e.learning_rate == 0.5
    a = _engine(optim.Adam(lr=0.5))
    with pytest.raises(mpscy.InvalidArgumentError, match="below 1"):
        S.OneCycleLR(a, max_lr=1.0, total_steps=100, max_momentum=1.0)
    assert a.learning_rate == 0.5 and a.betas == (0.9, 0.999)
    g = _engine(optim.SGD(0.5, momentum=0.9))
    with pytest.raises(mpscy.InvalidArgumentError, match="without steps"):
        S.OneCycleLR(g, max_lr=1.0, total_steps=10, pct_start=0.1)     # phase 1 ends at step 0
    assert S.ExponentialLR(g, gamma=0.5).base_lr == 0.5 and g.momentum == 0.9


def test_linear_one_cycle_takes_its_last_step():
    """torch's usage, scheduler.step() after each of total_steps training steps, ends with a
    step at total_steps, where the linear anneal extrapolates below 0 (never used): the engine's
    rate is 0 there instead of a refusal (which had stopped fit on its last batch), every earlier
    rate is torch's formula, and one more step is refused."""
    e = _engine(optim.SGD(0.1, momentum=0.9))
    s = S.OneCycleLR(e, max_lr=1.0, total_steps=10, anneal_strategy="linear")
    rates = [e.learning_rate]
    for _ in range(10):
        s.step()
        rates.append(e.learning_rate)
    init, low = 1.0 / 25, 1.0 / 25 / 1e4
    up = [init + (1.0 - init) * t / 2.0 for t in range(3)]          # phase 1 ends at 0.3 * 10 - 1 = 2
    down = [1.0 + (low - 1.0) * (t - 2) / 7.0 for t in range(3, 10)]  # phase 2 ends at 9
    assert rates[:10] == pytest.approx(up + down, rel=1e-12) and rates[10] == 0.0
    assert 1.0 + (low - 1.0) * 8 / 7.0 < 0  # what torch sets at step 10
    with pytest.raises(mpscy.InvalidArgumentError, match="total_steps is 10"):
        s.step()
    x, y = np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32), np.zeros(12, np.int32)
    e2 = _engine(optim.SGD(0.1, momentum=0.9))
    e2.set_schedule(S.OneCycleLR(e2, max_lr=1.0, epochs=3, steps_per_epoch=2, anneal_strategy="linear"), per="step")
    h = e2.fit(x, y, epochs=3, batch_size=6, verbose=0)
    assert len(h.history["loss"]) == 3 and e2.learning_rate == 0.0


def test_linear_one_cycle_of_adam_takes_its_last_step():
    """The same last step with beta1 cycled: the linear anneal extrapolates beta1 past
    max_momentum (0.99 + 0.14 / 14 = 1.0 here), which the engine refuses, so fit stopped with
    InvalidArgumentError after its last batch (and the schedule had moved and set the rate
    but not beta1). beta1 stays at max_momentum there instead; every earlier value is torch's."""
    x, y = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32), np.zeros(40, np.int32)
    e = _engine(optim.Adam(1e-3))
    s = S.OneCycleLR(e, max_lr=0.1, epochs=2, steps_per_epoch=10, anneal_strategy="linear", max_momentum=0.99)
    e.set_schedule(s, per="step")
    h = e.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert len(h.history["loss"]) == 2 and s.last_epoch == 20
    assert e.learning_rate == 0.0 and e.betas[0] == 0.99
    ramp = [0.99 + (0.85 - 0.99) * k / 5 for k in range(6)] + [0.85 + 0.14 * (k - 5) / 14 for k in range(6, 20)]
    assert [s.momentum_at(k) for k in range(20)] == pytest.approx(ramp, rel=1e-12)


def test_plateau_counts_a_nan_metric_as_no_improvement():
    """As torch: a NaN metric (a diverged validation loss) is a bad step, not an error; a
    non-number is refused by name."""
    e = _engine(optim.SGD(0.1))
    s = S.ReduceLROnPlateau(e, patience=1, factor=0.5)
    s.step(1.0)
    s.step(float("nan"))
    assert e.learning_rate == 0.1 and s.num_bad_epochs == 1 and s.best == 1.0
    s.step(float("nan"))
    assert e.learning_rate == 0.05 and s.num_bad_epochs == 0
    with pytest.raises(mpscy.InvalidArgumentError, match="metric must be a number, got 'low'"):
        s.step("low")


@pytest.mark.parametrize("T_0, T_mult, restart", [(1, 3, 121), (1, 10, 111), (10, 3, 1210)])
def test_warm_restarts_under_warmup_restart_on_time(T_0, T_mult, restart):
    """LinearWarmup(then=CosineAnnealingWarmRestarts) is torch's SequentialLR, which steps the
    restarts recursively: at `restart` (a cycle's first step) the rate is back at base_lr. The
    closed form's float log (log(243, 3) = 4.999...) had put that step at the previous cycle's
    end, eta_min."""
    e = _engine()
    s = S.LinearWarmup(e, 1, then=S.CosineAnnealingWarmRestarts(e, T_0=T_0, T_mult=T_mult))
    for _ in range(restart + 1):        # warmup step 0, then the child's steps 0..restart
        s.step()
    assert e.learning_rate == pytest.approx(_sgdr(restart, T_0, T_mult, 0.0), rel=1e-12)
    assert e.learning_rate == pytest.approx(BASE, rel=1e-12)
    assert s.then.lr_at(restart) == pytest.approx(BASE, rel=1e-12)
    assert s.then.lr_at(restart - 0.5) < 1e-3 * BASE      # the end of the cycle before


def _plateau_rates(metrics, **kw):
    e = mpscy.Engine(mlp(), optimizer=optim.SGD(lr=0.1, momentum=0.9), batch_size=16, device="cpu", seed=5)
    s = S.ReduceLROnPlateau(e, factor=0.5, **kw)
    return [s.step(m) or e.learning_rate for m in metrics]


def test_reduce_on_plateau_cooldown_resets_bad_steps():
    """torch: while in cooldown, num_bad_epochs is set to 0 after every step. A constant metric,
    patience 1, cooldown 2: cuts at steps 3, 7, 11 (two bad steps after each cooldown of two);
    bad steps counted through the cooldown would cut at step 5 instead. No min_lr or eps to mask
    a cut."""
    got = _plateau_rates([1.0] * 11, patience=1, cooldown=2)
    want = [0.1, 0.1] + [0.05] * 4 + [0.025] * 4 + [0.0125]
    np.testing.assert_allclose(got, want, rtol=1e-15)


@pytest.mark.parametrize("mode,metrics", [("max", [10.0, 10.2, 10.4, 10.41]), ("min", [10.0, 9.8, 9.6, 9.59])])
def test_reduce_on_plateau_abs_threshold_is_additive_away_from_one(mode, metrics):
    """threshold_mode "abs" with best around 10 (where best * (1 +- t) and best +- t differ:
    10.5 vs 10.05): steps of 0.2 are improvements under threshold 0.05, the 0.01 step is not
    (patience 0: it cuts)."""
    got = _plateau_rates(metrics, mode=mode, threshold_mode="abs", threshold=0.05, patience=0)
    np.testing.assert_allclose(got, [0.1, 0.1, 0.1, 0.05], rtol=1e-15)


@pytest.mark.parametrize("make, match", [
    (lambda e: S.StepLR(e, 2, gamma=10**400), "gamma must be a number, got 1000"),
    (lambda e: S.StepLR(e, 2, gamma=float("inf")), "gamma must be a finite number, got inf"),
    (lambda e: S.ExponentialLR(e, gamma="x"), "gamma must be a number, got 'x'"),
    (lambda e: S.MultiStepLR(e, [2, float("inf")]), "milestones must be integers"),
    (lambda e: S.CosineAnnealingLR(e, T_max=10**400), "T_max must be a positive integer below 2\\*\\*31"),
    (lambda e: S.CosineAnnealingLR(e, T_max=10, eta_min=10**400), "eta_min must be a number"),
    (lambda e: S.CosineAnnealingWarmRestarts(e, T_0=10**400), "T_0 must be a positive integer below 2\\*\\*31"),
    (lambda e: S.LinearWarmup(e, 10**400), "warmup_steps must be a positive integer below 2\\*\\*31"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10, div_factor=0), "div_factor must be > 0, got 0.0"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10, final_div_factor=0),
     "final_div_factor must be > 0, got 0.0"),
    (lambda e: S.OneCycleLR(e, max_lr=10**400, total_steps=10), "max_lr must be a number"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10**400), "total_steps must be a positive integer below"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10, max_momentum=float("inf")),
     "max_momentum must be a finite number, got inf"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10, base_momentum=float("inf")),
     "base_momentum must be a finite number, got inf"),
    (lambda e: S.OneCycleLR(e, max_lr=0.1, total_steps=10, anneal_strategy=np.array(["cos"])),
     "anneal_strategy must be 'cos' or 'linear', got array"),
    (lambda e: S.ReduceLROnPlateau(e, mode=np.array(["min", "max"])), "mode must be 'min' or 'max', got array"),
    (lambda e: S.ReduceLROnPlateau(e, threshold_mode=np.array(["rel"])), "threshold_mode must be 'rel' or 'abs'"),
    (lambda e: S.ReduceLROnPlateau(e, min_lr=10**400), "min_lr must be a number"),
    (lambda e: S.StepLR(e, step_size=0), "step_size must be a positive integer"),
])
def test_a_refused_schedule_leaves_the_engine_as_it_was(make, match):
    """Options are checked before anything touches the engine: 10**400 had raised OverflowError,
    a div_factor of 0 ZeroDivisionError, an array mode NumPy's ambiguous truth value; an
    infinite momentum was refused only after the rate of step 0 was set; and every refused
    schedule had recorded the engine's rate as its initial rate, so the next schedule built
    started from that stale rate instead of the engine's."""
    e = _engine(optim.SGD(0.1, momentum=0.9))
    e.learning_rate, e.momentum = 0.001, 0.5
    with pytest.raises(mpscy.InvalidArgumentError, match=match):
        make(e)
    assert e.learning_rate == 0.001 and e.momentum == 0.5 and getattr(e, "_initial_lr", None) is None
    e.learning_rate = 0.25
    s = S.StepLR(e, step_size=10)
    assert s.base_lr == 0.25 and e.learning_rate == 0.25


def test_a_rate_that_overflows_is_refused_naming_the_schedule():
    """ExponentialLR(gamma=1.5) stepped past float32's range, which the native step computes in
    (a rate of 4e38 became inf there and the step wrote inf into every parameter), and past
    Python's (torch's rate becomes inf; Python's float power had raised a bare OverflowError):
    the step is refused naming the schedule, with its position and the engine's rate unchanged;
    a rate of 0 stays 0 (torch's repeated product), and MultiStepLR and StepLR refuse the same way."""
    e = _engine(optim.SGD(0.1, momentum=0.9))
    s = S.ExponentialLR(e, gamma=1.5)
    k = next(k for k in range(1, 3000) if _closed_pow(0.1, 1.5, k) > float(np.finfo(np.float32).max))
    for _ in range(k - 1):
        s.step()
    lr, state = e.learning_rate, s.state_dict()
    assert 1e38 < lr <= float(np.finfo(np.float32).max)
    for _ in range(2):
        with pytest.raises(mpscy.InvalidArgumentError,
                           match=rf"^ExponentialLR gives a learning rate of {re.escape(repr(s.lr_at(k)))} at step {k} \(base_lr "
                                 r"0.1\), which no step can use; the step is refused$"):
            s.step()
        assert e.learning_rate == lr and s.state_dict() == state and s.last_epoch == k - 1
    assert s.lr_at(k + 1600) == math.inf
    z = _engine(optim.SGD(0.0))
    zs = S.ExponentialLR(z, gamma=1.5)
    for _ in range(3000):
        zs.step()
    assert z.learning_rate == 0.0
    m = _engine(optim.SGD(0.1))
    ms = S.MultiStepLR(m, [1] * 2000, gamma=2.0)
    with pytest.raises(mpscy.InvalidArgumentError, match="^MultiStepLR gives a learning rate of inf at step 1"):
        ms.step()
    assert m.learning_rate == 0.1 and ms.last_epoch == 0


def _closed_pow(base, gamma, k):
    try:
        return base * gamma ** k
    except OverflowError:
        return math.inf


def test_string_options_given_as_arrays_are_refused_by_type():
    """ReduceLROnPlateau's mode (above), LBFGS's line_search_fn and GELU's approximate (kept
    here, with the schedules' option checks) compared an array with strings: NumPy's ambiguous
    truth value instead of the option's name."""
    with pytest.raises(mpscy.InvalidArgumentError, match="^GELU approximate must be 'none' or 'tanh', got array"):
        mpscy.layers.GELU(approximate=np.array(["none", "tanh"]))
    assert mpscy.layers.GELU(approximate="tanh").approximate == "tanh"
    with pytest.raises(mpscy.InvalidArgumentError, match="line_search_fn must be None or 'strong_wolfe', got array"):
        optim.LBFGS(line_search_fn=np.array(["strong_wolfe", "x"]))
    assert optim.LBFGS(line_search_fn="strong_wolfe").line_search_fn == "strong_wolfe"


def _rate_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_a_rate_changed_behind_a_schedule_is_warned_about_once():
    """torch's schedulers stepped together on one optimizer compound; here each sets its closed
    form's rate, so the last one stepped wins. A schedule whose rate was changed behind it (by
    another schedule, or an assignment) warns once when it steps over that change; one schedule
    alone, LinearWarmup handing over to its `then`, and ReduceLROnPlateau (which, as torch's,
    reduces whatever rate it finds) do not."""
    engine = _engine()
    a, b = S.ExponentialLR(engine, 0.9), S.StepLR(engine, 3, 0.5)

    def together():
        for _ in range(8):
            a.step()
            b.step()

    got = _rate_warnings(together)
    assert len(got) == 2, got
    assert got[0].startswith("StepLR.step(): the engine's learning rate is 0.09000000000000001, not the 0.1 this "
                             "schedule set last; another schedule, a restore or an assignment changed it")
    assert got[1].startswith("ExponentialLR.step(): ") and "compose them with LinearWarmup(then=...)" in got[1]

    engine = _engine()
    s = S.StepLR(engine, 2, 0.5)
    engine.learning_rate = 0.3

    def assigned():
        s.step()
        s.step()

    got = _rate_warnings(assigned)
    assert len(got) == 1 and "learning rate is 0.3, not the 0.1" in got[0], got
    assert engine.learning_rate == BASE * 0.5

    def alone():
        e = _engine()
        one = S.LinearWarmup(e, 3, then=S.CosineAnnealingWarmRestarts(e, T_0=4))
        for _ in range(12):
            one.step()
        plateau = S.ReduceLROnPlateau(e, patience=0)
        e.learning_rate = 0.05
        for k in range(4):
            plateau.step(1.0 + k)
        assert e.learning_rate == pytest.approx(0.05 * 0.1 ** 3)

    assert _rate_warnings(alone) == []


def test_the_override_warning_points_at_the_user_s_code_and_takes_any_schedule_class():
    """Raised inside fit (an attached schedule stepping over a LearningRateScheduler's rate), the
    warning names the line of the user's fit call, not mpscy's; and a schedule class defining
    __eq__ (so unhashable) steps and warns as any other (a WeakSet of warned schedules had raised
    TypeError on it)."""
    engine = _engine()
    engine.set_schedule(S.StepLR(engine, 1, 0.5))
    x, y = digits_batches(16, 1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(x, y, epochs=3, verbose=0, callbacks=[callbacks.LearningRateScheduler(lambda e, lr: lr * 0.9)])
    got = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(got) == 1 and got[0].filename == __file__ and "StepLR.step()" in str(got[0].message)

    class Half(S.Schedule):
        def __init__(self, engine):
            super().__init__(engine)
            self._start()

        def lr_at(self, k):
            return self.base_lr / (k + 1)

        def __eq__(self, other):
            return vars(self) == vars(other)

    engine = _engine()
    h = Half(engine)
    engine.learning_rate = 0.3
    got = _rate_warnings(lambda: (h.step(), h.step()))
    assert len(got) == 1 and got[0].startswith("Half.step(): ") and engine.learning_rate == BASE / 3


# ----------------------------------------------------------------------------- fit and a schedule's end
def test_steps_left_counts_to_a_schedule_s_end():
    """steps_left(): how many more step() calls a schedule with an end takes (OneCycleLR's
    total_steps, a LinearWarmup handing over to one: its warmup too), None without an end."""
    e = _engine()
    one = S.OneCycleLR(e, max_lr=1.0, total_steps=10)
    assert one.steps_left() == 10
    for _ in range(3):
        one.step()
    assert one.steps_left() == 7
    e = _engine()
    warm = S.LinearWarmup(e, 2, then=S.OneCycleLR(e, max_lr=1.0, total_steps=5))
    assert warm.steps_left() == 7
    for _ in range(7):
        warm.step()
    assert warm.steps_left() == 0
    with pytest.raises(mpscy.InvalidArgumentError, match="total_steps is 5"):
        warm.step()
    e = _engine()
    for s in (S.StepLR(e, 2), S.LinearWarmup(e, 3), S.CosineAnnealingLR(e, 4), S.ReduceLROnPlateau(e)):
        assert s.steps_left() is None


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 64)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _one_cycle_engine(total, per="step", model=None):
    e = mpscy.Engine(model or mlp(), optimizer=optim.SGD(lr=BASE, momentum=0.9), batch_size=16, device="cpu", seed=5)
    e.set_schedule(S.OneCycleLR(e, max_lr=0.5, total_steps=total), per=per)
    return e


_MORE = r"; OneCycleLR's total_steps counts every batch of every epoch, steps_per_epoch={}\): build it for this " \
        r"fit's steps, or fit fewer epochs$"


def test_a_torch_loader_s_steps_count_the_rows_its_sampler_draws():
    """Under BatchNorm a lone last row is left out: a torch DataLoader over a SubsetRandomSampler
    of 161 of a dataset's 200 rows yields 5 batches of 32 and one of 1 row, so 5 steps an epoch
    (the dataset's 200 rows counted 7 and refused a OneCycleLR of 2 x 5 steps); over 192 of 193
    rows, 6 steps (the dataset's 193 counted 6 - 1 and let a schedule of 10 run out mid-fit)."""
    torch = pytest.importorskip("torch")
    bn = lambda: mpscy.Sequential([layers.Dense(8), layers.BatchNorm(), layers.Dense(10)], input_shape=(64,))  # noqa: E731

    def engine(total):
        e = mpscy.Engine(bn(), optimizer=optim.SGD(lr=BASE, momentum=0.9), batch_size=32, device="cpu", seed=5)
        e.set_schedule(S.OneCycleLR(e, max_lr=0.5, total_steps=total), per="step")
        return e

    def loader(n, subset):
        x, y = _rows(n)
        ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return torch.utils.data.DataLoader(ds, batch_size=32, sampler=torch.utils.data.SubsetRandomSampler(range(subset)))

    e = engine(10)
    e.fit(loader(200, 161), epochs=2, verbose=0)
    assert e.iterations == 10 and e.schedule.steps_left() == 0
    e = engine(10)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^OneCycleLR can step 10 more times and this fit would "
                                                         r"step it 12 times"):
        e.fit(loader(193, 192), epochs=2, verbose=0)
    assert e.iterations == 0

    class Rows(torch.utils.data.IterableDataset):   # a length, and a sampler without one
        def __init__(self, n):
            self.x, self.y = _rows(n)

        def __len__(self):
            return len(self.y)

        def __iter__(self):
            return iter(zip(torch.from_numpy(self.x), torch.from_numpy(self.y)))

    e = engine(4)   # 33 rows of 32: one batch and a lone row, 1 step an epoch (the dataset's count)
    e.fit(torch.utils.data.DataLoader(Rows(33), batch_size=32), epochs=4, verbose=0)
    assert e.iterations == 4 and e.schedule.steps_left() == 0
    e = engine(3)   # refused before the first step (uncounted, it ran out in the fourth epoch)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^OneCycleLR can step 3 more times and this fit would "
                                                         r"step it 4 times"):
        e.fit(torch.utils.data.DataLoader(Rows(33), batch_size=32), epochs=4, verbose=0)
    assert e.iterations == 0


def test_fit_refuses_a_schedule_that_cannot_cover_its_steps():
    """A per-step OneCycleLR whose total_steps fell short of the fit ran until the schedule
    raised at a late step ("OneCycleLR stepped 22 times; total_steps is 21", no batch named, the
    last epoch's callbacks never run). fit now counts its steps (a short last batch counts, a
    lone last row that BatchNorm leaves out and a DataLoader's drop_last do not, initial_epoch's
    epochs are not run) and refuses before the first step, changing nothing."""
    x, y = _rows(100)                                    # 7 batches of 16, the last of 4 rows
    e = _one_cycle_engine(21)
    assert len(e.fit(x, y, epochs=3, verbose=0).epoch) == 3 and e.schedule.steps_left() == 0
    e = _one_cycle_engine(20)
    before, lr, mom, history = e.get_parameters(), e.learning_rate, e.momentum, e.history
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^OneCycleLR can step 20 more times and this fit would "
                                                         r"step it 21 times \(set_schedule\(per='step'\) steps it "
                                                         r"after each batch: 3 epochs of 7 batches" + _MORE.format(7)):
        e.fit(x, y, epochs=3, verbose=0)
    assert all(np.array_equal(v, e.get_parameters()[k]) for k, v in before.items())
    assert (e.learning_rate, e.momentum, e.history, e.epoch, e.schedule.last_epoch) == (lr, mom, history, 0, 0)
    assert len(e.fit(x, y, epochs=3, initial_epoch=1, verbose=0).epoch) == 2    # 14 steps
    bn = mpscy.Sequential([layers.Dense(16), layers.BatchNorm(), layers.Tanh(), layers.Dense(10)], input_shape=(64,))
    x97, y97 = _rows(97)                                 # 6 batches: the 97th row is left out
    assert len(_one_cycle_engine(18, model=bn).fit(x97, y97, epochs=3, verbose=0).epoch) == 3
    with pytest.raises(mpscy.InvalidArgumentError, match=r"3 epochs of 6 batches" + _MORE.format(6)):
        _one_cycle_engine(17).fit(x97[:96], y97[:96], epochs=3, verbose=0)
    loader = data.DataLoader(data.ArrayDataset(x, y), batch_size=16, drop_last=True)
    assert len(_one_cycle_engine(18).fit(loader, epochs=3, verbose=0).epoch) == 3
    with pytest.raises(mpscy.InvalidArgumentError, match=r"step it 18 times .* 3 epochs of 6 batches"):
        _one_cycle_engine(17).fit(loader, epochs=3, verbose=0)


def test_a_schedule_s_error_during_fit_names_its_batch_or_epoch():
    """Where fit cannot count its steps (a loader without a length), the schedule's refusal
    comes when it is stepped past its end, now named by batch as a step's error is; a per-epoch
    schedule's by epoch. A per-epoch OneCycleLR, and one a LearningRateScheduler steps, are
    refused before training as the per-step one is."""
    x, y = _rows(100)

    class NoLength:
        def __iter__(self):
            return ((x[i:i + 16], y[i:i + 16]) for i in range(0, 100, 16))

    e = _one_cycle_engine(20)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^epoch 3, batch 6: OneCycleLR stepped 21 times; "
                                                         r"total_steps is 20$"):
        e.fit(NoLength(), epochs=3, verbose=0)
    assert e.epoch == 2

    class Inf(S.Schedule):
        def __init__(self, engine):
            super().__init__(engine)
            self._start()

        def lr_at(self, k):
            return BASE if k < 2 else math.inf

    e = _engine()
    e.set_schedule(Inf(e), per="epoch")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^epoch 2: Inf gives a learning rate of inf at step 2"):
        e.fit(x, y, epochs=3, verbose=0)
    e = _one_cycle_engine(2, per="epoch")
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^OneCycleLR can step 2 more times and this fit would step "
                                                         r"it 3 times \(set_schedule\(per='epoch'\) steps it once an "
                                                         r"epoch\): build it"):
        e.fit(x, y, epochs=3, verbose=0)
    e = _engine()
    one = S.OneCycleLR(e, max_lr=0.5, total_steps=2)
    with pytest.raises(mpscy.InvalidArgumentError, match=r"^OneCycleLR can step 2 more times and this fit would step "
                                                         r"it 3 times \(LearningRateScheduler steps it once an "
                                                         r"epoch\)"):
        e.fit(x, y, epochs=3, verbose=0, callbacks=[callbacks.LearningRateScheduler(one)])
    assert e.epoch == 0 and one.last_epoch == 0
