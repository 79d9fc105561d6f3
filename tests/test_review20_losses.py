"""Review of the twentieth session: the training losses and the l_p schedule on edge cases.

Half-precision logits overflowed inside the losses (a finite float16 batch gave a NaN loss); a
0-dim tensor of logits raised IndexError instead of naming the shape; an l_p schedule ending its
ramp at progress 1 never reached p = inf under lipcert.train, whose progress stays below 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from lipcert.config import ConfigError
from lipcert.losses import kr_loss, linf_dist_loss, lmt_loss, tau_cross_entropy
from lipcert.models.linf import linf_dist_net
from lipcert.nn.linf import LpSchedule
from lipcert.train import _check_schedules


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=gen) * 10, torch.tensor([0, 1, 2, 3, 0, 1])


HALF_PRECISION_CALLS = [
    # tau (f - offset e_y) overflows float16 (65504) at tau = 1e4: the loss was NaN (f32: 6.868).
    pytest.param(lambda f, y: tau_cross_entropy(f, y, 1e4, offset=0.5), id="tau_ce"),
    # LMT's margin sqrt(2) eps L = 1.06e5 at L = 5e4 (an early product bound): NaN (f32: 1.06e5).
    pytest.param(lambda f, y: lmt_loss(f, y, 1.5, 5e4), id="lmt"),
    pytest.param(lambda f, y: linf_dist_loss(f, y, 0.9, 8.0, 0.5), id="linf_dist"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("call", HALF_PRECISION_CALLS)
def test_half_precision_logits_are_computed_in_float32(call, dtype):
    """A loss of finite half-precision logits is the float32 loss of the same values (as
    torch.autocast runs cross-entropy in float32), and its gradient reaches the logits finite."""
    f, y = _batch()
    half = f.to(dtype).requires_grad_()
    loss = call(half, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, call(half.detach().float(), y))
    loss.backward()
    assert half.grad.dtype == dtype and bool(half.grad.isfinite().all())


def test_half_precision_binary_logits():
    """KR terms are (B / n+) f: 256 x -458 overflows float16, the loss was inf (f32: 347.9)."""
    gen = torch.Generator().manual_seed(1)
    f = (torch.randn(1024, generator=gen) * 300).half()
    y = torch.zeros(1024, dtype=torch.long)
    y[:4] = 1
    torch.testing.assert_close(kr_loss(f, y), kr_loss(f.float(), y))


@pytest.mark.parametrize(
    "call",
    [
        lambda: kr_loss(torch.tensor(1.0), torch.tensor(1)),
        lambda: tau_cross_entropy(torch.tensor(1.0), torch.tensor(0), 1.0),
        lambda: linf_dist_loss(torch.tensor(1.0), torch.tensor(0), 0.9, 1.0, 0.0),
    ],
)
def test_zero_dim_logits_name_the_shape(call):
    """logits.shape[0] of a 0-dim tensor raised IndexError ('tuple index out of range')."""
    with pytest.raises(ValueError, match="0-dim"):
        call()


def test_lp_schedule_must_reach_inf_during_training():
    """lipcert.train's progress is step / total_steps, at most (total - 1) / total < 1: with
    ramp_end = 1 the schedule's p = inf was never reached, and the model trained, saved and
    certified at p ~ p_end (here 997.5 after 2000 steps), an l_p net and not the paper's."""
    schedule = LpSchedule(8.0, 1000.0, hold=0.05, ramp_end=0.95)
    total = 2000
    assert math.isinf(schedule((total - 1) / total))
    model = linf_dist_net((4,), 3, width=8, depth=2, ramp_end=1.0)  # a saved one still loads
    with pytest.raises(ConfigError, match="ramp_end"):
        _check_schedules(model)  # but training refuses it
