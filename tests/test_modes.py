import pytest
import torch
from torch import nn

from lipcert.attacks import pgd
from lipcert.modes import eval_mode


def test_eval_mode_restores_each_modules_own_flag_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # a frozen batch norm inside a model in training mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(KeyError), eval_mode(model):
        raise KeyError("inside")
    assert model.training and not model[1].training


def test_pgd_leaves_the_models_modes_as_they_were():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    x, y = torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)
    pgd(model, x, y, 0.1, "l2", steps=2, restarts=1)
    assert all(m.training for m in model.modules())
