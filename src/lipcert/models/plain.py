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
    kernel_size: int = 3,
    stride: int = 1,
    padding: int = 1,
    pool: bool = True,
) -> nn.Sequential:
    """conv (+BN) ReLU (+MaxPool2) per entry of ``channels``, then Linear-ReLU-Linear.

    The defaults give conv3x3 / MaxPool2 blocks. ``kernel_size=4, stride=2, padding=1,
    pool=False, channels=(16, 32), hidden=100`` is the small MNIST CNN of Wong & Kolter (ICML 2018)
    that LMT (Tsuzuku et al., NeurIPS 2018) was compared on.
    """
    in_channels, height, width = check_shape(input_shape, num_classes)
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)]
        layers += [nn.BatchNorm2d(out_channels)] if batch_norm else []
        layers += [nn.ReLU()]
        height, width = ((n + 2 * padding - kernel_size) // stride + 1 for n in (height, width))
        if pool:
            layers += [nn.MaxPool2d(2)]
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"plain_cnn: input {tuple(input_shape)} shrinks to nothing")
        in_channels = out_channels
    layers += [
        nn.Flatten(),
        nn.Linear(in_channels * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    ]
    return nn.Sequential(*layers)
