"""Sound upper bounds (and empirical lower bounds) of Lipschitz constants.

Importing the package registers the rules of the ``torch.nn`` layers (:mod:`.rules`). Whole
models are bounded by :func:`lipschitz_upper_bound`, which traces them (:mod:`.graph`, imported on
use: it builds on ``lipcert.nn``, which itself imports :mod:`.network`).
"""

from lipcert.bounds import rules  # noqa: F401  (registers the torch.nn rules)
from lipcert.bounds.network import (
    lipschitz_lower_bound,
    lipschitz_upper_bound,
    module_bound,
    register_bound_rule,
)
from lipcert.bounds.operator import gram_spectral_bound, rounding_safety

__all__ = [
    "gram_spectral_bound",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "module_bound",
    "register_bound_rule",
    "rounding_safety",
]
