import torch

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
