"""Lipschitz-Margin Training (LMT; Tsuzuku, Sato & Sugiyama, NeurIPS 2018) of ordinary networks.

LMT trains with CE(f(x) + sqrt(2) eps L (1 - onehot(y)), y) (:func:`lipcert.losses.lmt_loss`), L
the network's Lipschitz constant: a sample only stops contributing once its logit margin certifies
radius ``eps``, and the gradient through L pushes the constant down. L must be cheap and
differentiable at every step, so it is an *estimate* here, as in the paper (Sec. 4, Alg. 1):

* **Linear layers** (``nn.Linear``, ``nn.Conv1d/2d/3d`` with their stride, padding and padding
  mode, dilation and groups): the spectral norm of the layer's linear map (the bias dropped)
  *at its real input shape*, by power iteration on A^T A with a persistent unit vector
  v (a buffer, one iteration per training step). sigma = ||A v|| with v fixed is differentiable
  in the weights: d sigma / dW = u v^T, u = A v / ||A v|| (Miyato et al., ICLR 2018). A^T is
  applied through ``torch.func.vjp``, so every convolution option is covered.
* **BatchNorm**: the eval-mode map x -> gamma (x - mu) / sqrt(running_var + eps) + beta, a per-
  channel scale; its constant max_c |gamma_c| / sqrt(running_var_c + eps) is differentiable in
  gamma. The authors' code takes the mini-batch variance during training; we take the running
  variance, since that is the map that is certified.
* **Everything without parameters** (ReLU, pools, Flatten, Dropout, ...) and every lipcert
  layer: the constant of the sound rule (:func:`lipcert.bounds.network.module_bound`, at the
  layer's input shape), the one certification uses. E.g. a MaxPool is sqrt(c), c the most windows
  that share an input element (1 without overlap), an AvgPool the Schur test's bound of its
  operator norm (2/3 for a 3x3 window, stride 2, padding 1 on 7x7, whose norm is 0.49).
  A module without a rule is refused by name, never assumed 1-Lipschitz.

Layers compose as a product (nested ``nn.Sequential`` chains; no residual blocks). Power iteration
converges to each norm *from below*, so the product is not an upper bound of anything: it is never
used to certify. Certification uses the sound bound (:func:`lipcert.certify`).

:class:`LMTTrainingLoss` is the training loss: ``bind(model, input_shape)`` (called by
:func:`lipcert.train.train` once the model exists) attaches a :class:`PowerIterationLipschitz`;
its vectors are buffers of the loss, saved and restored with the training state. With
``head_pairs`` (the default) it uses the tighter last-layer form that :func:`lipcert.certify` also
uses (design.md §4; the authors' code has it as a last-layer mode): with body estimate L_b and
head rows w_k, class j gets the margin eps L_b ||w_y - w_j|| instead of sqrt(2) eps L_b ||W||;
since ||w_y - w_j|| <= sqrt(2) ||W||, it is never larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipcert.bounds.network import module_bound
from lipcert.losses import lmt_loss
from lipcert.losses.base import (
    ReducedLoss,
    check_count,
    check_hyperparameter,
    multiclass_inputs,
    reduce,
)
from lipcert.modes import eval_mode
from lipcert.nn.constraint import LipschitzLayer

#: Power iterations run when an estimator is built, so training starts from an estimate close to
#: the initial weights' norms rather than from a random vector's (one iteration per step after).
DEFAULT_WARMUP_ITERATIONS = 10
#: Floor of squared distances before the square root: keeps the gradient of ||w_i - w_j|| finite
#: when two head rows coincide.
_MIN_SQUARED_DISTANCE = 1e-12

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

Factor = Callable[[], "Tensor | float"]


class PowerIterationNorm(nn.Module):
    """Spectral norm estimate of a linear map A at a fixed input shape (from below).

    ``linear_map`` computes A x for x of shape (1, *input_shape) from the layer's *current*
    weights; it is held as a plain callable, so the layer is not a sub-module of this one. The
    unit vector ``v`` is the only state (a buffer). :meth:`iterate` sets v <- A^T A v / ||.||;
    ``forward()`` returns ||A v||, differentiable in the weights.
    """

    def __init__(
        self,
        linear_map: Callable[[Tensor], Tensor],
        input_shape: Sequence[int],
        like: Tensor,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self._linear_map = linear_map
        v = torch.randn((1, *input_shape), generator=generator, dtype=torch.float64)
        self.register_buffer("v", (v / v.norm()).to(device=like.device, dtype=like.dtype))

    @torch.no_grad()
    def iterate(self, n_iterations: int) -> None:
        """``n_iterations`` steps of power iteration on A^T A (A^T through ``torch.func.vjp``)."""
        v = self.v
        for _ in range(n_iterations):
            image, pullback = torch.func.vjp(self._linear_map, v)
            (normal,) = pullback(image)  # A^T A v
            norm = normal.norm()
            # A v = 0 (e.g. A = 0) keeps v; torch.where, not an `if`: no device sync.
            v = torch.where(norm > 0, normal / norm.clamp_min(torch.finfo(norm.dtype).tiny), v)
        self.v = v  # a new tensor: a graph that saved the old v stays valid

    def forward(self) -> Tensor:
        return self._linear_map(self.v).norm()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Also refuse a stored ``v`` that is zero or not finite (an edited or corrupt file): 0 is a
        fixed point of the iteration, so the estimate would stay 0 and LMT train plain CE without
        a word; NaN would stop training as if it had diverged."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        stored = state_dict.get(prefix + "v")
        if torch.is_tensor(stored) and stored.is_floating_point():
            norm = float(stored.double().norm())
            if not math.isfinite(norm) or norm == 0:
                error_msgs.append(
                    f"{prefix}v is zero or not finite (norm {norm}), not a power-iteration vector"
                )


def _batch_norm_scale(layer: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """max_c |gamma_c| / sqrt(running_var_c + eps): the eval-mode map's constant."""
    scale = (layer.running_var + layer.eps).rsqrt()
    if layer.weight is not None:
        scale = layer.weight.abs() * scale
    return scale.max()


def flatten_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` in order, nested ``nn.Sequential`` containers unrolled."""
    if not isinstance(model, nn.Sequential):
        return [(type(model).__name__, model)]
    layers = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            layers += [(f"{name}.{sub}", layer) for sub, layer in flatten_chain(child)]
        else:
            layers.append((name, child))
    return layers


def _check_fixed_map(name: str, layer: nn.Module) -> None:
    """Refuse a layer whose eval-mode map still depends on the batch."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_var is None:
        raise ValueError(
            f"layer {name} ({type(layer).__name__}) keeps no running statistics "
            "(track_running_stats=False): it normalizes by the batch and has no Lipschitz constant"
        )


def _trace_shapes(
    layers: list[tuple[str, nn.Module]], input_shape: tuple[int, ...], like: Tensor
) -> list[tuple[int, ...]]:
    """The per-sample input shape of every layer (one forward of a zero sample)."""
    x = torch.zeros((1, *input_shape), device=like.device, dtype=like.dtype)
    shapes = []
    for name, layer in layers:
        shapes.append(tuple(x.shape[1:]))
        try:
            x = layer(x)
        except RuntimeError as err:
            raise ValueError(
                f"input_shape {input_shape} does not fit the model: layer {name} "
                f"({type(layer).__name__}) got an input of shape {shapes[-1]}: {err}"
            ) from err
    return shapes


class PowerIterationLipschitz(nn.Module):
    """Differentiable estimate of a ``nn.Sequential`` model's l2 Lipschitz constant, for training.

    The product over the layers of per-layer estimates (see the module docstring): power iteration
    with persistent vectors for linear layers, the sound rules' constants for the rest (BatchNorm:
    its eval-mode scale, differentiable in gamma). ``forward()`` returns the current estimate as a
    scalar tensor; in training mode it first runs ``n_iterations`` power iterations per layer.
    Not a bound: never certify with it.

    ``input_shape``: one sample's shape, e.g. (1, 28, 28). The model's layers are referenced, not
    registered: ``state_dict()`` holds only the power-iteration vectors (``vectors.<layer>.v``).
    The vectors start from a ``seed``-ed random draw, refined by ``warmup_iterations`` iterations.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        n_iterations: int = 1,
        warmup_iterations: int = DEFAULT_WARMUP_ITERATIONS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_iterations = check_count("n_iterations", n_iterations, 1)
        warmup_iterations = check_count("warmup_iterations", warmup_iterations, 0)
        like = next(model.parameters(), torch.empty(0))  # device and dtype of the vectors
        generator = torch.Generator().manual_seed(seed)
        self.vectors = nn.ModuleDict()
        self._factors: list[tuple[str, Factor]] = []
        layers = flatten_chain(model)
        for name, layer in layers:
            _check_fixed_map(name, layer)
        with eval_mode(model), torch.no_grad():
            shapes = _trace_shapes(layers, tuple(int(s) for s in input_shape), like)
            for (name, layer), in_shape in zip(layers, shapes, strict=True):
                factor = self._factor(name, layer, in_shape, like, generator)
                self._factors.append((name, factor))
        self.iterate(warmup_iterations)

    def _factor(
        self,
        name: str,
        layer: nn.Module,
        in_shape: tuple[int, ...],
        like: Tensor,
        generator: torch.Generator,
    ) -> Factor:
        """The estimate of one layer, as a callable evaluated at every ``forward()``."""
        if isinstance(layer, LipschitzLayer):
            module_bound(layer, "l2")  # refuses a layer bounded only in l_inf, now
            return lambda: module_bound(layer, "l2")
        linear_map = _linear_map(layer)
        if linear_map is not None:
            norm = PowerIterationNorm(linear_map, in_shape, like, generator)
            self.vectors[self._vector_key(name)] = norm
            return norm
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return lambda: _batch_norm_scale(layer)
        if next(layer.parameters(), None) is None:
            try:
                constant = module_bound(layer, "l2", input_shape=in_shape)
            except TypeError as err:
                raise TypeError(f"layer {name} ({type(layer).__name__}): {err}") from None
            return lambda: constant
        raise TypeError(
            f"no Lipschitz estimate for layer {name} ({type(layer).__name__}); "
            "PowerIterationLipschitz supports nn.Sequential chains of Linear, Conv1d/2d/3d, "
            "BatchNorm, lipcert layers and parameter-free modules with a bound rule"
        )

    def _vector_key(self, name: str) -> str:
        """The buffer name of layer ``name``'s vector (a module name holds no '.'); ValueError
        naming both layers when another layer's maps to it (its vector would be dropped)."""
        key = name.replace(".", "_")
        if key in self.vectors:
            other = next(n for n, _ in self._factors if n.replace(".", "_") == key)
            raise ValueError(
                f"layers {other} and {name} would share the power-iteration vector {key!r}: "
                "rename one of them"
            )
        return key

    @torch.no_grad()
    def iterate(self, n_iterations: int) -> None:
        """Refine every persistent vector by ``n_iterations`` power iterations."""
        for norm in self.vectors.values():
            norm.iterate(n_iterations)

    def layer_estimates(self) -> list[tuple[str, float]]:
        """(layer name, current estimate) for every layer, without iterating."""
        with torch.no_grad():
            return [(name, float(factor())) for name, factor in self._factors]

    def forward(self) -> Tensor:
        if self.training:
            self.iterate(self.n_iterations)
        values = [factor() for _, factor in self._factors]
        tensors = [value for value in values if torch.is_tensor(value)]
        constant = math.prod(value for value in values if not torch.is_tensor(value))
        if not tensors:
            return torch.tensor(float(constant), dtype=torch.float64)
        return constant * torch.stack(tensors).prod()


def _linear_map(layer: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """x -> A x for the layers that are (or whose weight part is) linear; None for the others."""
    if type(layer) is nn.Linear:
        return lambda x: F.linear(x, layer.weight)
    if type(layer) in _CONVS:
        # _conv_forward applies the padding mode (zeros, reflect, replicate, circular), then conv.
        return lambda x: layer._conv_forward(x, layer.weight, None)
    return None


def pairwise_row_distances(weight: Tensor) -> Tensor:
    """(C, C) matrix of ||w_i - w_j||_2 for the rows of ``weight``; differentiable, 0 diagonal."""
    squared = weight.pow(2).sum(dim=1)
    distances2 = squared[:, None] + squared[None, :] - 2 * weight @ weight.T
    off_diagonal = ~torch.eye(len(weight), dtype=torch.bool, device=weight.device)
    distances = distances2.clamp_min(_MIN_SQUARED_DISTANCE).sqrt()
    return torch.where(off_diagonal, distances, torch.zeros_like(distances))


class LMTTrainingLoss(ReducedLoss):
    """LMT's loss with the trained model's own Lipschitz estimate (Tsuzuku et al., 2018, Sec. 4).

    ``head_pairs=False``: CE(f + sqrt(2) eps L (1 - onehot(y)), y) with L the whole model's
    :class:`PowerIterationLipschitz` estimate (:func:`lipcert.losses.lmt_loss`).
    ``head_pairs=True`` (needs an ``nn.Sequential`` ending in ``nn.Linear``, rows w_k, or a bare
    ``nn.Linear``): the margin of class j is eps L_b ||w_y - w_j||, L_b the estimate of the body
    (all but the last layer; 1 for a linear model), the form :func:`lipcert.certify` certifies
    with. Either way a zero loss needs the margin that certifies radius eps under the estimate.

    ``eps_warmup``: the fraction of training over which eps ramps linearly from 0 (through the
    trainer's ``set_progress`` hook, so it is a function of the global step); 0 keeps eps fixed.
    Without a trainer (no ``set_progress`` call) the full eps applies.

    Call :meth:`bind` with the model before the first step (``lipcert.train`` does).
    ``n_iterations`` power iterations run per step and layer, ``warmup_iterations`` at bind.
    """

    hyperparameters = ("eps", "eps_warmup", "head_pairs", "n_iterations")

    def __init__(
        self,
        eps: float,
        eps_warmup: float = 0.0,
        head_pairs: bool = True,
        n_iterations: int = 1,
        warmup_iterations: int = DEFAULT_WARMUP_ITERATIONS,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        self.eps = check_hyperparameter("eps", eps, positive=False)
        self.eps_warmup = check_hyperparameter("eps_warmup", eps_warmup, positive=False)
        if self.eps_warmup > 1:
            raise ValueError(f"eps_warmup is a fraction of training in [0, 1], got {eps_warmup}")
        if not isinstance(head_pairs, bool):
            raise ValueError(f"head_pairs must be true or false, got {head_pairs!r}")
        self.head_pairs = head_pairs
        self.n_iterations = check_count("n_iterations", n_iterations, 1)
        self.warmup_iterations = check_count("warmup_iterations", warmup_iterations, 0)
        self.progress = 1.0
        self.estimator: PowerIterationLipschitz | None = None
        # The head's weight, read at every step (a closure: the head is the model's, not ours).
        self._head_weight: Callable[[], Tensor] | None = None

    def set_progress(self, progress: float) -> None:
        self.progress = progress

    def current_eps(self) -> float:
        """eps, ramped linearly over the first ``eps_warmup`` of training."""
        if self.eps_warmup == 0:
            return self.eps
        return self.eps * min(1.0, self.progress / self.eps_warmup)

    def bind(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        """Estimate ``model``'s Lipschitz constant (inputs of shape ``input_shape``) from now on."""
        body = model
        if self.head_pairs:
            # A bare nn.Linear is all head: its body is the empty chain (L_b = 1).
            layers = model if isinstance(model, nn.Sequential) else nn.Sequential(model)
            last = layers[-1] if len(layers) else layers
            if type(last) is not nn.Linear:
                raise ValueError(
                    "LMT with head_pairs = true needs an nn.Sequential ending in nn.Linear; this "
                    f"model ends in {type(last).__name__}: set loss.kwargs.head_pairs = false"
                )
            body = layers[:-1]
            self._head_weight = lambda: last.weight
        self.estimator = PowerIterationLipschitz(
            body, input_shape, self.n_iterations, self.warmup_iterations
        )

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.estimator is None:
            raise RuntimeError(
                "LMTTrainingLoss has no model: call bind(model, input_shape) before training"
            )
        lipschitz, eps = self.estimator(), self.current_eps()
        if self._head_weight is None:
            return lmt_loss(logits, targets, eps, lipschitz, reduction=self.reduction)
        logits, targets = multiclass_inputs("LMTTrainingLoss", logits, targets)
        pairs = pairwise_row_distances(self._head_weight())[targets]  # (B, C), 0 at the target
        shifted = logits + eps * lipschitz.to(logits.device) * pairs
        return reduce(F.cross_entropy(shifted, targets, reduction="none"), self.reduction)
