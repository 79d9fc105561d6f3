"""Batch augmentations on tensors: random crop with zero padding, random horizontal flip.

They act on a whole ``(B, C, H, W)`` batch at once, on the batch's device; randomness comes from a
``torch.Generator`` (on the CPU or on the batch's device), so a seed reproduces a run exactly.
The crop and flip are those of the standard CIFAR-10 recipe (He et al., "Deep Residual Learning
for Image Recognition", CVPR 2016, Sec. 4.2: 4-pixel padding, random 32x32 crop, random flip).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: Probability of a horizontal flip (He et al., 2016).
FLIP_PROBABILITY = 0.5


def _check_images(fn: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{fn} expects images (B, C, H, W), got shape {tuple(x.shape)}")


def _draw(
    generator: torch.Generator | None,
    device: torch.device,
    fn: Callable[..., Tensor],
    *args: object,
) -> Tensor:
    """Draw with ``fn`` on the generator's device (the default one's: ``device``), then move."""
    draw_device = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=draw_device).to(device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each image by ``padding`` pixels a side and crop it back at a random offset."""
    _check_images("random_crop", x)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    batch, _, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    offsets = _draw(generator, x.device, torch.randint, 0, 2 * padding + 1, (batch, 2))
    rows = offsets[:, 0, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(width, device=x.device)  # (B, W)
    index = torch.arange(batch, device=x.device)[:, None, None]  # (B, 1, 1)
    crops = padded[index, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_flip(
    x: Tensor, generator: torch.Generator | None = None, p: float = FLIP_PROBABILITY
) -> Tensor:
    """Mirror each image left-right (a horizontal flip) with probability ``p``."""
    _check_images("random_flip", x)
    if not 0 <= p <= 1:
        raise ValueError(f"p is a probability and must lie in [0, 1], got {p}")
    flip = _draw(generator, x.device, torch.rand, len(x)) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchAugment:
    """Random crop (zero padding ``crop_padding``) then horizontal flip, seeded.

    ``generator_device`` is where the random draws happen (the CPU by default; a CUDA device
    keeps the whole augmentation on the GPU). ``state_dict`` / ``load_state_dict`` carry the
    generator state through a checkpoint, so a resumed run draws the same augmentations.
    """

    def __init__(
        self,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        generator_device: torch.device | str | None = None,
    ) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.generator = torch.Generator(device=generator_device or "cpu").manual_seed(seed)

    def __call__(self, x: Tensor) -> Tensor:
        x = random_crop(x, self.crop_padding, self.generator)
        return random_flip(x, self.generator) if self.flip else x

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip})"
