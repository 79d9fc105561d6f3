"""Counterfactual explanations: follow the gradient of the margin until the decision changes.

Serrurier et al., "Achieving robustness in classification using optimal transport with hinge
regularization", CVPR 2021: the minimizer of the hKR loss over 1-Lipschitz functions is the
potential of an optimal-transport problem; its gradient has norm 1 almost everywhere and points
along the transport plan between the classes, so following it changes the input in a
meaningful way and reaches the decision boundary after a distance close to the certified radius
|f(x)|. The gradient of an unconstrained network is a local direction with no such meaning, and
its certified radius (from a product of layer norms) is far below the distance actually needed.

**Search.** With c the class predicted at x and m(z) = f_c(z) - max_{j != c} f_j(z) its margin
(+-f for a binary one-logit model, class 1 iff f > 0), the binary linearized step of DeepFool
(Moosavi-Dezfooli et al., CVPR 2016, Eq. 3 and Alg. 1), applied to the margin against the
runner-up class, z <- z - (1 + overshoot) m(z) grad m(z) / ||grad m(z)||^2, is repeated from
z = x until the decision changes,
then bisection on the last step finds a point x' with another decision within
:data:`BISECTION_STEPS` halvings of the boundary. For a gradient-norm-preserving network that is
close to the optimal potential the first step already lands there.

**Tightness** = ||x' - x||_2 / r(x), r the certified l2 radius of the prediction at x
(:func:`lipcert.certify` with the predicted classes as labels). Soundness of the certificate
means tightness >= 1 for every flipped point; 1.0 means the certificate is exact.

**Arithmetic.** The search runs in the model's own dtypes, with TF32 and autocast off
(:func:`lipcert.precision.ieee_float32`), as :func:`lipcert.certify` does: under a caller's
``torch.autocast(bfloat16)`` 94 of 200 counterfactuals that flipped the bfloat16 decision did not
flip the model's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lipcert.attacks import perturbation_norms, wrong_class_margin
from lipcert.certify import certify, check_points, finite_input_norms, predict, run_model
from lipcert.losses.base import check_count, check_hyperparameter
from lipcert.modes import eval_mode
from lipcert.precision import ieee_float32
from lipcert.report import save_figure

#: Default DeepFool overshoot: each step goes 2% past the linearized boundary (Moosavi-Dezfooli
#: et al. 2016 use 0.02), so a nearly linear margin flips in one step.
DEFAULT_OVERSHOOT = 0.02
#: Default cap on the linearized steps; hKR nets flip in 1-3, plain CNNs in a few more.
DEFAULT_MAX_STEPS = 50
#: Halvings of the last step: the counterfactual lies within 2^-30 of a step of the boundary.
BISECTION_STEPS = 30
#: Margin used for the step at an exact tie (margin 0 that still predicts c), so it moves on.
TIE_MARGIN = 1e-6


@dataclass(frozen=True)
class Counterfactuals:
    """Counterfactuals of a batch: per sample, the point x' found and what it tells.

    ``points`` (B, ...): x', where the decision changed (the bisection's outer end, next to the
    boundary; where no step changed it, the last iterate). ``gradients`` (B, ...): grad m at x.
    ``classes`` / ``new_classes`` (B,): the decision at x / at x'.
    ``distances`` (B,): ||x' - x||_2, inf where the decision did not change. ``radii`` (B,): the
    certified l2 radius of the prediction at x (NaN when the model has no sound bound).
    """

    inputs: Tensor
    points: Tensor
    gradients: Tensor
    classes: Tensor
    new_classes: Tensor
    distances: Tensor
    radii: Tensor

    @property
    def flipped(self) -> Tensor:
        """(B,) bool: whether the decision at x' differs from the one at x."""
        return self.new_classes != self.classes

    @property
    def tightness(self) -> Tensor:
        """(B,) ||x' - x|| / r(x); NaN where nothing flipped or the radius is not positive."""
        valid = self.flipped & (self.radii > 0)
        return torch.where(valid, self.distances / self.radii, torch.nan)

    def flip_rate(self) -> float:
        return float(self.flipped.float().mean())

    def median_tightness(self) -> float:
        """Median tightness over the samples where it is defined (NaN if none)."""
        return float(self.tightness.nanmedian())


def class_margin(logits: Tensor, classes: Tensor) -> Tensor:
    """(B,) f_c - max_{j != c} f_j; a one-logit model is read as logits (0, f), as in certify."""
    return -wrong_class_margin(logits, classes)


def _probe(model: nn.Module, z: Tensor, classes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decisions, margins m(z) and gradients grad m(z) at the points ``z``."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(z)
        margin = class_margin(logits, classes)
        (grad,) = torch.autograd.grad(margin.sum(), z)
    return predict(logits.detach()), margin.detach(), grad


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *[1] * (like.dim() - 1))  # (B, 1, ..., 1)


def _linearized_search(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    start: tuple[Tensor, Tensor, Tensor],
    max_steps: int,
    overshoot: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepFool steps from x (``start``: its :func:`_probe`) until the decision changes.

    Returns (inside, outside, decision at outside): the last two iterates per sample.
    """
    inside, outside = x.clone(), x.clone()
    decision, margin, grad = start
    for _ in range(max_steps):
        grad_sq = grad.flatten(1).pow(2).sum(dim=1)  # (B,)
        active = (decision == classes) & (grad_sq > 0)
        if not bool(active.any()):
            break
        scale = (1 + overshoot) * margin.clamp_min(TIE_MARGIN) / grad_sq.clamp_min(1e-300)
        step = -_per_sample(torch.where(active, scale, 0.0), x) * grad
        inside = torch.where(_per_sample(active, x), outside, inside)
        outside = outside + step
        decision, margin, grad = _probe(model, outside, classes)
    return inside, outside, decision


def _bisect(
    model: nn.Module, inside: Tensor, outside: Tensor, classes: Tensor, flipped: Tensor
) -> Tensor:
    """Shrink [inside, outside] (decision c at inside, another at outside) to the boundary."""
    mask = _per_sample(flipped, inside)
    with torch.no_grad():
        for _ in range(BISECTION_STEPS):
            middle = (inside + outside) / 2
            keeps = _per_sample(predict(model(middle)) == classes, inside) & mask
            inside = torch.where(keeps, middle, inside)
            outside = torch.where(mask & ~keeps, middle, outside)
    return outside


def _certified_radii(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """l2 radius of the prediction at x; NaN (with a warning) when no sound bound exists."""
    try:
        return certify(model, x, classes, norm="l2")
    except TypeError as err:  # a module without a sound bound rule
        warnings.warn(f"no certified radius, so no tightness: {err}", stacklevel=4)
        return torch.full((len(x),), torch.nan, device=x.device)


def counterfactuals(
    model: nn.Module,
    x: Tensor,
    max_steps: int = DEFAULT_MAX_STEPS,
    overshoot: float = DEFAULT_OVERSHOOT,
) -> Counterfactuals:
    """Counterfactual of each input of ``x`` (B, ...), found along the margin's gradient.

    See the module docstring: linearized steps, then bisection to the boundary. Works for any
    differentiable classifier (logits (B, C), or (B, 1) for a binary one-logit model); the
    model is evaluated in eval mode, in IEEE arithmetic (module docstring), and left in the mode
    it was in.
    """
    check_points(x)
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (B, ...) of inputs, got shape {tuple(x.shape)}")
    finite_input_norms(x)
    check_count("max_steps", max_steps, 1)
    check_hyperparameter("overshoot", overshoot, positive=False)
    with eval_mode(model), ieee_float32():
        return _counterfactuals(model, x, max_steps, overshoot)


def _counterfactuals(
    model: nn.Module, x: Tensor, max_steps: int, overshoot: float
) -> Counterfactuals:
    """:func:`counterfactuals` of checked arguments, the model in eval mode and IEEE arithmetic."""
    logits = run_model(model, x)  # a model that refuses x: a ValueError naming x's shape
    if logits.dim() != 2:
        raise ValueError(
            "counterfactuals needs (B, C) logits, (B, 1) for a binary model; the model gave "
            f"{tuple(logits.shape)}"
        )
    classes = predict(logits)
    start = _probe(model, x, classes)
    inside, outside, decision = _linearized_search(model, x, classes, start, max_steps, overshoot)
    flipped = decision != classes
    points = _bisect(model, inside, outside, classes, flipped)
    new_classes = predict(run_model(model, points))
    distances = perturbation_norms(points, x, "l2")
    distances = torch.where(new_classes != classes, distances, torch.inf)
    radii = _certified_radii(model, x, classes)
    return Counterfactuals(x, points, start[2], classes, new_classes, distances, radii)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image(tensor: Tensor):
    """(C, H, W) -> an array imshow accepts: (H, W) for one channel, else (H, W, C)."""
    array = tensor.detach().cpu().float()
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).clamp(0, 1).numpy()


def _gradient_image(gradient: Tensor):
    """(C, H, W) -> (H, W): the channel mean, for a diverging colormap centred on 0."""
    return gradient.detach().cpu().float().mean(dim=0).numpy()


def plot_counterfactual_grid(
    results: dict[str, Counterfactuals],
    path: str | Path,
    rows: int = 8,
    class_names: Sequence[str] | None = None,
) -> Path:
    """PNG grid: per row an input, then per model its gradient map and its counterfactual.

    Images are (C, H, W); counterfactuals are shown clipped to the image range of the inputs.
    """
    plt = _pyplot()
    first = next(iter(results.values()))
    if first.inputs.dim() != 4:
        shape = tuple(first.inputs.shape)
        raise ValueError(f"the grid needs image inputs (B, C, H, W), got {shape}")
    rows = min(rows, len(first.inputs))
    low, high = float(first.inputs.min()), float(first.inputs.max())
    seen = max(int(torch.cat([r.classes, r.new_classes]).max()) for r in results.values())
    names = class_names or [str(c) for c in range(seen + 1)]
    cols = 1 + 2 * len(results)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(_image(first.inputs[r]), cmap="gray", vmin=low, vmax=high)
        axes[r, 0].set_title(f"input: {names[int(first.classes[r])]}", fontsize=7)
        for m, (model_name, res) in enumerate(results.items()):
            grad = _gradient_image(res.gradients[r])
            limit = float(abs(grad).max()) or 1.0
            axes[r, 1 + 2 * m].imshow(grad, cmap="bwr", vmin=-limit, vmax=limit)
            axes[r, 1 + 2 * m].set_title(f"{model_name}: gradient", fontsize=7)
            cf = res.points[r].clamp(low, high)
            axes[r, 2 + 2 * m].imshow(_image(cf), cmap="gray", vmin=low, vmax=high)
            axes[r, 2 + 2 * m].set_title(_counterfactual_title(res, r, names), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)


def _counterfactual_title(res: Counterfactuals, i: int, names: Sequence[str]) -> str:
    if not bool(res.flipped[i]):
        return "no flip"
    tight = float(res.tightness[i])
    text = f"-> {names[int(res.new_classes[i])]}, d={float(res.distances[i]):.2f}"
    return text + ("" if math.isnan(tight) else f", x{tight:.2f}")


def _signed_margin(model: nn.Module, points: Tensor) -> Tensor:
    """(N,) f for a one-logit model, f_1 - f_0 for two logits: > 0 where class 1 is predicted."""
    with torch.no_grad():
        logits = model(points)
    if logits.shape[1] == 1:
        return logits[:, 0]
    if logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ValueError(f"the 2-D figure needs a binary model, got {logits.shape[1]} logits")


#: Grid resolution (per axis) of the 2-D figure and the margin around the data it covers.
PLANE_RESOLUTION = 300
PLANE_PADDING = 0.5
#: Test points whose certified disc and counterfactual arrow are drawn in the 2-D figure.
PLANE_HIGHLIGHTS = 12


def plot_decision_2d(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: Counterfactuals,
    path: str | Path,
    title: str = "",
) -> Path:
    """PNG of a binary classifier on 2-D inputs: level sets of f, the boundary f = 0, certified
    radii (discs around a few points, which a sound certificate keeps off the boundary) and
    the counterfactual of each of those points (arrows)."""
    plt = _pyplot()
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"the 2-D figure needs inputs (N, 2), got {tuple(x.shape)}")
    low = x.min(dim=0).values - PLANE_PADDING
    high = x.max(dim=0).values + PLANE_PADDING
    axes_values = [torch.linspace(float(low[i]), float(high[i]), PLANE_RESOLUTION) for i in (0, 1)]
    grid_x, grid_y = torch.meshgrid(*axes_values, indexing="xy")  # (R, R) each
    plane = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1).to(x)  # (R * R, 2)
    with eval_mode(model):
        values = _signed_margin(model, plane).reshape(grid_x.shape).cpu()  # (R, R)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    limit = float(values.abs().max())
    filled = ax.contourf(grid_x, grid_y, values, levels=30, cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(filled, ax=ax, label="f (class 1 iff f > 0)")
    lines = ax.contour(grid_x, grid_y, values, levels=15, colors="k", linewidths=0.4, alpha=0.5)
    ax.clabel(lines, fontsize=6, fmt="%.2f")
    ax.contour(grid_x, grid_y, values, levels=[0.0], colors="k", linewidths=2.0)
    points, labels = x.cpu(), y.cpu()
    ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="coolwarm", s=6, edgecolors="none")
    _draw_certificates(ax, plt, result, PLANE_HIGHLIGHTS)
    ax.set_aspect("equal")
    ax.set_xlim(float(low[0]), float(high[0]))
    ax.set_ylim(float(low[1]), float(high[1]))
    ax.set_title(title or "level sets of f, boundary f = 0 (bold), certified radii (discs)")
    fig.tight_layout()
    return save_figure(fig, path)


def _draw_certificates(ax, plt, result: Counterfactuals, count: int) -> None:
    """Discs of the certified radius and arrows to the counterfactual, for ``count`` points."""
    chosen = torch.linspace(0, len(result.inputs) - 1, min(count, len(result.inputs))).long()
    for i in chosen.tolist():
        center = result.inputs[i].cpu()
        radius = float(result.radii[i])
        if radius > 0:
            disc = plt.Circle(center.tolist(), radius, fill=False, color="gold", linewidth=1.2)
            ax.add_patch(disc)
        if bool(result.flipped[i]):
            end = result.points[i].cpu()
            ax.annotate(
                "",
                xy=end.tolist(),
                xytext=center.tolist(),
                arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8},
            )
