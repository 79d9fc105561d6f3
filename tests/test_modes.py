import pytest
from torch import nn

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
