"""Integer normalisations: per-channel affine (standalone BatchNorm), and LayerNorm / GroupNorm /
InstanceNorm by exact int64 statistics, a table rsqrt and an affine requantization
(docs/integer-arithmetic.md, section 11).

Example:
    >>> import torch
    >>> m, n, k = affine_factors(torch.tensor([0.5], dtype=torch.float64),
    ...                          torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.125]))
    >>> affine_requantize(torch.tensor([[1, 2, -3]]), m, n, k, "qint8").tolist()  # (0.5 q + 0.25) / 0.125
    [[6, 10, -10]]
    >>> r, shift = rsqrt_fixed(torch.tensor([4, 10**12]))
    >>> [round(float(v) * 2.0 ** -float(s), 12) for v, s in zip(r, shift)]  # 1 / sqrt(W)
    [0.5, 1e-06]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType, qinfo, torch_dtype
from hq_lightning.functional.integer.multiplier import quantize_multiplier
from hq_lightning.functional.integer.rounding import rounding_right_shift

__all__ = [
    "EXP_FRACTION_BITS",
    "LOG_MANTISSA_BITS",
    "NORM_FRACTION_BITS",
    "RSQRT_BITS",
    "affine_factors",
    "affine_requantize",
    "exp_table",
    "log_softmax_codes",
    "log_softmax_factors",
    "max_reduced_elements",
    "normalized_codes",
    "rsqrt_fixed",
    "rsqrt_table",
]

#: Fractional bits of the normalised value ``z`` (``Z = RHU(z * 2^16)``).
NORM_FRACTION_BITS = 16
#: ``R = 2^RSQRT_BITS / sqrt(w)`` for the normalised ``w`` in ``[2^24, 2^26)``: ``R`` in ``(2^29, 2^30]``.
RSQRT_BITS = 42
_SEGMENT_BITS = 14  # w >> 14 indexes the table: 3072 segments of 2^14 over [2^24, 2^26)
_OFFSET_CAP = 61


def rsqrt_table() -> Tensor:
    """Knots ``T[j] = RNE(2^42 / sqrt((1024 + j) 2^14))``, ``j = 0..3072`` (int64; IEEE sqrt and division)."""
    knots = [
        round(2.0**RSQRT_BITS / math.sqrt((1024 + j) * 2.0**_SEGMENT_BITS)) for j in range(3073)
    ]
    return torch.tensor(knots, dtype=torch.int64)


_TABLE = rsqrt_table()


def _floor_log2(w: Tensor) -> Tensor:
    e = torch.frexp(w.to(torch.float64)).exponent.to(torch.int64) - 1
    e = e - ((w >> e.clamp(min=0)) == 0).to(torch.int64)  # float64 rounded W up to a power of 2
    return e + ((w >> (e + 1).clamp(min=0)) > 0).to(torch.int64)


def rsqrt_fixed(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, s)`` with ``R 2^-s`` about ``1 / sqrt(W)`` for int64 ``W >= 1`` (``W < 2^62``).

    ``W = w 4^k`` with ``w`` in ``[2^24, 2^26)`` (``k = floor((log2 W - 24) / 2)``; ``w = W >> 2k``,
    truncating, or ``W << -2k``); ``R = T[i] + RHU_14((T[i+1] - T[i]) f)``, ``i = (w >> 14) - 1024``,
    ``f = w & (2^14 - 1)``; ``s = 42 + k``. Relative error below ``1.5e-7`` (tested).
    """
    w = w.to(torch.int64).clamp(min=1)
    k = torch.div(_floor_log2(w) - 24, 2, rounding_mode="floor")
    normal = torch.where(k >= 0, w >> (2 * k).clamp(min=0), w << (-2 * k).clamp(min=0))
    index = (normal >> _SEGMENT_BITS) - 1024
    frac = normal & ((1 << _SEGMENT_BITS) - 1)
    table = _TABLE.to(w.device)
    t0, t1 = table[index], table[index + 1]
    r = t0 + rounding_right_shift((t1 - t0) * frac, torch.tensor(_SEGMENT_BITS, device=w.device))
    return r, k + RSQRT_BITS


def max_reduced_elements(dtype: QuantDType | str) -> int:
    """The most elements one statistic may reduce: ``N * 2^bits <= 2^31`` keeps every term in int64."""
    return 2 ** (31 - qinfo(dtype).bits)


def normalized_codes(x: Tensor, eps_term: Tensor) -> Tensor:
    """``Z = RHU(z * 2^16)``, ``z = (N q - S1) / sqrt(N S2 - S1^2 + E)`` over the last axis (int64).

    ``S1 = sum q``, ``S2 = sum q^2`` and ``V = N S2 - S1^2`` are exact int64 (``N^2 var`` in code
    units); ``E = RNE(eps N^2 / s_in^2)`` is ``eps_term``; the rsqrt is :func:`rsqrt_fixed`.
    """
    q = x.to(torch.int64)
    count = q.shape[-1]
    s1 = q.sum(dim=-1, keepdim=True)
    s2 = (q * q).sum(dim=-1, keepdim=True)
    w = count * s2 - s1 * s1 + eps_term.to(torch.int64)
    r, shift = rsqrt_fixed(w)
    d = count * q - s1
    return rounding_right_shift(d * r, shift - NORM_FRACTION_BITS)


def affine_factors(
    scale: Tensor, offset: Tensor, output_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, n, k)`` (int64, signed ``m``) for ``out = (v * scale + offset) / s_out`` per element.

    ``M = |scale| / s_out``, ``(m, n)`` its multiplier (section 3), ``B = offset / s_out``; ``n`` is
    lowered to ``61 - e`` (``|B| < 2^e``, ``m = RNE(M 2^n)`` again) when ``k = RNE(B 2^n)`` would
    pass ``2^61``; ``m`` takes the sign of ``scale``. All float64 from the given float64 reals.
    """
    s_out = output_scale.to(torch.float64).reshape(-1)[:1]
    real = scale.to(torch.float64).abs() / s_out
    bias = offset.to(torch.float64) / s_out
    m, n = quantize_multiplier(real)
    exponent = torch.frexp(bias.abs()).exponent.to(torch.int64)
    cap = torch.where(bias == 0, torch.full_like(n, 62), (_OFFSET_CAP - exponent).clamp(min=0))
    capped = n > cap
    n = torch.where(capped, cap, n)
    m = torch.where(capped, torch.round(torch.ldexp(real, n)).to(torch.int64), m)
    m = torch.where(scale < 0, -m, m)
    k = torch.round(torch.ldexp(bias, n)).to(torch.int64)
    return m, n, k


def affine_requantize(
    v: Tensor, m: Tensor, n: Tensor, k: Tensor, out_dtype: QuantDType | str
) -> Tensor:
    """``sat(RHU_n(v * m + k))`` (``m``, ``n``, ``k`` broadcast against ``v``)."""
    info = qinfo(out_dtype)
    value = rounding_right_shift(v.to(torch.int64) * m + k, n)
    return value.clamp(info.min, info.max).to(torch_dtype(out_dtype))


#: ``log_table`` resolution: the mantissa of the exp sum is truncated to 16 fractional bits.
LOG_MANTISSA_BITS = 16
#: Fractional bits of the standalone softmax's exp table (``table[0] = 2^22`` stands for 1).
EXP_FRACTION_BITS = 22


def exp_table(
    input_scale: Tensor, input_dtype: QuantDType | str, bits: int = EXP_FRACTION_BITS
) -> Tensor:
    """``table[d] = RNE(exp(-d s_in) 2^bits)`` (``math.exp`` in float64) for ``d = 0, 1, ...`` up to the
    first 0 entry or ``qmax - qmin``; int64. ``d = max - q`` beyond the end reads the last entry."""
    info = qinfo(input_dtype)
    s = float(input_scale.to(torch.float32).reshape(-1)[0])
    entries = []
    for d in range(info.max - info.min + 1):
        entries.append(round(math.exp(-d * s) * 2.0**bits))
        if entries[-1] == 0:
            break
    return torch.tensor(entries, dtype=torch.int64)


def log_softmax_factors(
    input_scale: Tensor, output_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m, n, c1, log_table)`` of :func:`log_softmax_codes`.

    ``(m, n)``: the multiplier of ``s_in / s_out``; ``c1 = RNE(ln 2 * 2^n / s_out)``;
    ``log_table[i] = RNE(ln(1 + i / 2^16) * 2^n / s_out)``, ``i = 0..2^16 - 1`` (float64,
    ``math.log``).
    """
    s_in = float(input_scale.to(torch.float32).reshape(-1)[0])
    s_out = float(output_scale.to(torch.float32).reshape(-1)[0])
    m, n = quantize_multiplier(torch.tensor([s_in / s_out], dtype=torch.float64))
    unit = 2.0 ** int(n) / s_out
    c1 = round(math.log(2.0) * unit)
    table = [
        round(math.log(1.0 + i / 2.0**LOG_MANTISSA_BITS) * unit)
        for i in range(2**LOG_MANTISSA_BITS)
    ]
    return m, n, torch.tensor([c1], dtype=torch.int64), torch.tensor(table, dtype=torch.int64)


def log_softmax_codes(
    z: Tensor, exp_table: Tensor, m: Tensor, n: Tensor, c1: Tensor, log_table: Tensor,
    out_dtype: QuantDType | str, fraction_bits: int = EXP_FRACTION_BITS,
) -> Tensor:  # fmt: skip
    """log-softmax over the last axis of integer codes ``z`` (docs/integer-arithmetic.md, section 11).

    ``d = z - max`` (``<= 0``), ``S = sum exp_table[min(-d, D)]`` (exact int64, ``2^-F`` units),
    ``k = floor(log2 S)``, ``i = ((S << 16) >> k) - 2^16`` (the mantissa, truncated), and
    ``out = sat(RHU_n(d m - ((k - F) c1 + log_table[i])))``.
    """
    info = qinfo(out_dtype)
    wide = z.to(torch.int64)
    d = wide - wide.amax(dim=-1, keepdim=True)
    e = exp_table.to(z.device)[(-d).clamp(max=exp_table.numel() - 1)]
    total = e.sum(dim=-1, keepdim=True)
    k = _floor_log2(total)
    index = ((total << LOG_MANTISSA_BITS) >> k) - (1 << LOG_MANTISSA_BITS)
    g = (k - fraction_bits) * c1.to(z.device) + log_table.to(z.device)[index]
    value = rounding_right_shift(d * m.to(z.device) - g, n.to(z.device))
    return value.clamp(info.min, info.max).to(torch_dtype(out_dtype))
