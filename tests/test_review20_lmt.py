"""Twentieth session's review of LMT training (lipcert.lmt): faults found, each pinned by a test."""

from collections import OrderedDict

import pytest
from torch import nn

from lipcert.lmt import PowerIterationLipschitz


def test_layers_whose_vector_names_collide_are_refused_by_name():
    """'a_b' and 'a.b' both map to the buffer name 'a_b': the second replaced the first's vector,
    whose estimate then never iterated (0.62 against a norm of 0.96) and was never saved."""
    inner = nn.Sequential(OrderedDict(b=nn.Linear(3, 3)))
    model = nn.Sequential(OrderedDict(a_b=nn.Linear(3, 3), a=inner))
    with pytest.raises(ValueError, match=r"a_b.*a\.b"):
        PowerIterationLipschitz(model, (3,))
