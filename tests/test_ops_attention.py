"""Attention ops: integer matmul spellings, constant operands, nn.MultiheadAttention, Swin window
attention; each integer kernel against tests/reference/attention_ref.py bit for bit."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from torch import nn

from hq_lightning.functional.integer.attention import (
    masked_softmax,
    softmax_exp_table,
    softmax_reciprocal,
)
from hq_lightning.functional.integer.matmul import exact_matmul, matmul_chunk
from hq_lightning.nn.quantized.attention import (
    QuantizedAttention,
    QuantizedMultiheadAttention,
    QuantizedWindowAttention,
)
from hq_lightning.nn.quantized.constant import QuantizedChannelMul, QuantizedConstant
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from hq_lightning.quantization.fx.islands import float_islands
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc8
from hq_lightning.quantization.qconfig import default_qat_16bit_fake_quant_qconfig as qc16
from tests.reference.attention_ref import ref_attention, ref_matmul, ref_softmax

INT = {"qint8": (torch.int8, 127), "qint16": (torch.int16, 32767)}


def _codes(shape, dtype, generator):
    td, hi = INT[dtype]
    return torch.randint(-hi - 1, hi + 1, shape, dtype=td, generator=generator)


@pytest.mark.parametrize("dtypes", [("qint8", "qint8"), ("qint16", "qint8"), ("qint16", "qint16")])
def test_exact_matmul_matches_python_ints(dtypes):
    g = torch.Generator().manual_seed(1)
    a, b = _codes((2, 3, 9), dtypes[0], g), _codes((2, 9, 4), dtypes[1], g)
    a[0, 0].fill_(-INT[dtypes[0]][1] - 1)  # an extreme row
    got = exact_matmul(a, b)
    want = [[[sum(int(a[n, i, t]) * int(b[n, t, j]) for t in range(9)) for j in range(4)] for i in range(3)] for n in range(2)]
    assert got.dtype == torch.int64 and got.tolist() == want


def test_matmul_path_is_chosen_from_dtypes_and_k():
    assert matmul_chunk(torch.int8, torch.int8, 1024) == (torch.float32, 1024)
    assert matmul_chunk(torch.int8, torch.int8, 1025)[0] is torch.float64
    assert matmul_chunk(torch.int16, torch.int16, 2**24) == (torch.float64, 2**23)


def test_exact_matmul_rejects_float_operands():
    with pytest.raises(TypeError, match="Expected `a` to be a torch.int8 or torch.int16"):
        exact_matmul(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int8))


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_masked_softmax_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    z = _codes((6, 7), dtype, g)
    keep = torch.rand(6, 7, generator=g) > 0.3
    keep[0] = False  # a row with every key excluded gives zeros
    s_in, s_out = (0.05, 1 / 127.5) if dtype == "qint8" else (3e-4, 1 / 32767.5)
    table = softmax_exp_table(torch.tensor([s_in]), dtype)
    got = masked_softmax(z, table, keep, *softmax_reciprocal(torch.tensor([s_out])), dtype)
    want = [ref_softmax(z[i].tolist(), keep[i].tolist(), s_in, s_out, dtype, dtype) for i in range(6)]
    assert got.tolist() == want
    assert got[0].abs().sum() == 0


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_core_matches_reference(dtype, with_bias):
    g = torch.Generator().manual_seed(3)
    scores_scale = 0.03 if dtype == "qint8" else 2e-4
    probs_scale = 1 / 127.5 if dtype == "qint8" else 1 / 32767.5
    bias = _codes((1, 2, 5, 6), dtype, g) if with_bias else None
    core = QuantizedAttention(
        0.05, 0.04, 0.03, factor=0.5, head_dim=4, scores_scale=scores_scale, probs_scale=probs_scale,
        context_scale=0.02, scores_dtype=dtype, probs_dtype=dtype, context_dtype=dtype, input_dtype=dtype,
        bias=bias, bias_scale=0.01 if with_bias else None,
    )  # fmt: skip
    q, k, v = _codes((1, 2, 5, 4), dtype, g), _codes((1, 2, 6, 4), dtype, g), _codes((1, 2, 6, 3), dtype, g)
    excluded = torch.rand(1, 2, 5, 6, generator=g) < 0.25
    additive = torch.randn(1, 1, 5, 6, generator=g)
    context, probs = core(q, k, v, excluded, additive)
    scales = {"q": 0.05, "k": 0.04, "v": 0.03, "scores": scores_scale, "probs": probs_scale, "context": 0.02, "bias": 0.01}
    dtypes = dict.fromkeys(("q", "scores", "probs", "context", "bias"), dtype)
    for h in range(2):
        rc, rp = ref_attention(
            q[0, h].numpy(), k[0, h].numpy(), v[0, h].numpy(), scales, 0.5, dtypes,
            keep=~excluded[0, h].numpy(), bias=None if bias is None else bias[0, h].numpy(),
            additive=additive[0, 0].numpy(),
        )  # fmt: skip
        assert (probs[0, h].numpy() == rp).all()
        assert (context[0, h].numpy() == rc).all()


# --------------------------------------------------------------------------- matmul spellings


class _Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.quant_b, self.dequant = QuantStub(), QuantStub(), DeQuantStub()

    def forward(self, a, b):
        a, b = self.quant(a), self.quant_b(b)
        bt = b.transpose(-2, -1)
        outs = [torch.bmm(a, bt), torch.matmul(a, bt), operator.matmul(a, bt), a.matmul(bt), a.bmm(bt), a @ b.transpose(-2, -1)]
        return [self.dequant(o) for o in outs]


def _prepared(model, inputs, qconfig=qc8):
    prepared = prepare_qat_fx(model, {"": qconfig})
    prepared.train()
    for _ in range(2):
        prepared(*inputs)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def test_every_matmul_spelling_is_an_exact_integer_matmul():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    prepared = _prepared(_Spellings(), (a, b))
    generated = [n for n, _ in prepared.named_children() if n.startswith("_generated_matmul_")]
    assert len(generated) == 6 and float_islands(prepared) == []
    converted = convert_fx(prepared)
    qa, qb = converted.quant(a), converted.quant_b(b)
    s_a, s_b = float(converted.quant.scale), float(converted.quant_b.scale)
    outs = converted(a, b)
    for i, out in enumerate(outs):
        module = getattr(converted, f"_generated_matmul_{i}")
        s_out = float(module.output_scale)
        for n in range(2):
            want = ref_matmul(qa[n].numpy(), qb[n].numpy().T, s_a * s_b / s_out, "qint8", "qint8", "qint8")
            got = torch.round(out[n] / s_out).to(torch.int64).numpy()
            assert (got == want).all(), f"spelling {i}"
    assert all(torch.equal(o, v) for o, v in zip(outs, prepared(a, b)))  # VALIDATION is the integer model


def test_qfunctional_matmul_int16_large_accumulator_stays_exact():
    from hq_lightning.nn.quantized import QFunctional

    f = QFunctional([1e-3, 1e-3], 0.05, "qint16")
    a = torch.full((1, 64), -32768, dtype=torch.int16)
    b = torch.full((64, 1), -32768, dtype=torch.int16)
    got = int(f.matmul(a, b))
    want = int(ref_matmul(a.numpy(), b.numpy(), float(np.float32(1e-3)) ** 2 / float(np.float32(0.05)), "qint16", "qint16", "qint16")[0, 0])
    assert got == want == 32767  # saturates, no int64 wrap-around


# --------------------------------------------------------------------------- constant operands


class _Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 4, 4) * 0.1)
        self.layer_scale = nn.Parameter(torch.rand(4, 1, 1) + 0.01)

    def forward(self, x):  # x [N, 4, 3, 4]
        x = self.quant(x)
        y = self.layer_scale * x
        seq = y.flatten(2).transpose(1, 2)[:, :3]  # [N, 3, 4]
        seq = torch.cat([self.token.expand(seq.shape[0], -1, -1), seq], dim=1)
        return self.dequant(seq + self.pos)


def test_constant_operands_convert_to_codes():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 4)
    prepared = _prepared(_Constants(), (x,))
    assert float_islands(prepared) == []
    assert "layer_scale" in dict(prepared.named_parameters())  # state_dict keys unchanged
    converted = convert_fx(prepared)
    constants = {n: m for n, m in converted.named_modules() if isinstance(m, QuantizedConstant)}
    assert len(constants) == 3
    by_ch = [m for m in constants.values() if m.ch_axis is not None]
    assert len(by_ch) == 1 and by_ch[0].scale.numel() == 4  # layer_scale per channel
    for path, module in constants.items():
        fake_quant = prepared.get_submodule(path).weight_fake_quant
        assert module.codes.dtype == torch.int8 and fake_quant.scale.flatten().tolist() == module.scale.tolist()
    mul = [m for m in converted.modules() if isinstance(m, QuantizedChannelMul)]
    assert len(mul) == 1
    assert torch.equal(converted(x), prepared(x))
    with fake_quant_path():
        fq = prepared(x)
    step = float(converted.dequant.scale)
    assert ((converted(x) - fq).abs() <= step * 1.001).float().mean() >= 0.99


def test_constant_codes_equal_the_fake_quantized_parameter():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 4)
    prepared = _prepared(_Constants(), (x,))
    converted = convert_fx(prepared)
    for name in ("layer_scale", "token", "pos"):
        node = next(n for n in prepared.graph.nodes if n.op == "get_attr" and n.target == name)
        const = next(iter(node.users))
        fake_quant = prepared.get_submodule(const.target).weight_fake_quant
        scale = fake_quant.scale.reshape([-1] + [1] * (getattr(prepared, name).dim() - 1)) if fake_quant.scale.numel() > 1 else fake_quant.scale
        expected = torch.round(fake_quant(getattr(prepared, name)).detach() / scale).to(torch.int8)
        assert torch.equal(converted.get_submodule(const.target).codes, expected), name


# --------------------------------------------------------------------------- nn.MultiheadAttention


class _MHA(nn.Module):
    def __init__(self, batch_first=True, kdim=None):
        super().__init__()
        self.quant, self.quant_kv = QuantStub(), QuantStub()
        self.dequant, self.dequant_w = DeQuantStub(), DeQuantStub()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)

    def forward(self, x, kv, key_padding_mask=None, attn_mask=None, average=True):
        x, kv = self.quant(x), self.quant_kv(kv)
        out, weights = self.attn(x, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                 need_weights=True, average_attn_weights=average)  # fmt: skip
        return self.dequant(out), self.dequant_w(weights)


def _mask_cases(batch, target, source, heads):
    g = torch.Generator().manual_seed(4)
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[:, -2:] = True
    float_mask = torch.randn(target, source, generator=g) * 0.5
    float_mask[0, 0] = float("-inf")
    causal = torch.ones(target, source, dtype=torch.bool).triu(1)
    per_head = torch.rand(batch * heads, target, source, generator=g) < 0.2
    return [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal},
        {"attn_mask": float_mask},
        {"key_padding_mask": padding, "attn_mask": per_head, "average": False},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_multihead_attention_converts_and_matches_fake_quant(batch_first, kdim):
    torch.manual_seed(5)
    shape = (3, 5, 16) if batch_first else (5, 3, 16)
    kv_shape = (3, 6, kdim or 16) if batch_first else (6, 3, kdim or 16)
    x, kv = torch.randn(shape), torch.randn(kv_shape)
    cases = _mask_cases(3, 5, 6, 4)
    prepared = prepare_qat_fx(_MHA(batch_first, kdim), {"": qc8})
    assert float_islands(prepared) == []
    prepared.train()
    for case in cases:
        out, weights = prepared(x, kv, **case)
        (out.sum() + weights.sum()).backward()
    assert prepared.attn.in_proj_weight.grad is not None if kdim is None else prepared.attn.q_proj_weight.grad is not None
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    converted = convert_fx(prepared)
    assert isinstance(converted.attn, QuantizedMultiheadAttention)
    for case in cases:
        got = converted(x, kv, **case)
        assert all(torch.equal(a, b) for a, b in zip(got, prepared(x, kv, **case)))
        with fake_quant_path():
            fq = prepared(x, kv, **case)
        for value, ref, stub in zip(got, fq, (converted.dequant, converted.dequant_w)):
            step = float(stub.scale)
            assert ((value - ref).abs() <= step * 1.001).float().mean() >= 0.99, case


def test_multihead_attention_refuses_bias_kv():
    from hq_lightning.nn.qat.attention import MultiheadAttention

    with pytest.raises(ValueError, match="add_bias_kv=False"):
        MultiheadAttention.from_float(nn.MultiheadAttention(8, 2, add_bias_kv=True), qc8)


def test_multihead_attention_int16_matches_float_closely():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16)
    model = _MHA()
    prepared = _prepared(model, (x, x), qconfig=qc16)
    converted = convert_fx(prepared)
    out, weights = converted(x, x)
    ref_out, ref_w = model(x, x)
    assert (out - ref_out).abs().max() < 0.02 * ref_out.abs().max()
    assert (weights - ref_w).abs().max() < 2e-3


# --------------------------------------------------------------------------- Swin window attention


def test_window_attention_converts_and_matches_fake_quant():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.plain = ShiftedWindowAttention(8, [2, 2], [0, 0], 2)
            self.shifted = ShiftedWindowAttention(8, [2, 2], [1, 1], 2)

        def forward(self, x):
            return self.dequant(self.shifted(self.plain(self.quant(x))))

    torch.manual_seed(7)
    x = torch.randn(2, 5, 5, 8)  # 5 is no multiple of the window: padding, then the shift mask
    model = Net()
    prepared = _prepared(model, (x,))
    assert float_islands(prepared) == []
    converted = convert_fx(prepared)
    assert isinstance(converted.shifted, QuantizedWindowAttention)
    out = converted(x)
    assert torch.equal(out, prepared(x))
    with fake_quant_path():
        fq = prepared(x)
    step = float(converted.dequant.scale)
    assert ((out - fq).abs() <= step * 1.001).float().mean() >= 0.99
    assert (out - model(x)).abs().max() < 0.15 * model(x).abs().max()


def test_window_attention_refuses_swin_v2():
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    from hq_lightning.nn.qat.attention import WindowAttention

    with pytest.raises(ValueError, match="Swin V1"):
        WindowAttention.from_float(ShiftedWindowAttentionV2(8, [2, 2], [0, 0], 2), qc8)
