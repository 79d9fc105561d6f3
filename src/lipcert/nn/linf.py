"""l_inf-distance neurons (Zhang et al., ICML 2021; ICLR 2022): ``LinfDist`` and its helpers.

``LinfDist(in_features, out_features)`` computes u_m(x) = ||x - w_m||_p + b_m (Zhang et al. 2021:
the l_inf-dist neuron at p = inf, its "l_p relaxation" at finite p), optionally followed by their
"mean shift normalization" u - E[u] (the batch mean in training, a running mean at eval; a bias
is then redundant, so the two exclude each other). The distances go through the memory-lean kernels
of :mod:`lipcert.nn.linf_kernel`.

**Lipschitz constant (l_inf -> l_inf).** At p = inf each output is 1-Lipschitz: by the reverse
triangle inequality |u(x) - u(x')| <= ||x - x'||_inf (the 2021 paper's central property); the
eval-mode shift is a constant. At finite p, ||x - w||_p is 1-Lipschitz in l_p and
||d||_p <= N^(1/p) ||d||_inf, so the sound bound is N^(1/p) (N = ``in_features``), tight when all
coordinates move together. ``lipschitz_bound()`` returns that bound for the current p: a model
certified before p reaches inf gets honest, smaller radii (never the p = inf number). In training
mode, mean shift makes the output of a sample depend on the whole batch; the batch map is
2(1 - 1/B)-Lipschitz in the l_inf norm over the batch (each u moves by at most eps, their mean
too), so the bound doubles there.

**The l_p schedule.** :class:`LpSchedule` raises p from ``p_start`` to ``p_end`` geometrically and
then sets p = inf (as in the 2021 paper: p from 8 to about 1000, the last epochs at inf). A layer
given a schedule follows ``set_progress(progress)``, called by :mod:`lipcert.train` every step
(resume is exact); :func:`set_p` sets p for every layer of a model at once, :func:`final_p` for
the length of a block to the p each layer ends training at. p is a buffer, so checkpoints keep the
p a model was trained (and certified) at.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipcert.bounds.network import (
    UnsupportedNorm,
    magnitude,
    register_bound_rule,
    register_internal_growth,
    register_internal_size,
)
from lipcert.bounds.operator import rounding_safety
from lipcert.nn.constrained import check_input_shape, layer_name
from lipcert.nn.constraint import LipschitzLayer
from lipcert.nn.linf_kernel import lp_distance

#: Default l_p schedule, after Zhang et al. 2021 (l_p relaxation): p from 8 to 1000, then inf.
DEFAULT_P_START, DEFAULT_P_END = 8.0, 1000.0
#: Batch-map Lipschitz factor of training-mode mean shift: u_b - mean(u) moves by <= 2 eps.
MEAN_SHIFT_TRAIN_FACTOR = 2.0
#: Default diagonal offset of :func:`identity_init_` (inputs after mean shift are O(1)).
IDENTITY_OFFSET = 3.0


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
        raise ValueError(f"p must be a number >= 1 or math.inf, got {p!r}")
    return float(p)


def _layer_p(layer: nn.Module) -> float:
    """``layer.p`` as a float, checked (a ValueError naming the layer): p is a buffer of
    :class:`LinfDist` (an attribute of :class:`PlainLinfDist`) that a state dict, a tampered
    checkpoint or a write through ``.data`` sets unchecked, and below 1 ||.||_p is no norm, nor
    N^(1/p) a bound (36 at p = 0.5 for N = 6, 1/6 at p = -1)."""
    try:
        return _check_p(float(layer.p))
    except ValueError as err:
        raise ValueError(f"{layer_name(layer)}: {err}") from None


@dataclass(frozen=True)
class LpSchedule:
    """p as a function of training progress t in [0, 1] (Zhang et al. 2021, l_p relaxation).

    p = ``p_start`` for t < ``hold``, then grows geometrically to ``p_end`` at t = ``ramp_end``,
    then p = inf (the authors' code: p_start exp(log(p_end / p_start) r), r the ramp's progress,
    and inf once r reaches 1). :mod:`lipcert.train` sets t = step / steps, below 1 at the last
    step, so it refuses ``ramp_end = 1`` (p would never reach inf); a schedule saved with it still
    loads. ``powers_of_two`` rounds p (in log
    scale) to a power of two, for which the kernels square instead of taking exp/log (about 13x
    faster on CPU).
    """

    p_start: float = DEFAULT_P_START
    p_end: float = DEFAULT_P_END
    hold: float = 0.05
    ramp_end: float = 0.95
    powers_of_two: bool = False

    def __post_init__(self) -> None:
        _check_p(self.p_start)
        if not (math.isfinite(self.p_end) and self.p_end >= self.p_start):
            raise ValueError(f"p_end must be finite and >= p_start, got {self.p_end!r}")
        if not 0.0 <= self.hold <= self.ramp_end <= 1.0:
            raise ValueError(
                f"need 0 <= hold <= ramp_end <= 1, got hold={self.hold}, ramp_end={self.ramp_end}"
            )

    def __call__(self, progress: float) -> float:
        if progress >= self.ramp_end:
            return math.inf
        ramp = max(0.0, progress - self.hold) / max(self.ramp_end - self.hold, 1e-12)
        p = self.p_start * (self.p_end / self.p_start) ** ramp
        return 2.0 ** round(math.log2(p)) if self.powers_of_two else p


class LinfDist(LipschitzLayer, nn.Module):
    """u(x) = ||x - w||_p + b per output, optional mean shift; input (*, in_features).

    Zhang et al., ICML 2021: the l_inf-dist neuron, l_p relaxation, mean shift. Arguments
    beyond torch's: ``p`` (>= 1 or inf), ``mean_shift`` (subtract the batch mean in training,
    the running mean at eval; excludes ``bias``), ``momentum`` of the running mean (as in
    ``nn.BatchNorm1d``), ``p_schedule`` (an :class:`LpSchedule` followed by ``set_progress``).
    """

    lipschitz_norm = "linf"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        p: float = math.inf,
        mean_shift: bool = False,
        momentum: float = 0.1,
        p_schedule: LpSchedule | None = None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if bias and mean_shift:
            raise ValueError("bias=True is redundant with mean_shift=True (the shift removes it)")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.mean_shift, self.momentum, self.p_schedule = mean_shift, momentum, p_schedule
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("p", torch.tensor(_check_p(p), dtype=torch.float64, device=device))
        running = torch.zeros(out_features, **factory) if mean_shift else None
        self.register_buffer("running_mean", running)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights from N(0, 1), zero bias and running mean."""
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.running_mean is not None:
            self.running_mean.zero_()

    def set_p(self, p: float) -> None:
        self.p.fill_(_check_p(p))

    def set_progress(self, progress: float) -> None:
        """Follow ``p_schedule`` (if any) at training progress ``progress`` in [0, 1]."""
        if self.p_schedule is not None:
            self.set_p(self.p_schedule(progress))

    allocates_output = True  # the distances

    def forward(self, input: Tensor) -> Tensor:
        _check_features(self, input, self.in_features)
        out = biased_distances(input, self.weight, self.bias, _layer_p(self))  # (B, M)
        if self.mean_shift:
            out = out - self._shift(out)
        return out.reshape(*input.shape[:-1], self.out_features)

    def _shift(self, out: Tensor) -> Tensor:
        """The batch mean (training; it updates the running mean) or the running mean (eval). An
        empty batch keeps the running mean (its mean is NaN), as ``nn.BatchNorm1d`` does."""
        if not self.training:
            return self.running_mean
        mean = out.mean(dim=0)
        if len(out):
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        return mean

    def lipschitz_bound(self) -> float:
        """l_inf -> l_inf bound: :func:`distance_bound`; x2 for the batch map of training-mode
        mean shift (module docstring)."""
        bound = distance_bound(self.in_features, _layer_p(self))
        if self.mean_shift and self.training:
            bound *= MEAN_SHIFT_TRAIN_FACTOR
        return bound

    def export(self) -> PlainLinfDist:
        with torch.no_grad():
            shift = self.running_mean if self.mean_shift else None
            return PlainLinfDist(self.weight, self.bias, shift, _layer_p(self))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, p={float(self.p)}, mean_shift={self.mean_shift}"
        )


def _check_features(layer: nn.Module, input: Tensor, features: int) -> None:
    """ValueError naming ``layer`` unless ``input`` is (*, ``features``)."""
    ok = input.dim() >= 1 and input.shape[-1] == features
    check_input_shape(layer, input, f"(*, {features})", ok)


def biased_distances(input: Tensor, weight: Tensor, bias: Tensor | None, p: float) -> Tensor:
    """(B, M) ||x_b - w_m||_p + b_m of ``input`` (*, N) flattened to (B, N)."""
    flat = input.reshape(-1, weight.shape[1]).to(weight.dtype)  # (B, N)
    out = lp_distance(flat, weight, p)
    return out if bias is None else out + bias


def distance_bound(in_features: int, p: float) -> float:
    """l_inf -> l_inf bound of x -> (||x - w_m||_p + b_m)_m: 1 at p = inf (each output moves by at
    most ||dx||_inf), in_features^(1/p) at finite p (||dx||_p <= n^(1/p) ||dx||_inf)."""
    if math.isinf(p):
        return 1.0
    return in_features ** (1.0 / p) * rounding_safety(torch.float64, 1)


class PlainLinfDist(nn.Module):
    """The export of :class:`LinfDist`: ||x - w||_p + b - shift with constant weights.

    No ``torch.nn`` layer computes an l_p distance, so this small module holds the weights as
    buffers and computes the distance as the layer does (:func:`lp_distance`, memory-lean, each
    |x_i - w_i| scaled by the largest before the power), and with plain ops while exporting to
    ONNX (Sub, Abs, ReduceMax, Div, Pow, ReduceSum; the same scaling). ``torch.cdist`` is not used:
    at a large finite p its unscaled sum of powers overflows, and at p = 2 it switches to
    ||x||^2 + ||w||^2 - 2 x.w, which loses distances between points far from the origin.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, shift: Tensor | None, p: float):
        super().__init__()
        self.p = _check_p(p)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("shift", None if shift is None else shift.detach().clone())

    def forward(self, input: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():  # the input shape was checked before tracing
            out = self._onnx_distances(input)
        else:
            _check_features(self, input, self.weight.shape[1])
            out = biased_distances(input, self.weight, self.bias, _layer_p(self))  # (B, M)
        if self.shift is not None:
            out = out - self.shift
        return out.reshape(*input.shape[:-1], self.weight.shape[0])

    def _onnx_distances(self, input: Tensor) -> Tensor:
        """:func:`biased_distances` with the plain ops ONNX has (the same scaling)."""
        flat = input.reshape(-1, self.weight.shape[1]).to(self.weight.dtype)  # (B, N)
        diff = (flat[:, None, :] - self.weight[None]).abs()  # (B, M, N)
        out, p = diff.amax(dim=-1), _layer_p(self)
        if not math.isinf(p):
            scale = out.clamp_min(torch.finfo(out.dtype).tiny)[..., None]
            out = (diff / scale).pow(p).sum(dim=-1).pow(1.0 / p) * scale[..., 0]
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, p={self.p}"
        )


@register_bound_rule(PlainLinfDist)
def _plain_linf_dist(module: nn.Module, norm: str) -> float:
    """The exported layer's bound, as :meth:`LinfDist.lipschitz_bound` in eval mode (l_inf only)."""
    if norm != "linf":
        raise UnsupportedNorm(f"PlainLinfDist is Lipschitz in linf, not {norm}")
    return distance_bound(module.weight.shape[1], _layer_p(module))


@register_internal_size(LinfDist, PlainLinfDist)
def _distances_internal_size(module: nn.Module, x: Tensor, norm: str) -> float:
    """The distances, before a bias adds or a mean shift subtracts (isometries): large distances
    that either cancels round at their own size. With the bias added first, distances ~1e6 that
    a bias of -1e6 cancels counted as ~0: a radius of 0.00915 was broken 5e-4 away."""
    with torch.no_grad():
        distances = biased_distances(x, module.weight, None, _layer_p(module))
    return magnitude(distances, norm)


@register_internal_growth(LinfDist, PlainLinfDist)
def _distances_internal_growth(module: nn.Module, norm: str) -> tuple[float, float]:
    """|x_j - w_mj| <= ||h|| + max |w| (||h||_inf <= ||h|| in either norm); the distance, whose
    powers :func:`lp_distance` takes of the differences scaled by their largest, is at most
    n^(1/p) times that (:func:`distance_bound`), and the distance plus the bias at most max |b|
    more; subtracting the shift gives the output. An exported layer may hold both, and they may
    cancel: distances of 1.5e38 plus a bias of 2e38 are inf where the output, less a shift of
    2e38, is not (a ``LinfDist`` refuses a bias beside its mean shift)."""
    reach = distance_bound(module.weight.shape[1], _layer_p(module))
    weight = float(module.weight.detach().abs().max()) if module.weight.numel() else 0.0
    bias = 0.0 if module.bias is None else float(module.bias.detach().abs().max())
    return reach * weight + bias, reach


class Negate(LipschitzLayer, nn.Module):
    """x -> -x: an l_inf-distance net's logits are its last layer's negated distances (Zhang et
    al. 2021: a class scores high near its prototype). An isometry in every norm."""

    lipschitz_norm = "any"
    allocates_output = True

    def forward(self, input: Tensor) -> Tensor:
        return -input

    def lipschitz_bound(self) -> float:
        return 1.0

    def export(self) -> Negate:
        return Negate()


def set_p(model: nn.Module, p: float) -> None:
    """Set p of every :class:`LinfDist` in ``model`` (the l_p relaxation, Zhang et al. 2021)."""
    p = _check_p(p)
    for module in model.modules():
        if isinstance(module, LinfDist):
            module.set_p(p)


@contextmanager
def final_p(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every :class:`LinfDist` of ``model`` at the p it is certified at after
    training: its schedule's end (``set_progress(1.0)``: p = inf) or, without a schedule, its own
    p. Each layer's p is restored after (the buffer's value, as it was)."""
    saved = [(layer, layer.p.clone()) for layer in model.modules() if isinstance(layer, LinfDist)]
    try:
        for layer, _ in saved:
            layer.set_progress(1.0)
        yield model
    finally:
        for layer, p in saved:
            layer.p.copy_(p)


def identity_init_(layer: LinfDist, offset: float = IDENTITY_OFFSET) -> None:
    """Make a square ``layer`` start near the identity (Zhang et al. 2021, identity init).

    w_ii = -offset, w_ij = 0 (i != j): u_i(x) = max(|x_i + offset|, max_{j != i} |x_j|), which is
    x_i + offset whenever x_i + offset >= |x_j| for all j; mean shift then removes the offset.
    Deep l_inf-distance nets thus start as shallow ones and learn to deviate.
    """
    if layer.in_features != layer.out_features:
        raise ValueError(
            f"identity_init_ needs a square layer, got {layer.in_features} -> {layer.out_features}"
        )
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.diagonal().fill_(-offset)
