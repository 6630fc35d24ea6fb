"""Integer modules against the slow reference (tests/reference/integer_ref.py), bit for bit."""

from __future__ import annotations

import copy
import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from hq_lightning.nn.quantized import (
    DeQuantize,
    QFunctional,
    Quantize,
    QuantizedAdaptiveAvgPool2d,
    QuantizedAvgPool2d,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConvTranspose2d,
    QuantizedInterpolate,
    QuantizedLinear,
    QuantizedMaxPool2d,
    QuantizedReLU6,
)
from tests.reference.integer_ref import (
    ref_conv2d,
    ref_conv_output,
    ref_conv_transpose2d,
    ref_dequantize,
    ref_multipliers,
    ref_quantize,
    ref_relu6,
    ref_requant,
)

TORCH = {"qint8": torch.int8, "qint16": torch.int16}


def _ints(gen, shape, dtype):
    info = torch.iinfo(TORCH[dtype])
    return torch.randint(info.min, info.max + 1, shape, generator=gen).to(TORCH[dtype])


def _f(t):
    return [float(v) for v in t.flatten()]


CASES = [
    dict(
        act="qint8",
        out="qint8",
        activation=None,
        addend=False,
        groups=1,
        stride=1,
        padding=1,
        dilation=1,
    ),
    dict(
        act="qint16",
        out="qint16",
        activation="relu",
        addend=False,
        groups=2,
        stride=2,
        padding=0,
        dilation=1,
    ),
    dict(
        act="qint8",
        out="qint8",
        activation="relu6",
        addend=True,
        groups=1,
        stride=1,
        padding=2,
        dilation=2,
    ),
    dict(
        act="qint16",
        out="qint8",
        activation=None,
        addend=True,
        groups=4,
        stride=1,
        padding=1,
        dilation=1,
    ),
    dict(
        act="qint8",
        out="qint32",
        activation="relu",
        addend=False,
        groups=1,
        stride=1,
        padding=0,
        dilation=1,
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_conv2d_matches_reference(case):
    gen = torch.Generator().manual_seed(hash(str(case)) % 1000)
    w_float = torch.randn(4, 4 // case["groups"], 3, 3, generator=gen)
    s_w = torch.tensor([0.02, 3.0e-6, 0.9, 0.0071])  # wide and tiny per-channel scales
    s_in = 0.031 if case["act"] == "qint8" else 1.3e-4
    s_out = None if case["out"] == "qint32" else (0.05 if case["out"] == "qint8" else 2e-4)
    s_y = 0.17
    kw = dict(
        input_dtype=case["act"],
        output_dtype=case["out"],
        activation=case["activation"],
        addend_scale=s_y if case["addend"] else None,
    )
    conv = QuantizedConv2d.from_float_params(
        w_float,
        torch.randn(4, generator=gen),
        s_w,
        s_in,
        s_out,
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        **kw,
    )
    x = _ints(gen, (2, 4, 6, 7), case["act"])
    x[0, 0, 0, :2] = torch.tensor([torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max])
    st, pad, dil = (case["stride"],) * 2, (case["padding"],) * 2, (case["dilation"],) * 2
    acc = ref_conv2d(x.numpy(), conv.weight.numpy(), st, pad, dil, case["groups"])
    addend = _ints(gen, acc.shape, "qint8") if case["addend"] else None
    out = conv(x, addend) if addend is not None else conv(x)
    s_w32 = _f(conv.weight_scale)
    expect = ref_conv_output(
        acc,
        conv.bias.numpy(),
        float(np.float32(s_in)),
        s_w32,
        None if s_out is None else float(np.float32(s_out)),
        case["out"],
        case["activation"],
        None if addend is None else addend.numpy(),
        float(np.float32(s_y)),
    )
    assert (
        out.dtype
        == {"qint8": torch.int8, "qint16": torch.int16, "qint32": torch.int32}[case["out"]]
    )
    assert out.long().tolist() == expect.tolist()
    if case["out"] != "qint32":  # the tests exercise saturation
        assert int(out.max()) == conv.clamp_max.item() or case["activation"] == "relu6"
    # every forward path gives the same bits: int64 epilogue, one sample per epilogue slice
    args = (x,) if addend is None else (x, addend)
    assert torch.equal(conv._forward_int64(x, addend), out)
    conv._slice_elements = 1
    assert torch.equal(conv(*args), out)


def _extreme_rows(w: torch.Tensor) -> torch.Tensor:
    """int8 inputs that drive each output channel's accumulator to its max and to its min."""
    top = torch.where(w > 0, 127, -128)
    bottom = torch.where(w > 0, -128, 127)
    return torch.cat([top, bottom]).to(torch.int8)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_deep_layer_float_epilogue_matches_reference_at_extreme_accumulators(activation):
    # K = 4608 (ResNet-18 layer4 3x3x512): |acc| * m can reach 2^57, past float64's 2^53, so the
    # float epilogue is exact only through the saturated-window argument; probe the extremes.
    gen = torch.Generator().manual_seed(11)
    k, c = 4608, 6
    w = torch.randn(c, k, generator=gen) * 0.02
    s_w = w.abs().amax(1) / 127
    fc = QuantizedLinear.from_float_params(
        w, torch.randn(c, generator=gen), s_w, 0.03, 0.05, activation=activation
    )
    assert fc._float_requant is not None and len(fc._plan.chunks) > 1
    acc_max = int(fc._plan.accumulator_range(torch.int8)[1].max())
    assert acc_max * int(fc.multiplier.max()) > 2**53
    x = torch.cat([_extreme_rows(fc.weight), _ints(gen, (4, k), "qint8")])
    x[-1] = 0
    exact = x.numpy().astype(object) @ fc.weight.numpy().astype(object).T
    expect = ref_conv_output(
        exact,
        fc.bias.numpy(),
        float(np.float32(0.03)),
        _f(fc.weight_scale),
        float(np.float32(0.05)),
        "qint8",
        activation,
    )
    out = fc(x)
    assert out.long().tolist() == expect.tolist()
    assert torch.equal(fc._forward_int64(x, None), out)
    # row i drives channel i to its extreme accumulator: both output saturation ends are hit
    assert out[:c].diagonal().tolist() == [127] * c
    assert out[c : 2 * c].diagonal().tolist() == [fc.clamp_min.item()] * c


def test_int64_fallback_when_the_float_proof_fails_and_rebuild_after_buffer_changes():
    # int16 in/out with a tiny factor: the unsaturated window spans products far beyond 2^53
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(3, 40, generator=gen)
    fc = QuantizedLinear.from_float_params(
        w,
        None,
        w.abs().amax(1) / 127,
        1.0e-4,
        1.0e-2,
        input_dtype="qint16",
        output_dtype="qint16",
    )
    assert fc._float_requant is None
    x = _ints(gen, (5, 40), "qint16")
    x[:2] = torch.where(fc.weight > 0, 32767, -32768)[:2].to(torch.int16)
    exact = x.numpy().astype(object) @ fc.weight.numpy().astype(object).T
    expect = ref_conv_output(
        exact,
        None,
        float(np.float32(1.0e-4)),
        _f(fc.weight_scale),
        float(np.float32(1.0e-2)),
        "qint16",
    )
    assert fc(x).long().tolist() == expect.tolist()
    # an int8 layer takes the float path; changing a buffer in place rebuilds the derived factors
    conv = QuantizedConv2d.from_float_params(
        torch.randn(4, 3, 3, 3, generator=gen),
        torch.randn(4, generator=gen),
        torch.full((4,), 0.01),
        0.05,
        0.1,
        padding=1,
    )
    assert conv._float_requant is not None
    xc = _ints(gen, (2, 3, 5, 5), "qint8")
    before = conv(xc)
    conv.bias.add_(700)
    conv.multiplier[1] += 12345
    after = conv(xc)
    assert not torch.equal(before, after)
    assert torch.equal(after, conv._forward_int64(xc, None))


def test_weights_and_bias_quantized_by_the_fake_quant_rule():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 1, 1, generator=gen)
    s_w = torch.tensor([0.01, 0.02, 0.003])
    conv = QuantizedConv2d.from_float_params(w, torch.randn(3, generator=gen), s_w, 0.1, 0.1)
    for c in range(3):
        assert (
            conv.weight[c].long().flatten().tolist()
            == ref_quantize(w[c].flatten().numpy(), float(s_w[c]), "qint8").tolist()
        )
    assert conv.weight.dtype == torch.int8 and conv.bias.dtype == torch.int32


def test_bernoulli_power_of_two_scales_requantize_by_a_pure_shift():
    gen = torch.Generator().manual_seed(2)
    conv = QuantizedConv2d.from_float_params(
        torch.randn(3, 2, 3, 3, generator=gen),
        torch.randn(3, generator=gen),
        torch.tensor([2.0**-7, 2.0**-9, 2.0**-5]),
        2.0**-4,
        2.0**-3,
        padding=1,
    )
    assert conv.multiplier.tolist() == [1, 1, 1] and conv.shift.tolist() == [8, 10, 6]
    x = _ints(gen, (1, 2, 4, 4), "qint8")
    acc = ref_conv2d(x.numpy(), conv.weight.numpy(), padding=(1, 1))
    for idx in np.ndindex(*acc.shape):
        n = conv.shift.tolist()[idx[1]]
        v = int(acc[idx]) + int(conv.bias[idx[1]])
        assert int(conv(x)[idx]) == max(-128, min(127, (v + (1 << (n - 1))) >> n))


def test_conv_transpose2d_linear_conv1d_match_reference():
    gen = torch.Generator().manual_seed(3)
    # ConvTranspose2d, groups 2: per-channel scale [C_out/groups] repeats over groups
    s_w = torch.tensor([0.01, 0.5, 2e-5])
    tconv = QuantizedConvTranspose2d.from_float_params(
        torch.randn(4, 3, 3, 3, generator=gen),
        torch.randn(6, generator=gen),
        s_w,
        0.02,
        0.03,
        stride=2,
        padding=1,
        output_padding=1,
        groups=2,
    )
    x = _ints(gen, (1, 4, 3, 3), "qint8")
    acc = ref_conv_transpose2d(x.numpy(), tconv.weight.numpy(), (2, 2), (1, 1), (1, 1), groups=2)
    expect = ref_conv_output(
        acc,
        tconv.bias.numpy(),
        float(np.float32(0.02)),
        _f(s_w.repeat(2)),
        float(np.float32(0.03)),
        "qint8",
    )
    assert tconv(x).long().tolist() == expect.tolist()
    # Linear with fused add, int16 in
    fc = QuantizedLinear.from_float_params(
        torch.randn(5, 7, generator=gen),
        torch.randn(5, generator=gen),
        torch.rand(5, generator=gen) * 0.01 + 1e-4,
        1e-4,
        0.02,
        input_dtype="qint16",
        addend_scale=0.05,
        activation="relu",
    )
    x = _ints(gen, (3, 7), "qint16")
    y = _ints(gen, (3, 5), "qint8")
    acc = x.numpy().astype(object) @ fc.weight.numpy().astype(object).T
    expect = ref_conv_output(
        acc,
        fc.bias.numpy(),
        float(np.float32(1e-4)),
        _f(fc.weight_scale),
        float(np.float32(0.02)),
        "qint8",
        "relu",
        y.numpy(),
        float(np.float32(0.05)),
    )
    assert fc(x, y).long().tolist() == expect.tolist()
    # Conv1d = Conv2d of height 1
    c1 = QuantizedConv1d.from_float_params(
        torch.randn(2, 3, 3, generator=gen), None, 0.01, 0.02, 0.04, padding=1
    )
    x = _ints(gen, (1, 3, 5), "qint8")
    acc = ref_conv2d(x.numpy()[:, :, None], c1.weight.numpy()[:, :, None], padding=(0, 1))[:, :, 0]
    expect = ref_conv_output(
        acc,
        None,
        float(np.float32(0.02)),
        [float(np.float32(0.01))] * 2,
        float(np.float32(0.04)),
        "qint8",
    )
    assert c1(x).long().tolist() == expect.tolist()


def test_stubs_and_quant_scale_fill():
    x = torch.tensor([0.3, -1.7, 250.0, 0.015625])
    quant = Quantize(1 / 64, "qint8")
    assert quant(x).long().tolist() == ref_quantize(x.numpy(), 1 / 64, "qint8").tolist()
    quant.scale.fill_(1.0)
    assert quant(x).long().tolist() == ref_quantize(x.numpy(), 1.0, "qint8").tolist()
    q = torch.tensor([[[5, -7]], [[300, 1]]], dtype=torch.int32).permute(1, 0, 2)  # [1, 2, 2]
    deq = DeQuantize(torch.tensor([0.5, 1e-3]))
    assert deq(q).tolist() == ref_dequantize(q.numpy(), [0.5, float(np.float32(1e-3))]).tolist()


def test_qfunctional_matches_reference():
    gen = torch.Generator().manual_seed(4)
    x, y = _ints(gen, (50,), "qint8"), _ints(gen, (50,), "qint16")
    sx, sy, so = 0.013, 7e-5, 0.021
    f = QFunctional([sx, sy], so)
    f32 = [float(np.float32(v)) for v in (sx, sy, so)]
    (mx, my), n = ref_multipliers([f32[0] / f32[2], f32[1] / f32[2]])
    for op, sign in (("add", 1), ("sub", -1)):
        got = getattr(f, op)(x, y).long().tolist()
        assert got == [
            ref_requant(int(a) * mx + sign * int(b) * my, 1, n, "qint8") for a, b in zip(x, y)
        ]
    assert f.add_relu(x, y).long().tolist() == [max(0, v) for v in f.add(x, y).long().tolist()]
    (mp,), np_ = ref_multipliers([f32[0] * f32[1] / f32[2]])
    assert f.mul(x, y).long().tolist() == [
        ref_requant(int(a) * int(b), mp, np_, "qint8") for a, b in zip(x, y)
    ]
    a, b = _ints(gen, (2, 3, 4), "qint8"), _ints(gen, (2, 4, 5), "qint16")
    exact = np.matmul(a.numpy().astype(object), b.numpy().astype(object))
    assert f.matmul(a, b).long().tolist() == [
        [[ref_requant(v, mp, np_, "qint8") for v in row] for row in m] for m in exact
    ]
    got = f.cat([x, y], 0).long().tolist()
    parts = [ref_multipliers([f32[i] / f32[2]]) for i in (0, 1)]
    assert got == [ref_requant(int(v), parts[0][0][0], parts[0][1], "qint8") for v in x] + [
        ref_requant(int(v), parts[1][0][0], parts[1][1], "qint8") for v in y
    ]
    assert f.stack([x, y], 0).long().flatten().tolist() == got
    g = QFunctional([sx], so)
    z = _ints(gen, (3, 8), "qint8")
    (ms,), ns = ref_multipliers([f32[0] / (8 * f32[2])])
    assert g.mean(z, 1).long().tolist() == [
        ref_requant(int(r.sum()), ms, ns, "qint8") for r in z.long()
    ]
    (ms,), ns = ref_multipliers([f32[0] / f32[2]])
    assert g.sum(z, 1).long().tolist() == [
        ref_requant(int(r.sum()), ms, ns, "qint8") for r in z.long()
    ]
    k = round(Fraction(2.5 / f32[2]) * 2**ns)
    assert g.add_scalar(z[0], 2.5).long().tolist() == [
        ref_requant(int(v) * ms + k, 1, ns, "qint8") for v in z[0]
    ]
    (ms,), ns = ref_multipliers([f32[0] * 1.7 / f32[2]])
    assert g.mul_scalar(z[0], -1.7).long().tolist() == [
        ref_requant(-int(v) * ms, 1, ns, "qint8") for v in z[0]
    ]


def test_pools_and_interpolate_match_reference():
    gen = torch.Generator().manual_seed(5)
    x = _ints(gen, (1, 2, 5, 6), "qint16")
    xs = x.long().numpy()
    s_in, s_out = float(np.float32(3e-4)), float(np.float32(2e-3))
    pool = QuantizedAvgPool2d(2, 2, 1, input_scale=s_in, output_scale=s_out)
    (m,), n = ref_multipliers([s_in / (4 * s_out)])
    padded = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = pool(x)
    for idx in np.ndindex(*out.shape):
        _, _, i, j = idx
        total = int(padded[idx[0], idx[1], 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum())
        assert int(out[idx]) == ref_requant(total, m, n, "qint8")
    apool = QuantizedAdaptiveAvgPool2d((2, 4), input_scale=s_in, output_scale=s_out)
    assert apool(x).tolist() == _ref_adaptive_avg_pool(x, (2, 4), s_in, s_out)
    mp = QuantizedMaxPool2d(2)(x)
    assert (
        mp.dtype == torch.int16
        and mp.tolist() == torch.nn.functional.max_pool2d(x.float(), 2).long().tolist()
    )
    near = QuantizedInterpolate(scale_factor=2, mode="nearest")(x)
    assert near.tolist() == x.repeat_interleave(2, -1).repeat_interleave(2, -2).tolist()
    bil = QuantizedInterpolate(
        size=(3, 4), mode="bilinear", align_corners=True, input_scale=s_in, output_scale=s_out
    )
    (m,), n = ref_multipliers([s_in / s_out / 2**16])
    out = bil(x)
    for idx in np.ndindex(*out.shape):
        _, _, e, d = idx
        sy, sx = e * (4 / 2), d * (5 / 3)
        j0, i0 = math.floor(sy), math.floor(sx)
        mu, lam = round((sy - j0) * 256), round((sx - i0) * 256)
        j1, i1 = min(j0 + 1, 4), min(i0 + 1, 5)
        p = xs[idx[0], idx[1]]
        acc = (256 - mu) * ((256 - lam) * int(p[j0, i0]) + lam * int(p[j0, i1])) + mu * (
            (256 - lam) * int(p[j1, i0]) + lam * int(p[j1, i1])
        )
        assert int(out[idx]) == ref_requant(acc, m, n, "qint8")


def _ref_adaptive_avg_pool(x, output_size, s_in, s_out):
    xs = x.long().numpy()
    (height, width), (out_h, out_w) = x.shape[-2:], output_size
    out = np.zeros((*x.shape[:2], out_h, out_w), dtype=object)
    for idx in np.ndindex(*out.shape):
        _, _, i, j = idx
        h0, h1 = (i * height) // out_h, math.ceil((i + 1) * height / out_h)
        w0, w1 = (j * width) // out_w, math.ceil((j + 1) * width / out_w)
        (m,), n = ref_multipliers([s_in / ((h1 - h0) * (w1 - w0) * s_out)])
        out[idx] = ref_requant(int(xs[idx[0], idx[1], h0:h1, w0:w1].sum()), m, n, "qint8")
    return out.tolist()


def test_adaptive_avg_pool_caches_multipliers_per_input_size_and_follows_its_scales():
    gen = torch.Generator().manual_seed(18)
    s_in, s_out = float(np.float32(3e-3)), float(np.float32(2e-2))
    pool = QuantizedAdaptiveAvgPool2d((2, 3), input_scale=s_in, output_scale=s_out)
    small, large = _ints(gen, (2, 3, 5, 7), "qint8"), _ints(gen, (1, 3, 9, 4), "qint8")
    for _ in range(2):  # the second round is served from the cache
        assert pool(small).tolist() == _ref_adaptive_avg_pool(small, (2, 3), s_in, s_out)
        assert pool(large).tolist() == _ref_adaptive_avg_pool(large, (2, 3), s_in, s_out)
    assert len(pool._multipliers) == 2
    s_new = float(np.float32(1e-3))
    pool.input_scale.fill_(s_new)  # an in-place edit invalidates the cache
    assert pool(small).tolist() == _ref_adaptive_avg_pool(small, (2, 3), s_new, s_out)
    pool.output_scale = torch.tensor([s_in])  # so does a replaced buffer
    assert pool(large).tolist() == _ref_adaptive_avg_pool(large, (2, 3), s_new, s_in)
    traced = torch.jit.trace(copy.deepcopy(pool), small)  # computed in the trace, from buffers
    traced.input_scale.fill_(s_in)
    assert traced(small).tolist() == _ref_adaptive_avg_pool(small, (2, 3), s_in, s_in)
    buffer = io.BytesIO()
    torch.save(pool, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(large), pool(large))


def _fused_conv(gen, channels=(6, 4), scales=(0.05, 0.1, 0.2), bias_shift=0.0):
    """A random 3x3 Conv + add + ReLU6 layer: ``channels`` (out, in), ``scales`` (in, out, addend)."""
    out_channels, in_channels = channels
    return QuantizedConv2d.from_float_params(
        torch.randn(out_channels, in_channels, 3, 3, generator=gen),
        torch.randn(out_channels, generator=gen) + bias_shift,
        torch.rand(out_channels, generator=gen) * 0.01 + 1e-3,
        scales[0],
        scales[1],
        padding=1,
        addend_scale=scales[2],
        activation="relu6",
    )


def test_state_dict_save_load_and_trace_round_trip():
    gen = torch.Generator().manual_seed(6)
    conv = _fused_conv(gen, (64, 64), (0.02, 0.04, 0.1))
    x = _ints(gen, (1, 64, 5, 5), "qint8")
    y = _ints(gen, (1, 64, 5, 5), "qint8")
    expect = conv(x, y)
    state = conv.state_dict()
    assert state["weight"].dtype == torch.int8 and state["bias"].dtype == torch.int32
    buf = io.BytesIO()
    torch.save(state, buf)
    float_buf = io.BytesIO()
    torch.save(torch.nn.Conv2d(64, 64, 3).state_dict(), float_buf)
    assert buf.tell() < 0.3 * float_buf.tell()
    other = QuantizedConv2d.from_float_params(
        torch.randn(64, 64, 3, 3),
        torch.randn(64),
        torch.full((64,), 0.5),
        1.0,
        1.0,
        padding=1,
        addend_scale=1.0,
        activation="relu6",
    )
    other.load_state_dict(state)
    assert torch.equal(other(x, y), expect)
    whole = io.BytesIO()
    torch.save(conv, whole)
    assert whole.tell() < 0.35 * float_buf.tell()
    whole.seek(0)
    loaded = torch.load(whole, weights_only=False)
    assert torch.equal(loaded(x, y), expect)
    traced = torch.jit.trace(conv, (x, y))
    assert torch.equal(traced(x, y), expect)
    quant = Quantize(0.1)
    traced_q = torch.jit.trace(quant, torch.randn(4))
    assert torch.equal(traced_q(torch.tensor([0.25])), torch.tensor([2], dtype=torch.int8))


def test_bad_inputs_raise_clear_errors():
    conv = QuantizedConv2d.from_float_params(torch.randn(2, 2, 1, 1), None, 0.1, 0.1, 0.1)
    with pytest.raises(TypeError, match="Expected `input` to be a torch.int8"):
        conv(torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="Expected `addend` to be None"):
        conv(torch.zeros(1, 2, 2, 2, dtype=torch.int8), torch.zeros(1, 2, 2, 2, dtype=torch.int8))
    with pytest.raises(TypeError, match="Expected `weight` to be a torch.int8"):
        QuantizedConv2d(torch.zeros(2, 2, 1, 1), None, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="Expected `output_scale` for a fused add"):
        QuantizedConv2d.from_float_params(
            torch.randn(2, 2, 1, 1), None, 0.1, 0.1, None, addend_scale=0.1
        )
    with pytest.raises(ValueError, match="Expected `input_scales` to have 2"):
        QFunctional([0.1], 0.1).add(
            torch.zeros(2, dtype=torch.int8), torch.zeros(2, dtype=torch.int8)
        )


def test_trace_of_a_sliced_module_generalizes_to_other_batch_sizes():
    # eager forward slices the batch for the float epilogue; a trace must not bake the slices
    gen = torch.Generator().manual_seed(15)
    conv = QuantizedConv2d.from_float_params(
        torch.randn(6, 3, 3, 3, generator=gen),
        torch.randn(6, generator=gen),
        torch.full((6,), 0.01),
        0.05,
        0.1,
        padding=1,
        addend_scale=0.2,
    )
    conv._slice_elements = 1  # one sample per slice in eager mode
    conv.bias.add_(3)  # stale plan: rebuilt during the trace, which must not record the rebuild
    x4, y4 = _ints(gen, (4, 3, 5, 5), "qint8"), _ints(gen, (4, 6, 5, 5), "qint8")
    traced = torch.jit.trace(conv, (x4, y4))
    x7, y7 = _ints(gen, (7, 3, 5, 5), "qint8"), _ints(gen, (7, 6, 5, 5), "qint8")
    assert torch.equal(traced(x7, y7), conv(x7, y7))
    assert torch.equal(conv(x7, y7), conv._forward_int64(x7, y7))


def test_plan_is_derived_on_the_first_forward_not_at_construction():
    gen = torch.Generator().manual_seed(16)
    conv = _fused_conv(gen)
    assert conv._derived_plan is None  # construction (convert_fx) does not pay for the plan
    x, y = _ints(gen, (2, 4, 5, 5), "qint8"), _ints(gen, (2, 6, 5, 5), "qint8")
    # a never-run module traces (the plan is built with the tracer paused), scripts by copy,
    # pickles and deep-copies; every route gives the eager int64 rule's result
    expect = conv._forward_int64(x, y)
    fresh = [copy.deepcopy(conv) for _ in range(3)]
    assert all(m._derived_plan is None for m in fresh)
    traced = torch.jit.trace(fresh[0], (x, y))
    assert torch.equal(traced(x, y), expect)
    buffer = io.BytesIO()
    torch.save(fresh[1], buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x, y), expect)
    assert torch.equal(conv(x, y), expect)
    assert conv._derived_plan is not None
    used = copy.deepcopy(conv)  # a deep copy drops the derived state and rebuilds it lazily
    assert used._derived_plan is None and torch.equal(used(x, y), expect)
    # load_state_dict drops the plan: the next forward derives it from the loaded buffers
    other = _fused_conv(gen, bias_shift=3.0)
    other(x, y)
    other.load_state_dict(conv.state_dict())
    assert other._derived_plan is None and torch.equal(other(x, y), expect)
    assert torch.equal(fresh[2](x, y), expect)


def test_export_of_a_never_run_module_asks_for_a_real_run_first():
    gen = torch.Generator().manual_seed(17)
    conv = _fused_conv(gen)
    x, y = _ints(gen, (1, 4, 5, 5), "qint8"), _ints(gen, (1, 6, 5, 5), "qint8")
    with pytest.raises(Exception, match="to have run once on a real input"):
        torch.export.export(conv, (x, y))
    conv(x, y)  # what hq_lightning.deploy.export_onnx does before exporting
    exported = torch.export.export(conv, (x, y))
    assert torch.equal(exported.module()(x, y), conv._forward_int64(x, y))


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_standalone_relu6_matches_reference_and_the_fused_bound(dtype):
    gen = torch.Generator().manual_seed(19)
    # scales with 6/s below, near and above qmax, and one whose 6 * fp32(1/s) sits on a tie
    for scale in [0.1, 6 / 127.4, 6 / 126.5, 0.02, 1e-4, 0.75, 0.0234375]:
        relu6 = QuantizedReLU6(scale, dtype)
        x = _ints(gen, (3, 50), dtype)
        expect = ref_relu6(x.numpy(), float(np.float32(scale)), dtype)
        out = relu6(x)
        assert out.dtype == TORCH[dtype] and out.tolist() == expect.tolist()
        # the same bound as a Conv/Linear with a fused ReLU6 and this output scale
        fused = QuantizedLinear.from_float_params(
            torch.ones(1, 1), None, 1.0, 1.0, scale, output_dtype=dtype, activation="relu6"
        )
        q6 = int(ref_relu6(np.array([2**20]), float(np.float32(scale)), dtype)[0])
        assert int(fused.clamp_max) == q6
    relu6 = QuantizedReLU6(0.1)
    codes = torch.arange(-128, 128, dtype=torch.int8)
    traced = torch.jit.trace(relu6, codes)
    relu6.scale.fill_(0.5)  # the bound follows the buffer, also in the trace
    assert int(relu6(codes).max()) == 12 and int(traced(codes).max()) == 12
    with pytest.raises(TypeError, match="Expected `input` to be a torch.int8"):
        relu6(codes.float())


def test_quantize_with_input_scale_requantizes_integer_input_like_a_one_input_cat():
    gen = torch.Generator().manual_seed(20)
    s_in, s_out = float(np.float32(3e-4)), float(np.float32(7e-3))
    stub = Quantize(s_out, "qint16", input_scale=s_in)
    x = _ints(gen, (4, 40), "qint16")
    (m,), n = ref_multipliers([s_in / s_out])
    assert stub(x).tolist() == [[ref_requant(int(v), m, n, "qint16") for v in row] for row in x]
    assert torch.equal(stub(x), QFunctional([s_in], s_out, "qint16").cat([x], 0))
    floats = torch.randn(5)
    assert torch.equal(stub(floats), Quantize(s_out, "qint16")(floats))
    assert set(stub.state_dict()) == {"scale", "input_scale"}
    assert set(Quantize(s_out).state_dict()) == {"scale"}  # unchanged for an input stub
    stub.input_scale.fill_(s_out)  # M = 1: the integers pass unchanged
    assert torch.equal(stub(x), x)
