"""A stateless residual container, x -> x + branch(x), and its Lipschitz bound rule."""

from __future__ import annotations

from torch import Tensor, nn

from lipcert.bounds.network import module_bound, register_bound_rule


class Residual(nn.Module):
    """``x + branch(x)``: holds only ``branch``, so bounds compose from the branch's own bound."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


@register_bound_rule(Residual)
def _residual(module: nn.Module, norm: str) -> float:
    """L(x + g(x)) <= 1 + L(g) in any norm (triangle inequality)."""
    return 1.0 + module_bound(module.branch, norm)
