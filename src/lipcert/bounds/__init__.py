"""Sound upper bounds (and empirical lower bounds) of Lipschitz constants."""

from lipcert.bounds.network import lipschitz_lower_bound, lipschitz_upper_bound
from lipcert.bounds.operator import gram_spectral_bound, rounding_safety

__all__ = [
    "gram_spectral_bound",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "rounding_safety",
]
