"""Slow reference of the integer normalisations (docs/integer-arithmetic.md, section 11) in Python ints.

Shares no code with ``hq_lightning.functional.integer.normalization``: the affine factors, the
table rsqrt, the statistics and the rounding are re-derived from the document with scalar Python
arithmetic (``fractions.Fraction`` for exact scalings, ``int.bit_length`` for the normalisation).
"""

from __future__ import annotations

import math
from fractions import Fraction

from tests.reference.integer_ref import RANGES, ref_multipliers, rshift_round, sat

_RSQRT_KNOTS = [round(2.0**42 / math.sqrt((1024 + j) * 2.0**14)) for j in range(3073)]


def ref_affine_factors(scale: float, offset: float, s_out: float) -> tuple[int, int, int]:
    """``(m, n, k)`` for ``(v * scale + offset) / s_out``: multiplier, shift capped by the offset, offset."""
    real = abs(scale) / float(s_out)
    bias = offset / float(s_out)
    (m,), n = ref_multipliers([real])
    if bias != 0:
        cap = max(61 - math.frexp(abs(bias))[1], 0)
        if n > cap:
            n = cap
            m = round(Fraction(real) * 2**n)
    if scale < 0:
        m = -m
    return m, n, round(Fraction(bias) * 2**n)


def ref_affine(v: int, factors: tuple[int, int, int], dtype: str) -> int:
    m, n, k = factors
    return sat(rshift_round(v * m + k, n), dtype)


def ref_batch_norm(q: int, channel: dict, s_in: float, s_out: float, dtype: str) -> int:
    """One code of a standalone BatchNorm: ``a = gamma / sqrt(var + eps)``, ``b = beta - mean a``."""
    a = channel["gamma"] / math.sqrt(channel["var"] + channel["eps"])
    b = channel["beta"] - channel["mean"] * a
    return ref_affine(q, ref_affine_factors(a * float(s_in), b, s_out), dtype)


def ref_rsqrt(w: int) -> tuple[int, int]:
    """``(R, s)``, ``R 2^-s`` about ``1 / sqrt(w)``: normalise to ``[2^24, 2^26)``, interpolate the knots."""
    w = max(w, 1)
    k = (w.bit_length() - 1 - 24) // 2
    normal = w >> (2 * k) if k >= 0 else w << (-2 * k)
    i, f = (normal >> 14) - 1024, normal & (2**14 - 1)
    t0, t1 = _RSQRT_KNOTS[i], _RSQRT_KNOTS[i + 1]
    return t0 + rshift_round((t1 - t0) * f, 14), 42 + k


def ref_normalize(row: list[int], eps: float, s_in: float) -> list[int]:
    """``Z = RHU((N q - S1) / sqrt(N S2 - S1^2 + E) * 2^16)`` for one statistic's codes."""
    count = len(row)
    s1 = sum(row)
    s2 = sum(v * v for v in row)
    s = float(s_in)
    e = min(max(round(float(eps) * float(count) ** 2 / (s * s)), 0), 2**61)
    r, shift = ref_rsqrt(count * s2 - s1 * s1 + e)
    return [rshift_round((count * v - s1) * r, shift - 16) for v in row]


def ref_norm_output(z: int, gamma: float, beta: float, s_out: float, dtype: str) -> int:
    """The affine part of a normalisation: ``(z 2^-16 gamma + beta) / s_out``."""
    return ref_affine(z, ref_affine_factors(gamma * 2.0**-16, beta, s_out), dtype)


def ref_exp_table(s_in: float, dtype: str, bits: int = 22) -> list[int]:
    """``RNE(exp(-d s_in) 2^bits)`` for ``d = 0, 1, ...`` up to the first 0 (or the code range)."""
    lo, hi = RANGES[dtype]
    table = []
    for d in range(hi - lo + 1):
        table.append(round(Fraction(math.exp(-d * float(s_in))) * 2**bits))
        if table[-1] == 0:
            break
    return table


def _exp_sum(row: list[int], table: list[int]) -> tuple[int, list[int]]:
    top = max(row)
    e = [table[min(top - v, len(table) - 1)] for v in row]
    return sum(e), e


def ref_softmax(
    row: list[int], s_in: float, s_out: float, in_dtype: str, out_dtype: str
) -> list[int]:
    """One row of the integer softmax: ``e / S / s_out`` rounded half up, ``1 / s_out`` as ``m 2^-n``."""
    total, e = _exp_sum(row, ref_exp_table(s_in, in_dtype))
    (m,), n = ref_multipliers([1.0 / float(s_out)])
    return [sat(math.floor(Fraction(v * m, total * 2**n) + Fraction(1, 2)), out_dtype) for v in e]


def ref_log_softmax(
    row: list[int], s_in: float, s_out: float, in_dtype: str, out_dtype: str
) -> list[int]:
    """One row of the integer log-softmax: the softmax's exp table and sum, ``ln`` of the sum by
    ``k ln 2`` plus the truncated 16-bit mantissa's ``ln``, one multiplier/shift."""
    total, _ = _exp_sum(row, ref_exp_table(s_in, in_dtype))
    top = max(row)
    (m,), n = ref_multipliers([float(s_in) / float(s_out)])
    unit = 2.0**n / float(s_out)
    k = total.bit_length() - 1
    index = ((total << 16) >> k) - 2**16
    g = (k - 22) * round(math.log(2.0) * unit) + round(math.log(1.0 + index / 2.0**16) * unit)
    return [sat(rshift_round((v - top) * m - g, n), out_dtype) for v in row]
