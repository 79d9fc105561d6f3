"""What every lipcert loss shares: input validation, the reduction, and the thin-module base.

The pure loss functions validate their inputs here once and then work on plain tensors; the
modules (:class:`ReducedLoss` subclasses) only store hyper-parameters and the reduction.
:func:`check_hyperparameter` and :func:`check_count` also check the numeric knobs of the rest of
lipcert (attacks, bounds, certification, LMT).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

#: Reductions accepted by every loss, with torch's meaning: "none" gives the (B,) per-sample
#: terms, "mean" their average, "sum" their sum.
REDUCTIONS = ("mean", "sum", "none")

#: Label sets accepted by the binary losses; a sample is positive iff its label is > 0.
BINARY_LABEL_SETS = ({0, 1}, {-1, 1})


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of :data:`REDUCTIONS`, else raise ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` to the (B,) per-sample loss terms."""
    check_reduction(reduction)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_hyperparameter(name: str, value: float, *, positive: bool) -> float:
    """``value`` as a float, checked finite and > 0 (``positive``) or >= 0; else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_count(name: str, value: int, minimum: int) -> int:
    """``value`` as an int, checked to be an integer (not a bool) >= ``minimum``; else
    ``ValueError`` naming ``name`` (an iteration count, a batch size)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_tensor(loss: str, arg: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{loss}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_logits(loss: str, logits: object) -> Tensor:
    """Finite floating logits with a non-empty batch dimension; narrower than float32 (float16,
    bfloat16) they are returned in float32, the precision torch.autocast runs cross-entropy in:
    tau f, f + sqrt(2) eps L or (B / n+) f overflow float16's 65504 for finite logits."""
    logits = _check_tensor(loss, "logits", logits)
    if not logits.is_floating_point():
        raise ValueError(f"{loss}: logits must be floating point, got dtype {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{loss}: logits must have a batch dimension, got a 0-dim tensor")
    if logits.shape[0] == 0:
        raise ValueError(f"{loss}: empty batch, logits have shape {tuple(logits.shape)}")
    if not bool(logits.isfinite().all()):
        raise ValueError(f"{loss}: logits contain NaN or inf")
    return logits.float() if torch.finfo(logits.dtype).bits < 32 else logits


def _check_batch(loss: str, logits: Tensor, targets: Tensor) -> None:
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{loss}: batch sizes differ, logits {tuple(logits.shape)} vs targets "
            f"{tuple(targets.shape)}"
        )


def binary_inputs(loss: str, logits: object, targets: object) -> tuple[Tensor, Tensor]:
    """Validate binary inputs; return the logits as (B,) and the positive-sample mask as (B,).

    ``logits``: (B,) or (B, 1) float, finite. ``targets``: (B,) or (B, 1), labels all in {0, 1}
    or all in {-1, +1} (integer, bool or float dtype).
    """
    logits = _check_logits(loss, logits)
    targets = _check_tensor(loss, "targets", targets)
    for arg, tensor in (("logits", logits), ("targets", targets)):
        if not (tensor.dim() == 1 or (tensor.dim() == 2 and tensor.shape[1] == 1)):
            raise ValueError(
                f"{loss}: binary {arg} must have shape (B,) or (B, 1), got {tuple(tensor.shape)}"
            )
    _check_batch(loss, logits, targets)
    if targets.is_complex():
        raise ValueError(f"{loss}: targets must be integer, bool or float, got {targets.dtype}")
    labels = set(targets.unique().tolist())
    if not any(labels <= allowed for allowed in BINARY_LABEL_SETS):
        raise ValueError(
            f"{loss}: binary labels must all be in {{0, 1}} or all in {{-1, +1}}, "
            f"got values {sorted(labels, key=str)}"
        )
    return logits.reshape(-1), targets.reshape(-1) > 0  # (B,), (B,)


def multiclass_inputs(loss: str, logits: object, targets: object) -> tuple[Tensor, Tensor]:
    """Validate multi-class inputs: (B, C) float logits, C >= 2, and (B,) int64 class ids."""
    logits = _check_logits(loss, logits)
    targets = _check_tensor(loss, "targets", targets)
    if logits.dim() != 2:
        raise ValueError(f"{loss}: logits must have shape (B, C), got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{loss}: needs C >= 2 classes, logits have shape {tuple(logits.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"{loss}: targets must have shape (B,), got {tuple(targets.shape)}")
    _check_batch(loss, logits, targets)
    if targets.dtype != torch.int64:
        raise ValueError(f"{loss}: targets must be int64 class ids, got dtype {targets.dtype}")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(
            f"{loss}: class ids must be in [0, {logits.shape[1] - 1}], got range [{low}, {high}]"
        )
    return logits, targets


class ReducedLoss(nn.Module):
    """Base of the loss modules: stores the reduction; subclasses list their hyper-parameters in
    ``hyperparameters`` (attribute names) for ``repr``."""

    hyperparameters: tuple[str, ...] = ()

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        names = (*self.hyperparameters, "reduction")
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
