"""IEEE float32 arithmetic (no TF32, no autocast) while constraints and certificates are computed.

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

:func:`ieee_float32` switches TF32 off (both the current ``fp32_precision`` settings, oneDNN's
for the CPU included, which ``torch.set_float32_matmul_precision("medium")`` sets to bfloat16,
and, on an older PyTorch, the ``allow_tf32`` flags) and autocast off on the CPU and CUDA (under
``torch.autocast(bfloat16)`` a float32 model's products would run in bfloat16 while its logits
came back float32: ``certify`` gave a float32 allowance to a bfloat16 computation, and a radius
of 0.29 was broken at 0.05), and restores the user's settings when the last thread inside leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch

from lipcert.switches import SharedSwitches


def _backends() -> list[tuple[object, str, object]]:
    """(object, attribute, IEEE value) for each TF32 switch this PyTorch has, oneDNN's CPU
    matrix products and convolutions included (``torch.set_float32_matmul_precision("medium")``
    sets its matmul to bfloat16, which CPUs with AVX512-BF16 or AMX then run)."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        onednn = [getattr(torch.backends.mkldnn, op, None) for op in ("matmul", "conv")]
        return [
            (matmul, "fp32_precision", "ieee"),
            (conv, "fp32_precision", "ieee"),
            *((op, "fp32_precision", "ieee") for op in onednn if hasattr(op, "fp32_precision")),
        ]
    return [(matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


#: Device types whose autocast :func:`ieee_float32` switches off: those lipcert runs on.
AUTOCAST_DEVICES = ("cpu", "cuda")


#: The TF32 switches, held off while any thread computes under :func:`ieee_float32`.
TF32_OFF = SharedSwitches(_backends)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with TF32 off for float32 matrix products and convolutions (CUDA) and
    autocast off (every tensor computes in its own dtype). The TF32 switches are process-wide:
    they stay off until the last thread inside leaves (:class:`~lipcert.switches.SharedSwitches`);
    autocast is per thread."""
    with TF32_OFF.held(), ExitStack() as stack:
        for device in AUTOCAST_DEVICES:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def autocast_off(device: torch.device) -> AbstractContextManager:
    """Autocast switched off for ``device``'s type only, where it is on, else nothing: the light
    form of :func:`ieee_float32` for the AOL / SLL row sums (entering a context costs more than
    the row sums of a tiny kernel), whose products write into float32 buffers, which autocast's
    bfloat16 products refused (a backward run inside ``torch.autocast`` raised), and whose
    constraint's slack is for the kernel's own dtype; beside :func:`ieee_float32` it covers a
    device type other than :data:`AUTOCAST_DEVICES` (a 'meta' tensor has no autocast)."""
    available = torch.amp.is_autocast_available(device.type)  # not for 'meta' (it raised)
    if available and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
