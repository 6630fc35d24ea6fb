"""Slow references of the integer pools and resizes, one output element at a time in Python ints.

Shares no code with ``hq_lightning.functional.integer``: windows, adaptive bounds and bilinear
coordinates are re-derived from torch's documented definitions; requantization is the reference
rule of :mod:`tests.reference.integer_ref` (section 3 of docs/integer-arithmetic.md).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

from tests.reference.integer_ref import ref_multipliers, ref_requant


def _spatial(x: np.ndarray) -> tuple[int, ...]:
    return x.shape[2:]


def _out_len(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def ref_avg_pool(x, kernel, stride, padding, s_in, s_out, dtype="qint8") -> np.ndarray:
    """Zero-padded window sums (count_include_pad), requantized by s_in / (prod(kernel) * s_out)."""
    dims = len(kernel)
    (m,), n = ref_multipliers([s_in / (math.prod(kernel) * s_out)])
    outs = [_out_len(_spatial(x)[d], kernel[d], stride[d], padding[d]) for d in range(dims)]
    out = np.zeros((*x.shape[:2], *outs), dtype=np.int64)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for pos in itertools.product(*[range(o) for o in outs]):
            total = 0
            for offs in itertools.product(*[range(k) for k in kernel]):
                src = [pos[d] * stride[d] - padding[d] + offs[d] for d in range(dims)]
                if all(0 <= src[d] < _spatial(x)[d] for d in range(dims)):
                    total += int(x[(b, c, *src)])
            out[(b, c, *pos)] = ref_requant(total, m, n, dtype)
    return out


def _adaptive_bounds(n: int, o: int, i: int) -> tuple[int, int]:
    return (i * n) // o, math.ceil((i + 1) * n / o)


def ref_adaptive_avg_pool(x, output_size, s_in, s_out, dtype="qint8") -> np.ndarray:
    """Sum of each adaptive window, requantized by s_in / (count * s_out) of that window."""
    dims = len(output_size)
    out = np.zeros((*x.shape[:2], *output_size), dtype=np.int64)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for pos in itertools.product(*[range(o) for o in output_size]):
            bounds = [_adaptive_bounds(_spatial(x)[d], output_size[d], pos[d]) for d in range(dims)]
            count = math.prod(hi - lo for lo, hi in bounds)
            total = sum(int(x[(b, c, *src)]) for src in itertools.product(*[range(lo, hi) for lo, hi in bounds]))
            (m,), n = ref_multipliers([s_in / (count * s_out)])
            out[(b, c, *pos)] = ref_requant(total, m, n, dtype)
    return out


def ref_max_pool(x, kernel, stride, padding, dilation) -> np.ndarray:
    """Max over each (dilated, -inf padded) window."""
    dims = len(kernel)
    outs = [_out_len(_spatial(x)[d], kernel[d], stride[d], padding[d], dilation[d]) for d in range(dims)]
    out = np.zeros((*x.shape[:2], *outs), dtype=np.int64)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for pos in itertools.product(*[range(o) for o in outs]):
            best = None
            for offs in itertools.product(*[range(k) for k in kernel]):
                src = [pos[d] * stride[d] - padding[d] + offs[d] * dilation[d] for d in range(dims)]
                if all(0 <= src[d] < _spatial(x)[d] for d in range(dims)):
                    v = int(x[(b, c, *src)])
                    best = v if best is None else max(best, v)
            out[(b, c, *pos)] = best
    return out


def ref_adaptive_max_pool(x, output_size) -> np.ndarray:
    dims = len(output_size)
    out = np.zeros((*x.shape[:2], *output_size), dtype=np.int64)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for pos in itertools.product(*[range(o) for o in output_size]):
            bounds = [_adaptive_bounds(_spatial(x)[d], output_size[d], pos[d]) for d in range(dims)]
            out[(b, c, *pos)] = max(int(x[(b, c, *src)]) for src in itertools.product(*[range(lo, hi) for lo, hi in bounds]))
    return out


def ref_nearest(x, out_size, scale_factors=None) -> np.ndarray:
    """torch's 'nearest': src = min(floor(dst * r), in - 1), r = 1 / scale or in / out (float32)."""
    dims = len(out_size)
    out = np.zeros((*x.shape[:2], *out_size), dtype=np.int64)
    ratios = []
    for d in range(dims):
        n = _spatial(x)[d]
        r = 1.0 / scale_factors[d] if scale_factors else n / out_size[d]
        ratios.append(np.float32(r))
    for idx in itertools.product(*[range(v) for v in out.shape]):
        src = [min(int(math.floor(np.float32(idx[2 + d]) * ratios[d])), _spatial(x)[d] - 1) for d in range(dims)]
        out[idx] = int(x[(idx[0], idx[1], *src)])
    return out


def _taps(n: int, o: int, d: int, align_corners: bool, scale) -> tuple[int, int, int]:
    """Source index, next index and the 8-bit weight of the next one (Fractions, half to even)."""
    if align_corners:
        src = Fraction(d * (n - 1), o - 1) if o > 1 else Fraction(0)
    else:
        ratio = 1 / Fraction(scale) if scale else Fraction(n, o)
        src = max((d + Fraction(1, 2)) * ratio - Fraction(1, 2), Fraction(0))
    i0 = min(math.floor(src), n - 1)
    lam = min(max(round((src - i0) * 256), 0), 256)
    return i0, min(i0 + 1, n - 1), lam


def ref_bilinear(x, out_size, align_corners, s_in, s_out, scale_factors=None, dtype="qint8") -> np.ndarray:
    """sum w_y w_x x over the 2x2 neighbours (weights in 1/256), requantized by s_in / (s_out 2^16)."""
    (m,), n = ref_multipliers([s_in / s_out / 2**16])
    (h, w), (oh, ow) = _spatial(x), out_size
    sy, sx = scale_factors if scale_factors else (None, None)
    out = np.zeros((*x.shape[:2], oh, ow), dtype=np.int64)
    for b, c, e, d in itertools.product(range(x.shape[0]), range(x.shape[1]), range(oh), range(ow)):
        j0, j1, mu = _taps(h, oh, e, align_corners, sy)
        i0, i1, lam = _taps(w, ow, d, align_corners, sx)
        p = x[b, c]
        acc = (256 - mu) * ((256 - lam) * int(p[j0, i0]) + lam * int(p[j0, i1])) + mu * (
            (256 - lam) * int(p[j1, i0]) + lam * int(p[j1, i1])
        )
        out[b, c, e, d] = ref_requant(acc, m, n, dtype)
    return out
