"""Gradient-norm-preserving 1-Lipschitz networks for optimal transport and hKR classifiers.

Serrurier et al., "Achieving robustness in classification using optimal transport with hinge
regularization", CVPR 2021: the minimizer of the hKR loss over 1-Lipschitz functions is the
potential of an optimal-transport problem and has a gradient of norm 1 almost everywhere.
Networks that can reach it must preserve gradient norms (Anil et al., "Sorting out Lipschitz
function approximation", ICML 2019): orthogonal weights (Björck, :class:`OrthoLinear`) and
GroupSort activations. The head is a :class:`RowNormLinear`: every logit f_k has a unit-norm row,
so each one-vs-all logit is itself 1-Lipschitz (the multi-class hKR setting), and a single row
(``binary=True``) gives the binary potential f, class 1 iff f > 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lipcert.models.registry import check_shape, register_model
from lipcert.nn.activations import GroupSort
from lipcert.nn.head import RowNormLinear
from lipcert.nn.orthogonal import OrthoLinear


def _head_size(num_classes: int, binary: bool) -> int:
    """1 logit for a binary model (class 1 iff f > 0), else one per class."""
    if binary and num_classes != 2:
        raise ValueError(f"binary=True needs num_classes == 2, got num_classes={num_classes}")
    return 1 if binary else num_classes


@register_model
def gnp_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 128,
    depth: int = 3,
    group_size: int = 2,
    binary: bool = False,
    bjorck_iters: int | str = "default",
    retraction: int = 0,
) -> nn.Sequential:
    """Flatten -> ``depth`` x (OrthoLinear -> GroupSort) -> RowNormLinear head (Anil et al. 2019).

    Every logit is 1-Lipschitz. Orthogonal weights and GroupSort (a permutation on each region)
    let the network represent gradient-norm-preserving functions such as the optimal potential,
    which norm-constrained ReLU networks cannot. ``binary``: one logit (the binary hKR /
    Wasserstein-1 potential), which needs ``num_classes == 2``. ``bjorck_iters`` and
    ``retraction``: the OrthoLinear options (retraction is 5x faster per step at width 256).
    """
    shape = check_shape(input_shape, num_classes)
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (hidden layers), got {depth}")
    if group_size < 1 or width % group_size:
        raise ValueError(f"width={width} must be a multiple of group_size={group_size}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(shape)
    for _ in range(depth):
        layers += [
            OrthoLinear(features, width, bjorck_iters=bjorck_iters, retraction=retraction),
            GroupSort(group_size),
        ]
        features = width
    layers.append(RowNormLinear(width, _head_size(num_classes, binary)))
    return nn.Sequential(*layers)
