"""``lipcert lipschitz CKPT``: the per-layer table and the whole-network bounds."""

from __future__ import annotations

import re

import pytest
import torch

import lipcert
from lipcert.cli import main
from lipcert.models import build_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("plain_cnn", input_shape=(1, 8, 8), num_classes=3, channels=(4,),
                        hidden=8, batch_norm=True)  # fmt: skip
    path = tmp_path / "plain.safetensors"
    lipcert.save(model, path)
    return path, model.eval()


def test_table_lists_every_layer_and_the_network_bounds(checkpoint, capsys):
    path, model = checkpoint
    assert main(["lipschitz", str(path), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    for layer in ("Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear"):
        assert layer in out
    found = re.search(r"sound upper bound (\S+), empirical lower bound (\S+), ratio (\S+)", out)
    upper, lower, ratio = map(float, found.groups())
    assert upper == pytest.approx(lipcert.lipschitz_upper_bound(model, (1, 8, 8)), rel=1e-5)
    assert 0 < lower <= upper and ratio == pytest.approx(upper / lower, rel=1e-3)
    assert "chain of 8 layers: product of upper bounds" in out
    conv_row = next(line for line in out.splitlines() if "Conv2d" in line)
    conv_upper, conv_lower = (float(v) for v in conv_row.split()[3:5])
    assert conv_lower <= conv_upper <= conv_lower * 1.05  # a linear layer: near-exact bounds


def test_linf_table_and_bad_shapes(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["lipschitz", str(path), "--norm", "linf"]) == 0
    assert "network (linf): sound upper bound" in capsys.readouterr().out
    assert main(["lipschitz", str(path), "--input-shape", "3", "8", "8"]) == 2
    assert "input_shape (3, 8, 8) does not fit" in capsys.readouterr().err
