"""Exact integer matmul of two quantized activations (docs/integer-arithmetic.md, section 10).

``exact_matmul(a, b)`` is the int64 sum of products ``sum_k a[..., i, k] * b[..., k, j]`` for
int8/int16 operands, batched like ``torch.matmul``. It runs as a float matmul where every partial
sum is provably an integer the float type holds exactly, whatever the summation order:

- float32 when ``K * max|a| * max|b| <= 2^24`` (int8 x int8 up to ``K = 1024``);
- float64 when ``K * max|a| * max|b| <= 2^53`` (int16 x int16 up to ``K = 2^23``);
- else the contraction is cut into chunks of ``K`` that each satisfy the float64 bound, and
  the chunk results are summed in int64.

``max|a|``, ``max|b|`` are the largest magnitudes of the operands' dtypes (128 / 32768), so the
path is chosen from shapes and dtypes alone (it never depends on the values).

Example:
    >>> import torch
    >>> a = torch.tensor([[127, -128]], dtype=torch.int8)
    >>> b = torch.tensor([[2], [3]], dtype=torch.int8)
    >>> exact_matmul(a, b).tolist()
    [[-130]]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EXACT_FLOAT32_SUM", "EXACT_FLOAT64_SUM", "exact_matmul", "matmul_chunk"]

#: Largest magnitude of a float32 / float64 partial sum that is always an exact integer.
EXACT_FLOAT32_SUM = 2**24
EXACT_FLOAT64_SUM = 2**53

_MAGNITUDE = {torch.int8: 2**7, torch.int16: 2**15, torch.int32: 2**31, torch.int64: 2**63}


def _magnitude(t: Tensor, name: str) -> int:
    if t.dtype not in (torch.int8, torch.int16):
        raise TypeError(
            f"Expected `{name}` to be a torch.int8 or torch.int16 tensor (quantized codes), but "
            f"got {t.dtype}."
        )
    return _MAGNITUDE[t.dtype]


def matmul_chunk(a_dtype: torch.dtype, b_dtype: torch.dtype, k: int) -> tuple[torch.dtype, int]:
    """The float type and the contraction chunk length ``exact_matmul`` uses for ``K = k``."""
    product = _MAGNITUDE[a_dtype] * _MAGNITUDE[b_dtype]
    if k * product <= EXACT_FLOAT32_SUM:
        return torch.float32, k
    return torch.float64, max(1, min(k, EXACT_FLOAT64_SUM // product))


def exact_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` of int8/int16 tensors as an exact int64 tensor (see the module docstring).

    Args:
        a: ``[..., M, K]`` integer codes.
        b: ``[..., K, N]`` integer codes (batch dimensions broadcast like ``torch.matmul``).

    Returns:
        int64 ``[..., M, N]``.
    """
    _magnitude(a, "a")
    _magnitude(b, "b")
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(
            f"Expected `a` and `b` to have at least 2 dimensions, but got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}."
        )
    k = a.shape[-1]
    if b.shape[-2] != k:
        raise ValueError(
            f"Expected the contraction sizes to agree (a[..., K] and b[..., K, :]), but got "
            f"{tuple(a.shape)} @ {tuple(b.shape)}."
        )
    float_type, chunk = matmul_chunk(a.dtype, b.dtype, k)
    if chunk >= k:
        return torch.matmul(a.to(float_type), b.to(float_type)).to(torch.int64)
    total = None
    for start in range(0, k, chunk):
        part = torch.matmul(
            a[..., start : start + chunk].to(float_type), b[..., start : start + chunk, :].to(float_type)
        ).to(torch.int64)
        total = part if total is None else total + part
    return total
