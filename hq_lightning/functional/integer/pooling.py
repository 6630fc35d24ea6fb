"""Exact integer window sums for average pooling and reductions.

Example:
    >>> import torch
    >>> x = torch.arange(16, dtype=torch.int8).reshape(1, 1, 4, 4)
    >>> avg_pool_sum(x, (2, 2), (2, 2), (0, 0)).tolist()
    [[[[10, 18], [42, 50]]]]
    >>> sums, counts = adaptive_avg_pool_sums(x, (1, 1))
    >>> sums.tolist(), counts.tolist()
    ([[[[120]]]], [[16]])
    >>> integer_max_pool(x[0], F.max_pool1d, 4).tolist()
    [[[3], [7], [11], [15]]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["avg_pool_sum", "adaptive_avg_pool_sums", "adaptive_windows", "integer_max_pool"]


def avg_pool_sum(x: Tensor, kernel_size, stride, padding, ceil_mode: bool = False) -> Tensor:
    """Sum of each pooling window (zero padding) as int64: float64 pooling with divisor 1 (exact)."""
    ops = {3: None, 4: F.avg_pool2d, 5: F.avg_pool3d}
    if x.dim() not in ops:
        raise ValueError(
            f"Expected `x` to be 3-D, 4-D or 5-D (N, C, *spatial), but got {x.dim()}-D."
        )
    x64 = x.to(torch.float64)
    if x.dim() == 3:
        # avg_pool1d has no divisor_override: run it as a 2-D pool of height 1.
        total = F.avg_pool2d(
            x64.unsqueeze(-2), (1, *kernel_size), (1, *stride), (0, *padding), ceil_mode, True, 1
        )
        return total.squeeze(-2).to(torch.int64)
    total = ops[x.dim()](x64, kernel_size, stride, padding, ceil_mode, True, 1)
    return total.to(torch.int64)


def adaptive_windows(in_size: int, out_size: int) -> tuple[list[int], list[int]]:
    """torch's adaptive pooling windows: ``[floor(i*in/out), ceil((i+1)*in/out))``."""
    starts = [(i * in_size) // out_size for i in range(out_size)]
    stops = [-((-(i + 1) * in_size) // out_size) for i in range(out_size)]
    return starts, stops


def adaptive_avg_pool_sums(x: Tensor, output_size) -> tuple[Tensor, Tensor]:
    """Window sums (int64, exact) and window sizes (int64, ``output_size``) of adaptive average pooling.

    1, 2 or 3 spatial dimensions: ``x`` is ``(N, C, *spatial)`` with ``len(output_size)`` spatial
    dims (an entry ``None`` keeps that size). The sums come from torch's float64 adaptive average
    pool times the window size, rounded: a window sum ``S`` is an integer below ``2^50`` in
    magnitude (``count * 2^15`` with ``count < 2^35``), every partial sum is exact in float64, and
    the division and the multiplication back by ``count`` add a relative error of a few
    ``2^-53``, less than 0.5 in absolute terms, so rounding gives ``S`` exactly (10-20x faster
    than an int64 integral image).
    """
    dims = len(output_size)
    pools = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    if dims not in pools or x.dim() != dims + 2:
        raise ValueError(
            f"Expected `x` to be {dims + 2}-D (N, C, *{dims} spatial dims) for an output size of "
            f"{dims} dims, but got {x.dim()}-D."
        )
    sizes = [x.shape[-dims + d] if output_size[d] is None else int(output_size[d]) for d in range(dims)]
    lengths = []
    for d in range(dims):
        starts, stops = adaptive_windows(x.shape[-dims + d], sizes[d])
        lengths.append(torch.tensor([b - a for a, b in zip(starts, stops)], dtype=torch.int64))
    counts = lengths[0]
    for length in lengths[1:]:
        counts = counts.unsqueeze(-1) * length
    counts = counts.to(x.device)
    means = pools[dims](x.to(torch.float64), sizes)
    sums = torch.round(means * counts.to(torch.float64)).to(torch.int64)
    return sums, counts


def integer_max_pool(x: Tensor, pool, *args, **kwargs) -> Tensor:
    """A max pool (``F.max_pool1d``, ``F.adaptive_max_pool2d``...) of integer codes, exactly.

    The codes go through float32 (float64 for int32), which holds every value exactly, and a
    max only selects values, so the result is the maximum of the integers (torch has no integer
    1-D / 3-D / adaptive max pool kernels).
    """
    if x.is_floating_point():
        raise TypeError(f"Expected `x` to be an integer tensor, but got {x.dtype}.")
    wide = x.to(torch.float32 if x.dtype in (torch.int8, torch.int16) else torch.float64)
    return pool(wide, *args, **kwargs).to(x.dtype)
