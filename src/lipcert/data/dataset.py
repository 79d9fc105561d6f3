"""The common shape of every lipcert dataset: tensors per split, no loader objects.

Images are float32 in [0, 1] with shape ``(N, C, H, W)``; feature datasets (moons) are ``(N, D)``;
labels are int64 class indices. A training loop batches them itself (or through
``torch.utils.data.TensorDataset``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lipcert.finite import check_finite

#: Largest value of an 8-bit pixel: uint8 images are divided by it to land in [0, 1].
UINT8_MAX = 255.0


def unit_images(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return pixels.to(torch.float32) / UINT8_MAX


@dataclass(frozen=True, eq=False)
class Split:
    """One split: inputs ``x`` (float32, ``(N, ...)``, finite) and labels ``y`` (int64,
    ``(N,)``)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32:
            raise ValueError(f"Split.x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise ValueError(f"Split.y must be 1-D int64, got {self.y.dtype} {tuple(self.y.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Split has {len(self.x)} inputs but {len(self.y)} labels")
        check_finite(
            [("Split.x", self.x)],
            "inputs must be finite (a NaN input makes training diverge and has no certificate)",
        )

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named dataset: train and test splits and the class names (index = label)."""

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.train.x.shape[1:] != self.test.x.shape[1:]:
            raise ValueError(
                f"{self.name}: train inputs {tuple(self.train.x.shape[1:])} and test inputs "
                f"{tuple(self.test.x.shape[1:])} differ in shape"
            )
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and not 0 <= int(split.y.min()) <= int(split.y.max()) < self.num_classes:
                raise ValueError(
                    f"{self.name}: {split_name} labels outside 0..{self.num_classes - 1}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.train.x.shape[1:])
