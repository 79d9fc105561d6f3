"""lipcert: certifiably robust classifiers from Lipschitz-constrained networks.

``lipcert.nn`` holds the layers, ``lipcert.losses`` the losses; the functions below certify,
bound, export and save models built from them.
"""

from lipcert import losses, nn
from lipcert.bounds import lipschitz_lower_bound, lipschitz_upper_bound
from lipcert.certify import certified_accuracy, certify
from lipcert.checkpoint import load, save
from lipcert.export import export

__all__ = [
    "certified_accuracy",
    "certify",
    "export",
    "lipschitz_lower_bound",
    "lipschitz_upper_bound",
    "load",
    "losses",
    "nn",
    "save",
]
__version__ = "0.1.0"
