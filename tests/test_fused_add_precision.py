"""The fused add (Conv/Linear + add) against the exact rational result (issue 13, item 2).

``out = RHU((acc m_1 + y m_2) / 2^n)`` with each factor keeping its own 31 bits on the finer
shift (docs/integer-arithmetic.md, section 3). Against the exact value
``v = acc s_acc / s_out + y s_y / s_out`` (``fractions.Fraction`` of the float32 scales) the
output is ``clamp(floor(v + 1/2))`` wherever ``v`` is farther than the documented bound from a
rounding boundary, and within one step everywhere. The case is the one the issue measured: a
conv term about ``2^-19`` of the addend's factor (under the former shared shift chosen by the
largest factor, that term kept only ~12 bits and flipped outputs of large accumulators).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from hq_lightning.functional.integer import quantize_multipliers
from hq_lightning.nn.quantized import QuantizedLinear
from tests.reference.integer_ref import (
    RANGES,
    ref_conv_output,
    ref_fused_add_exact,
    ref_multipliers,
    rshift_round,
)

K = 8192


def _f32(v: float) -> float:
    return float(np.float32(v))


def _layer(addend_dtype: str, output_dtype: str, gen: torch.Generator):
    sign = torch.where(torch.rand(K, generator=gen) < 0.5, -1.0, 1.0)
    w = torch.randint(1, 128, (4, K), generator=gen).float() * sign  # one sign pattern for all channels
    s_w = torch.tensor([1.0, 0.93, 0.71, 0.55])
    s_in = 1.0 / 3
    s_out = (128 * 64 * K * s_in) / (97.3 if output_dtype == "qint8" else 19731.7)
    s_y = s_out * (0.61 if addend_dtype == "qint8" else 0.0137)
    layer = QuantizedLinear.from_float_params(
        w * s_w[:, None], torch.randn(4, generator=gen) * 1e5, s_w, s_in, s_out,
        output_dtype=output_dtype, addend_scale=s_y, addend_dtype=addend_dtype,
    )
    return layer, sign, (_f32(s_in), [_f32(v) for v in s_w.tolist()], _f32(s_out), _f32(s_y))


def _inputs(sign: torch.Tensor, addend_dtype: str, gen: torch.Generator, batch: int = 256):
    magnitude = torch.randint(60, 129, (batch, K), generator=gen)
    flip = torch.where(torch.rand(batch, 1, generator=gen) < 0.5, -1, 1)
    x = (magnitude * sign.long()[None] * flip).clamp(-128, 127).to(torch.int8)  # |acc| ~ 2^26
    lo, hi = RANGES[addend_dtype]
    y = torch.randint(lo, hi + 1, (batch, 4), generator=gen).to(getattr(torch, f"int{8 if addend_dtype == 'qint8' else 16}"))
    return x, y


@pytest.mark.parametrize(("addend_dtype", "output_dtype"), [("qint8", "qint8"), ("qint16", "qint16"), ("qint8", "qint16")])
def test_fused_add_equals_the_exact_rational_result_outside_the_bound(addend_dtype, output_dtype):
    gen = torch.Generator().manual_seed(0)
    layer, sign, (s_in, s_w, s_out, s_y) = _layer(addend_dtype, output_dtype, gen)
    x, y = _inputs(sign, addend_dtype, gen)
    out = layer(x, y).long().numpy()

    acc = x.numpy().astype(np.int64) @ layer.weight.numpy().astype(np.int64).T  # exact, < 2^31
    bias = layer.bias.long().numpy()
    # the integer rule, reference code (section 5 with the section 3 multipliers)
    expect_rule = ref_conv_output(
        acc.astype(object), bias, s_in, s_w, s_out, output_dtype, addend=y.numpy(), s_y=s_y,
        addend_dtype=addend_dtype,
    )
    assert np.array_equal(out, expect_rule)

    lo, hi = RANGES[output_dtype]
    old_flips = clear = 0
    for (i, c), got in np.ndenumerate(out):
        a = max(-(2**31), min(2**31 - 1, int(acc[i, c]) + int(bias[c])))
        s_acc = s_in * s_w[c]
        exact = ref_fused_add_exact(a, int(y[i, c]), s_acc, s_y, s_out)
        nearest = max(lo, min(hi, int((exact + Fraction(1, 2)).__floor__())))
        # documented bound: 2^-31 per factor (31-bit multipliers) + the float64 division (2^-52)
        m1, m2 = s_acc / s_out, s_y / s_out
        bound = (abs(a) * m1 + abs(int(y[i, c])) * m2) * (2.0**-31 + 2.0**-52)
        frac = exact - (exact + Fraction(1, 2)).__floor__() + Fraction(1, 2)  # position in [0, 1)
        if min(frac, 1 - frac) > bound:
            clear += 1
            assert got == nearest, (i, c, float(exact))
        assert abs(got - nearest) <= 1
        # the former rule: one shift from the largest factor
        e = np.frexp(max(m1, m2))[1]
        n_old = 31 - int(e)
        old = rshift_round(a * round(Fraction(m1) * 2**n_old) + int(y[i, c]) * round(Fraction(m2) * 2**n_old), n_old)
        old_flips += max(lo, min(hi, old)) != nearest
    assert clear >= 0.999 * out.size  # ties within the bound are rare
    if addend_dtype == "qint8" and output_dtype == "qint8":
        assert old_flips > 0  # the shared shift of the largest factor really lost precision here


def test_each_factor_keeps_31_bits_unless_int64_needs_them():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        m1 = float(torch.rand((), generator=gen)) * 2.0 ** int(torch.randint(-30, 3, (), generator=gen))
        m2 = float(torch.rand((), generator=gen)) * 2.0 ** int(torch.randint(-30, 3, (), generator=gen))
        for magnitudes in ([2**31, 2**7], [2**31, 2**15], [2**15, 2**15]):
            (a, b), n = quantize_multipliers(
                torch.tensor([m1], dtype=torch.float64), torch.tensor([m2], dtype=torch.float64),
                magnitudes=magnitudes,
            )
            got = ([int(a), int(b)], int(n))
            assert got == ref_multipliers([m1, m2], magnitudes)
            mults, shift = got
            total = sum(x * m for x, m in zip(magnitudes, mults))
            assert total + (1 << max(shift - 1, 0)) < 2**63  # the int64 sum cannot overflow
            # the cap binds when the finest factor's own shift does not fit in int64
            top = min(max(31 - int(np.frexp(r)[1]) for r in (m1, m2)), 62)
            capped = sum(x * round(Fraction(r) * 2**top) for x, r in zip(magnitudes, (m1, m2))) >= 3 * 2**61
            for real, m in zip((m1, m2), mults):
                if not capped and real >= 2.0**-32:
                    assert abs(real - m * 2.0**-shift) <= real * 2.0**-31
