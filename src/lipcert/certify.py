"""Certified radii from Lipschitz bounds, with a float-rounding safety.

**l2** (design.md §4). If the logit map f is L-Lipschitz (l2 -> l2), the margin f_y - f_j can
fall by at most sqrt(2) L ||delta|| (the vector e_y - e_j has norm sqrt(2)), so
r(x) = (f_y(x) - max_{j != y} f_j(x)) / (sqrt(2) L) is a certified radius. When the model ends in a
linear layer with rows w_k and the rest of the network (the *body*) is L_b-Lipschitz, the margin
f_y - f_j is (L_b ||w_y - w_j||)-Lipschitz, so r(x) = min_j (f_y - f_j) / (L_b ||w_y - w_j||)
is a tighter radius (Araujo et al. 2023; SLL's ``eval_certified``). Both come from sound bounds
(``lipcert.bounds``), never from an assumed 1.0.

**l_inf from l2.** ||delta||_2 <= sqrt(d) ||delta||_inf, so an l2 radius r gives the l_inf radius
r / sqrt(d) (d = input dimension). This is sound but loose; l_inf-distance nets certify directly.

**Rounding.** Logits are computed in floating point, each off its exact value by some delta.
Bounding the float32 forward error of a whole network tightly is impractical, so we use a
documented a-priori bound, checked against float64 recomputation in the tests:
delta_logit(x) = ROUNDING_REL * (1 + max_k |f_k(x)| + L_b ||x||_2) for float32 (scaled by the
dtype's eps otherwise), L_b the body bound: L_b ||x||_2 bounds the size of the intermediate
activations. With delta_m = 2 delta_logit (a margin is a difference of two logits), the radius is
r = (m_computed - 3 delta_m) / L_pair: at any x' with ||x' - x|| <= r the exact margin is
>= 2 delta_m and the computed one >= delta_m > 0, so even a float tie is excluded.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipcert.bounds.network import module_bound
from lipcert.nn.constraint import EvalCache

#: Relative float32 logit error allowed for: 2^-14 ~ 6.1e-5 = 1024 * float32 unit roundoff
#: (2^-24). Measured errors of trained lipcert nets are ~1e-7 relative (tests/test_certify.py).
ROUNDING_REL_FLOAT32 = 2.0**-14
#: Margins pass through (e_y - e_j), whose l2 norm is sqrt(2) (design.md §4, Tsuzuku et al. 2018).
SQRT2 = math.sqrt(2.0)
NORMS = ("l2", "linf")


@dataclass(frozen=True)
class LipschitzSummary:
    """What a certificate needs: a body bound and, when known, the last linear layer."""

    body_bound: float
    head_weight: Tensor | None  # (C, D) float64 rows w_k of the last linear layer, or None
    head_pair_bound: Tensor | None  # (C, C) sound upper bounds of ||w_i - w_j||


_SUMMARIES: weakref.WeakKeyDictionary[nn.Module, EvalCache] = weakref.WeakKeyDictionary()


def _pairwise_row_distance_bound(weight: Tensor) -> Tensor:
    """Upper bounds of ||w_i - w_j||_2 in float64 (+ a relative rounding slack)."""
    weight = weight.detach().double()
    dist = torch.cdist(weight[None], weight[None])[0]  # (C, C)
    return dist * (1 + 1e-12) + 1e-300


def _head_weight(module: nn.Module) -> Tensor | None:
    """The effective weight of a final linear layer (nn.Linear or a constrained/exported one)."""
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            return module.weight.detach().double().clone()
    return None


def summarize(model: nn.Module) -> LipschitzSummary:
    """Sound Lipschitz summary of ``model`` (eval mode): body + linear head when possible."""
    if isinstance(model, nn.Sequential) and len(model) > 1:
        head = _head_weight(model[-1])
        if head is not None:
            body_bound = module_bound(model[:-1])
            return LipschitzSummary(body_bound, head, _pairwise_row_distance_bound(head))
    return LipschitzSummary(module_bound(model), None, None)


def cached_summary(model: nn.Module) -> LipschitzSummary:
    """:func:`summarize`, computed once per model state (keyed on every parameter and buffer)."""
    cache = _SUMMARIES.setdefault(model, EvalCache())
    sources = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        return cache.get(sources, lambda: summarize(model), enabled=True)


def _check_inputs(x: Tensor, y: Tensor, norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of class ids, got {getattr(y, 'dtype', y)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values")


def logit_rounding_bound(
    logits: Tensor, x: Tensor, lipschitz: float, computed_in: torch.dtype
) -> Tensor:
    """A-priori bound of the rounding error of each sample's logits (see module docstring).

    ``computed_in`` is the dtype the forward pass ran in (the logits may have been upcast since).
    """
    rel = ROUNDING_REL_FLOAT32 * torch.finfo(computed_in).eps / torch.finfo(torch.float32).eps
    scale = 1 + logits.abs().amax(dim=1) + lipschitz * x.flatten(1).norm(dim=1)
    return rel * scale


def radii_from_logits(logits: Tensor, x: Tensor, y: Tensor, summary: LipschitzSummary) -> Tensor:
    """l2 radii (<= 0 where misclassified or not certifiable) from precomputed logits."""
    logits64 = logits.detach().double()
    y = y.long()
    true_logit = logits64.gather(1, y[:, None])  # (B, 1)
    margins = true_logit - logits64  # (B, C); 0 at the true class
    if summary.head_pair_bound is not None:
        pair = summary.head_pair_bound.to(logits64.device)[y] * summary.body_bound  # (B, C)
    else:
        pair = torch.full_like(margins, SQRT2 * summary.body_bound)
    computed_in = torch.promote_types(logits.dtype, x.dtype)
    delta_margin = 2 * logit_rounding_bound(logits64, x.double(), summary.body_bound, computed_in)
    safe = margins - 3 * delta_margin[:, None]
    per_class = safe / pair.clamp_min(1e-300)
    per_class.scatter_(1, y[:, None], math.inf)
    radius = per_class.amin(dim=1)
    # A sample whose computed margin is not positive is misclassified (or tied): radius <= 0.
    wrong = margins.scatter(1, y[:, None], math.inf).amin(dim=1) <= 0
    return torch.where(wrong, torch.minimum(radius, torch.zeros_like(radius)), radius).float()


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str = "l2",
    lipschitz: float | None = None,
) -> Tensor:
    """Per-sample certified radius in ``norm`` around each input; <= 0 means not certified.

    ``lipschitz``: a known l2 Lipschitz constant of the whole logit map (then the sqrt(2) form is
    used); by default a sound bound is computed once per model state (body + last-layer form when
    the model is an ``nn.Sequential`` ending in a linear layer). Costs one forward pass.
    """
    _check_inputs(x, y, norm)
    if lipschitz is not None and not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a positive finite number, got {lipschitz!r}")
    was_training = model.training
    model.eval()
    try:
        summary = (
            LipschitzSummary(float(lipschitz), None, None)
            if lipschitz is not None
            else cached_summary(model)
        )
        with torch.no_grad():
            logits = model(x)
    except RuntimeError as err:
        shape = tuple(x.shape)
        raise ValueError(f"the model does not accept inputs of shape {shape}: {err}") from err
    finally:
        model.train(was_training)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"certify needs (B, C>=2) logits, the model gave {tuple(logits.shape)}")
    if bool((y < 0).any()) or bool((y >= logits.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {y.min()}..{y.max()}")
    radius = radii_from_logits(logits, x, y, summary)
    if norm == "linf":
        radius = radius / math.sqrt(x[0].numel())
    return radius


def certified_accuracy(radii: Tensor, eps: list[float] | tuple[float, ...]) -> dict[float, float]:
    """Fraction of samples whose radius is at least each eps (eps = 0: clean accuracy)."""
    return {float(e): float((radii > 0).logical_and(radii >= e).float().mean()) for e in eps}


def certify_batched(
    model: nn.Module, x: Tensor, y: Tensor, norm: str = "l2", batch_size: int = 1000
) -> Tensor:
    """:func:`certify` over a whole dataset in batches (the bound is computed once)."""
    if len(y) == 0:
        raise ValueError("cannot certify an empty dataset")
    device = next(model.parameters()).device
    return torch.cat(
        [
            certify(
                model, x[i : i + batch_size].to(device), y[i : i + batch_size].to(device), norm
            ).cpu()
            for i in range(0, len(y), batch_size)
        ]
    )
