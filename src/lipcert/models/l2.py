"""l2 1-Lipschitz architectures built from lipcert's layers (SLL, AOL, RowNormLinear head)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lipcert import nn as lnn
from lipcert.models.registry import check_shape, register_model


@register_model
def sll_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 256,
    inner_width: int = 512,
    depth: int = 4,
    aol_rescale: str = "input",
) -> nn.Sequential:
    """Flatten -> AOLLinear -> depth x SLLLinear -> RowNormLinear (1-Lipschitz body).

    ``aol_rescale``: the AOL layers' ``rescale`` ("auto" rescales the cheaper side)."""
    shape = check_shape(input_shape, num_classes)
    return nn.Sequential(
        nn.Flatten(),
        lnn.AOLLinear(math.prod(shape), width, rescale=aol_rescale),
        *[lnn.SLLLinear(width, inner_width) for _ in range(depth)],
        lnn.RowNormLinear(width, num_classes),
    )


@register_model
def sll_convnet(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 16,
    blocks_per_stage: int = 2,
    stages: int = 2,
    inner_factor: int = 2,
    dense_width: int = 256,
    dense_depth: int = 2,
    aol_rescale: str = "input",
) -> nn.Sequential:
    """Convolutional SLL net (Araujo et al. 2023, Table 6 style, scaled for small images).

    AOLConv2d stem, then per stage ``blocks_per_stage`` SLLConv2d blocks and an orthogonal
    space-to-depth downsampling followed by a 1x1 AOLConv2d that halves the channels; a dense SLL
    head ends in RowNormLinear for the last-layer certificate. ``aol_rescale``: the AOL layers'
    ``rescale`` ("auto" rescales the output channels of the channel-halving 1x1 convolutions,
    the cheaper side; the default "input" keeps older checkpoints' function).
    """
    channels, height, width_px = check_shape(input_shape, num_classes)
    layers: list[nn.Module] = [lnn.AOLConv2d(channels, width, 3, rescale=aol_rescale)]
    c, h, w = width, height, width_px
    for _ in range(stages):
        layers += [lnn.SLLConv2d(c, inner_factor * c, 3) for _ in range(blocks_per_stage)]
        if h % 2 or w % 2:
            raise ValueError(f"sll_convnet needs even spatial sizes at each stage, got {h}x{w}")
        halve = lnn.AOLConv2d(4 * c, 2 * c, 1, rescale=aol_rescale)
        layers += [lnn.InvertibleDownsample(2), halve]
        c, h, w = 2 * c, h // 2, w // 2
    layers += [
        nn.Flatten(),
        lnn.AOLLinear(c * h * w, dense_width, rescale=aol_rescale),
        *[lnn.SLLLinear(dense_width, 2 * dense_width) for _ in range(dense_depth)],
        lnn.RowNormLinear(dense_width, num_classes),
    ]
    return nn.Sequential(*layers)
