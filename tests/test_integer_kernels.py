"""Integer kernels against the slow reference, bit for bit (docs/integer-arithmetic.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hq_lightning.functional.integer import (
    ConvPlan,
    FloatRequantFactors,
    accumulator_range,
    adaptive_avg_pool_sums,
    avg_pool_sum,
    bilinear_accumulate,
    chunk_channels,
    float_requant_factors,
    quantize,
    quantize_bias,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    requantize_float,
)
from tests.reference.integer_ref import (
    ref_bias,
    ref_conv2d,
    ref_conv_transpose2d,
    ref_multipliers,
    ref_quantize,
    ref_requant,
    rshift_round,
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


def test_chunks_are_greedy_under_the_abs_weight_sum_rule_and_stay_exact():
    # the uniform rule (every weight at max|w|): 2^24 // (9 * 127 * 128) = 114 channels per chunk
    assert chunk_channels(9, 127, 128) == 114
    gen = torch.Generator().manual_seed(7)
    w = torch.randint(-127, 128, (2, 300, 3, 3), generator=gen).to(torch.int8)
    w[0, :, 0, 0] = -128  # output channel 0 is the heavier one everywhere
    plan = ConvPlan.build(w, "conv2d", 1, torch.int8)
    # slow greedy reference: extend a chunk while 128 * sum|w| <= 2^24 for both output channels
    sums = [[sum(abs(v) for v in w[o, i].flatten().tolist()) for i in range(300)] for o in (0, 1)]
    expect, start, running = [], 0, [0, 0]
    for i in range(300):
        if max(running[o] + sums[o][i] for o in (0, 1)) * 128 > 2**24:
            expect.append((start, i))
            start, running = i, [0, 0]
        running = [running[o] + sums[o][i] for o in (0, 1)]
    expect.append((start, 300))
    assert plan.bounds == expect
    assert len(expect) == 2 and expect[0][1] > 114  # fewer chunks than the uniform rule's 3
    # inputs at the sign of channel 0's weights: its chunk sums reach their worst case
    x = torch.where(w[:1] > 0, 127, -128).to(torch.int8)
    assert (
        max(abs(int((x.long() * w[:1].long())[:, a:b].sum())) for a, b in expect)
        > 2**24 - 128 * 9 * 128
    )
    acc = plan.accumulate(x, None, 1, 0, 1)
    exact = (x.long().reshape(1, -1) * w.long().reshape(2, -1)).sum(-1)
    assert acc.flatten().tolist() == exact.tolist()


@pytest.mark.parametrize("kind", ["conv2d", "linear", "conv_transpose2d"])
def test_abs_weight_sums_are_exact_including_minus_128(kind):
    from hq_lightning.functional.integer.accumulate import _abs_weight_sums

    gen = torch.Generator().manual_seed(21)
    shape = {"conv2d": (3, 4, 3, 3), "linear": (3, 5), "conv_transpose2d": (4, 3, 2, 2)}[kind]
    w = torch.randint(-128, 128, shape, generator=gen).to(torch.int8)
    w.view(-1)[::3] = -128  # |-128| wraps in int8 arithmetic
    if kind == "conv_transpose2d":  # groups=2: output channel g*3 + j sees inputs 2g, 2g+1
        expect = [
            [sum(abs(v) for v in w[2 * g + i, j].flatten().tolist()) for i in range(2)]
            for g in range(2)
            for j in range(3)
        ]
        got = _abs_weight_sums(w, 2, True)
    else:
        expect = [[sum(abs(v) for v in w[o, i].reshape(-1).tolist()) for i in range(shape[1])]
                  for o in range(3)]
        got = _abs_weight_sums(w, 1, False)
    assert got.dtype == torch.int64 and got.tolist() == expect


def test_conv_transpose2d_chunks_per_group_stay_exact():
    gen = torch.Generator().manual_seed(13)
    w = torch.randint(-128, 128, (1200, 2, 2, 2), generator=gen).to(torch.int8)  # groups=2
    plan = ConvPlan.build(w, "conv_transpose2d", 2, torch.int8)
    assert len(plan.bounds) > 1
    x = torch.where(torch.rand(1, 1200, 2, 2, generator=gen) > 0.5, 127, -128).to(torch.int8)
    acc = plan.accumulate(x, None, (1, 1), (0, 0), (1, 1), output_padding=(0, 0))
    ref = ref_conv_transpose2d(x.numpy(), w.numpy(), (1, 1), (0, 0), (0, 0), groups=2)
    assert acc.tolist() == ref.tolist()


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


@pytest.mark.parametrize("value", [32767, -32768, 127, -128])
def test_adaptive_window_sums_stay_exact_at_extreme_values_and_odd_windows(value):
    # float64 mean times count, rounded: exact while the error stays below 0.5; a 300x301
    # window of int16 extremes (|S| ~ 2^31.5) and overlapping odd windows, plus alternating signs
    dtype = torch.int16 if abs(value) > 128 else torch.int8
    x = torch.full((1, 2, 300, 301), value, dtype=dtype)
    x[0, 1, ::2] = -1 - value  # the other extreme on every second row
    for size in [(1, 1), (7, 3), (299, 2)]:
        sums, counts = adaptive_avg_pool_sums(x, size)
        xs = x.long()
        for i in sorted({0, size[0] // 2, size[0] - 1}):
            for j in range(size[1]):
                h0, h1 = (i * 300) // size[0], math.ceil((i + 1) * 300 / size[0])
                w0, w1 = (j * 301) // size[1], math.ceil((j + 1) * 301 / size[1])
                assert sums[0, :, i, j].tolist() == xs[0, :, h0:h1, w0:w1].sum((-1, -2)).tolist()
                assert int(counts[i, j]) == (h1 - h0) * (w1 - w0)


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


# -- exact float64 requantization (docs/integer-arithmetic.md, section 7) ---------------------


def _ref_output(t: int, bias: int, m: int, n: int, lo: int, hi: int, y: int = 0, m_y: int = 0):
    acc = max(-(2**31), min(2**31 - 1, t + bias))
    return max(lo, min(hi, rshift_round(acc * m + y * m_y, n)))


def _probe_accumulators(m: int, n: int, const: int, acc_min: int, acc_max: int, lo: int, hi: int):
    """Accumulators where the output steps (each integer boundary, both sides) plus the extremes."""
    probes = {acc_min, acc_max, 0, 1, -1}
    for k in range(lo, hi + 2):
        edge = -((const - k * 2**n) // m)  # smallest t with t*m + const >= k 2^n
        probes.update(t for t in (edge - 1, edge, edge + 1) if acc_min <= t <= acc_max)
    return sorted(probes)


@pytest.mark.parametrize(
    "lo, hi, bias, addend",
    [
        (-128, 127, 0, None),
        (0, 127, -(2**20), None),
        (-32768, 32767, 3, None),
        (0, 100, 7, "qint8"),
    ],
)
def test_float_requant_is_exact_at_the_float64_bound(lo, hi, bias, addend):
    # a dense odd 31-bit multiplier and the largest shift the proof accepts: the products of the
    # probed accumulators reach past 2^52, where float64 has no spare bit
    m, m_y = 2**31 - 1, 2**30 + 12345
    acc_min, acc_max = -(2**31) + 2**21, 2**31 - 2**21
    y_dtype = None if addend is None else torch.int8
    accepted = []
    for n in range(20, 63):
        factors = float_requant_factors(
            torch.tensor([acc_min]),
            torch.tensor([acc_max]),
            torch.tensor([bias], dtype=torch.int32),
            torch.tensor([m]),
            torch.tensor([n]),
            lo,
            hi,
            None if addend is None else torch.tensor([m_y]),
            y_dtype,
        )
        if factors is not None:
            accepted.append((n, factors))
    assert accepted and accepted[-1][0] < 62  # the proof really rejects larger shifts
    n, factors = accepted[-1]
    const = bias * m + 2 ** (n - 1)
    ts = _probe_accumulators(m, n, const, acc_min, acc_max, lo, hi)
    assert max(abs(t * m + const) for t in ts if _ref_output(t, bias, m, n, lo, hi) < hi) > 2**52
    ys = [0] if addend is None else [-128, -1, 0, 1, 127]
    for y in ys:
        total = torch.tensor(ts, dtype=torch.float64).reshape(1, -1)
        y_t = None if addend is None else torch.full((1, len(ts)), y, dtype=torch.int8)
        out = requantize_float(total, factors, lo, hi, torch.int64, channel_axis=0, addend=y_t)
        expect = [_ref_output(t, bias, m, n, lo, hi, y, m_y if addend else 0) for t in ts]
        assert out.flatten().tolist() == expect


def test_float_requant_guard_rejects_a_case_float64_gets_wrong():
    # t m = 2^61 - 2 rounds up to 2^61 in float64, so floor((t m + 2^61) / 2^62) becomes 1, not 0
    t, m, n = 2**31 - 2, 2**30 + 1, 62
    assert _ref_output(t, 0, m, n, -128, 127) == 0
    forced = FloatRequantFactors(
        torch.tensor([m * 2.0**-n], dtype=torch.float64),
        torch.tensor([2.0**-1], dtype=torch.float64),
        None,
    )
    total = torch.tensor([[float(t)]], dtype=torch.float64)
    assert requantize_float(total, forced, -128, 127, torch.int8, channel_axis=0).item() == 1
    rejected = float_requant_factors(
        torch.tensor([-(2**31)]),
        torch.tensor([2**31 - 1]),
        None,
        torch.tensor([m]),
        torch.tensor([n]),
        -128,
        127,
    )
    assert rejected is None


def test_float_requant_rejects_int32_saturation_inside_the_window():
    # bias near the int32 limit: the accumulator saturates where the output is not yet saturated
    args = (torch.tensor([-1000]), torch.tensor([1000]))
    m, n = torch.tensor([1]), torch.tensor([26])  # M = 2^-26: int32 max -> 32, not saturated
    near = torch.tensor([2**31 - 500], dtype=torch.int32)
    assert float_requant_factors(*args, near, m, n, -128, 127) is None
    assert float_requant_factors(*args, torch.tensor([5], dtype=torch.int32), m, n, -128, 127)
    # with M = 2^-20 the same bias saturates the int8 output first: the float path is exact again
    assert float_requant_factors(*args, near, m, torch.tensor([20]), -128, 127) is not None


@pytest.mark.parametrize("kind", ["conv2d", "linear", "conv_transpose2d"])
@pytest.mark.parametrize("act", [torch.int8, torch.int16])
def test_accumulator_range_is_a_tight_bound(kind, act):
    gen = torch.Generator().manual_seed(9)
    info = torch.iinfo(act)
    shape = {"linear": (3, 7), "conv2d": (3, 2, 2, 2), "conv_transpose2d": (4, 3, 1, 1)}[kind]
    w = torch.randint(-128, 128, shape, generator=gen).to(torch.int8)
    w.view(-1)[::4] = -128  # the magnitude of -128 must not wrap
    if kind == "linear":
        per_channel = w.long()
    elif kind == "conv2d":
        per_channel = w.long().reshape(3, -1)
    else:  # [C_in, C_out/g, kh, kw], groups=2 -> output channel g*opg + j
        per_channel = torch.stack(
            [w[g * 2 : g * 2 + 2, j].long().flatten() for g in (0, 1) for j in range(3)]
        )
    acc_min, acc_max = accumulator_range(w, kind, 2 if kind == "conv_transpose2d" else 1, act)
    for c in range(per_channel.shape[0]):
        top = sum(max(info.max * v, info.min * v) for v in per_channel[c].tolist())
        bottom = sum(min(info.max * v, info.min * v) for v in per_channel[c].tolist())
        assert (int(acc_min[c]), int(acc_max[c])) == (bottom, top)
    if kind == "conv2d":  # the extremes are reached by the matching input
        x = torch.where(w[1:2] > 0, info.max, info.min).to(act)
        plan = ConvPlan.build(w, kind, 1, act)
        assert int(plan.accumulate_float(x)[0, 1]) == int(acc_max[1])


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("mkldnn", [True, False])
@pytest.mark.parametrize("shape", [(144, 144, 3, 144), (24, 144, 1, 1), (64, 64, 3, 1)])
def test_float32_conv_backends_are_exact_on_extreme_integer_inputs(mkldnn, shape):
    # depthwise / 1x1 / 3x3 at benchmark-like sizes, inputs at the extremes matching the weight
    # signs (worst-case partial sums), with oneDNN on and off: both must equal float64 (exact)
    c_in, c_out, k, groups = shape
    gen = torch.Generator().manual_seed(14)
    w = torch.randint(-128, 128, (c_out, c_in // groups, k, k), generator=gen).to(torch.int8)
    x = torch.randint(-128, 128, (4, c_in, 8, 8), generator=gen).to(torch.int8)
    x[0] = -128
    x[1] = 127
    plan = ConvPlan.build(w, "conv2d", groups, torch.int8)
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        total = plan.accumulate_float(x, 1, k // 2, 1)
    exact = torch.conv2d(x.double(), w.double(), None, 1, k // 2, 1, groups)
    assert torch.equal(total.double(), exact)
