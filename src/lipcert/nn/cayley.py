"""An exactly orthogonal circular convolution: the Cayley transform in the Fourier domain.

Trockman & Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021
(Sec. 3, Alg. 1). A circular convolution is block-diagonalised by the 2-D DFT: at each frequency w
it multiplies the input's spectrum by a C_out x C_in matrix. The layer learns an ordinary k x k
kernel, takes its spectrum V(w), and replaces it by the Cayley transform of the skew-Hermitian
A(w) = V(w) - V(w)^H,

    Q(w) = (I + A)^-1 (I - A),

which is unitary because A is skew-Hermitian (so I + A is invertible). The operator
x -> IDFT(Q(w) DFT(x)(w)) is orthogonal: 1-Lipschitz and gradient-norm preserving. Q(w) is dense in
space (a full input_size kernel), so the input size must be known and fixed.

Why Cayley, and not SOC or BCOP
-------------------------------
* SOC (Singla & Feizi, ICML 2021) takes exp of a skew-symmetric convolution through a *truncated*
  Taylor series: it is only approximately orthogonal, with an error that grows with the kernel
  norm, so a sound certificate needs an extra bound of that error (and a correction) on top.
* BCOP (Li et al., NeurIPS 2019) is exact, but spans only the convolutions its block construction
  (products of symmetric projectors) reaches, and every step re-orthogonalises its many parameter
  matrices, which is costly to parametrize and itself iterative.
* Cayley is exact in exact arithmetic, for any kernel size and channel counts, at the cost of one
  small linear solve per frequency, done once per weight update (cached in eval mode) and in
  float64 (:data:`SOLVE_DTYPE`). The rounding of Q to the layer's dtype that remains is measured
  a posteriori by :func:`semi_unitary_spectral_bound`.

C_out != C_in: a semi-orthogonal block. With V = [U; R] (C_in x C_in on top of
(C_out - C_in) x C_in), take the first C_in columns of the Cayley transform of the skew-Hermitian
[V 0] - [V 0]^H = [[U - U^H, -R^H], [R, 0]]. By the Schur complement these equal
[(I + A)^-1 (I - A); -2 R (I + A)^-1] with A = U - U^H + R^H R, the paper's non-square Cayley
transform; we solve the larger, well-conditioned system instead, since I + A has condition ~||R||^2
and loses orthogonality (even in float64) once the kernel grows large. C_out < C_in uses the
conjugate transpose (orthonormal rows).

Stride is not supported inside the layer: downsample with an orthogonal pixel shuffle
(``nn.PixelUnshuffle`` / lipcert's ``InvertibleDownsample``) before it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipcert.bounds.network import register_internal_growth
from lipcert.bounds.operator import rounding_safety, semi_unitary_spectral_bound
from lipcert.nn.constrained import _check_positive, _init_torch_default, check_input_shape
from lipcert.nn.constraint import EvalCache, LipschitzLayer, plain_settings

#: Precision of the per-frequency Cayley solve, whose error grows like ||S|| u. Measured after the
#: test suite's adversarial optimizer steps (kernel entries ~1e5), a float32 layer's bound reaches
#: 1.02 with a complex64 solve; with complex128 it stays within 1e-7 of 1 (the rounding of Q to
#: float32), for about twice the cost of the solve.
SOLVE_DTYPE = torch.complex128

#: Largest Frobenius norm of the skew-Hermitian S handed to the solve; a larger S is scaled down to
#: it (Q stays exactly semi-unitary: only the parametrization saturates). The complex128 solve's
#: error is ~||S|| u (u = 1.1e-16), so this keeps Q unitary to ~1e-9 even after the test suite's
#: adversarial steps (kernel entries up to ~1e9, ||S|| ~ 1e11, defect measured 2e-6 to 8e-6
#: uncapped). Kernels at init give ||S|| ~ 2 (4 channels) to 13 (256 channels): the cap (which
#: rescales all of S(w)) changes the map only for kernels ~1e5 times their init scale.
MAX_SKEW_NORM = 1e6


def cayley(v: Tensor) -> Tensor:
    """Semi-unitary Cayley transform of each matrix in ``v`` (..., m, n).

    Trockman & Kolter (2021), Sec. 3: for m >= n, S = [V 0] - [V 0]^H (m x m, skew-Hermitian) and
    Q = (I + S)^-1 (I - S) [I; 0] = 2 (I + S)^-1 [I; 0] - [I; 0], the first n columns of a unitary
    matrix; for m < n, the first m rows (through the conjugate transpose). I + S is normal with
    singular values >= 1, so the solve loses only ~||S|| u (the equivalent n x n Schur-complement
    form of the module docstring would lose ~||V||^2 u); S is capped at :data:`MAX_SKEW_NORM`.
    """
    rows, cols = v.shape[-2:]
    if rows < cols:
        return cayley(v.mH).mH
    square = nn.functional.pad(v, (0, rows - cols))  # [V 0]: (..., m, m)
    skew = square - square.mH
    norm = torch.linalg.matrix_norm(skew, keepdim=True)  # (..., 1, 1)
    skew = skew * (MAX_SKEW_NORM / norm.clamp_min(MAX_SKEW_NORM))
    eye = torch.eye(rows, dtype=v.dtype, device=v.device)
    block = eye[:, :cols].expand_as(v)  # [I; 0]: (..., m, n), batched so never read as vectors
    solved = torch.linalg.solve(eye + skew, block)  # (I + S)^-1 [I; 0]
    return 2 * solved - block


def _size_pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class CayleyConv2d(LipschitzLayer, nn.Module):
    """Orthogonal circular convolution on a fixed ``input_size`` grid (Trockman & Kolter, 2021).

    ``weight`` (C_out, C_in, k_h, k_w) is a plain kernel, initialised as ``nn.Conv2d``'s; the layer
    applies the Cayley transform of its skew-Hermitian part per frequency (see the module
    docstring). Output shape equals input shape except for the channels. Exactly orthogonal when
    C_out == C_in, orthonormal rows/columns otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        input_size: int | tuple[int, int],
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, out_channels=out_channels)
        self.kernel_size = _size_pair("kernel_size", kernel_size)
        self.input_size = _size_pair("input_size", input_size)
        if any(k > n for k, n in zip(self.kernel_size, self.input_size, strict=True)):
            raise ValueError(
                f"kernel_size {self.kernel_size} must fit in input_size {self.input_size}: "
                "a larger kernel would wrap around the circular grid"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty((out_channels, in_channels, *self.kernel_size), **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._unitary_cache = EvalCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _init_torch_default(self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, bias={self.bias is not None}"
        )

    def kernel_spectrum(self) -> Tensor:
        """V(w): real DFT of the kernel centred at the origin of the grid, (H, W//2+1, C_out, C_in).

        Centring (the centre tap at offset 0) keeps the skew part V - V^H as local as the kernel.
        """
        (k_h, k_w), (height, width) = self.kernel_size, self.input_size
        padded = nn.functional.pad(self.weight, (0, width - k_w, 0, height - k_h))  # (O, I, H, W)
        centred = torch.roll(padded, shifts=(-(k_h // 2), -(k_w // 2)), dims=(-2, -1))
        return torch.fft.rfft2(centred).permute(2, 3, 0, 1)  # (H, W//2+1, O, I)

    def unitary(self) -> Tensor:
        """Q(w) per frequency, (H, W//2+1, C_out, C_in); cached in eval mode."""
        return self._unitary(cached=not self.training)

    def precompute(self) -> None:
        self.unitary()

    def _unitary(self, cached: bool) -> Tensor:
        settings = plain_settings(self)  # the grid (input_size) and the kernel size
        return self._unitary_cache.get([self.weight], self._fresh_unitary, cached, settings)

    def _fresh_unitary(self) -> Tensor:
        spectrum = self.kernel_spectrum()
        return cayley(spectrum.to(SOLVE_DTYPE)).to(spectrum.dtype)

    allocates_output = True  # an inverse FFT

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, *self.input_size)
        ok = x.dim() == 4 and tuple(x.shape[1:]) == expected
        check_input_shape(self, x, f"(B, {', '.join(map(str, expected))})", ok)
        spectrum = torch.fft.rfft2(x)  # (B, I, H, W//2+1)
        mixed = torch.einsum("hwoi,bihw->bohw", self.unitary(), spectrum)  # (B, O, H, W//2+1)
        out = torch.fft.irfft2(mixed, s=self.input_size)  # (B, O, H, W)
        return out if self.bias is None else out + self.bias[:, None, None]

    def lipschitz_bound(self) -> float:
        """Sound bound from the Q(w) the forward uses (float rounding of Q included).

        The real operator realised by ``irfft2`` has, at each frequency, Q(w) or the mean of
        Q(w) and conj Q(-w) (on self-conjugate bins), so max_w sigma_max(Q(w)) bounds it.
        """
        with torch.no_grad():
            return semi_unitary_spectral_bound(self._unitary(cached=True))

    def spatial_kernel(self) -> Tensor:
        """The full-grid real kernel K (C_out, C_in, H, W) with y = K (*) x, from Q in float64."""
        with torch.no_grad():
            q = self.unitary().to(torch.complex128).permute(2, 3, 0, 1)  # (O, I, H, W//2+1)
            return torch.fft.irfft2(q, s=self.input_size)  # (O, I, H, W)

    def export(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with circular padding and a full-grid kernel computing the same map.

        Torch convolutions are cross-correlations: y[i] = sum_t W[t] x[i + t - p]. With kernel
        size 2 (n // 2) + 1 and padding p = n // 2 per axis (odd, so the padding is symmetric),
        W[t] = K[(p - t) mod n] for t < n; the extra tap t = n (even n only) repeats a pixel and is
        zero.
        """
        kernel = self.spatial_kernel()
        pads = tuple(n // 2 for n in self.input_size)
        plain = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            tuple(2 * p + 1 for p in pads),
            padding=pads,
            bias=self.bias is not None,
            padding_mode="circular",
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        (height, width), (pad_h, pad_w) = self.input_size, pads
        rows = (pad_h - torch.arange(height, device=kernel.device)) % height
        cols = (pad_w - torch.arange(width, device=kernel.device)) % width
        with torch.no_grad():
            plain.weight.zero_()
            plain.weight[..., :height, :width] = kernel[..., rows[:, None], cols[None, :]]
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


def _largest_frobenius_norm(layer: CayleyConv2d) -> float:
    """An upper bound of max_w ||Q(w)||_F >= max_w ||Q(w)||_2 for the Q(w) the forward uses:
    sqrt(min(C_out, C_in)) times looser than :meth:`CayleyConv2d.lipschitz_bound` for a unitary
    Q, and 0.4 ms where that bound took 90 ms (64 channels, 32 x 32 grid)."""
    with torch.no_grad():
        unitary = layer._unitary(cached=True)
        norms = torch.linalg.vector_norm(torch.view_as_real(unitary), dim=(-3, -2, -1))
    terms = 2 * layer.out_channels * layer.in_channels
    return float(norms.amax()) * rounding_safety(norms.dtype, terms)


@register_internal_growth(CayleyConv2d)
def _spectrum_internal_growth(layer: nn.Module, norm: str) -> tuple[float, float]:
    """The unnormalised sums of ``rfft2``, the per-frequency mixing and ``irfft2`` on an H x W
    grid: each is a sum of terms of modulus at most those of the values it transforms, so with
    s = max(1, max_w ||Q(w)||_2) (bounded by :func:`_largest_frobenius_norm`: the graph bound
    has just computed the tight bound for the layer's Lipschitz constant, and a second one cost
    as much again) a spectrum entry is at most sum |x_c| <= sqrt(H W) ||x||_2, a mixed one
    s sqrt(H W) ||x||_2 (Parseval: the spectrum's norm is sqrt(H W) ||x||_2), and a partial sum
    of the inverse at most twice (the Hermitian half) sqrt(H W) times the mixed spectrum's norm:
    2 s H W ||x||_2, and ||x||_2 <= sqrt(C H W) ||x||_inf. The bias then gives the output. A
    32 x 32 image of 6e35 per pixel (norm 2e37) has a DC sum of 6e38, inf in float32, where the
    orthogonal map's output is 2e37."""
    height, width = layer.input_size
    gain = 2.0 * max(1.0, _largest_frobenius_norm(layer)) * height * width
    if norm == "linf":
        gain *= (layer.in_channels * height * width) ** 0.5
    return 0.0, gain * (1 + 2**-40)
