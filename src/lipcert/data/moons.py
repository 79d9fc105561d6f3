"""scikit-learn's two interleaving half circles (``make_moons``), a 2-D binary toy problem.

Inputs are raw coordinates ``(N, 2)`` (roughly [-1.2, 2.2] x [-0.7, 1.2] at the default noise),
not rescaled to [0, 1]: certified radii then read directly in the plane. Train and test are drawn
independently, with seeds ``seed`` and ``seed + 1``.
"""

from __future__ import annotations

import torch
from sklearn.datasets import make_moons

from lipcert.data.dataset import Dataset, Split

#: Default sizes and Gaussian noise (std of the jitter added to each point): a common toy setting.
MOONS_TRAIN_SIZE = 1000
MOONS_TEST_SIZE = 500
MOONS_NOISE = 0.1
#: Seed of the training draw; the test draw uses seed + 1.
MOONS_SEED = 0
#: make_moons label 0 is the upper half circle, label 1 the lower one.
MOONS_CLASSES = ("upper", "lower")


def _draw(n_samples: int, noise: float, seed: int) -> Split:
    points, labels = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return Split(torch.from_numpy(points).to(torch.float32), torch.from_numpy(labels).long())


def load_moons(
    n_train: int = MOONS_TRAIN_SIZE,
    n_test: int = MOONS_TEST_SIZE,
    noise: float = MOONS_NOISE,
    seed: int = MOONS_SEED,
) -> Dataset:
    """Two moons: ``(N, 2)`` float32 points, labels in {0, 1}."""
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 2:
            raise ValueError(f"{arg} must be at least 2 (one point a moon), got {value}")
    if noise < 0:
        raise ValueError(f"noise is a standard deviation and must be >= 0, got {noise}")
    return Dataset(
        name="moons",
        train=_draw(n_train, noise, seed),
        test=_draw(n_test, noise, seed + 1),
        class_names=MOONS_CLASSES,
    )
