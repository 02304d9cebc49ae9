"""MultiStepLR against torch for milestones torch never reaches: a negative milestone (torch's step
count starts at 0) leaves the rate alone, and a milestone
that is not a whole number is refused rather than truncated to an earlier step."""
import warnings

import numpy as np
import pytest

import mpscy
from mpscy import layers, optim
from mpscy.optim import schedules as S

torch = pytest.importorskip("torch")


def _engine():
    return mpscy.Engine(mpscy.Sequential([layers.Dense(2)], input_shape=(3,)), loss="mse",
                        optimizer=optim.SGD(0.1), batch_size=4, device="cpu")


@pytest.mark.parametrize("milestones", [[-2, 3], [-5, -1, 0, 2, 2], [0, 3], [2.0, 4], [np.int64(1), 3]])
def test_multisteplr_matches_torch_for_any_whole_milestones(milestones):
    e = _engine()
    s = S.MultiStepLR(e, milestones, 0.5)
    o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 0.1)
    t = torch.optim.lr_scheduler.MultiStepLR(o, [int(m) for m in milestones], 0.5)
    got, want = [e.learning_rate], [o.param_groups[0]["lr"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(6):
            s.step()
            o.step()
            t.step()
            got.append(e.learning_rate)
            want.append(o.param_groups[0]["lr"])
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_multisteplr_refuses_a_milestone_that_is_not_a_whole_number():
    e = _engine()
    with pytest.raises(mpscy.InvalidArgumentError, match="milestones must be integers"):
        S.MultiStepLR(e, [2.5, 4])
    assert e.learning_rate == 0.1
