"""Rounding right shift, saturation and requantization of integer accumulators.

Example:
    >>> import torch
    >>> rounding_right_shift(torch.tensor([5, -5, 6, -6]), torch.tensor(2)).tolist()
    [1, -1, 2, -1]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rounding_right_shift", "requantize", "saturate", "rounding_offset"]


def rounding_offset(shift: Tensor) -> Tensor:
    """``2^(n-1)`` for ``n > 0`` and ``0`` for ``n = 0`` (int64), added before the shift."""
    shift = shift.to(torch.int64)
    return torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)


def rounding_right_shift(value: Tensor, shift: Tensor, offset: Tensor | None = None) -> Tensor:
    """``floor((v + 2^(n-1)) / 2^n)``: round half up (towards +inf), on int64 values."""
    if offset is None:
        offset = rounding_offset(shift)
    return (value + offset) >> shift


def saturate(value: Tensor, qmin: int, qmax: int, dtype: torch.dtype) -> Tensor:
    """Clamp to ``[qmin, qmax]`` and store as ``dtype``."""
    return value.clamp(qmin, qmax).to(dtype)


def requantize(
    acc: Tensor,
    multiplier: Tensor,
    shift: Tensor,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
    offset: Tensor | None = None,
) -> Tensor:
    """``saturate(round_half_up(acc * m / 2^n))``; ``m``, ``n`` broadcast against ``acc``."""
    value = acc.to(torch.int64) * multiplier
    return saturate(rounding_right_shift(value, shift, offset), qmin, qmax, dtype)
