"""Review of the twelfth session's change: the Fourier row sums' backward, where the correlation
is ~0 (AOL's init: every offset but the centre)."""

from __future__ import annotations

import pytest
import torch

from lipcert.nn.aol import orthogonal_centre_
from lipcert.nn.correlation import abs_correlation_sums, kernel_self_correlation


def _directional_derivative(
    kernel: torch.Tensor, weights: torch.Tensor, direction: torch.Tensor
) -> float:
    """f'(K; v) of f(K) = sum_ij weights_ij sum_d |corr_ij(d)|, from the exact convolution:
    sign(corr) dcorr where corr != 0, |dcorr| where it is 0."""
    corr, tangent = torch.func.jvp(kernel_self_correlation, (kernel,), (direction,))
    weights = weights[:, :, None, None].expand_as(corr)
    zero = corr.abs() < 1e-12
    return float(torch.where(zero, weights * tangent.abs(), weights * corr.sign() * tangent).sum())


@pytest.mark.parametrize("shape", [(8, 8, 3, 3), (16, 8, 3, 3), (8, 8, 5, 5)])
def test_the_gradient_at_aol_init_is_a_subgradient_of_the_row_sums(shape):
    """At AOL's init the correlations off the centre are exactly 0, computed by the DFT as
    rounding noise of either sign. Folding the backward's transposes into g + g^T assumed
    sign(corr(-d)) = sign(corr(d))^T bit for bit, and there the gradient g of
    f = sum weights |corr| broke <g, v> <= f'(K; v) (by 55 for 8 -> 8, with <g, g> = 560)."""
    torch.manual_seed(0)
    kernel = orthogonal_centre_(torch.empty(shape, dtype=torch.float64)).requires_grad_()
    weights = torch.rand(shape[1], shape[1], dtype=torch.float64)
    (grad,) = torch.autograd.grad((abs_correlation_sums(kernel) * weights).sum(), kernel)
    kernel = kernel.detach()
    for direction in [grad, *(torch.randn_like(grad) for _ in range(20))]:
        inner = float((grad * direction).sum())
        assert inner <= _directional_derivative(kernel, weights, direction) + 1e-9 * abs(inner)
