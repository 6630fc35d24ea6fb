"""Integer kernels of attention: requantized matmul and the masked softmax (docs/integer-arithmetic.md, section 10).

- :func:`matmul_requantize`: ``sat(RHU_n(exact_matmul(a, b) * m))`` with ``(m, n)`` for the real
  factor ``M = s_a s_b c / s_out`` (``c`` a constant factor such as ``1 / sqrt(head_dim)``),
  quantized for accumulators up to ``K * max|a| * max|b|`` so the product stays inside int64.
- :func:`softmax_exp_table` and :func:`masked_softmax`: an exp table indexed by ``max - z``,
  an exact int64 row sum, and one rounded division per output.

Example:
    >>> import torch
    >>> table = softmax_exp_table(torch.tensor([0.1]), "qint8")
    >>> int(table[0]), int(table[10])  # exp(0) and exp(-1.0) in units of 2^-16
    (65536, 24109)
    >>> z = torch.tensor([[10, 0, -128]], dtype=torch.int8)
    >>> keep = torch.tensor([[True, True, False]])
    >>> masked_softmax(z, table, keep, *softmax_reciprocal(torch.tensor([1 / 127.5])), "qint8").tolist()
    [[93, 34, 0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType, as_dtype, qinfo, torch_dtype
from hq_lightning.functional.integer.matmul import exact_matmul
from hq_lightning.functional.integer.multiplier import quantize_multiplier, quantize_multipliers
from hq_lightning.functional.integer.rounding import requantize

__all__ = [
    "SOFTMAX_FRACTION_BITS",
    "masked_softmax",
    "matmul_multiplier",
    "matmul_requantize",
    "softmax_exp_table",
    "softmax_reciprocal",
]

#: Fractional bits of the exp table: ``table[0] = 2^16`` stands for ``exp(0) = 1``.
SOFTMAX_FRACTION_BITS = 16
_MAGNITUDE = {torch.int8: 2**7, torch.int16: 2**15}


def matmul_multiplier(real: Tensor, k: int, a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(m, n)`` for ``M = real`` applied to a ``K = k`` accumulator of ``a_dtype x b_dtype`` codes.

    The operand magnitude given to :func:`~hq_lightning.functional.integer.quantize_multipliers`
    is ``k * max|a| * max|b|``, the largest possible accumulator, so ``acc * m + 2^(n-1)`` never
    leaves int64 (the multiplier gives up low bits when the accumulator can be large).
    """
    bound = max(1, k) * _MAGNITUDE[a_dtype] * _MAGNITUDE[b_dtype]
    (m,), n = quantize_multipliers(real.to(torch.float64).reshape(-1)[:1], magnitudes=(bound,))
    return m, n


def matmul_requantize(
    a: Tensor, b: Tensor, real: Tensor, out_dtype: QuantDType | str
) -> Tensor:
    """``sat(RHU_n(exact_matmul(a, b) * m))``, ``(m, n) = matmul_multiplier(real, K, ...)``.

    Args:
        a: ``[..., M, K]`` int8/int16 codes.
        b: ``[..., K, N]`` int8/int16 codes.
        real: float64 ``[1]``: ``s_a * s_b * c / s_out``.
        out_dtype: ``qint8`` or ``qint16``.
    """
    d = as_dtype(out_dtype)
    info = qinfo(d)
    m, n = matmul_multiplier(real, a.shape[-1], a.dtype, b.dtype)
    return requantize(exact_matmul(a, b), m, n, info.min, info.max, torch_dtype(d))


def softmax_exp_table(input_scale: Tensor, input_dtype: QuantDType | str) -> Tensor:
    """``table[d] = RNE(exp(-d * s_in) * 2^16)`` (float64) for ``d = 0 .. D``, int64.

    ``d = max - z`` is the distance of a code below its row's maximum. The table stops at the
    first ``d`` whose entry is 0 (or at ``qmax - qmin``); larger distances read that last entry.
    """
    info = qinfo(input_dtype)
    s = float(torch.as_tensor(input_scale, dtype=torch.float32).reshape(-1)[0])
    d = torch.arange(info.max - info.min + 1, dtype=torch.float64)
    table = torch.round(torch.exp(-d * s) * 2.0**SOFTMAX_FRACTION_BITS).to(torch.int64)
    zeros = (table == 0).nonzero()
    if zeros.numel():
        table = table[: int(zeros[0]) + 1]
    return table


def softmax_reciprocal(output_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``(m_r, n_r)`` standing for ``R = 1 / s_out`` (float64 from the float32 scale)."""
    real = 1.0 / torch.as_tensor(output_scale, dtype=torch.float32).reshape(-1)[:1].to(torch.float64)
    return quantize_multiplier(real)


def masked_softmax(
    z: Tensor,
    table: Tensor,
    keep: Tensor | None,
    recip_multiplier: Tensor,
    recip_shift: Tensor,
    out_dtype: QuantDType | str,
) -> Tensor:
    """Softmax over the last axis of integer codes ``z``, entries where ``keep`` is False excluded.

    ``e = table[min(max_kept - z, D)]`` for kept entries and ``0`` for excluded ones, ``S`` the
    exact int64 row sum, ``p = sat(floor((2 e m_r + S 2^n_r) / (S 2^(n_r + 1))))`` (``e / S / s_out``
    rounded half up). A row with no kept entry gives zeros.

    Args:
        z: int8/int16 codes ``[..., S]``.
        table: :func:`softmax_exp_table` of ``z``'s scale and dtype.
        keep: bool, broadcastable to ``z`` (``None``: every entry is kept).
        recip_multiplier: ``m_r`` of :func:`softmax_reciprocal`.
        recip_shift: ``n_r`` of :func:`softmax_reciprocal`.
        out_dtype: ``qint8`` or ``qint16``.
    """
    d = as_dtype(out_dtype)
    info = qinfo(d)
    wide = z.to(torch.int64)
    if keep is None:
        keep = torch.ones_like(z, dtype=torch.bool)
    keep = keep.expand_as(z)
    lowest = torch.iinfo(torch.int64).min
    row_max = wide.masked_fill(~keep, lowest).amax(dim=-1, keepdim=True)
    distance = (row_max - wide).clamp(0, table.numel() - 1)
    e = table[distance].masked_fill(~keep, 0)
    total = e.sum(dim=-1, keepdim=True)
    shift = int(recip_shift.reshape(-1)[0])
    if int(total.max()) << (shift + 1) >= 2**63 or (table.numel() and int(table[0]) * int(recip_multiplier) >= 2**61):
        raise ValueError(
            f"Expected a softmax row sum that fits the int64 division (rows up to 2^(45 - n_r) = "
            f"{2 ** max(0, 45 - shift)} keys at full weight), but got a row of {z.shape[-1]} keys "
            f"with shift n_r = {shift}; use a larger output scale or shorter rows."
        )
    safe = total.clamp(min=1)
    numerator = 2 * e * recip_multiplier + (safe << shift)
    p = torch.div(numerator, safe << (shift + 1), rounding_mode="floor")
    p = p.masked_fill(total == 0, 0)
    return p.clamp(info.min, info.max).to(torch_dtype(d))
