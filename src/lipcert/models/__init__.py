"""Named architectures, one family a file; importing this package registers them all."""

from lipcert.models import hkr, l2, linf, plain
from lipcert.models.registry import MODELS, build_model, check_shape, register_model

__all__ = ["MODELS", "build_model", "check_shape", "hkr", "l2", "linf", "plain", "register_model"]
