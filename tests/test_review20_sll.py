"""Review of the SLL layers, the exported SLL form and the bound of ``Residual`` (twentieth
session): residuals whose branch broadcasts, weights that overflow the form's bound, and the eval
cache of SLL's T after state changes, against exact float64 Jacobian norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipcert.bounds.network import lipschitz_upper_bound
from lipcert.nn import Residual
from lipcert.ot import kantorovich_value


def _broadcasting_potential() -> nn.Module:
    """f(z) = 0.5 sum_k (z + 0 z)_k on 1-d points: the residual copies z to 4 entries, so f = 2 z
    (Lipschitz 2), which x + branch(x) computes by broadcasting x (1 entry) to the branch's 4."""
    residual, head = Residual(nn.Linear(1, 4)), nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        residual.branch.weight.zero_(), residual.branch.bias.zero_(), head.weight.fill_(0.5)
    return nn.Sequential(residual, head).double()


def test_a_residual_whose_branch_broadcasts_is_refused():
    """The rule 1 + L(branch) holds for x + g(x) with x and g(x) of one shape. Broadcasting
    repeats one of them: Residual(Linear(1, 4)) with zero weights is x -> (x, x, x, x), Lipschitz
    2, and was bounded by 1.0 (no input shape); the potential above passed the 1-Lipschitz check
    and its Kantorovich value between the points 0 and 1 was 2.0, where W1 is 1."""
    potential = _broadcasting_potential()
    x = torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Residual.*\(3, 4\).*\(3, 1\)"):
        potential(x)
    with pytest.raises(ValueError, match="Residual"):
        kantorovich_value(potential, x, torch.zeros_like(x))
    shrinking = Residual(nn.Linear(4, 1)).double()  # g(x) repeated: 1 + sqrt(4) ||w||
    with pytest.raises(ValueError, match="Residual"):
        shrinking(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Residual"):
        lipschitz_upper_bound(shrinking, (4,))
    same = Residual(nn.Identity())  # x + x: shapes agree, the rule holds
    assert torch.equal(same(x), 2 * x) and lipschitz_upper_bound(same) == 2.0
