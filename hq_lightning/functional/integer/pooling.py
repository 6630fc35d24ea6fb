"""Exact integer window sums for average pooling and reductions.

Example:
    >>> import torch
    >>> x = torch.arange(16, dtype=torch.int8).reshape(1, 1, 4, 4)
    >>> avg_pool_sum(x, (2, 2), (2, 2), (0, 0)).tolist()
    [[[[10, 18], [42, 50]]]]
    >>> sums, counts = adaptive_avg_pool_sums(x, (1, 1))
    >>> sums.tolist(), counts.tolist()
    ([[[[120]]]], [[16]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["avg_pool_sum", "adaptive_avg_pool_sums", "adaptive_windows"]


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


def adaptive_avg_pool_sums(x: Tensor, output_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Window sums (int64, exact) and window sizes (int64 ``[out_h, out_w]``) of adaptive 2-D pooling.

    The sums come from torch's float64 adaptive average pool times the window size, rounded: a
    window sum ``S`` is an integer below ``2^50`` in magnitude (``count * 2^15``), every partial
    sum is exact in float64, and the division and the multiplication back by ``count`` add a
    relative error of a few ``2^-53``, less than 0.5 in absolute terms, so rounding gives ``S``
    exactly (10-20x faster than an int64 integral image).
    """
    if x.dim() != 4:
        raise ValueError(f"Expected `x` to be 4-D (N, C, H, W), but got {x.dim()}-D.")
    height, width = x.shape[-2], x.shape[-1]
    out_h = height if output_size[0] is None else output_size[0]
    out_w = width if output_size[1] is None else output_size[1]
    h0, h1 = adaptive_windows(height, out_h)
    w0, w1 = adaptive_windows(width, out_w)
    counts = torch.tensor(
        [[(b - a) * (d - c) for c, d in zip(w0, w1)] for a, b in zip(h0, h1)], device=x.device
    )
    means = F.adaptive_avg_pool2d(x.to(torch.float64), (out_h, out_w))
    sums = torch.round(means * counts.to(torch.float64)).to(torch.int64)
    return sums, counts
