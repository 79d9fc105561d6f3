"""Wasserstein-1 distances from 1-Lipschitz networks (Kantorovich-Rubinstein duality).

For probability measures P and Q, W1(P, Q) = sup over 1-Lipschitz f of E_P[f] - E_Q[f]
(Kantorovich-Rubinstein duality; Villani, *Optimal Transport: Old and New*, 2009, Thm. 5.10 and
Rem. 6.5). :func:`wasserstein1` maximizes the right-hand side over a gradient-norm-preserving
GroupSort network, as in the Wasserstein-distance experiments of Anil et al. (ICML 2019) and the
WGAN critic (Arjovsky et al., ICML 2017, Eq. 3), by minimizing the KR loss of
:mod:`lipcert.losses` with the points of ``x`` labelled positive.

**A certified lower bound.** For *any* f with Lipschitz constant at most L,
(E_P[f] - E_Q[f]) / L <= W1(P, Q). The reported distance is exactly that, for the empirical
measures of ``x`` and ``y`` (uniform weights, the points as given: float64, not the float32 copies
the network trains on), with L the sound bound of :func:`logit_lipschitz_bound` and the means
taken in float64 on the exported weights, less a bound of their rounding error (the a-priori
allowance of :mod:`lipcert.certify` for each value, and that of the sum): it can fall short of
W1 (the network did not reach the optimum) but never exceeds it. :func:`exact_wasserstein1` (POT,
an optional dependency) gives the exact value of the same quantity for small clouds.

**Scale.** W1 is translation invariant and scales with the data: the network works on
(z - c) / s, c the mean and s the root-mean-square radius of the pooled clouds, and its output is
multiplied by s, so the potential f(z) = s g((z - c) / s) is exactly as Lipschitz as g. Both steps
are :class:`~lipcert.data.Normalize` layers, whose bounds are exact (1 / s and s).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lipcert.bounds.network import has_bound_rule, module_bound
from lipcert.bounds.operator import rounding_safety
from lipcert.certify import LipschitzSummary, logit_rounding_bound, native_summary, run_model
from lipcert.data.normalize import Normalize
from lipcert.export import export
from lipcert.losses.base import check_count, check_hyperparameter
from lipcert.losses.kr import kr_loss
from lipcert.models.hkr import gnp_mlp
from lipcert.modes import eval_mode

#: A model whose sound logit Lipschitz bound exceeds 1 by more than this is refused as "not
#: 1-Lipschitz" (training it with the KR loss would not approach W1, its gradients have no
#: transport reading). The slack covers sound bounds of layers that are 1-Lipschitz but not
#: exactly orthogonal: Gram iteration overestimates a flat spectrum by up to a factor
#: rank^(1/2^t), 0.4% for rank 64 at t = 10 (lipcert.bounds.operator; Delattre et al., ICML 2023,
#: Thm. 1). The KR value is divided by the bound anyway, so this slack never makes it unsound.
LIPSCHITZ_TOLERANCE = 1e-2
#: Defaults of the potential and its training, chosen on 2-D and 64-D clouds of 1000 points
#: (docs/ot.md): within 2% of the exact W1 in 2-D and 5% in 64-D (low intrinsic dimension).
DEFAULT_WIDTH = 64
DEFAULT_DEPTH = 3
DEFAULT_STEPS = 500
DEFAULT_LR = 2e-2
#: Points evaluated at once when computing the KR value (memory only; the value is the same).
EVAL_CHUNK = 4096
#: Modules that are 1-Lipschitz but shrink gradients: a potential built from them cannot reach
#: the optimal potential, whose gradient has norm 1 almost everywhere (Anil et al., ICML 2019:
#: norm-constrained networks with such activations are gradient-norm preserving only if linear).
GRADIENT_SHRINKING = (nn.ReLU, nn.Tanh)


@dataclass(frozen=True)
class W1Estimate:
    """The result of :func:`wasserstein1`.

    ``distance``: (E_x[f] - E_y[f] - the rounding allowance of :func:`kantorovich_value`) /
    ``lipschitz``, a lower bound of W1 between the empirical measures of ``x`` and ``y``.
    ``potential``: the trained f (eval mode). ``lipschitz``: the sound bound of f's Lipschitz
    constant. ``steps`` and ``seconds``: the training it took.
    """

    distance: float
    potential: nn.Module
    lipschitz: float
    steps: int
    seconds: float


def as_point_cloud(name: str, points: object, dtype: torch.dtype = torch.float32) -> Tensor:
    """``points`` (array or tensor, (n, d)) as a ``dtype`` tensor, or a ValueError naming ``name``.

    float32 is what the potential trains on; float64 (:func:`kantorovich_value`,
    :func:`exact_wasserstein1`) holds the points as given, which the lower bound is about:
    integers beyond 2^53, which float64 would round, are refused there.
    """
    if isinstance(points, np.ndarray):
        points = _numpy_cloud(name, points)
    if not isinstance(points, Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(points)}")
    if points.dim() != 2:
        got = "a single number" if points.dim() == 0 else f"shape {tuple(points.shape)}"
        raise ValueError(f"{name} must be a point cloud of shape (n, d), got {got}")
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(points.shape)}")
    if points.is_complex() or points.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {points.dtype}")
    converted = points.to(dtype)
    if not bool(torch.isfinite(converted).all()):
        beyond = " (or values beyond float32's range)" if dtype == torch.float32 else ""
        raise ValueError(f"{name} contains NaN or inf values{beyond}")
    integers = dtype == torch.float64 and not points.is_floating_point()
    if integers and not torch.equal(converted.to(points.dtype), points):
        raise ValueError(
            f"{name} holds integers float64 cannot represent exactly (beyond 2^53 in "
            "magnitude): shift or rescale them"
        )
    return converted


def _numpy_cloud(name: str, points: np.ndarray) -> Tensor:
    """A numpy array of real numbers as a tensor of its dtype, in native byte order (``np.save``
    keeps an array's byte order, and torch reads only the native one)."""
    real = np.issubdtype(points.dtype, np.integer) or np.issubdtype(points.dtype, np.floating)
    if not real:
        raise ValueError(f"{name} must hold real numbers, got dtype {points.dtype}")
    if points.dtype.kind == "f" and points.dtype.itemsize > 8:
        raise ValueError(
            f"{name} holds long doubles ({points.dtype}), which torch cannot hold: convert it "
            "to float64 (the bound is then about the float64 points)"
        )
    shape = points.shape  # ascontiguousarray makes a 0-d array 1-d: keep the real shape
    native = np.ascontiguousarray(points, dtype=points.dtype.newbyteorder("="))
    return torch.from_numpy(native).reshape(shape)


def check_clouds(
    x: object,
    y: object,
    names: tuple[str, str] = ("x", "y"),
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as ``dtype`` point clouds (:func:`as_point_cloud`) of the same dimension,
    or a ValueError naming them by ``names`` (argument names, or file names in the CLI)."""
    x_name, y_name = names
    x, y = as_point_cloud(x_name, x, dtype), as_point_cloud(y_name, y, dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{x_name} has shape {tuple(x.shape)} and {y_name} {tuple(y.shape)}: the two point "
            "clouds must have the same dimension d"
        )
    return x, y


def logit_lipschitz_bound(model: nn.Module) -> float:
    """Sound bound of the Lipschitz constant of every single logit f_k of ``model`` (l2).

    For an ``nn.Sequential`` ending in a linear layer with rows w_k after an L_b-Lipschitz body,
    f_k is (L_b ||w_k||_2)-Lipschitz: the one-vs-all logits of an hKR net with a unit-row head
    are 1-Lipschitz even where the head's spectral norm is not 1 (the one-vs-all setting of
    Serrurier et al., CVPR 2021). Otherwise the whole model's bound holds for each logit.
    ValueError when the model cannot be bounded soundly.
    """
    try:
        with eval_mode(model):
            return _logit_bound(model)
    except TypeError as err:  # no sound bound rule for a module (UnsupportedNorm included)
        raise ValueError(f"cannot bound the model's Lipschitz constant soundly: {err}") from err


def _logit_bound(model: nn.Module) -> float:
    """Per-logit bound in eval mode: body bound times the largest head row norm, or the whole
    model's bound. The head form needs a chain and a head that compute what ``nn.Sequential``
    and ``nn.Linear`` do (:func:`~lipcert.bounds.network.has_bound_rule`: no hooks, no
    overridden forward); a slice ``model[:-1]`` drops the chain's hooks, and a hook or an
    overridden forward of the head scales its rows (f = 10 z was bounded by 1)."""
    if (
        isinstance(model, nn.Sequential)
        and len(model) > 1
        and isinstance(model[-1], nn.Linear)
        and has_bound_rule(model)
        and has_bound_rule(model[-1])
    ):
        rows = torch.linalg.vector_norm(model[-1].weight.detach().double(), dim=1)  # (C,)
        row_bound = float(rows.max()) * rounding_safety(torch.float64, model[-1].in_features)
        return module_bound(model[:-1]) * row_bound
    return module_bound(model)


def check_one_lipschitz(model: nn.Module, what: str) -> float:
    """:func:`logit_lipschitz_bound` of ``model``; ValueError above 1 + LIPSCHITZ_TOLERANCE or
    NaN (a rule that read a NaN slope: ``NaN > 1`` is False, and such a potential passed)."""
    bound = logit_lipschitz_bound(model)
    if not bound <= 1 + LIPSCHITZ_TOLERANCE:
        raise ValueError(
            f"{what} is not 1-Lipschitz: the sound bound of its logits' Lipschitz constant is "
            f"{bound:.4g} > {1 + LIPSCHITZ_TOLERANCE:g}, so its values and gradients have no "
            "optimal-transport reading; build it from lipcert's 1-Lipschitz layers "
            "(e.g. the lipcert.models.hkr.gnp_mlp architecture)"
        )
    return bound


def _warn_gradient_shrinking(model: nn.Module) -> None:
    shrinking = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, GRADIENT_SHRINKING)}
    )
    if shrinking:
        warnings.warn(
            f"the potential uses {', '.join(shrinking)}, which is 1-Lipschitz but not gradient-"
            "norm preserving: the estimate may fall well short of W1 (use GroupSort/MaxMin)",
            stacklevel=3,
        )


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's parameters (the CPU and float32 without any)."""
    param = next(model.parameters(), None)
    return (
        (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    )


def _check_scalar_output(potential: nn.Module, probe: Tensor) -> None:
    """A potential maps each point to one value: output (n,) or (n, 1). A potential that refuses
    the points (their dimension): a ValueError naming their shape (:func:`run_model`)."""
    out = run_model(potential, probe.to(*_placement(potential)))
    if tuple(out.shape) not in ((len(probe),), (len(probe), 1)):
        raise ValueError(
            f"the potential must give one value a point, (n,) or (n, 1); for input "
            f"{tuple(probe.shape)} it gave {tuple(out.shape)}"
        )


def kantorovich_value(potential: nn.Module, x: object, y: object) -> float:
    """(E_x[f] - E_y[f]) / L for the potential f, L its sound Lipschitz bound.

    Kantorovich-Rubinstein duality (Villani 2009, Rem. 6.5): a lower bound of W1 between the
    empirical measures of ``x`` and ``y`` for any f. f is evaluated in float64 on the points as
    given and on its exported (plain torch) form, which has the very weights the bound is
    computed from; the rounding error of each mean (:func:`_mean_and_error`) is subtracted.
    """
    x, y = check_clouds(x, y, dtype=torch.float64)
    plain = export(potential).double()
    _check_scalar_output(plain, x[:1])
    # Two bounds of f, not one: the divisor is the rule-based per-logit bound that
    # check_one_lipschitz and W1Estimate.lipschitz report (and that refuses a potential without
    # rules), while the rounding allowance takes the traced graph's L with the Z and U it was
    # computed with. They differ: the graph bounds a convolution at the clouds' input size
    # (0.378 against 0.420 for Conv1d -> Linear) and a head nested in a Sequential by its row
    # norm, and gives the default potential 1 ulp less; the divisor stays the reported bound.
    bound = logit_lipschitz_bound(plain)
    summary = native_summary(plain, "l2", (x.shape[1],), torch.float64)
    (mean_x, error_x), (mean_y, error_y) = (_mean_and_error(plain, c, summary) for c in (x, y))
    return (mean_x - mean_y - error_x - error_y) / bound


def _mean_and_error(
    plain: nn.Module, cloud: Tensor, summary: LipschitzSummary
) -> tuple[float, float]:
    """The float64 mean of f over ``cloud`` and a bound of its rounding error: each value is off
    by at most the a-priori allowance of :func:`lipcert.certify.logit_rounding_bound` (in
    float64; it counts constants that cancel, such as f(z) = (z + 2^53) - 2^53, whose computed
    f(3) - f(2) is 2), and a sum of n values by at most (n - 1) u sum |f_i| (Higham, *Accuracy
    and Stability of Numerical Algorithms*, 2002, Eq. 4.4; n eps covers it and the division)."""
    device, _ = _placement(plain)
    with torch.no_grad():
        parts = [plain(part.to(device)).reshape(-1).cpu() for part in cloud.split(EVAL_CHUNK)]
    values = torch.cat(parts)  # (n,)
    lipschitz = summary.body_bound * summary.head_row_bound
    terms = (summary.zero_input_scale, summary.underflow_error)
    each = logit_rounding_bound(values[:, None], cloud.cpu(), lipschitz, torch.float64, *terms)
    total = each.sum() + len(values) * torch.finfo(torch.float64).eps * values.abs().sum()
    return float(values.sum()) / len(values), float(total) / len(values)


def default_potential(dim: int, center: Tensor, scale: float) -> nn.Sequential:
    """f(z) = s g((z - c) / s) with g a binary :func:`~lipcert.models.hkr.gnp_mlp` (see above)."""
    body = gnp_mlp([dim], 2, width=DEFAULT_WIDTH, depth=DEFAULT_DEPTH, binary=True)
    return nn.Sequential(
        Normalize(center, torch.full((dim,), scale)),  # (z - c) / s: bound 1 / s
        body,
        Normalize(0.0, 1.0 / scale),  # times s: bound s
    )


def _center_and_scale(points: Tensor) -> tuple[Tensor, float]:
    """Mean of the pooled clouds and their root-mean-square distance to it (> 0)."""
    center = points.double().mean(dim=0)
    scale = float((points.double() - center).pow(2).sum(dim=1).mean().sqrt())
    return center, scale if scale > 0 else 1.0


def _check_training_arguments(steps: int, lr: float, batch_size: int | None) -> None:
    check_count("steps", steps, 1)
    if batch_size is not None:
        check_count("batch_size", batch_size, 1)
    check_hyperparameter("lr", lr, positive=True)


def wasserstein1(
    x: object,
    y: object,
    *,
    potential: nn.Module | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int | None = None,
    seed: int = 0,
) -> W1Estimate:
    """Estimate W1 between the point clouds ``x`` (n, d) and ``y`` (m, d) with a 1-Lipschitz net.

    Trains ``potential`` (default: a GroupSort network with orthogonal weights, fitted to the
    data's position and scale, see the module docstring) with Adam and a cosine learning-rate
    decay to minimize the KR loss -(E_x[f] - E_y[f]) (Arjovsky et al., ICML 2017, Eq. 3), on all
    points at each step or, with ``batch_size``, on that many points of each cloud drawn at
    random. Returns a :class:`W1Estimate`; its ``distance`` never exceeds the exact W1 of the
    empirical measures. A given ``potential`` (one output a point) must be 1-Lipschitz (sound
    bound <= 1 + :data:`LIPSCHITZ_TOLERANCE`), else ValueError; it is trained in place, on the
    raw coordinates in its parameters' dtype. ``seed`` fixes the initialization and the batches
    (the global RNG is left as it was).
    """
    x, y = check_clouds(x, y, dtype=torch.float64)  # the measures the bound is about
    _check_training_arguments(steps, lr, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if potential is None:
            potential = default_potential(x.shape[1], *_center_and_scale(torch.cat([x, y])))
        else:
            check_one_lipschitz(potential, "the potential")
            _check_scalar_output(potential, x[:1])
            _warn_gradient_shrinking(potential)
        # Training copies in the potential's dtype (float32 ones refuse values beyond its range).
        x_train, y_train = check_clouds(x, y, dtype=_placement(potential)[1])
        started = time.perf_counter()
        _train_potential(potential, x_train, y_train, steps, lr, batch_size)
        distance = kantorovich_value(potential, x, y)  # export initializes modules: RNG
    lipschitz = logit_lipschitz_bound(potential)
    return W1Estimate(distance, potential, lipschitz, steps, time.perf_counter() - started)


def _train_potential(
    potential: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, batch_size: int | None
) -> None:
    """Adam on the KR loss, x labelled 1 and y labelled 0, with a cosine learning-rate decay."""
    device, dtype = _placement(potential)
    x, y = x.to(device), y.to(device)
    labels = torch.cat([torch.ones(len(x)), torch.zeros(len(y))]).to(device, dtype)  # (n + m,)
    optimizer = torch.optim.Adam(potential.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    potential.train()
    for _ in range(steps):
        if batch_size is None:
            batch, batch_labels = torch.cat([x, y]), labels
        else:
            pick_x = torch.randint(len(x), (batch_size,), device=device)
            pick_y = torch.randint(len(y), (batch_size,), device=device)
            batch = torch.cat([x[pick_x], y[pick_y]])  # (2 batch_size, d)
            batch_labels = torch.cat([labels.new_ones(batch_size), labels.new_zeros(batch_size)])
        loss = kr_loss(potential(batch), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    potential.eval()


def exact_wasserstein1(x: object, y: object, max_iterations: int = 10**7) -> float:
    """Exact W1 between the empirical measures of ``x`` and ``y`` (uniform weights).

    The network-simplex solver of POT (Flamary et al., JMLR 2021, ``ot.emd2``) on the Euclidean
    cost matrix: O(n m) memory, for clouds of a few thousand points. POT is an optional
    dependency (``pip install 'lipcert[peers]'``). ValueError where the solver stops at
    ``max_iterations`` before the optimum.
    """
    x, y = check_clouds(x, y, dtype=torch.float64)
    check_count("max_iterations", max_iterations, 1)
    try:
        import ot
    except ImportError as err:
        raise ImportError(
            "the exact W1 needs POT (Python Optimal Transport): pip install 'lipcert[peers]' "
            "or pip install POT"
        ) from err
    a, b = x.numpy(), y.numpy()
    cost = ot.dist(a, b, metric="euclidean")
    weights_a, weights_b = np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b))
    with warnings.catch_warnings():  # POT warns where it stops early: the error below says it
        warnings.simplefilter("ignore", UserWarning)
        value, log = ot.emd2(weights_a, weights_b, cost, numItermax=max_iterations, log=True)
    if log["result_code"] != 1:  # 1: optimal; a plan stopped early is not W1 (0.09 for 1.45)
        raise ValueError(
            f"POT's network simplex did not reach the optimum ({log['warning']}): raise "
            f"max_iterations (now {max_iterations})"
        )
    return float(value)
