"""Review of the seventeenth session's row-sum and grid-angle changes: the row sums on a 'meta'
kernel, and the caches of the DFT matrices and grid angles against tracers' fake tensors and
integer types that share a cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lipcert.bounds import conv
from lipcert.bounds.conv import conv2d_operator_bound, grid_twiddles
from lipcert.nn import correlation
from lipcert.nn.aol import AOLConv2d, correlation_row_sums
from lipcert.nn.correlation import abs_correlation_sums


def test_row_sums_of_a_meta_kernel_give_their_shapes():
    """A kernel on the 'meta' device (shapes only) has no autocast: the row sums and an AOL
    layer give their shapes. abs_correlation_sums raised at the autocast check."""
    kernel = torch.empty(6, 4, 3, 3, device="meta", requires_grad=True)
    assert abs_correlation_sums(kernel).shape == (4, 4)
    rows = correlation_row_sums(kernel)
    rows.sum().backward()
    assert rows.shape == (4,) and kernel.grad.shape == kernel.shape
    layer = AOLConv2d(3, 5, 3, device="meta")
    assert layer(torch.empty(2, 3, 6, 6, device="meta")).shape == (2, 5, 6, 6)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_row_sums_traced_with_fake_tensors_leave_later_row_sums_real(kernel_size):
    """torch.export traces with fake tensors: the cached DFT matrices made there were handed to
    every later forward, whose row sums (and AOL outputs) came out NaN. Both schemes' matrices
    (real points for 3 x 3, the DFT for 5 x 5) are cached."""
    caches = (correlation._fourier_matrices, correlation._real_point_matrices)
    for cache in caches:
        cache.cache_clear()
    torch.manual_seed(0)
    kernel = torch.randn(5, 4, kernel_size, kernel_size)
    with FakeTensorMode() as mode:
        abs_correlation_sums(mode.from_tensor(kernel))
    sums = abs_correlation_sums(kernel)
    for cache in caches:
        cache.cache_clear()
    assert type(sums) is torch.Tensor
    assert torch.equal(sums, abs_correlation_sums(kernel))


def test_grid_angles_traced_with_fake_tensors_leave_later_bounds_real():
    """A SpectralConv2d exported with torch.export (fake tensors) filled the angles' cache with a
    fake tensor: every later bound of that shape raised."""
    conv._float64_twiddles.cache_clear()
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3)
    with FakeTensorMode() as mode:
        grid_twiddles((3, 3), (32, 17), mode.from_tensor(kernel))
    twiddles = grid_twiddles((3, 3), (32, 17), kernel)
    assert type(twiddles) is torch.Tensor
    bound = conv2d_operator_bound(kernel)
    conv._float64_twiddles.cache_clear()
    assert torch.equal(twiddles, grid_twiddles((3, 3), (32, 17), kernel))
    assert torch.equal(bound, conv2d_operator_bound(kernel))


def test_grid_angles_of_numpy_integer_or_float_sizes_share_no_cache_entry():
    """NumPy integers hash like ints but their products wrap (int8: 16 * 16 = 0), and floats are
    refused: as the cache key, an int8 grid's angles (NaN) were handed to the int grid, and a
    float grid got the int grid's angles once those were cached (it raises, as before)."""
    conv._float64_twiddles.cache_clear()
    kernel = torch.zeros(1, dtype=torch.float64)
    narrow = grid_twiddles((3, 3), (np.int8(16), np.int8(16)), kernel, origin=(np.int8(1), 1))
    plain = grid_twiddles((3, 3), (16, 16), kernel, origin=(1, 1))
    conv._float64_twiddles.cache_clear()
    assert torch.equal(plain, grid_twiddles((3, 3), (16, 16), kernel, origin=(1, 1)))
    assert torch.equal(narrow, plain)
    with pytest.raises(TypeError):
        grid_twiddles((3, 3), (16.0, 16.0), kernel, origin=(1, 1))
