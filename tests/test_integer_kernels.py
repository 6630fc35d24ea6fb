"""Integer kernels against the slow reference, bit for bit (docs/integer-arithmetic.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hq_lightning.functional.integer import (
    ConvPlan,
    adaptive_avg_pool_sums,
    avg_pool_sum,
    bilinear_accumulate,
    chunk_channels,
    quantize,
    quantize_bias,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
)
from tests.reference.integer_ref import (
    ref_bias,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_multipliers,
    ref_quantize,
    ref_requant,
)


def _reals(gen: torch.Generator, count: int) -> list[float]:
    exponents = torch.randint(-40, 20, (count,), generator=gen)
    return [float(torch.rand((), generator=gen)) * 2.0 ** int(e) for e in exponents]


def test_multiplier_matches_reference_and_error_bound():
    gen = torch.Generator().manual_seed(0)
    reals = _reals(gen, 300) + [0.0, 1.0, 0.5, 2.0**-14, 2.0**30, 2.0**-33, (2**31 - 1) / 2**31]
    m, n = quantize_multiplier(torch.tensor(reals, dtype=torch.float64))
    for real, mi, ni in zip(reals, m.tolist(), n.tolist()):
        assert ([mi], ni) == ref_multipliers([real])
        assert mi < 2**31 and 0 <= ni <= 62
        if real >= 2.0**-32:
            assert abs(real - mi * 2.0**-ni) <= real * 2.0**-31


def test_power_of_two_factor_is_a_pure_shift():
    for k in range(0, 40):
        m, n = quantize_multiplier(torch.tensor([2.0**-k], dtype=torch.float64))
        assert (int(m), int(n)) == (1, k)
    acc = torch.arange(-70, 70)
    out = requantize(acc, torch.tensor(1), torch.tensor(3), -128, 127, torch.int8)
    assert out.tolist() == [(v + 4) >> 3 for v in acc.tolist()]


def test_shared_shift_matches_reference():
    gen = torch.Generator().manual_seed(1)
    a, b = _reals(gen, 100), _reals(gen, 100)
    (ma, mb), n = quantize_multipliers(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    for i in range(100):
        assert ([int(ma[i]), int(mb[i])], int(n[i])) == ref_multipliers([a[i], b[i]])


def test_multiplier_rejects_out_of_range():
    with pytest.raises(ValueError, match="Expected `real multiplier`"):
        quantize_multiplier(torch.tensor([2.0**31], dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected `real multiplier`"):
        quantize_multiplier(torch.tensor([-1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", ["qint8", "qint16", "qint32"])
def test_requantize_matches_reference_with_saturation(dtype):
    gen = torch.Generator().manual_seed(2)
    acc = torch.randint(-(2**31), 2**31 - 1, (400,), generator=gen, dtype=torch.int64)
    acc[:4] = torch.tensor([-(2**31), 2**31 - 1, 0, -1])
    reals = _reals(gen, 400)
    m, n = quantize_multiplier(torch.tensor(reals, dtype=torch.float64))
    lo, hi = {"qint8": (-128, 127), "qint16": (-32768, 32767), "qint32": (-(2**31), 2**31 - 1)}[
        dtype
    ]
    out = requantize(acc, m, n, lo, hi, torch.int64)
    for i in range(400):
        assert int(out[i]) == ref_requant(int(acc[i]), int(m[i]), int(n[i]), dtype)


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_quantize_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    for scale in [0.0173, 2.0**-7, 3.1e-5, 1.0]:
        x = torch.randn(64, generator=gen) * 200 * scale
        x[:3] = torch.tensor([0.5 * scale, 1e9, -1e9])  # a tie, saturation
        q = quantize(x, torch.tensor([scale]), dtype)
        assert q.dtype == (torch.int8 if dtype == "qint8" else torch.int16)
        assert q.long().tolist() == ref_quantize(x.numpy(), scale, dtype).tolist()


def test_bias_matches_reference():
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(16, generator=gen) * 3
    b[0] = 1e12  # saturates to int32
    s_w = torch.rand(16, generator=gen) * 0.01 + 1e-6
    q = quantize_bias(b, torch.tensor(0.02, dtype=torch.float64) * s_w.double())
    assert q.dtype == torch.int32
    assert q.tolist() == [ref_bias(float(b[i]), np.float32(0.02), float(s_w[i])) for i in range(16)]


CONV_CASES = [
    dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 1), groups=1),
    dict(stride=(1, 1), padding=(2, 2), dilation=(2, 1), groups=2),
    dict(stride=(1, 2), padding=(1, 1), dilation=(1, 1), groups=4),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("act", [torch.int8, torch.int16])
def test_conv2d_accumulator_matches_reference(case, act):
    gen = torch.Generator().manual_seed(5)
    info = torch.iinfo(act)
    x = torch.randint(info.min, info.max + 1, (2, 4, 5, 6), generator=gen, dtype=act)
    x[0, 0, 0, :2] = torch.tensor([info.min, info.max])
    w = torch.randint(-128, 128, (4, 4 // case["groups"], 3, 2), generator=gen).to(torch.int8)
    bias = torch.randint(-(2**20), 2**20, (4,), generator=gen, dtype=torch.int32)
    plan = ConvPlan.build(w, "conv2d", case["groups"], act)
    acc = plan.accumulate(x, bias, case["stride"], case["padding"], case["dilation"])
    ref = ref_conv2d(x.numpy(), w.numpy(), **case)
    ref = ref + bias.numpy().astype(object).reshape(1, -1, 1, 1)
    ref = np.clip(ref, -(2**31), 2**31 - 1)
    assert acc.tolist() == ref.tolist()


def test_conv_transpose2d_accumulator_matches_reference():
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(-128, 128, (1, 4, 3, 4), generator=gen).to(torch.int8)
    w = torch.randint(-128, 128, (4, 3, 3, 3), generator=gen).to(torch.int8)
    plan = ConvPlan.build(w, "conv_transpose2d", 2, torch.int8)
    acc = plan.accumulate(x, None, (2, 1), (1, 0), (1, 1), output_padding=(1, 0))
    ref = ref_conv_transpose2d(x.numpy(), w.numpy(), (2, 1), (1, 0), (1, 0), groups=2)
    assert acc.tolist() == ref.tolist()


def test_chunks_split_input_channels_and_stay_exact():
    # 3x3 kernel, |w| = 127: 2^24 // (9 * 127 * 128) = 114 channels per chunk.
    assert chunk_channels(9, 127, 128) == 114
    gen = torch.Generator().manual_seed(7)
    w = torch.randint(-127, 128, (2, 300, 3, 3), generator=gen).to(torch.int8)
    w[0, 0, 0, 0] = 127
    plan = ConvPlan.build(w, "conv2d", 1, torch.int8)
    assert [b for b in plan.bounds] == [(0, 114), (114, 228), (228, 300)]
    x = torch.randint(-128, 128, (1, 300, 3, 3), generator=gen).to(torch.int8)
    acc = plan.accumulate(x, None, 1, 0, 1)
    exact = (x.long().reshape(1, -1) * w.long().reshape(2, -1)).sum(-1)
    assert acc.flatten().tolist() == exact.tolist()


def test_worst_case_accumulation_is_exact_where_naive_float32_rounds():
    # 4097 odd products of 127 * 127 = 16129: sums far beyond 2^24 that float32 cannot hold.
    k = 4097
    x = torch.full((1, k), 127, dtype=torch.int8)
    w = torch.full((3, k), 127, dtype=torch.int8)
    w[1] = -127
    w[2, ::2] = -128
    exact = [127 * 127 * k, -127 * 127 * k, 127 * (-128 * 2049 + 127 * 2048)]
    naive = torch.nn.functional.linear(x.float(), w.float()).double().flatten().tolist()
    assert naive[:2] != exact[:2]  # the float32 shortcut really rounds here
    plan = ConvPlan.build(w, "linear", 1, torch.int8)
    assert len(plan.chunks) > 1
    assert plan.accumulate(x, None).flatten().tolist() == exact
    # the same layer as a 1x1 conv, and through the float64 fallback
    xc, wc = x.reshape(1, k, 1, 1), w.reshape(3, k, 1, 1)
    conv = ConvPlan.build(wc, "conv2d", 1, torch.int8)
    assert conv.accumulate(xc, None).flatten().tolist() == exact
    wide = ConvPlan(conv.kind, wc, 1, k, [], [])
    assert wide.accumulate(xc, None).flatten().tolist() == exact


def test_int16_worst_case_saturates_the_int32_accumulator():
    k = 600
    x = torch.full((1, k), 32767, dtype=torch.int16)
    w = torch.full((2, k), 127, dtype=torch.int8)
    w[1] = -128
    x[0, 0] = -32768
    plan = ConvPlan.build(w, "linear", 1, torch.int16)
    acc = plan.accumulate(x, torch.tensor([5, -5], dtype=torch.int32))
    assert acc.flatten().tolist() == [2**31 - 1, -(2**31)]
    small = torch.full((1, 500), -32768, dtype=torch.int16)
    acc = ConvPlan.build(w[:, :500], "linear", 1, torch.int16).accumulate(small, None)
    assert acc.flatten().tolist() == [-32768 * 127 * 500, 32768 * 128 * 500]  # just inside int32


def test_window_sums_and_bilinear_taps():
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-32768, 32768, (2, 3, 5, 7), generator=gen).to(torch.int16)
    xs = x.long().numpy()
    sums = avg_pool_sum(x, (2, 3), (2, 2), (1, 1))
    padded = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(sums.shape[2]):
        for j in range(sums.shape[3]):
            window = padded[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 3]
            assert sums[:, :, i, j].tolist() == window.sum(axis=(2, 3)).tolist()
    sums, counts = adaptive_avg_pool_sums(x, (3, 2))
    for i in range(3):
        for j in range(2):
            h0, h1 = (i * 5) // 3, math.ceil((i + 1) * 5 / 3)
            w0, w1 = (j * 7) // 2, math.ceil((j + 1) * 7 / 2)
            assert sums[:, :, i, j].tolist() == xs[:, :, h0:h1, w0:w1].sum(axis=(2, 3)).tolist()
            assert int(counts[i, j]) == (h1 - h0) * (w1 - w0)
    acc = bilinear_accumulate(x, (4, 9), align_corners=False)
    for d in range(9):
        src = max((d + 0.5) * (7 / 9) - 0.5, 0.0)
        i0 = math.floor(src)
        lam = round((src - i0) * 256)
        i1 = min(i0 + 1, 6)
        for e in range(4):
            sy = max((e + 0.5) * (5 / 4) - 0.5, 0.0)
            j0 = math.floor(sy)
            mu = round((sy - j0) * 256)
            j1 = min(j0 + 1, 4)
            expect = (256 - mu) * ((256 - lam) * xs[:, :, j0, i0] + lam * xs[:, :, j0, i1]) + mu * (
                (256 - lam) * xs[:, :, j1, i0] + lam * xs[:, :, j1, i1]
            )
            assert acc[:, :, e, d].tolist() == expect.tolist()
