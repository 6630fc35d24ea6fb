"""Slow reference of the table ops (docs/integer-arithmetic.md, section 9) in Python ints.

Shares no code with ``hq_lightning.functional.integer.lookup``: tables, segment levels, knots,
interpolation, clamp and division are re-derived from the document with scalar Python
arithmetic (``fractions.Fraction`` for the exact comparisons). The float function values are
inputs (the table is defined from the float function the QAT model runs).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from tests.reference.integer_ref import RANGES, ref_multipliers, rshift_round, sat

F_BITS = 14  # fractional bits of the int16-input knots


def _unrounded_code(value: float, out_scale: float) -> float:
    """``fp32(y * fp32(1 / s_out))``, the fake quant's product before rounding (a Python float)."""
    inv = np.float32(1.0) / np.float32(out_scale)
    return float(np.float32(np.float32(value) * inv))


def _round_code(t: float, dtype: str) -> int:
    lo, hi = RANGES[dtype]
    if math.isnan(t):
        return 0
    if math.isinf(t):
        return hi if t > 0 else lo
    return sat(round(Fraction(t)), dtype)  # Fraction rounds half to even


def ref_table(values, out_scale: float, out_dtype: str) -> list[int]:
    """Full table: the fake quant of each float value (NaN -> 0)."""
    return [_round_code(_unrounded_code(v, out_scale), out_dtype) for v in values]


def ref_segmented(values, out_scale: float, out_dtype: str) -> tuple[list[int], list[list[int]]]:
    """Segment level and knots of each of the 256 blocks, from the 65,537 float values."""
    lo, hi = RANGES[out_dtype]
    targets: list[Fraction] = []
    for v in values:
        t = _unrounded_code(v, out_scale)
        t = 0.0 if math.isnan(t) else min(max(t, lo - 1.0), hi + 1.0)
        targets.append(Fraction(t))
    knot = [round(t * 2**F_BITS) for t in targets]  # half to even
    levels: list[int] = []
    blocks: list[list[int]] = []
    for b in range(256):
        base = 256 * b
        chosen = 0
        for w in range(8, 0, -1):
            step = 1 << w
            good = True
            for r in range(256):
                start = base + (r // step) * step
                k0, k1 = knot[start], knot[start + step]
                num = k0 * step + (k1 - k0) * (r % step)
                if abs(num - targets[base + r] * 2 ** (F_BITS + w)) > Fraction(
                    2 ** (F_BITS + w - 1)
                ):
                    good = False
                    break
            if good:
                chosen = w
                break
        levels.append(chosen)
        blocks.append([knot[base + j * (1 << chosen)] for j in range((256 >> chosen) + 1)])
    return levels, blocks


def ref_segmented_lookup(q: int, levels: list[int], blocks: list[list[int]], out_dtype: str) -> int:
    """Interpolate the segmented table at the int16 code ``q``."""
    u = q + 32768
    b, r = divmod(u, 256)
    w = levels[b]
    seg, frac = divmod(r, 1 << w)
    k0, k1 = blocks[b][seg], blocks[b][seg + 1]
    value = k0 * (1 << w) + (k1 - k0) * frac
    return sat(rshift_round(value, F_BITS + w), out_dtype)


def ref_clamp(q: int, scale: float, dtype: str, lo: float | None, hi: float | None) -> int:
    """Clamp at the codes the fake quant gives the bounds at ``scale``."""
    qmin, qmax = RANGES[dtype]
    low = qmin if lo is None else _round_code(_unrounded_code(lo, scale), dtype)
    high = qmax if hi is None else _round_code(_unrounded_code(hi, scale), dtype)
    return max(low, min(high, q))


def ref_div(x: int, r: int, s_x: float, s_r: float, s_out: float, out_dtype: str) -> int:
    """``x * r`` (``r`` the reciprocal table's code of the divisor), requantized by ``s_x s_r / s_out``."""
    real = float(np.float64(s_x) * np.float64(s_r) / np.float64(s_out))
    (m,), n = ref_multipliers([real])
    return sat(rshift_round(x * r * m, n), out_dtype)
