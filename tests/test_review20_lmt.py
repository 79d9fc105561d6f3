"""Twentieth session's review of LMT training (lipcert.lmt): faults found, each pinned by a test."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_bad_inputs_checkpoint import _edited, _state_tensor_names
from test_lmt import _images
from torch import nn

from lipcert.checkpoint import CheckpointError
from lipcert.config import parse_config
from lipcert.lmt import LMTTrainingLoss, PowerIterationLipschitz, pairwise_row_distances
from lipcert.train import train


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


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_a_vector_that_is_zero_or_not_finite_is_refused_when_loaded(value):
    """A zero vector is a fixed point of power iteration: the estimate stayed 0 and LMT trained
    plain cross-entropy without a word; a NaN one stopped the run as 'diverged'."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3))
    estimator = PowerIterationLipschitz(model, (1, 5, 5))
    state = estimator.state_dict()
    state["vectors.0.v"] = torch.full_like(state["vectors.0.v"], value)
    with pytest.raises(RuntimeError, match=r"vectors\.0\.v"):
        estimator.load_state_dict(state)


def test_resume_refuses_a_checkpoint_whose_power_iteration_vector_is_zero(tmp_path):
    config = parse_config(
        {
            "epochs": 2,
            "eval_every": 2,
            "data": {"batch_size": 8},
            "model": {"name": "_lmt_tiny_cnn"},
            "loss": {"name": "lmt", "kwargs": {"eps": 0.5}},
        }
    )
    train(config, tmp_path, data=_images(), stop_after_epochs=1)
    ckpt = tmp_path / "last.safetensors"
    (name,) = _state_tensor_names(ckpt, "loss")
    tensors = load_file(ckpt)
    tensors[name] = torch.zeros_like(tensors[name])
    _edited(ckpt, ckpt, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"estimator\.vectors\.0\.v.*zero"):
        train(config, tmp_path, data=_images(), resume=True)
