"""PGD attacks (Madry et al., ICLR 2018) in l2 and l_inf, with random restarts.

Used for verification, not training: the attack maximises the best wrong-class margin
max_{j != y} f_j - f_y inside the eps-ball, counting a float tie (margin >= 0) as a success, so a
certificate that float rounding could break shows up. Step sizes follow the usual 2.5 eps / steps.
Every point evaluated is in the ball in exact arithmetic: x + delta rounds to the input's dtype,
which could leave the ball (by 2e-7 eps for pixels in [0, 1], 10% of eps at x ~ 1e3, eps 1e-3)
and report a correct certificate broken, so delta is shrunk until the rounded point is inside.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from lipcert.certify import check_eps, check_inputs, finite_input_norms, input_norm_bound
from lipcert.losses.base import check_count
from lipcert.modes import eval_mode
from lipcert.precision import ieee_float32

#: Step size factor: eps * 2.5 / steps lets PGD cross the ball and back (Madry et al. 2018).
STEP_FACTOR = 2.5


def wrong_class_margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} f_j - f_y per sample (>= 0: the attack succeeded or tied).

    One logit f is a binary model (class 1 iff f > 0), read as the logits (0, f) as in certify.
    """
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)  # (B, 2)
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(dim=1) - true


def _per_sample(eps: Tensor | float, x: Tensor, name: str = "eps") -> Tensor:
    """``eps`` (a number, or one value per sample: a tensor, list or array) as (B, 1, ..., 1) in
    x's dtype; ValueError naming ``name`` unless it has one value or one per sample, each finite
    and >= 0 in x's dtype (1e300 overflows float32)."""
    try:
        if isinstance(eps, bool | str | bytes):
            raise TypeError
        values = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{name} must be a number or one number per sample (a tensor, list or array), "
            f"got {type(eps).__name__}"
        ) from None
    if values.dim() > 1 or values.numel() not in (1, len(x)):
        raise ValueError(
            f"{name} must be a number or a tensor of shape ({len(x)},) (one value per sample), "
            f"got shape {tuple(values.shape)}"
        )
    check_eps(values.flatten(), name)
    return values.expand(len(x)).reshape(-1, *[1] * (x.dim() - 1))


def _check_clamp(clamp: tuple[float, float] | None, x: Tensor) -> None:
    """ValueError unless ``clamp`` is None or a pair of numbers (low, high) with low <= high
    and x inside that box (else clamping moves even x itself, possibly beyond eps)."""
    if clamp is None:
        return
    pair = isinstance(clamp, tuple | list) and len(clamp) == 2
    real = pair and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in clamp)
    if not (real and clamp[0] <= clamp[1]):
        raise ValueError(f"clamp must be None or (low, high) with low <= high, got {clamp!r}")
    if not bool(((x >= clamp[0]) & (x <= clamp[1])).all()):
        raise ValueError(f"x must lie inside the clamp box {tuple(clamp)}")


def _check_attack(x: Tensor, y: Tensor, norm: str, steps: int, restarts: int) -> None:
    """The checks shared by :func:`pgd` and :func:`minimal_adversarial_distance`: x a finite
    floating-point batch (possibly empty), y its (B,) class ids, ``steps`` and ``restarts`` >= 1;
    ValueError naming the argument otherwise."""
    check_inputs(x, y, norm, allow_empty=True)
    finite_input_norms(x)
    check_count("steps", steps, 1)
    check_count("restarts", restarts, 1)


def _project(delta: Tensor, eps: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    norms = delta.flatten(1).norm(dim=1).reshape_as(eps).clamp_min(1e-12)
    return delta * torch.clamp(eps / norms, max=1.0)


def _point(x: Tensor, delta: Tensor, clamp: tuple[float, float] | None) -> Tensor:
    """The input PGD evaluates: x + delta in x's dtype, clamped to the box if one is given."""
    x_adv = x + delta
    return x_adv if clamp is None else x_adv.clamp(*clamp)


def _exact_norms(diff: Tensor, norm: str) -> Tensor:
    """(B,) upper bounds of the exact ||diff|| for float64 differences of two inputs, each
    rounded once (by at most 2^-53 relative): l2, :func:`lipcert.certify.input_norm_bound`,
    whose slack (n + 2) 2^-52 covers that rounding too; l_inf, the largest |entry| raised by
    it."""
    flat = diff.double().flatten(1)
    if norm == "l2":
        return input_norm_bound(flat)
    return flat.abs().amax(dim=1) * (1 + 2.0**-52)


def _fit_in_ball(
    x: Tensor, delta: Tensor, eps: Tensor, norm: str, clamp: tuple[float, float] | None
) -> Tensor:
    """``delta`` shrunk where the rounded point ``_point(x, delta)`` lies outside the eps-ball in
    exact arithmetic: scaled by eps / ||point - x|| (1 - 2^k u), u the dtype's eps, for
    k = 0, 1, ... until inside. It ends: at 2^k u >= 1 delta is 0 and the point is x itself (in
    the box, :func:`_check_clamp`); shrinking toward x keeps a point of the box in it."""
    radius, origin = eps.double().flatten(), x.double()
    relative = torch.finfo(x.dtype).eps
    while True:
        distance = _exact_norms(_point(x, delta, clamp).double() - origin, norm)
        outside = distance > radius
        if not bool(outside.any()):
            return delta
        scale = (radius / distance * (1 - relative)).clamp(0.0, 1.0)
        delta = torch.where(
            outside.reshape_as(eps), delta * scale.to(x.dtype).reshape_as(eps), delta
        )
        relative *= 2


def _random_start(x: Tensor, eps: Tensor, norm: str, gen: torch.Generator) -> Tensor:
    noise = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
    if norm == "linf":
        return noise * eps
    noise = noise / noise.flatten(1).norm(dim=1).reshape_as(eps).clamp_min(1e-12)
    radius = torch.rand(eps.shape, generator=gen, device=x.device, dtype=x.dtype)
    return noise * eps * radius


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Tensor | float,
    norm: str = "l2",
    steps: int = 50,
    restarts: int = 3,
    clamp: tuple[float, float] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Search the ``eps``-ball (per-sample eps allowed) for a misclassified point.

    Returns ``(x_adv, success)``: the strongest point found per sample and whether its margin is
    >= 0 (wrong class or tie); each x_adv is in the ball in exact arithmetic, as rounded to x's
    dtype. ``clamp`` keeps inputs in a box (e.g. images in [0, 1]; x must lie in it): off by
    default, as a certificate covers the whole ball.
    Runs in IEEE float32 (no TF32 on a GPU), the arithmetic the certificates assume.
    ValueError naming the argument for a bad one: ``x`` not a finite floating-point batch, ``y``
    not its (B,) class ids, ``eps`` not one value (or one per sample) finite and >= 0,
    ``steps`` or ``restarts`` not an int >= 1.
    """
    _check_attack(x, y, norm, steps, restarts)
    eps_t = _per_sample(eps, x)
    _check_clamp(clamp, x)
    with eval_mode(model), ieee_float32():  # restores each module's mode after
        return _search(model, x, y, eps_t, norm, steps, restarts, clamp, seed)


def _search(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_t: Tensor,
    norm: str,
    steps: int,
    restarts: int,
    clamp: tuple[float, float] | None,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """The restarts and steps of :func:`pgd` (model already in eval mode)."""
    step = eps_t * STEP_FACTOR / steps
    gen = torch.Generator(device=x.device).manual_seed(seed)
    best_x, best_margin = x.clone(), torch.full((x.shape[0],), -torch.inf, device=x.device)
    for restart in range(restarts):
        delta = _random_start(x, eps_t, norm, gen) if restart else torch.zeros_like(x)
        for _ in range(steps + 1):
            delta = _fit_in_ball(x, delta, eps_t, norm, clamp).requires_grad_(True)
            x_adv = _point(x, delta, clamp)
            margin = wrong_class_margin(model(x_adv), y)
            improved = margin.detach() > best_margin
            best_margin = torch.where(improved, margin.detach(), best_margin)
            best_x[improved] = x_adv.detach()[improved]
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == "linf":
                    delta = delta + step * grad.sign()
                else:
                    g_norm = grad.flatten(1).norm(dim=1).reshape_as(eps_t).clamp_min(1e-12)
                    delta = delta + step * grad / g_norm
                delta = _project(delta, eps_t, norm)
    return best_x, best_margin >= 0


def perturbation_norms(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """(B,) ||x_adv - x|| in ``norm``."""
    diff = (x_adv - x).flatten(1)
    return diff.abs().amax(dim=1) if norm == "linf" else diff.norm(dim=1)


def minimal_adversarial_distance(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    upper: Tensor,
    norm: str = "l2",
    steps: int = 50,
    restarts: int = 1,
    bisections: int = 8,
    doublings: int = 3,
    seed: int = 0,
) -> Tensor:
    """Per sample, the smallest ||x' - x|| (in ``norm``) of a misclassified x' that :func:`pgd`
    finds: an upper bound of the distance to the decision boundary, for the tightness of a
    certificate (distance / radius >= 1 unless the certificate is wrong).

    The search brackets the distance in (0, upper], doubling ``upper`` (at most ``doublings``
    times) where PGD finds nothing, then halves the bracket ``bisections`` times, one PGD per
    step on the samples not yet settled; each success records the norm of the perturbation PGD
    actually used (<= its eps). ``inf`` where even the largest ball gave nothing.

    ``upper``: a number or one per sample, finite and > 0. ValueError naming the argument for a
    bad one (the checks of :func:`pgd`; ``bisections`` and ``doublings`` ints >= 0).
    """
    _check_attack(x, y, norm, steps, restarts)
    check_count("bisections", bisections, 0)
    check_count("doublings", doublings, 0)
    hi = _per_sample(upper, x, "upper").reshape(-1).clone()  # (B,)
    if bool((hi == 0).any()):
        raise ValueError("upper values must be > 0: the search starts there and doubles it")
    if not bool(torch.isfinite(torch.ldexp(hi, torch.tensor(doublings))).all()):
        raise ValueError(f"upper * 2**doublings must stay finite in {x.dtype}, got {doublings=}")
    found = torch.full((len(x),), torch.inf, dtype=x.dtype, device=x.device)
    for _ in range(doublings + 1):
        missing = ~torch.isfinite(found)
        if not bool(missing.any()):
            break
        _record(model, x, y, hi, missing, found, norm, steps, restarts, seed)
        hi = torch.where(torch.isfinite(found), hi, 2 * hi)
    lo = torch.zeros_like(hi)
    hi = torch.minimum(found, hi)
    bracketed = torch.isfinite(found)
    for _ in range(bisections):
        middle = (lo + hi) / 2
        succeeded = _record(model, x, y, middle, bracketed, found, norm, steps, restarts, seed)
        hi = torch.where(succeeded, found, hi)  # found <= the perturbation used <= middle
        lo = torch.where(bracketed & ~succeeded, middle, lo)
    return found


def _record(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    attacked: Tensor,
    found: Tensor,
    norm: str,
    steps: int,
    restarts: int,
    seed: int,
) -> Tensor:
    """PGD at per-sample ``eps`` on the ``attacked`` samples; lowers ``found`` in place to the
    norm of each successful perturbation. Returns (B,) bool: which attacked samples succeeded."""
    index = attacked.nonzero()[:, 0]
    succeeded = torch.zeros_like(attacked)
    if len(index) == 0:
        return succeeded
    x_sub = x[index]
    x_adv, success = pgd(model, x_sub, y[index], eps[index], norm, steps, restarts, seed=seed)
    distances = torch.where(success, perturbation_norms(x_adv, x_sub, norm), torch.inf)
    found[index] = torch.minimum(found[index], distances)
    succeeded[index] = success
    return succeeded
