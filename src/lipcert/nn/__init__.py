"""Lipschitz-constrained layers: drop-in ``torch.nn`` modules, one family a file.

Every layer is 1-Lipschitz by construction (l2 unless it says otherwise), implements the
:class:`~lipcert.nn.constraint.LipschitzLayer` protocol (a sound ``lipschitz_bound()`` and an
``export()`` to plain ``torch.nn``), and caches its constrained weight in eval mode.
"""

from lipcert.nn.activations import GroupSort, MaxMin, get_activation
from lipcert.nn.aol import AOLConv2d, AOLLinear
from lipcert.nn.cayley import CayleyConv2d
from lipcert.nn.constraint import (
    EvalCache,
    LipschitzLayer,
    WeightConstraint,
    clear_caches,
    precomputed_weights,
)
from lipcert.nn.head import RowNormLinear
from lipcert.nn.linf import LinfDist
from lipcert.nn.orthogonal import OrthoLinear, retract_, retract_after_steps
from lipcert.nn.pooling import InvertibleDownsample, L2NormPool2d, ScaledAvgPool2d
from lipcert.nn.residual import Residual
from lipcert.nn.sll import SLLConv2d, SLLLinear
from lipcert.nn.spectral import SpectralConv2d, SpectralLinear

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "CayleyConv2d",
    "EvalCache",
    "GroupSort",
    "InvertibleDownsample",
    "L2NormPool2d",
    "LinfDist",
    "LipschitzLayer",
    "MaxMin",
    "OrthoLinear",
    "Residual",
    "RowNormLinear",
    "SLLConv2d",
    "SLLLinear",
    "ScaledAvgPool2d",
    "SpectralConv2d",
    "SpectralLinear",
    "WeightConstraint",
    "clear_caches",
    "get_activation",
    "precomputed_weights",
    "retract_",
    "retract_after_steps",
]
