"""Every shipped config parses, validates and builds its model (without loading the data)."""

from pathlib import Path

import pytest
import torch

from lipcert.config import load_config
from lipcert.models import build_model
from lipcert.train import make_loss

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
#: Input shape and class count of each dataset (as lipcert.data loads them).
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "moons": ((2,), 2),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_and_runs_a_forward(path):
    config = load_config(path)
    shape, classes = SHAPES[config.data.dataset]
    classes = len(config.data.classes) or classes
    model = build_model(
        config.model.name, input_shape=list(shape), num_classes=classes, **config.model.kwargs
    )
    make_loss(config.loss)
    with torch.no_grad():
        out = model(torch.rand(2, *shape))
    assert out.shape[0] == 2
