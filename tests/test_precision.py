import pytest
import torch
from lipschitz import LIPSCHITZ_TOL

import lipcert.nn as lnn
from lipcert.precision import ieee_float32


def _switches():
    return (
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
    )


def test_ieee_float32_turns_tf32_off_and_restores_the_user_settings():
    before = _switches()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with ieee_float32():
            assert _switches() == ("ieee", "ieee")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        try:
            with ieee_float32():
                raise KeyError("inside")
        except KeyError:
            pass
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize(
    "make",
    [
        lambda: lnn.OrthoLinear(64, 64),
        lambda: lnn.OrthoLinear(64, 64, retraction=2),
        lambda: lnn.AOLLinear(64, 64),
        lambda: lnn.SpectralLinear(64, 64),
    ],
)
def test_constrained_weights_ignore_autocast(make):
    """Under bfloat16 autocast the constraint still runs in float32: computed in bfloat16, the
    Björck weights had norm 1.003-1.005 (measured)."""
    layer = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = layer.weight
    assert weight.dtype == torch.float32
    assert torch.linalg.matrix_norm(weight.double(), ord=2) <= 1 + LIPSCHITZ_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "make",
    [
        lambda: lnn.SLLConv2d(16, 32, 3),
        lambda: lnn.SLLLinear(64, 128),
        lambda: lnn.AOLConv2d(16, 16, 3),
        lambda: lnn.AOLLinear(64, 64),
        lambda: lnn.OrthoLinear(64, 64),
    ],
)
def test_gpu_constraints_keep_their_bound_with_tf32_switched_on(make):
    """With TF32 on (cuDNN's default), the constrained weights computed on the GPU keep their
    sound bound at 1 (float32 slack only): rounded at TF32 they exceeded it by ~1e-3 (H200)."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for param in layer.parameters():
            param.mul_(3.0)
    before = _switches()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        gpu_bound = layer.cuda().eval().lipschitz_bound()
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
    assert gpu_bound <= 1 + 1e-5
    assert abs(gpu_bound - layer.cpu().lipschitz_bound()) <= 1e-5
