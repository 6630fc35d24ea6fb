"""Slow reference of docs/integer-arithmetic.md section 10 (attention) in Python ints.

Shares no code with ``hq_lightning.functional.integer``: exact sums in Python ints, the
multipliers from ``integer_ref.ref_multipliers`` (Fractions), the exp table from ``math.exp``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from tests.reference.integer_ref import RANGES, ref_multipliers, sat

MAGNITUDE = {"qint8": 2**7, "qint16": 2**15}


def rhu(v: int, n: int) -> int:
    """Round half up of ``v / 2^n`` (Python ints: ``>>`` is a floor)."""
    return (v + (1 << (n - 1))) >> n if n > 0 else v


def ref_matmul(a: np.ndarray, b: np.ndarray, real: float, a_dtype: str, b_dtype: str, out_dtype: str, extra=None,
               additive=None, additive_scale=None) -> np.ndarray:
    """``sat(RHU_n(sum_k a_ik b_kj * m [+ extra_ij * m_e] [+ RNE(mask_ij / s * 2^n)]))``, 2-D operands.

    ``extra``: ``(codes [M, N], real_e, dtype)`` summed inside the same rounding (a bias);
    ``additive``: a float mask ``[M, N]`` at scale ``additive_scale`` (quotient in float64).
    """
    k = a.shape[1]
    bound = k * MAGNITUDE[a_dtype] * MAGNITUDE[b_dtype]
    if extra is None:
        (m,), n = ref_multipliers([real], [bound])
    else:
        (m, m_e), n = ref_multipliers([real, extra[1]], [bound, MAGNITUDE[extra[2]]])
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            acc = sum(int(a[i, t]) * int(b[t, j]) for t in range(k))
            v = acc * m + (int(extra[0][i, j]) * m_e if extra is not None else 0)
            if additive is not None:
                quotient = np.float64(np.float32(additive[i, j])) / np.float64(np.float32(additive_scale))
                v += round(Fraction(float(quotient)) * 2**n)
            out[i, j] = sat(rhu(v, n), out_dtype)
    return out


def ref_exp_table(scale: float, dtype: str) -> list[int]:
    lo, hi = RANGES[dtype]
    s = float(np.float32(scale))
    table = []
    for d in range(hi - lo + 1):
        entry = round(Fraction(math.exp(-d * s)) * 2**16)  # Fraction round: half to even
        table.append(entry)
        if entry == 0:
            break
    return table


def ref_softmax(row: list[int], keep: list[bool], in_scale: float, out_scale: float, in_dtype: str, out_dtype: str) -> list[int]:
    """One row of the masked integer softmax."""
    table = ref_exp_table(in_scale, in_dtype)
    kept = [z for z, k in zip(row, keep) if k]
    if not kept:
        return [0] * len(row)
    top = max(kept)
    e = [table[min(top - z, len(table) - 1)] if k else 0 for z, k in zip(row, keep)]
    total = sum(e)
    (m, ), n = ref_multipliers([1.0 / float(np.float32(out_scale))])
    out = []
    for v in e:
        value = Fraction(v * m, total * 2**n)
        out.append(sat(math.floor(value + Fraction(1, 2)), out_dtype))
    return out


def ref_attention(q, k, v, scales: dict, factor: float, dtypes: dict, keep=None, bias=None, additive=None):
    """``(context, probs)`` of one head: ``q [L, d]``, ``k [S, d]``, ``v [S, dv]`` codes.

    ``scales``/``dtypes`` keys: ``q``, ``k``, ``v``, ``scores``, ``probs``, ``context`` (and
    ``bias`` with ``bias = codes [L, S]``); ``keep`` ``[L, S]`` booleans.
    """
    f = np.float32
    real = float(f(scales["q"])) * float(f(scales["k"])) * factor / float(f(scales["scores"]))
    extra = None
    if bias is not None:
        extra = (bias, float(f(scales["bias"])) / float(f(scales["scores"])), dtypes["bias"])
    scores = ref_matmul(q, k.T, real, dtypes["q"], dtypes["q"], dtypes["scores"], extra, additive, scales["scores"])
    keep = np.ones(scores.shape, dtype=bool) if keep is None else keep
    probs = np.array([
        ref_softmax([int(z) for z in scores[i]], list(keep[i]), scales["scores"], scales["probs"], dtypes["scores"], dtypes["probs"])
        for i in range(scores.shape[0])
    ], dtype=np.int64)  # fmt: skip
    real_c = float(f(scales["probs"])) * float(f(scales["v"])) / float(f(scales["context"]))
    context = ref_matmul(probs, v, real_c, dtypes["probs"], dtypes["q"], dtypes["context"])
    return context, probs
