"""lipcert.finite: the first non-finite named tensor, shared by the bound, export, data and
training checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lipcert.finite import check_finite, first_nonfinite
from lipcert.train import _nonfinite_parameter


def test_first_nonfinite_names_the_first_bad_floating_tensor_and_skips_integers():
    bad = torch.tensor([1.0, float("nan")])
    named = [("counts", torch.ones(3, dtype=torch.int64)), ("ok", torch.ones(2)), ("a", bad)]
    assert first_nonfinite(named) == ("a", bad)
    assert first_nonfinite(named[:2]) is None
    assert first_nonfinite([("mask", torch.ones(2, dtype=torch.bool))]) is None


def test_check_finite_counts_the_bad_entries_and_says_the_consequence():
    tensor = torch.tensor([float("inf"), 0.0, float("-inf")], requires_grad=True)
    with pytest.raises(ValueError, match=r"^w holds NaN or inf values \(2 of 3 entries\): gone$"):
        check_finite([("w", tensor)], "gone")


def test_training_names_a_nan_parameter_and_passes_integer_ones():
    """An integer parameter raised RuntimeError (no l2 norm of integers) in the training check."""
    model = nn.Linear(2, 2)
    model.steps = nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)
    assert _nonfinite_parameter(model) is None
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert _nonfinite_parameter(model) == "bias"
