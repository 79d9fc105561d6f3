"""A stateless residual container, x -> x + branch(x), and its Lipschitz bound rule.

The rule is the triangle inequality, 1 + L(branch), except for the form SLL layers export
(:meth:`lipcert.nn.SLLLinear.export`): x + W_o relu(A x + b) with A a Linear or a stride-1 'same'
Conv2d and W_o = -B^T its adjoint geometry (a bias-free Linear or ConvTranspose2d), i.e.
x - B^T relu(A x + b). Its bound is :func:`residual_bound` (Araujo et al. 2023, Thm. 3, checked
a posteriori in float64), with the scales and Schur weights recovered from the weights
(:func:`sll_form_bound`): any positive ones give a sound bound, the recovered ones a tight one
(1 for an exported SLL layer, where 1 + L(branch) gives about 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lipcert.bounds.network import (
    add_up,
    distrust_reason,
    magnitude,
    module_bound,
    register_bound_rule,
    register_internal_growth,
    register_internal_size,
)
from lipcert.bounds.operator import rounding_safety
from lipcert.nn.aol import as_kernel, sound_row_sums
from lipcert.nn.correlation import abs_correlation_sums

#: Unit roundoff of float64, used to enclose the few elementwise operations of the bound.
_U64 = torch.finfo(torch.float64).eps / 2
_TINY = torch.finfo(torch.float64).tiny
#: Power steps refining the Schur weights of an exported SLL layer (:func:`_perron_weights`).
PERRON_STEPS = 50


class Residual(nn.Module):
    """``x + branch(x)``: holds only ``branch``, so bounds compose from the branch's own bound.

    ``branch(x)`` must have the shape of ``x`` (ValueError otherwise): the bound 1 + L(branch)
    is the triangle inequality for a sum of two maps into one space, and broadcasting repeats
    one of them (x -> (x, x, x, x) through a zero Linear(1, 4) branch is 2-Lipschitz, and was
    bounded by 1). The check is skipped while torch.fx or torch.jit trace the forward, where
    the graph bound's own rule for ``+`` counts broadcast copies.
    """

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        tracing = not isinstance(x, Tensor) or torch.jit.is_tracing()  # fx: a Proxy
        if not tracing and out.shape != x.shape:
            raise ValueError(
                f"Residual: the branch gave {list(out.shape)} for an input of "
                f"{list(x.shape)}; x + branch(x) needs one shape (no broadcasting)"
            )
        return x + out


@register_bound_rule(Residual)
def _residual(module: nn.Module, norm: str) -> float:
    """L(x + g(x)) <= 1 + L(g) in any norm (triangle inequality), the sum rounded up (1.0 for a
    branch bounded by 2^-60 rounded to nearest); in l2, an SLL form's own bound. It takes g(x) of
    x's shape, as :meth:`Residual.forward` enforces: a branch that would broadcast (a Linear of
    other widths) gives a model that cannot run, whose bound without an input shape describes
    nothing it computes (with one, the forward's probe refuses it)."""
    if norm == "l2" and sll_form(module):
        return sll_form_bound(module)
    return add_up(1.0, module_bound(module.branch, norm))


@register_internal_size(Residual)
def _residual_internal_size(module: nn.Module, x: Tensor, norm: str) -> float:
    """Kept whole (the SLL form), a residual hides its pre-activation A x + b, which reaches the
    output through the outer map: ||A x + b|| L(outer). A residual traced through needs none
    (its inner values are nodes of the graph)."""
    if not sll_form(module):
        return 0.0
    inner, _, outer = module.branch
    with torch.no_grad():
        pre = inner(x)
    return magnitude(pre, norm) * module_bound(outer, norm, tuple(pre.shape[1:]))


#: Relative slack over float64 sums of absolute values (n terms, n u64 relative at most).
_SUM_SLACK = 1 + 2**-20


def _abs_sum(tensor: Tensor | None) -> float:
    """Sum of |entries| in float64, rounded up by :data:`_SUM_SLACK` (0 for None)."""
    if tensor is None:
        return 0.0
    return float(tensor.detach().to(torch.float64).abs().sum()) * _SUM_SLACK


def sll_internal_growth(kernel: Tensor, bias: Tensor | None, outer: Tensor) -> tuple[float, float]:
    """(c, g) of :func:`lipcert.bounds.network.internal_growth` for x - B^T relu(A x + b), A the
    Linear or convolution of ``kernel`` K, B that of ``outer``: with kappa = sum |K|, beta =
    sum |B| (entrywise), c = max(1, beta) sum |b| and g = max(1, beta) kappa.

    A partial sum of (A h)_i adds a subset of one row's terms: at most ||a_i||_2 ||h||_2 <= kappa
    ||h||_2, or ||a_i||_1 ||h||_inf <= kappa ||h||_inf; the same bounds ||A h|| (the taps of a
    convolution are shifts of norm <= 1, ||A||_2 <= sum_tap ||K_tap||_2 <= kappa). So u = A h + b
    and relu(u) stay below sum |b| + kappa ||h|| entrywise (the bias broadcast over a grid
    included), and a partial sum of B^T relu(u) below sum |B_ij| |relu(u)_j| <= beta max_j
    |u_j|, in either norm. The output x - B^T relu(u) is the graph's own value."""
    beta = max(1.0, _abs_sum(outer))
    return beta * _abs_sum(bias), beta * _abs_sum(kernel)


@register_internal_growth(Residual)
def _residual_internal_growth(module: nn.Module, norm: str) -> tuple[float, float] | None:
    """The SLL form kept whole (:func:`sll_internal_growth`); None for a residual traced
    through."""
    if not sll_form(module):
        return None
    inner, _, outer = module.branch
    return sll_internal_growth(inner.weight, inner.bias, outer.weight)


def _fold_error(kernel: Tensor, outer: Tensor, scales: Tensor) -> Tensor:
    """Elementwise upper bound of |B - C K| (float64): the rounding of the fold B = fl(C K)."""
    product = kernel * scales.view(-1, 1, 1, 1)  # exact for float32 inputs, else within u64
    return ((outer - product).abs() + 2 * _U64 * product.abs()) * (1 + 4 * _U64)


def residual_bound(kernel: Tensor, outer: Tensor, scales: Tensor, weights: Tensor) -> float:
    """Sound bound (float64) of Lip(x -> x - B^T relu(A x + b)), A = conv(K), B = conv(outer).

    With C = diag(scales), E = B - C A (float rounding of the fold) and z = L A (x - y),
    L the ReLU slopes in [0, 1], one has <C A(x-y), z> >= z^T C z, hence
    ||h(x) - h(y)||^2 <= ||x-y||^2 - z^T (2C - B B^T) z + 2 <E (x-y), z>.
    Gershgorin on Q^-1 (2C - B B^T) Q with Q = diag(weights / scales) gives 2C - B B^T >= S,
    S = diag(slack). For any S' > 0, N = (S' - S)_+, maximizing over z:
    Lip^2 <= 1 + max(N) ||A||^2 + ||S'^-1/2 E||^2 (norms by the Schur test). Per unit,
    S'_i = max(S_i, ||E_i|| / ||A||) (the minimizer of (s - S_i) ||A||^2 + ||E_i||^2 / s): N = 0
    when the forward's slack survived rounding, and the excess is then second order in E (the
    N term is then 0 even where ||A||^2 overflows: 0 * inf was NaN). Weights that overflow give
    inf, never NaN.
    """
    k, b, c, q = (t.detach().to("cpu", torch.float64) for t in (kernel, outer, scales, weights))
    if not all(torch.isfinite(t).all() for t in (k, b, c, q)) or (c <= 0).any() or (q <= 0).any():
        return math.inf
    fold_error = _fold_error(k, b, c)
    rows = sound_row_sums(b.transpose(0, 1), q / c)  # rows of |B B^T|, weighted
    slack = 2 * c - rows - 2 * _U64 * (2 * c + rows)  # a lower bound of 2 c - rows
    norm_a2 = float(sound_row_sums(k).max())  # >= ||A||^2
    tiny = torch.finfo(torch.float64).tiny
    balance = fold_error.flatten(1).norm(dim=1) / math.sqrt(max(norm_a2, tiny))
    chosen = torch.maximum(slack, balance + tiny)  # S', positive
    deficit = (chosen - slack).clamp_min(0) * (1 + 2 * _U64)  # N
    scaled_error = fold_error / chosen.sqrt().view(-1, 1, 1, 1) * (1 + 8 * _U64)  # S'^-1/2 E
    largest_deficit = float(deficit.max())
    spread = 0.0 if largest_deficit == 0 else largest_deficit * norm_a2  # z^T N z <= max(N) ||z||^2
    excess = spread + float(sound_row_sums(scaled_error).max())
    if math.isnan(excess):  # inf - inf or 0 * inf where a weight overflowed
        return math.inf
    safety = rounding_safety(torch.float64, 2)
    return 1.0 if excess == 0 else math.sqrt(1 + excess * safety) * safety


#: (inner, outer) module types of the SLL form: the outer one computes the inner one's adjoint.
_SLL_PAIRS = ((nn.Linear, nn.Linear), (nn.Conv2d, nn.ConvTranspose2d))


def sll_form(module: nn.Module) -> bool:
    """Whether ``module`` is a :class:`Residual` computing x - B^T relu(A x + b), A a Linear or a
    Conv2d and B^T its adjoint geometry, written as SLL layers export it: the branch is exactly
    [inner, ReLU, bias-free outer] with the outer's weight -B, and no hook or override changes
    what these modules compute. Reads no tensor (it runs while torch.fx traces)."""
    if type(module) is not Residual or type(module.branch) is not nn.Sequential:
        return False
    parts = list(module.branch)
    if len(parts) != 3 or type(parts[1]) is not nn.ReLU:
        return False
    inner, outer = parts[0], parts[2]
    if (type(inner), type(outer)) not in _SLL_PAIRS or outer.bias is not None:
        return False
    if any(distrust_reason(m) is not None for m in (module, module.branch, *parts)):
        return False
    if isinstance(inner, nn.Linear):
        return (inner.in_features, inner.out_features) == (outer.out_features, outer.in_features)
    return _adjoint_convolutions(inner, outer)


def _adjoint_convolutions(conv: nn.Conv2d, transposed: nn.ConvTranspose2d) -> bool:
    """Whether ``transposed`` is the adjoint geometry of ``conv``, both stride 1 with zero 'same'
    padding of an odd kernel (the output keeps the input's size)."""
    same = tuple(k // 2 for k in conv.kernel_size)
    plain = (
        m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
        for m in (conv, transposed)
    )
    return (
        all(plain)
        and all(k % 2 == 1 for k in conv.kernel_size)
        and conv.kernel_size == transposed.kernel_size
        and tuple(conv.padding) == same == tuple(transposed.padding)
        and transposed.output_padding == (0, 0)
        and (conv.in_channels, conv.out_channels)
        == (transposed.out_channels, transposed.in_channels)
    )


def sll_form_bound(module: Residual) -> float:
    """:func:`residual_bound` of a residual of :func:`sll_form`, from its weights: K the inner
    weight, B minus the outer one (float64, as kernels), c_i = <B_i, K_i> / <K_i, K_i> (the fold
    B = C K fitted per unit, where positive; the bound charges what the fit misses), q = c w with
    w the Perron vector of diag(2c)^-1 |B B^T|, the Schur weights that make the Gershgorin test
    tightest (Collatz-Wielandt). Any positive c and q give a sound bound."""
    inner, _, outer = module.branch
    outer_weight = -outer.weight.T if isinstance(outer, nn.Linear) else -outer.weight
    kernel, folded = (
        as_kernel(w.detach()).to("cpu", torch.float64) for w in (inner.weight, outer_weight)
    )
    squares = kernel.flatten(1).pow(2).sum(dim=1)
    fitted = (folded * kernel).flatten(1).sum(dim=1) / squares.clamp_min(_TINY)
    usable = (squares > 0) & (fitted > 0)
    fallback = float(fitted[usable].max()) if bool(usable.any()) else 1.0
    scales = torch.where(usable, fitted, fallback)
    return residual_bound(kernel, folded, scales, scales * _perron_weights(folded, scales))


def _perron_weights(outer: Tensor, scales: Tensor) -> Tensor:
    """Positive w with diag(2c)^-1 |B B^T| w ~ rho w: the weights minimizing the largest weighted
    Gershgorin row sum. diag(2c)^-1 P (P = |B B^T| summed over offsets, symmetric) is similar to
    the symmetric S = diag(2c)^-1/2 P diag(2c)^-1/2, so w = diag(2c)^-1/2 v with v the top
    eigenvector of S; a few power steps from there (on positive entries) settle the units the
    eigenvector leaves near zero. Any positive w keeps :func:`residual_bound` sound; all ones
    where P overflows (eigh fails on inf or NaN, and the bound is then infinite anyway)."""
    gram = abs_correlation_sums(outer.transpose(0, 1))
    if not bool(torch.isfinite(gram).all()):
        return torch.ones_like(scales)
    root = (2 * scales).rsqrt()
    top = torch.linalg.eigh(gram * root[:, None] * root)[1][:, -1].abs()
    w = root * (top + 1e-3 * top.max() + _TINY)
    step = gram / (2 * scales[:, None])
    for _ in range(PERRON_STEPS):
        w = step @ w + w * 1e-6  # the shift keeps the fixed point and mixes periodic parts
        w = (w / w.max()).clamp_min(1e-30)  # a unit with a zero row (B_i = 0) stays positive
    return w
