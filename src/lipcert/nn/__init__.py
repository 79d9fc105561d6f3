"""Lipschitz-constrained layers: drop-in ``torch.nn`` modules, one family a file."""

from lipcert.nn.constraint import EvalCache, LipschitzLayer, WeightConstraint, clear_caches

__all__ = ["EvalCache", "LipschitzLayer", "WeightConstraint", "clear_caches"]
