"""scikit-learn's handwritten digits (UCI optdigits, 8x8) as a lipcert dataset.

The 1797 images are split once, stratified by class, with a fixed seed: with the defaults, 1347
train and 450 test images (``train_test_split`` rounds the test size up).
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits as sklearn_load_digits
from sklearn.model_selection import train_test_split

from lipcert.data.dataset import Dataset, Split

#: Pixels of ``load_digits`` count the set bits of a 4x4 block of the 32x32 bitmap: 0..16.
DIGITS_MAX_VALUE = 16.0
#: Seed of the stratified split (any fixed value; 0 is the documented one).
DIGITS_SPLIT_SEED = 0
#: Test fraction of the split: 450 of the 1797 images.
DIGITS_TEST_FRACTION = 0.25
DIGITS_CLASSES = tuple(str(digit) for digit in range(10))


def load_digits(
    test_fraction: float = DIGITS_TEST_FRACTION, seed: int = DIGITS_SPLIT_SEED
) -> Dataset:
    """The digits as ``(N, 1, 8, 8)`` float32 images in [0, 1], stratified train/test split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    bunch = sklearn_load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32) / DIGITS_MAX_VALUE
    images = images.unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset(
        name="digits",
        train=Split(images[train_idx], labels[train_idx]),
        test=Split(images[test_idx], labels[test_idx]),
        class_names=DIGITS_CLASSES,
    )
