"""Slow reference of docs/integer-arithmetic.md in Python ints and numpy int64.

Shares no code with ``hq_lightning.functional.integer``: every rule is re-derived from the document
with scalar Python arithmetic (``fractions.Fraction`` for exact real factors).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

RANGES = {"qint8": (-128, 127), "qint16": (-32768, 32767), "qint32": (-(2**31), 2**31 - 1)}


def sat(v: int, dtype: str) -> int:
    lo, hi = RANGES[dtype]
    return max(lo, min(hi, v))


def f32(v) -> np.float32:
    return np.float32(v)


def ref_quantize(x: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    inv = np.float32(1.0) / f32(scale)
    out = np.empty(x.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(x.astype(np.float32)):
        prod = np.float32(v * inv)  # one fp32 product
        out[idx] = sat(round(Fraction(float(prod))), dtype)  # Fraction round: half to even
    return out


def ref_dequantize(q: np.ndarray, scales: list[float]) -> np.ndarray:
    out = np.empty(q.shape, dtype=np.float32)
    for idx, v in np.ndenumerate(q):
        s = scales[idx[1]] if len(scales) > 1 else scales[0]
        out[idx] = np.float32(np.float32(v) * np.float32(s))
    return out


def ref_multipliers(reals: list[float], magnitudes: list[int] | None = None) -> tuple[list[int], int]:
    """Multipliers of factors summed before one rounding (section 3), with Fractions.

    Each nonzero factor's own shift gives it 31 bits; the common shift is the finest (at most
    62), lowered one by one while ``sum X_i m_i >= 3 * 2^61`` (``X_i`` the operand magnitudes,
    default ``2^15``); then common factors of two are stripped.
    """
    magnitudes = [2**15] * len(reals) if magnitudes is None else magnitudes
    own, alive = [], False
    for r in reals:
        if r == 0:
            continue
        frac = Fraction(r)
        n = 0
        while frac * 2**n < 2**30:  # the smallest n with M 2^n in [2^30, 2^31)
            n += 1
        while frac * 2**n >= 2**31:
            n -= 1
        if round(frac * 2**n) == 2**31:  # rounds up out of 31 bits
            n -= 1
        own.append(n)
        m, k = round(frac * 2**n), n  # this factor alone, canonical: dead if its shift stays > 62
        while k > 0 and m % 2 == 0:
            m, k = m // 2, k - 1
        alive = alive or k <= 62
    if not alive:
        return [0] * len(reals), 0
    n = min(max(own), 62)
    while True:
        ms = [round(Fraction(r) * 2**n) for r in reals]  # Fraction round: half to even
        if sum(x * m for x, m in zip(magnitudes, ms)) < 3 * 2**61:
            break
        n -= 1
        assert n >= 0, "factors too large to sum in int64"
    while n > 0 and all(m % 2 == 0 for m in ms):
        ms = [m // 2 for m in ms]
        n -= 1
    return ms, n


def ref_fused_add_exact(acc: int, y: int, s_acc: float, s_y: float, s_out: float) -> Fraction:
    """The exact rational value ``acc * s_acc / s_out + y * s_y / s_out`` of a fused add, in output steps."""
    return (acc * Fraction(s_acc) + y * Fraction(s_y)) / Fraction(s_out)


def rshift_round(v: int, n: int) -> int:
    """floor((v + 2^(n-1)) / 2^n): round half up."""
    if n == 0:
        return v
    return (v + (1 << (n - 1))) // (1 << n)


def ref_requant(v: int, m: int, n: int, dtype: str) -> int:
    return sat(rshift_round(v * m, n), dtype)


def ref_bias(b: float, s_in: float, s_w: float) -> int:
    s_acc = float(s_in) * float(s_w)  # exact: two float32 scales in float64
    return sat(round(Fraction(float(b) / s_acc)), "qint32")


def ref_conv2d(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """Exact int conv: x [N,C,H,W] int, w [O,C/g,kh,kw] int -> int (python ints), NCHW."""
    n_, c, h, wd = x.shape
    o, cpg, kh, kw = w.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    opg = o // groups
    out = np.zeros((n_, o, oh, ow), dtype=object)
    for b in range(n_):
        for oc in range(o):
            g = oc // opg
            for i in range(oh):
                for j in range(ow):
                    total = 0
                    for ic in range(cpg):
                        for u in range(kh):
                            for v in range(kw):
                                y = i * stride[0] - padding[0] + u * dilation[0]
                                z = j * stride[1] - padding[1] + v * dilation[1]
                                if 0 <= y < h and 0 <= z < wd:
                                    total += int(x[b, g * cpg + ic, y, z]) * int(w[oc, ic, u, v])
                    out[b, oc, i, j] = total
    return out


def ref_conv_transpose2d(x, w, stride, padding, output_padding, groups=1, dilation=(1, 1)):
    """Exact int transposed conv by scattering: w [C, O/g, kh, kw]."""
    n_, c, h, wd = x.shape
    _, opg, kh, kw = w.shape
    cpg = c // groups
    oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    ow = (wd - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    out = np.zeros((n_, opg * groups, oh, ow), dtype=object)
    out[...] = 0
    for b in range(n_):
        for ic in range(c):
            g = ic // cpg
            for i in range(h):
                for j in range(wd):
                    for oc in range(opg):
                        for u in range(kh):
                            for v in range(kw):
                                y = i * stride[0] - padding[0] + u * dilation[0]
                                z = j * stride[1] - padding[1] + v * dilation[1]
                                if 0 <= y < oh and 0 <= z < ow:
                                    out[b, g * opg + oc, y, z] += int(x[b, ic, i, j]) * int(
                                        w[ic, oc, u, v]
                                    )
    return out


def ref_conv_output(
    acc, bias, s_in, s_w, s_out, out_dtype, activation=None, addend=None, s_y=None, addend_dtype="qint8"
):
    """Per-channel epilogue of section 5 on an exact accumulator ``acc`` [N, C, ...] (objects)."""
    out = np.zeros(acc.shape, dtype=np.int64)
    channels = acc.shape[1]
    for c in range(channels):
        s_acc = float(s_in) * float(s_w[c])
        b = 0 if bias is None else int(bias[c])
        if s_out is None:  # high precision
            six = sat(round(Fraction(6.0 / s_acc)), "qint32")
            for idx in np.ndindex(*acc.shape):
                if idx[1] != c:
                    continue
                v = sat(int(acc[idx]) + b, "qint32")
                if activation is not None:
                    v = max(v, 0)
                if activation == "relu6":
                    v = min(v, six)
                out[idx] = v
            continue
        reals = [s_acc / float(s_out)]
        magnitudes = [2**31]
        if addend is not None:
            reals.append(float(s_y) / float(s_out))
            magnitudes.append(-RANGES[addend_dtype][0])
        ms, n = ref_multipliers(reals, magnitudes)
        lo, hi = RANGES[out_dtype]
        if activation is not None:
            lo = 0
        if activation == "relu6":
            six = round(Fraction(float(np.float32(6.0) * (np.float32(1.0) / np.float32(s_out)))))
            hi = min(hi, six)
        for idx in np.ndindex(*acc.shape):
            if idx[1] != c:
                continue
            v = sat(int(acc[idx]) + b, "qint32") * ms[0]
            if addend is not None:
                v += int(addend[idx]) * ms[1]
            out[idx] = max(lo, min(hi, rshift_round(v, n)))
    return out


def ref_relu6(q: np.ndarray, scale: float, dtype: str) -> np.ndarray:
    """Standalone ReLU6 on integers at scale ``s``: clamp to ``[0, q6]``, ``q6`` = fake quant of 6.0."""
    six = round(Fraction(float(np.float32(np.float32(6.0) * (np.float32(1.0) / f32(scale))))))
    top = sat(six, dtype)
    return np.vectorize(lambda v: max(0, min(top, int(v))), otypes=[np.int64])(q)
