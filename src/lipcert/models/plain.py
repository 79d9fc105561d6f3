"""Unconstrained baselines: ordinary CNNs certified through a whole-network bound (LMT) and
compared with 1-Lipschitz nets."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipcert.models.registry import check_shape, register_model


@register_model
def plain_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    batch_norm: bool = False,
) -> nn.Sequential:
    """conv3x3 (+BN) ReLU MaxPool2 per entry of ``channels``, then Linear-ReLU-Linear."""
    in_channels, height, width = check_shape(input_shape, num_classes)
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
        layers += [nn.BatchNorm2d(out_channels)] if batch_norm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_channels, height, width = out_channels, height // 2, width // 2
    layers += [
        nn.Flatten(),
        nn.Linear(in_channels * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)
