"""lipcert: certifiably robust classifiers from Lipschitz-constrained networks."""

from lipcert import nn
from lipcert.bounds import lipschitz_lower_bound, lipschitz_upper_bound
from lipcert.export import export

__all__ = ["export", "lipschitz_lower_bound", "lipschitz_upper_bound", "nn"]
__version__ = "0.1.0"
