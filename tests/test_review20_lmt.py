"""Twentieth session's review of LMT training (lipcert.lmt): faults found, each pinned by a test."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipcert.lmt import LMTTrainingLoss, PowerIterationLipschitz, pairwise_row_distances


def test_layers_whose_vector_names_collide_are_refused_by_name():
    """'a_b' and 'a.b' both map to the buffer name 'a_b': the second replaced the first's vector,
    whose estimate then never iterated (0.62 against a norm of 0.96) and was never saved."""
    inner = nn.Sequential(OrderedDict(b=nn.Linear(3, 3)))
    model = nn.Sequential(OrderedDict(a_b=nn.Linear(3, 3), a=inner))
    with pytest.raises(ValueError, match=r"a_b.*a\.b"):
        PowerIterationLipschitz(model, (3,))


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "sequential"])
def test_head_pairs_on_a_linear_model_take_the_row_distances_alone(wrap):
    """A linear model is all head: its body is the identity (L_b = 1). It raised "'Linear' object
    is not subscriptable" (bare) or "this model ends in Sequential" (nn.Sequential(Linear))."""
    torch.manual_seed(0)
    head = nn.Linear(4, 3).double()
    model = nn.Sequential(head) if wrap else head
    loss = LMTTrainingLoss(0.7).eval()
    loss.bind(model, (4,))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    logits = model(x)
    expected = F.cross_entropy(logits + 0.7 * pairwise_row_distances(head.weight)[y], y)
    torch.testing.assert_close(loss(logits, y), expected)
