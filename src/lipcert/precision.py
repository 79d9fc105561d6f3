"""IEEE float32 arithmetic on CUDA while constraints and certificates are computed.

On Ampere and later GPUs PyTorch may run float32 convolutions (cuDNN's default) and matrix
products (when enabled) in TF32, which keeps 10 mantissa bits: relative errors near 1e-3
instead of float32's 6e-8. Two things here must not see that:

* the weights of the constrained layers (AOL rescaling, SLL's T, Björck, ...): rounded at
  TF32 they lose the slack their 1-Lipschitz proof rests on, and the sound bounds of the
  folded weights (computed in float64 from the weights as they are) then exceed 1 — measured on
  an H200: an SLL MNIST net certified 5.6% at eps 1.58 during GPU training against 31.9% for the
  same parameters constrained in float32;
* the forward pass of :func:`lipcert.certify`, whose float-rounding safety assumes float32
  (``certify.ROUNDING_REL_FLOAT32``).

:func:`ieee_float32` switches TF32 off (both the current ``fp32_precision`` settings and, on an
older PyTorch, the ``allow_tf32`` flags) and restores the user's settings on exit. On a CPU it
changes nothing that matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _backends() -> list[tuple[object, str, object]]:
    """(object, attribute, IEEE value) for each TF32 switch this PyTorch has."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        return [(matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with TF32 off for float32 matrix products and convolutions (CUDA)."""
    switches = _backends()
    saved = [getattr(obj, name) for obj, name, _ in switches]
    try:
        for obj, name, value in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(switches, saved, strict=True):
            setattr(obj, name, value)
