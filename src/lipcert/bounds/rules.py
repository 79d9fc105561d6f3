"""Sound Lipschitz bound rules for ``torch.nn`` layers (registered with :mod:`.network`).

* **Convolutions** (Conv1d/Conv2d: stride, padding and padding modes, dilation, groups). l2: at a
  known input size the near-exact bound of :mod:`lipcert.bounds.padded_conv`; without it the
  every-size bound of :mod:`lipcert.bounds.conv` (zero padding, or circular padding of at most
  (span - 1) / 2). l_inf: the largest row l1 norm of the operator, at most the largest
  sum_{i, a} |K[o, i, a]| (exact when one output sees all taps).
* **Batch norm** in eval mode is y = gamma (x - mu) / sqrt(var + eps) + beta, a per-channel scale:
  max |gamma| / sqrt(var + eps) in every l_p (instance norm with running statistics likewise),
  var + eps taken as the forward's float32 or half-type sum may round it (they can cancel).
  Training mode, or no running statistics, normalizes by the input's own statistics: refused,
  like LayerNorm / GroupNorm / RMSNorm, whose x / std(x) is not Lipschitz near constant inputs.
* **Activations** act coordinate-wise, so their constant sup |g'| holds in every l_p norm
  (constants and where they come from: :data:`ACTIVATION_CONSTANTS`). Refused: CELU with
  alpha <= 0 (its slope exp(x / alpha) is unbounded for alpha < 0) and Softplus with a finite
  ``threshold`` (torch returns x past beta x > threshold, a jump of log1p(exp(-threshold)) / beta:
  not Lipschitz at all).
* **Max pooling**: |max_w x - max_w x'| <= max_{p in w} |x_p - x'_p|, so ||y - y'||_2^2
  <= sum_p uses(p) (x_p - x'_p)^2: sqrt(max uses) in l2, 1 in l_inf. Along an axis with kernel
  k, stride s, dilation d, pixel p is tap t of window j iff p = s j + d t, and the t < k that
  fit form a progression of step s / gcd(s, d): uses <= ceil(k gcd(s, d) / s) per axis.
* **Average pooling** is a nonnegative matrix A; by the Schur test ||A||_2 <= sqrt(||A||_1
  ||A||_inf), the largest column sum (A^T 1) and row sum (A 1), computed exactly at the input
  size from a pool of ones and its transpose; l_inf: the largest row sum. All entries are
  1 / divisor, of one sign, so a negative ``divisor_override`` takes absolute sums.
* **Padding** with zeros/constants is 1-Lipschitz; reflect/replicate/circular padding copies
  pixels: sqrt(max copies) per axis in l2 (:func:`~lipcert.bounds.padded_conv.max_copies`), 1 in
  l_inf.
* **Softmax** (Softmax, Softmin, Softmax2d) over a dimension other than the batch: 1/2 in l2 and
  in l_inf; **LogSoftmax**: sqrt(n) in l2 over groups of n entries, 2 in l_inf
  (:func:`softmax_bound`, with the proofs). Over dimension 0, or torch's implicit dim 0 (3-D
  inputs with ``dim=None``): refused.
* **Upsample** (nearest, nearest-exact, linear, bilinear, trilinear, area): a nonnegative matrix,
  the Schur test at the input size as for average pooling (nearest: sqrt(most copies) in l2,
  exact; 1 in l_inf); bicubic (negative weights): refused (:func:`interpolation_bound`).
* **LPPool** (1-D, 2-D): the windows' l_p norms for an even p (sqrt(most windows per entry) in l2,
  k^(1/p) in l_inf), a sum pool for p = 1, a max pool of |x| for p = +-inf; odd or fractional p
  and ceil_mode with an even p: refused (:func:`_lp_pool`).

Constants round up: a square root or quotient computed here is checked in exact arithmetic and
raised to the next float when below (:func:`~lipcert.bounds.network.round_up`,
:func:`~lipcert.bounds.network.sqrt_up`), or gets a
:func:`~lipcert.bounds.operator.rounding_safety` factor when it sums many terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from lipcert.bounds.conv import conv2d_operator_bound
from lipcert.bounds.network import (
    magnitude,
    matrix_operator_bound,
    module_bound,
    register_bound_rule,
    register_input_limit,
    register_internal_growth,
    register_internal_size,
    round_up,
    sqrt_up,
)
from lipcert.bounds.operator import rounding_safety
from lipcert.bounds.padded_conv import (
    ConvGeometry,
    conv_geometry,
    conv_operator_norm,
    dilated_kernel,
    max_copies,
    module_geometry,
)
from lipcert.nn.constraint import LipschitzLayer

#: sup |GELU'| = Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.1289041..., at x = sqrt 2, the root of
#: GELU'' = phi(x) (2 - x^2); rounded up.
GELU_LIPSCHITZ = 1.12891
#: The tanh approximation of GELU: sup |g'| = 1.1289931 (x = 1.4185, 1e-5 grid over [-30, 30],
#: |g''| <= 1 so the grid misses at most 1e-5; g' -> 0 and 1 monotonically beyond); rounded up.
GELU_TANH_LIPSCHITZ = 1.12901
#: sup |SiLU'| = sup sigma(x) (1 + x (1 - sigma(x))) = 1.0998393 at x = 2.3994, the root of
#: 2 + x (1 - 2 sigma(x)) (SiLU'' = 0); the minimum, -0.0998, is smaller in size; rounded up.
SILU_LIPSCHITZ = 1.09985
#: sup |Mish'| = 1.0884982 (x = 1.4906; min -0.1125), found like GELU_TANH_LIPSCHITZ; rounded up.
MISH_LIPSCHITZ = 1.08851
#: SELU = scale * ELU(alpha): sup |g'| = scale * alpha = 1.0507010 * 1.6732632 = 1.7580993.
SELU_LIPSCHITZ = 1.7580994
#: The slope 1/6 of Hardsigmoid on [-3, 3], rounded up (the nearest double is below 1/6).
HARDSIGMOID_LIPSCHITZ = round_up(1 / 6, Fraction(1, 6))

#: Lipschitz constants (sup |g'|, any l_p norm) of the parameter-free coordinate-wise activations.
ACTIVATION_CONSTANTS: dict[type[nn.Module], float] = {
    nn.Sigmoid: 0.25,  # sigma (1 - sigma) <= 1/4
    nn.Hardsigmoid: HARDSIGMOID_LIPSCHITZ,
    nn.Hardtanh: 1.0,  # and its subclass ReLU6
    nn.Softsign: 1.0,  # 1 / (1 + |x|)^2
    nn.LogSigmoid: 1.0,  # sigma(-x)
    nn.Tanhshrink: 1.0,  # 1 - tanh^2
    nn.Softshrink: 1.0,
    nn.Hardswish: 1.5,  # (2x + 3) / 6 on [-3, 3]
    nn.SiLU: SILU_LIPSCHITZ,
    nn.Mish: MISH_LIPSCHITZ,
    nn.SELU: SELU_LIPSCHITZ,
}


def _constant_rule(constant: float):
    def rule(module: nn.Module, norm: str) -> float:
        return constant

    return rule


for _type, _constant in ACTIVATION_CONSTANTS.items():
    register_bound_rule(_type)(_constant_rule(_constant))


def _slopes_bound(slope: float) -> float:
    """max(1, |slope|): the larger slope of a map with slope 1 above 0. NaN stays NaN (Python's
    max(1.0, nan) is 1.0, and a NaN slope gives NaN outputs: no bound)."""
    slope = abs(float(slope))
    return slope if math.isnan(slope) or slope > 1 else 1.0


@register_bound_rule(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, norm: str) -> float:
    return _slopes_bound(module.negative_slope)


@register_bound_rule(nn.ELU)
def _elu(module: nn.ELU, norm: str) -> float:
    return _slopes_bound(module.alpha)  # alpha e^x below 0


@register_bound_rule(nn.CELU)
def _celu(module: nn.CELU, norm: str) -> float:
    """max(0, x) + min(0, alpha (exp(x / alpha) - 1)): slope exp(x / alpha) <= 1 below 0 when
    alpha > 0; unbounded as x -> -inf when alpha < 0 (and alpha = 0 divides by zero)."""
    if not module.alpha > 0:
        raise TypeError(
            f"CELU(alpha={module.alpha}) is not Lipschitz: its slope exp(x / alpha) below 0 is "
            "unbounded unless alpha > 0"
        )
    return 1.0


@register_bound_rule(nn.Softplus)
def _softplus(module: nn.Softplus, norm: str) -> float:
    """log(1 + exp(beta x)) / beta has slope sigma(beta x) in (0, 1); torch returns x instead
    where beta x > threshold, a jump of log1p(exp(-threshold)) / beta (2e-9 at the default 20)."""
    beta, threshold = module.beta, module.threshold
    if threshold != math.inf or beta == 0:
        log1p_exp = max(-threshold, 0.0) + math.log1p(math.exp(-abs(threshold)))  # stable
        jump = log1p_exp / abs(beta) if beta else math.inf
        raise TypeError(
            f"Softplus(beta={beta}, threshold={threshold}) is not Lipschitz: torch returns x "
            f"where beta * x > threshold, a jump of log1p(exp(-threshold)) / |beta| = {jump:.3g}; "
            "use nn.Softplus(beta, threshold=math.inf) (beta != 0), which is 1-Lipschitz"
        )
    return 1.0


@register_input_limit(nn.Softplus)
def _softplus_input_limit(module: nn.Module, ceiling: float) -> float:
    """exp(beta x) stays below the ceiling while |beta x| <= log(ceiling) (rounded down by 2^-40
    relative): torch computes log1p(exp(beta x)) / beta at threshold inf, ~x where exp(beta x) is
    inf (from x = 88.7 in float32 at beta = 1; a certified radius of 1e6 held inf logits at 100)."""
    return math.log(ceiling) * (1 - 2**-40) / abs(module.beta)


@register_internal_growth(nn.Hardswish)
def _hardswish_internal_growth(module: nn.Module, norm: str) -> tuple[float, float]:
    """(3, 6): torch (CPU and CUDA kernels) computes x * min(max(x + 3, 0), 6) before dividing
    by 6: x + 3 is at most 3 + ||h||, the product at most 6 |x| <= 6 ||h||. The product is inf
    from x = 5.7e37 in float32 and bfloat16 where the output, x, is not (certified at 0 with
    radius 1.13e38 before, NaN logits at 6e37)."""
    return 3.0, 6.0


@register_bound_rule(nn.GELU)
def _gelu(module: nn.GELU, norm: str) -> float:
    return GELU_TANH_LIPSCHITZ if module.approximate == "tanh" else GELU_LIPSCHITZ


@register_bound_rule(nn.PReLU)
def _prelu(module: nn.PReLU, norm: str) -> float:
    return _slopes_bound(module.weight.detach().abs().max())


@register_bound_rule(nn.RReLU)
def _rrelu(module: nn.RReLU, norm: str) -> float:
    if module.training:
        raise ValueError("RReLU in training mode has random slopes: call model.eval() first")
    total = Fraction(module.lower) + Fraction(module.upper)  # eval slope: the mean, total / 2
    return max(1.0, round_up(abs(module.lower + module.upper) / 2, abs(total) / 2))


@register_bound_rule(nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
def _not_lipschitz_norm(module: nn.Module, norm: str) -> float:
    raise TypeError(
        f"{type(module).__name__} divides by statistics of its own input, which is not Lipschitz "
        "(no global bound exists near constant inputs); use BatchNorm in eval mode or none"
    )


@register_bound_rule(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
def _batch_norm(module: nn.Module, norm: str) -> float:
    name = type(module).__name__
    if module.training:
        raise ValueError(
            f"{name} in training mode normalizes by batch statistics: call model.eval() first"
        )
    instance_stats = isinstance(module, _InstanceNorm) and not module.track_running_stats
    if module.running_var is None or instance_stats:  # InstanceNorm reads the flag at each call
        raise TypeError(
            f"{name} without running statistics normalizes by its input's own statistics, "
            "which is not Lipschitz; use track_running_stats=True"
        )
    return float(_batch_norm_scale(module).max()) * rounding_safety(torch.float64, 4)


def _batch_norm_scale(module: nn.Module) -> Tensor:
    """|gamma| / sqrt(var + eps) per channel (float64), at the smallest var + eps among the
    float64 sum and the sums in the buffer's type and in float32, which torch's kernels compute
    (float32(eps) added to a float32 var): a var of -float32(1e-5) + 2^-40 cancels there to
    2^-40, where the float64 sum is 2^-40 + 2.5e-13 (slope 1048576, bound 927631). After the
    sum the forward's roundings are relative, within the rounding allowance."""
    scale = _batch_norm_inverse_std(module)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return scale


def _batch_norm_inverse_std(module: nn.Module) -> Tensor:
    """1 / sqrt(var + eps) per channel (float64), at the smallest sum (see
    :func:`_batch_norm_scale`)."""
    var = module.running_var.detach()
    types = {torch.float64, var.dtype, torch.promote_types(var.dtype, torch.float32)}
    sums = [var.to(t) + torch.tensor(module.eps, dtype=t) for t in types]
    return torch.stack([total.double() for total in sums]).amin(dim=0).rsqrt()


@register_internal_size(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
def _batch_norm_internal_size(module: nn.Module, x: Tensor, norm: str) -> float:
    """||(x - mean) |w| / sqrt(var + eps)||: the centred input as the output's scale carries it,
    before the bias is added (a large mean and bias can cancel)."""
    if module.running_mean is None:
        return 0.0  # refused by the bound rule
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = _batch_norm_scale(module)
    centred = x.detach().double() - module.running_mean.detach().double().view(shape)
    return magnitude(centred * scale.view(shape), norm)


@register_internal_growth(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip
def _batch_norm_internal_growth(module: nn.Module, norm: str) -> tuple[float, float] | None:
    """x - mean times any of 1, |w|, 1 / sqrt(var + eps) and their product a, or x a, whichever
    the kernel forms (the CPU's folds x a + (b - mean a); a GPU kernel may form w (x - mean)
    first): at most k (M + ||h||), k = max(1, max |w|, max 1 / sqrt(var + eps), max a),
    M = max |mean|; adding the bias (or the folded constant) gives the output."""
    if module.running_mean is None:
        return None  # refused by the bound rule
    factors = [_batch_norm_scale(module).max(), _batch_norm_inverse_std(module).max()]
    if module.weight is not None:
        factors.append(module.weight.detach().abs().max())
    scale = max(1.0, *(float(f) for f in factors))
    return scale * float(module.running_mean.detach().abs().max()), scale


def conv_bound(weight: Tensor, geometry: ConvGeometry, norm: str) -> float:
    """Sound bound of a convolution with ``weight`` (torch layout) at ``geometry``, in ``norm``."""
    if norm == "linf":
        return _conv_linf(weight)
    return conv_operator_norm(weight, geometry)


def _conv_linf(weight: Tensor) -> float:
    return matrix_operator_bound(weight.detach().reshape(weight.shape[0], -1), "linf")


@register_bound_rule(nn.Conv1d, nn.Conv2d, shaped=True)
def _conv_at_size(module: nn.Conv1d | nn.Conv2d, norm: str, input_shape: tuple[int, ...]) -> float:
    axes = len(module.kernel_size)
    return conv_bound(module.weight, module_geometry(module, input_shape[-axes:]), norm)


@register_bound_rule(nn.Conv1d, nn.Conv2d)
def _conv_any_size(module: nn.Conv1d | nn.Conv2d, norm: str) -> float:
    """Every input size: zero padding, or circular padding that wraps at most once per output."""
    if norm == "linf":
        return _conv_linf(module.weight)
    kernel = module.weight.detach().double()
    if kernel.dim() == 3:  # Conv1d: a 1 x k kernel
        kernel = kernel.unsqueeze(-2)
    dilation = (1, *module.dilation) if len(module.dilation) == 1 else module.dilation
    kernel = _block_diagonal(dilated_kernel(kernel, dilation), module.groups)
    stride = (1, *module.stride) if len(module.stride) == 1 else module.stride
    name = type(module).__name__
    if module.padding_mode == "circular":
        geometry = module_geometry(module, (1,) * len(module.kernel_size))
        spans = kernel.shape[-len(module.kernel_size) :]
        if any(2 * max(pad) > span - 1 for pad, span in zip(geometry.pads, spans, strict=True)):
            raise TypeError(
                f"{name}'s circular padding wraps twice: the bound needs the input size"
            )
        stride = (1, 1)  # the polyphase bound needs a torus that is a multiple of the stride
    elif module.padding_mode != "zeros":
        raise TypeError(
            f"{name} with {module.padding_mode} padding: the bound needs the input size"
        )
    with torch.no_grad():
        return float(conv2d_operator_bound(kernel, stride))


@register_bound_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, shaped=True)
def _conv_transpose(
    module: nn.ConvTranspose1d | nn.ConvTranspose2d, norm: str, input_shape: tuple[int, ...]
) -> float:
    """The adjoint of the convolution with the same weight, stride, padding, dilation and groups
    on the transposed convolution's output size (torch defines it as that gradient): the same l2
    norm. In l_inf, ||A^T||_inf = ||A||_1: an output entry sums at most all the taps of its
    channel's weights over the input channels of its group."""
    axes = len(module.kernel_size)
    if norm == "linf":
        weight = module.weight.detach().double().abs()
        groups = module.groups
        per_group = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        sums = per_group.sum(dim=(1, *range(3, per_group.dim())))  # (groups, out / groups)
        return float(sums.max()) * rounding_safety(torch.float64, weight[0].numel() * groups)
    sizes = input_shape[-axes:]
    output_size = [
        (n - 1) * s - 2 * p + d * (k - 1) + extra + 1
        for n, s, p, d, k, extra in zip(
            sizes, module.stride, module.padding, module.dilation, module.kernel_size,
            module.output_padding, strict=True,
        )
    ]  # fmt: skip
    geometry = conv_geometry(
        module.kernel_size, tuple(output_size), module.stride, module.padding, module.dilation,
        module.groups,
    )  # fmt: skip
    return conv_bound(module.weight, geometry, norm)


def _block_diagonal(kernel: Tensor, groups: int) -> Tensor:
    """(c_out, c_in / groups, kh, kw) -> the equivalent dense (c_out, c_in, kh, kw) kernel."""
    if groups == 1:
        return kernel
    c_out, c_in_g = kernel.shape[:2]
    dense = kernel.new_zeros((c_out, c_in_g * groups, *kernel.shape[2:]))
    step = c_out // groups
    for g in range(groups):
        rows, cols = slice(g * step, (g + 1) * step), slice(g * c_in_g, (g + 1) * c_in_g)
        dense[rows, cols] = kernel[rows]
    return dense


def _per_axis(value: int | tuple[int, ...], axes: int) -> tuple[int, ...]:
    return (value,) * axes if isinstance(value, int) else tuple(value)


@register_bound_rule(nn.MaxPool1d, nn.MaxPool2d)
def _max_pool(module: nn.MaxPool1d | nn.MaxPool2d, norm: str) -> float:
    if module.return_indices:
        raise TypeError(f"{type(module).__name__} with return_indices=True returns indices")
    if norm == "linf":
        return 1.0
    axes = 1 if isinstance(module, nn.MaxPool1d) else 2
    kernel, stride, dilation = (
        _per_axis(v, axes) for v in (module.kernel_size, module.stride, module.dilation)
    )
    uses = math.prod(
        -(-k * math.gcd(s, d) // s) for k, s, d in zip(kernel, stride, dilation, strict=True)
    )
    return sqrt_up(uses)


@register_bound_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, shaped=True)
def _adaptive_max_pool(module: nn.Module, norm: str, input_shape: tuple[int, ...]) -> float:
    if module.return_indices:
        raise TypeError(f"{type(module).__name__} with return_indices=True returns indices")
    if norm == "linf":
        return 1.0
    axes = 1 if isinstance(module, nn.AdaptiveMaxPool1d) else 2
    sizes = input_shape[-axes:]
    outputs = [n if o is None else o for n, o in
               zip(sizes, _per_axis(module.output_size, axes), strict=True)]  # fmt: skip
    uses = math.prod(_adaptive_uses(n, o) for n, o in zip(sizes, outputs, strict=True))
    return sqrt_up(uses)


def _adaptive_uses(n: int, o: int) -> int:
    """Most windows of an adaptive pool (n -> o) holding a pixel; window i is
    [floor(i n / o), ceil((i + 1) n / o))."""
    uses = [0] * n
    for i in range(o):
        for p in range((i * n) // o, -(-(i + 1) * n // o)):
            uses[p] += 1
    return max(uses)


#: Average pools: each sums its windows before dividing them (:func:`output_root`: p = 1).
AVERAGING_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


@register_bound_rule(*AVERAGING_MODULES, shaped=True)
def _avg_pool_at_size(module: nn.Module, norm: str, input_shape: tuple[int, ...]) -> float:
    """Schur test (module docstring) with the exact row and column sums at this input size; the
    entries share the sign of the divisor, so absolute values give the sums of |A|."""
    axes = 1 if isinstance(module, nn.AvgPool1d | nn.AdaptiveAvgPool1d) else 2
    return one_sign_map_bound(module, input_shape[-axes:], norm)


def one_sign_map_bound(linear_map: Callable[[Tensor], Tensor], sizes: tuple[int, ...],
                       norm: str) -> float:  # fmt: skip
    """Bound of a linear map A of one channel's ``sizes`` whose entries all have one sign (a
    pool, an interpolation), applied per channel: the Schur test ||A||_2 <= sqrt(||A||_1
    ||A||_inf) with the largest row sum |A 1| and column sum |A^T 1|, exact sums of |A| for one
    sign, computed in float64 from a forward and a vector-Jacobian product of ones; l_inf: the
    largest row sum. The sums round up by the safety of as many terms as the map has entries."""
    ones = torch.ones((1, 1, *sizes), dtype=torch.float64)
    rows, transpose = torch.func.vjp(linear_map, ones)
    (cols,) = transpose(torch.ones_like(rows))
    safety = rounding_safety(torch.float64, max(ones.numel(), rows.numel()))
    rows, cols = float(rows.abs().max()), float(cols.abs().max())
    if norm == "linf":
        return rows * safety
    return math.sqrt(rows * cols) * safety


@register_bound_rule(nn.AvgPool1d, nn.AvgPool2d)
def _avg_pool_any_size(module: nn.AvgPool1d | nn.AvgPool2d, norm: str) -> float:
    """Divisor kh kw (no override, no ceil mode, padding counted): rows sum to <= 1 and columns
    to <= uses / (kh kw), so the Schur test gives sqrt(uses / (kh kw))."""
    axes = 1 if isinstance(module, nn.AvgPool1d) else 2
    kernel, stride, padding = (
        _per_axis(v, axes) for v in (module.kernel_size, module.stride, module.padding)
    )
    padding_counted = module.count_include_pad or not any(padding)
    override = getattr(module, "divisor_override", None)  # AvgPool1d has none
    if override is not None or module.ceil_mode or not padding_counted:
        raise TypeError(f"the bound of {module} depends on its input shape")
    if norm == "linf":
        return 1.0
    uses = math.prod(-(-k // s) for k, s in zip(kernel, stride, strict=True))
    return math.sqrt(uses / math.prod(kernel)) * rounding_safety(torch.float64, 2)


@register_bound_rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
def _constant_pad(module: nn.Module, norm: str) -> float:
    return 1.0  # adds constant entries (or crops)


#: Padding modules that copy pixels, and their F.pad mode.
COPYING_PADS: dict[type[nn.Module], str] = {
    nn.ReflectionPad1d: "reflect",
    nn.ReflectionPad2d: "reflect",
    nn.ReplicationPad1d: "replicate",
    nn.ReplicationPad2d: "replicate",
    nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular",
}


def pad_factor(input_shape: tuple[int, ...], pad: tuple[int, ...], mode: str, norm: str) -> float:
    """Bound of ``F.pad(x, pad, mode)`` on inputs of ``input_shape``: copies of pixels (l2)."""
    if mode == "constant" or norm == "linf":
        return 1.0
    axes = len(pad) // 2  # pad lists (before, after) from the last axis backwards
    sizes = input_shape[len(input_shape) - axes :][::-1]
    copies = [max_copies(n, (pad[2 * i], pad[2 * i + 1]), mode) for i, n in enumerate(sizes)]
    return sqrt_up(math.prod(copies))


@register_bound_rule(*COPYING_PADS, shaped=True)
def _copying_pad(module: nn.Module, norm: str, input_shape: tuple[int, ...]) -> float:
    mode = next(mode for kind, mode in COPYING_PADS.items() if isinstance(module, kind))
    return pad_factor(input_shape, tuple(module.padding), mode, norm)


#: The Lipschitz constant of softmax over a group, in l2 and in l_inf (:func:`softmax_bound`).
SOFTMAX_LIPSCHITZ = 0.5
#: The Lipschitz constant of log-softmax over a group in l_inf (:func:`softmax_bound`).
LOG_SOFTMAX_LIPSCHITZ_LINF = 2.0


def softmax_dim(name: str, dim: int | None, ndim: int) -> int:
    """The dimension (in 0..ndim-1) that a softmax of an ``ndim``-D input normalizes: ``dim``,
    or torch's implicit choice when None (``torch.nn.functional._get_softmax_dim``: 0 for 0-,
    1- and 3-D inputs, else 1). TypeError when it is dimension 0, the batch."""
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}(dim={dim}) does not fit inputs of {ndim} dimensions")
    if dim % ndim == 0:
        raise TypeError(
            f"{name} normalizes over dimension 0, the batch (dim={dim} of a {ndim}-D input): "
            "samples must be processed independently; pass the dim of one sample's entries"
        )
    return dim % ndim


def softmax_bound(log: bool, group: int, norm: str) -> float:
    """Bound of softmax (``log=False``) or log-softmax over groups of ``group`` entries.

    Softmax p = softmax(x) has Jacobian J = diag(p) - p p^T. It is symmetric and v^T J v =
    sum_i p_i v_i^2 - (sum_i p_i v_i)^2 = Var_p(v) >= 0, so ||J||_2 = max_{||v||_2 = 1} Var_p(v);
    Var_p(v) <= E_p (v - c)^2 <= ((max v - min v) / 2)^2 with c the midrange, and
    (max v - min v)^2 <= 2 (max v^2 + min v^2) <= 2 ||v||^2: ||J||_2 <= 1/2, attained at
    p = (1/2, 1/2, 0, ...), v = (1, -1, 0, ...) / sqrt 2. In l_inf the row sums of |J| are
    p_i (1 - p_i) + p_i sum_{j != i} p_j = 2 p_i (1 - p_i) <= 1/2, attained at p_i = 1/2.

    Log-softmax has J = I - 1 p^T: (J v)_i = v_i - p^T v. In l_inf, |v_i - p^T v| <=
    max_j |v_i - v_j| <= 2 ||v||_inf (sup 2, as p_i -> 0). In l2, ||v - (p^T v) 1|| is convex in
    p, so at most its largest value at a vertex p = e_k of the simplex, sum_{i != k}
    (v_i - v_k)^2 = Q - 2 v_k S + (n - 1) v_k^2 (S, Q: the sum and sum of squares of the v_i,
    i != k, S^2 <= (n - 1) Q) <= (sqrt(Q) + sqrt(n - 1) |v_k|)^2 <= n (Q + v_k^2) (Cauchy-Schwarz):
    sqrt(n) for groups of n entries (sup: as p -> e_k, J -> I - 1 e_k^T, whose norm is sqrt(n)).

    Groups are disjoint, so the whole map's Jacobian is block diagonal: the largest block's
    norm, in both norms. By the mean value inequality the Jacobian bound is the Lipschitz
    constant. Rounding needs no internal size (:func:`~lipcert.bounds.network.internal_size`):
    torch computes t = x - max x, exp(t) and their sum S >= 1; rounding t_i moves p_i by
    p_i |t_i| eps <= eps / e and the output by at most 2 eps max|t| <= 4 eps ||x||, and log-softmax
    t - log S has |t_i| <= |output_i|: errors of the size of the input and output, as the
    allowance takes them."""
    if not log:
        return SOFTMAX_LIPSCHITZ
    return LOG_SOFTMAX_LIPSCHITZ_LINF if norm == "linf" else sqrt_up(group)


#: Softmax modules: whether each takes the log, and the dim it normalizes (None: ``module.dim``).
SOFTMAX_MODULES: dict[type[nn.Module], tuple[bool, int | None]] = {
    nn.Softmax: (False, None),
    nn.Softmin: (False, None),  # softmax(-x)
    nn.LogSoftmax: (True, None),
    nn.Softmax2d: (False, -3),
}


@register_bound_rule(*SOFTMAX_MODULES, shaped=True)
def _softmax(module: nn.Module, norm: str, input_shape: tuple[int, ...]) -> float:
    log, fixed = next(v for kind, v in SOFTMAX_MODULES.items() if isinstance(module, kind))
    dim = module.dim if fixed is None else fixed
    dim = softmax_dim(type(module).__name__, dim, len(input_shape) + 1)
    return softmax_bound(log, input_shape[dim - 1], norm)


#: Interpolation modes whose weights are never negative: nearest and nearest-exact copy an input
#: entry, linear / bilinear / trilinear take convex combinations (antialiased too: a normalized
#: triangle filter) and area averages. Bicubic's kernel has negative lobes: the Schur test of
#: :func:`one_sign_map_bound` would need the sums of |A|.
ONE_SIGN_INTERPOLATIONS = frozenset(
    {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
)


def interpolation_bound(
    resize: Callable[[Tensor], Tensor], mode: str, input_shape: tuple[int, ...], norm: str
) -> float:
    """Bound of ``resize`` (``F.interpolate`` with its settings) on inputs of ``input_shape``
    (channels, then the resized axes), a linear map of each channel with nonnegative weights:
    :func:`one_sign_map_bound` at this size. Nearest copies each entry r times (rows of one 1):
    sqrt(max r) in l2, 1 in l_inf, exactly; linear modes sum weights to 1 per output."""
    if mode not in ONE_SIGN_INTERPOLATIONS:
        raise TypeError(
            f"interpolation mode {mode!r} has negative weights, which the bound of "
            f"interpolation does not cover: use one of {sorted(ONE_SIGN_INTERPOLATIONS)}"
        )
    return one_sign_map_bound(resize, input_shape[1:], norm)


def interpolation_root(mode: str) -> float | None:
    """1 for area interpolation, an average that sums its window before dividing (the sum may
    overflow where the average does not), else None: the other modes weight before adding
    (:func:`output_root`)."""
    return 1.0 if mode == "area" else None


@register_bound_rule(nn.Upsample, shaped=True)
def _upsample(module: nn.Upsample, norm: str, input_shape: tuple[int, ...]) -> float:
    return interpolation_bound(module, module.mode, input_shape, norm)


def root_up(value: int, p: int) -> float:
    """An upper bound of value^(1 / p) (integers value >= 0, p >= 1), checked exactly."""
    root = float(value) ** (1.0 / p)
    while Fraction(root) ** p < value:
        root = math.nextafter(root, math.inf)
    return root


def is_even_power(p: float) -> bool:
    """Whether ``p`` is an even integer >= 2 (x^p = |x|^p for every real x)."""
    return p >= 2 and float(p).is_integer() and int(p) % 2 == 0


@register_bound_rule(nn.LPPool1d, nn.LPPool2d, shaped=True)
def _lp_pool(module: nn.Module, norm: str, input_shape: tuple[int, ...]) -> float:
    """torch computes (k avg_pool(x.pow(p)))^(1 / p) over windows of k entries (k: the
    kernel's), no padding; p = +-inf: +-max_pool(+-|x|).

    * p = +-inf: |max_w |a| - max_w |b|| <= max_w |a - b|: the max pool's bound;
    * p = 1: a sum pool, linear with entries 1 (k / clipped window with ``ceil_mode``): the Schur
      test at this size (:func:`one_sign_map_bound`);
    * an even p >= 2 without ``ceil_mode``: each output is the l_p norm of a window, and
      |||a||_p - ||b||_p| <= ||a - b||_p <= ||a - b||_2 (p >= 2): sqrt(most windows per entry)
      in l2, as the max pool; ||a - b||_p <= k^(1/p) ||a - b||_inf in l_inf.

    Refused: odd or fractional p (x^p of a negative entry: a signed sum, or NaN), and ceil_mode
    with an even p (a window clipped to k' entries is scaled by (k / k')^(1/p)). Its p-th powers
    underflow: :func:`output_root` tells the rounding allowance."""
    p, axes = module.norm_type, 1 if isinstance(module, nn.LPPool1d) else 2
    kernel = _per_axis(module.kernel_size, axes)
    stride = kernel if module.stride is None else _per_axis(module.stride, axes)
    if p == 1:
        return one_sign_map_bound(module, input_shape[-axes:], norm)
    if abs(p) != math.inf and (not is_even_power(p) or module.ceil_mode):
        raise TypeError(
            f"{type(module).__name__}(norm_type={p}, ceil_mode={module.ceil_mode}) is bounded "
            "for p = 1, an even p without ceil_mode, or p = +-inf: torch raises entries to the "
            "power p (an odd or fractional p sums signed powers, or gives NaN) and scales "
            "clipped windows"
        )
    pool = nn.MaxPool1d if axes == 1 else nn.MaxPool2d
    max_pool = module_bound(pool(kernel, stride), norm)  # sqrt(uses) in l2, 1 in l_inf
    if norm == "linf" and abs(p) != math.inf:
        return root_up(math.prod(kernel), int(p))
    return max_pool


def output_root(module: nn.Module) -> float | None:
    """p when ``module``'s output is computed from sums of p-th powers of its input's entries,
    else None. p > 1: the p-th root of such sums (an LPPool with an even p, a lipcert layer
    declaring its ``output_root``: the l2 pool): entries below tiny^(1/p) underflow to 0 in
    their powers, so the output is resolved only to (N tiny)^(1/p), not tiny
    (:func:`lipcert.bounds.graph.underflow_error`). p = 1: a sum or an average (average pools,
    area upsampling, a sum pool, lipcert's scaled average pool), whose sums may overflow where
    the output does not (:func:`lipcert.bounds.graph.overflow_radius`)."""
    if isinstance(module, nn.LPPool1d | nn.LPPool2d):
        p = module.norm_type
        return float(p) if p == 1 or is_even_power(p) else None
    if isinstance(module, AVERAGING_MODULES):
        return 1.0
    if isinstance(module, nn.Upsample):
        return interpolation_root(module.mode)
    root = getattr(module, "output_root", None) if isinstance(module, LipschitzLayer) else None
    return None if root is None else float(root)
