"""Integer normalisations (docs/integer-arithmetic.md, section 11): bit for bit against the slow
reference, within one step of the fake-quant op, every spelling converts, gradients flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.functional.integer.normalization import rsqrt_fixed
from hq_lightning.nn import qat
from hq_lightning.nn.qat import normalization as qn
from hq_lightning.nn.quantized.normalization import (
    QuantizedBatchNorm,
    QuantizedGroupNorm,
    QuantizedInstanceNorm,
    QuantizedLayerNorm,
)
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.ops import lookup_module
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC8
from hq_lightning.quantization.qconfig import default_qat_16bit_fake_quant_qconfig as QC16
from tests.reference.norm_ref import ref_batch_norm, ref_norm_output, ref_normalize, ref_rsqrt

TORCH = {"qint8": torch.int8, "qint16": torch.int16}


def test_rsqrt_matches_the_reference_and_its_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.cat([
        torch.arange(1, 3000), torch.randint(1, 2**62, (3000,), generator=g),
        torch.tensor([2**24 - 1, 2**24, 2**26 - 1, 2**26, 2**53 + 1, 2**61, 2**62 - 1]),
        2 ** torch.arange(0, 62),
    ])  # fmt: skip
    r, shift = rsqrt_fixed(w)
    for value, got_r, got_s in zip(w.tolist(), r.tolist(), shift.tolist()):
        assert (got_r, got_s) == ref_rsqrt(value), value
    approx = r.double() * torch.pow(2.0, -shift.double())
    exact = 1 / torch.sqrt(w.double())
    assert ((approx - exact) / exact).abs().max() < 1.5e-7


def _bn(channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.weight[0] = 0.0  # a dead channel: the output is beta alone
        bn.weight[1] = -abs(bn.weight[1]) - 0.5  # a negative scale
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 0.01)
    return bn.eval()


@pytest.mark.parametrize(
    "dtype,s_in,s_out", [("qint8", 0.05, 0.04), ("qint16", 2e-4, 1e-4), ("qint8", 2**-5, 2**-4)]
)
def test_batch_norm_matches_the_reference_on_every_code(dtype, s_in, s_out):
    bn = _bn()
    module = QuantizedBatchNorm.from_batch_norm(bn, s_in, s_out, dtype, dtype)
    info = torch.iinfo(TORCH[dtype])
    codes = torch.arange(info.min, info.max + 1, 1 if dtype == "qint8" else 97, dtype=TORCH[dtype])
    x = codes[:, None].expand(-1, 4).contiguous()
    got = module(x)
    for c in range(4):
        channel = {
            "gamma": float(bn.weight[c].detach()), "beta": float(bn.bias[c].detach()),
            "mean": float(bn.running_mean[c]),
            "var": float(bn.running_var[c]), "eps": bn.eps,
        }  # fmt: skip
        s_in32, s_out32 = float(torch.tensor(s_in)), float(torch.tensor(s_out))
        expected = [ref_batch_norm(int(q), channel, s_in32, s_out32, dtype) for q in codes.tolist()]
        assert got[:, c].tolist() == expected, c


def _calibrate(module, qconfig, x):
    """Train-mode passes through an input fake quant and ``module``; both observers see the range."""
    stub = qat.QuantStub.from_float(QuantStub(), qconfig)
    module.train(), stub.train()
    for _ in range(3):
        module(stub(x))
    module.eval(), stub.eval()
    return stub.activation_post_process


def _steps_from_fake_quant_op(module, int_module, x, in_fq):
    """Max |integer output - fake-quant op output| in output steps, on ``x`` through the input fake quant."""
    with torch.no_grad():
        xq = in_fq(x)
        expected = torch.round(module(xq) / module.activation_post_process.scale)
    codes = torch.round(xq / in_fq.scale).to(TORCH[str(in_fq.dtype)])
    return float((int_module(codes).to(torch.float32) - expected).abs().max())


def _qat_module(float_module, qconfig):
    return lookup_module(float_module).qat.from_float(float_module, qconfig)


def test_standalone_batch_norm_is_within_one_step_of_the_fake_quant_op():
    for qconfig in (QC8, QC16):
        bn = _bn()
        module = _qat_module(bn, qconfig)
        x = torch.randn(64, 4, 5, 5) * 2
        in_fq = _calibrate(module, qconfig, x)
        module.eval()
        out_fq = module.activation_post_process
        int_module = QuantizedBatchNorm.from_batch_norm(
            module, in_fq.scale, out_fq.scale, in_fq.dtype, out_fq.dtype
        )
        assert (
            _steps_from_fake_quant_op(module, int_module, torch.randn(64, 4, 5, 5) * 2, in_fq) <= 1
        )


def _norm_cases():
    g = torch.Generator().manual_seed(1)
    ln = nn.LayerNorm(12)
    gn = nn.GroupNorm(2, 6)
    inorm = nn.InstanceNorm2d(6, affine=True)
    with torch.no_grad():
        for m in (ln, gn, inorm):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return [
        ("layer_norm", ln, (16, 5, 12)),
        ("layer_norm_plain", nn.LayerNorm((3, 4), elementwise_affine=False), (16, 5, 3, 4)),
        ("group_norm", gn, (16, 6, 3, 3)),
        ("instance_norm", inorm, (16, 6, 3, 3)),
        ("instance_norm_plain", nn.InstanceNorm1d(6), (16, 6, 10)),
    ]


def _int_module(module, in_fq):
    from hq_lightning.quantization.ops.normalization import (
        build_group_norm,
        build_instance_norm,
        build_layer_norm,
    )

    class Ctx:  # the two things the builders read, as convert gives them
        pass

    ctx = Ctx()
    ctx.module, ctx.path = module, "m"
    out_fq = module.activation_post_process
    q_in = type(
        "Q", (), {"scale": in_fq.scale.reshape(1), "dtype": in_fq.dtype, "per_channel": False}
    )()
    ctx.input = q_in
    ctx.output = type("Q", (), {"scale": out_fq.scale.reshape(1), "dtype": out_fq.dtype})()
    builder = {qn.LayerNorm: build_layer_norm, qn.GroupNorm: build_group_norm}.get(
        type(module), build_instance_norm
    )
    return builder(ctx)


@pytest.mark.parametrize("qconfig", [QC8, QC16], ids=["int8", "int16"])
@pytest.mark.parametrize(
    "name,float_module,shape", _norm_cases(), ids=[c[0] for c in _norm_cases()]
)
def test_norms_are_within_one_step_of_the_fake_quant_op(name, float_module, shape, qconfig):
    torch.manual_seed(2)
    module = _qat_module(float_module, qconfig)
    x = torch.randn(shape) * 3 + torch.randn(shape[:2] + (1,) * (len(shape) - 2))
    in_fq = _calibrate(module, qconfig, x)
    int_module = _int_module(module, in_fq)
    for trial in range(3):
        x = torch.randn(shape) * (1 + trial) + trial
        assert _steps_from_fake_quant_op(module, int_module, x, in_fq) <= 1, name


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_norms_match_the_reference_bit_for_bit(dtype):
    torch.manual_seed(3)
    info = torch.iinfo(TORCH[dtype])
    s_in, s_out = (0.05, 0.03) if dtype == "qint8" else (3e-4, 1e-4)
    gamma, beta = torch.randn(6), torch.randn(6) * 0.3
    cases = [
        (QuantizedLayerNorm((6,), gamma, beta, 1e-5, s_in, s_out, dtype, dtype), "last"),
        (QuantizedGroupNorm(3, 6, gamma, beta, 1e-3, s_in, s_out, dtype, dtype), "group"),
        (
            QuantizedInstanceNorm(6, gamma, beta, 1e-5, s_in, s_out, dtype, dtype, spatial_dims=1),
            "instance",
        ),
    ]
    x = torch.randint(info.min, info.max + 1, (3, 6, 7), dtype=TORCH[dtype])
    x[0, 1, :] = 5  # a constant row (variance 0): eps alone
    x[1, :, 6] = info.min
    s_in32, s_out32 = float(torch.tensor(s_in)), float(torch.tensor(s_out))
    for module, kind in cases:
        got = module(x if kind != "last" else x.transpose(1, 2).contiguous())
        rows = x.transpose(1, 2).tolist() if kind == "last" else x.tolist()
        for n in range(3):
            if kind == "last":
                for t in range(7):
                    z = ref_normalize(rows[n][t], module.eps, s_in32)
                    expected = [
                        ref_norm_output(z[c], float(gamma[c]), float(beta[c]), s_out32, dtype)
                        for c in range(6)
                    ]
                    assert got[n, t].tolist() == expected
            elif kind == "group":
                for grp in range(3):
                    flat = rows[n][2 * grp] + rows[n][2 * grp + 1]
                    z = ref_normalize(flat, module.eps, s_in32)
                    for j, c in enumerate((2 * grp, 2 * grp + 1)):
                        expected = [
                            ref_norm_output(v, float(gamma[c]), float(beta[c]), s_out32, dtype)
                            for v in z[7 * j : 7 * j + 7]
                        ]
                        assert got[n, c].tolist() == expected
            else:
                for c in range(6):
                    z = ref_normalize(rows[n][c], module.eps, s_in32)
                    expected = [
                        ref_norm_output(v, float(gamma[c]), float(beta[c]), s_out32, dtype)
                        for v in z
                    ]
                    assert got[n, c].tolist() == expected


def test_layer_norm_2d_of_convnext_normalises_over_channels():
    class LayerNorm2d(nn.LayerNorm):  # torchvision.models.convnext.LayerNorm2d
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    float_module = LayerNorm2d(6, eps=1e-6)
    module = _qat_module(float_module, QC16)
    assert isinstance(module, qn.LayerNorm) and module.channels_first
    x = torch.randn(8, 6, 4, 4)
    in_fq = _calibrate(module, QC16, x)
    int_module = _int_module(module, in_fq)
    assert int_module.channels_first
    assert _steps_from_fake_quant_op(module, int_module, torch.randn(8, 6, 4, 4), in_fq) <= 1

    class Odd(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="Expected an nn.LayerNorm, or a subclass"):
        _qat_module(Odd(6), QC8)


def test_graph_spellings_convert_and_bn_after_a_conv_stays_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn_fused = nn.BatchNorm2d(3)
            self.bn = nn.BatchNorm2d(3)
            self.gn = nn.GroupNorm(3, 3)
            self.ln = nn.LayerNorm(4)
            self.inorm = nn.InstanceNorm2d(3, track_running_stats=True)

        def forward(self, x):
            x = self.quant(x)
            y = self.bn_fused(self.conv(x))
            x = self.bn(x + y)  # after an add: standalone
            x = F.group_norm(self.gn(x), 3)
            x = F.layer_norm(self.ln(x), (4,), eps=1e-3)
            return self.dequant(self.inorm(x))

    model = prepare_qat_fx(Net(), {"": QC8}, allow_float_islands=False)
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 4, 4))
    converted = convert_fx(model.eval())
    kinds = [type(m).__name__ for m in converted.modules()]
    assert (
        kinds.count("QuantizedBatchNorm") == 2
    )  # the standalone BN, and the InstanceNorm with running stats
    assert kinds.count("QuantizedGroupNorm") == 2 and kinds.count("QuantizedLayerNorm") == 2
    assert converted(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_batch_norm_without_running_statistics_is_refused_at_convert():
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="Expected a BatchNorm with running statistics"):
        QuantizedBatchNorm.from_batch_norm(bn, 0.1, 0.1)


@pytest.mark.parametrize("name,float_module,shape", _norm_cases() + [("batch_norm", _bn(), (8, 4, 3, 3))],
                         ids=[c[0] for c in _norm_cases()] + ["batch_norm"])  # fmt: skip
def test_gradients_are_the_float_modules_through_the_output_fake_quant(name, float_module, shape):
    module = _qat_module(float_module, QC8)
    x = torch.randn(shape)
    _calibrate(module, QC8, x)
    module.train()
    module.activation_post_process.disable_observer()
    reference = qn.RetypedQATMixin.from_float.__func__(
        type(module), float_module, QC8
    )  # same parameters
    reference.activation_post_process = None
    reference.train(module.training)  # batch statistics, like the QAT module
    x = x.clone().requires_grad_(True)
    out = module(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    y = reference(x_ref)
    codes = torch.round(y.detach() * torch.reciprocal(module.activation_post_process.scale))
    inside = (codes >= -128) & (codes <= 127)
    (true_grad,) = torch.autograd.grad(y, x_ref, inside.to(y.dtype))
    assert torch.allclose(grad, true_grad, atol=1e-6), name
    if getattr(module, "weight", None) is not None:
        (wgrad,) = torch.autograd.grad(module(x).sum(), module.weight)
        assert wgrad.abs().sum() > 0


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_softmax_matches_the_reference_bit_for_bit(log, dtype):
    from hq_lightning.nn.quantized.normalization import QuantizedSoftmax
    from tests.reference.norm_ref import ref_log_softmax, ref_softmax

    info = torch.iinfo(TORCH[dtype])
    s_in = 0.06 if dtype == "qint8" else 5e-4
    s_out = (0.08 if dtype == "qint8" else 6e-4) if log else 1.0 / info.max
    module = QuantizedSoftmax(1, s_in, dtype, s_out, dtype, log=log)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(info.min, info.max + 1, (3, 9, 5), generator=g, dtype=TORCH[dtype])
    x[0, :, 0] = 7  # a constant row
    got = module(x)
    s_in32, s_out32 = float(torch.tensor(s_in)), float(torch.tensor(s_out))
    for n in range(3):
        for t in range(5):
            row = x[n, :, t].tolist()
            if log:
                expected = ref_log_softmax(row, s_in32, s_out32, dtype, dtype)
            else:
                expected = ref_softmax(row, s_in32, s_out32, dtype, dtype)
            assert got[n, :, t].tolist() == expected


@pytest.mark.parametrize("qconfig", [QC8, QC16], ids=["int8", "int16"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_is_within_one_step_of_the_fake_quant_op(log, qconfig):
    from hq_lightning.nn.quantized.normalization import QuantizedSoftmax

    torch.manual_seed(5)
    for length in (4, 64, 256):
        float_module = nn.LogSoftmax(dim=-1) if log else nn.Softmax(dim=-1)
        module = _qat_module(float_module, qconfig)
        x = torch.randn(32, length) * 3
        in_fq = _calibrate(module, qconfig, x)
        out_fq = module.activation_post_process
        int_module = QuantizedSoftmax(
            -1, in_fq.scale, in_fq.dtype, out_fq.scale, out_fq.dtype, log=log
        )
        assert (
            _steps_from_fake_quant_op(module, int_module, torch.randn(32, length) * 3, in_fq) <= 1
        ), length


def test_softmax_spellings_convert_and_an_implicit_dim_stays_float():
    import warnings

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.sm = nn.Softmax(dim=1)

        def forward(self, x):
            x = self.quant(x)
            parts = [
                self.sm(x),
                F.softmax(x, dim=-1),
                x.log_softmax(1),
                torch.softmax(x, 1),
                F.log_softmax(x, dim=1),
            ]
            return self.dequant(torch.cat(parts, dim=1))

    model = prepare_qat_fx(Net(), {"": QC8}, allow_float_islands=False)
    model.train()
    model(torch.randn(8, 3, 4))
    converted = convert_fx(model.eval())
    softmaxes = [m for m in converted.modules() if type(m).__name__ == "QuantizedSoftmax"]
    assert len(softmaxes) == 5 and sum(m.log for m in softmaxes) == 2
    assert converted(torch.randn(2, 3, 4)).shape == (2, 15, 4)

    class Implicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.sm = QuantStub(), DeQuantStub(), nn.Softmax()

        def forward(self, x):
            return self.dequant(self.sm(self.quant(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="explicit `dim`"):
            prepare_qat_fx(Implicit(), {"": QC8}, allow_float_islands=False)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_gradients_are_the_float_ones_through_the_output_fake_quant(log):
    float_module = nn.LogSoftmax(dim=1) if log else nn.Softmax(dim=1)
    module = _qat_module(float_module, QC16)
    x = torch.randn(8, 10)
    _calibrate(module, QC16, x)
    module.train()
    module.activation_post_process.disable_observer()
    x = x.clone().requires_grad_(True)
    weights = torch.randn(8, 10)
    (grad,) = torch.autograd.grad((module(x) * weights).sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad((float_module(x_ref) * weights).sum(), x_ref)
    assert torch.allclose(grad, true_grad, atol=1e-6)


def test_bernoulli_refuses_the_table_ops_all_at_once_and_keeps_bn_and_clamp():
    from hq_lightning.march import march_context
    from hq_lightning.quantization.fx.prepare import UnsupportedOperationError

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.ln, self.bn = nn.LayerNorm(4), nn.BatchNorm2d(3)

        def forward(self, x):
            x = self.bn(self.quant(x)).clamp(-1.0, 1.0)
            return self.dequant(
                torch.cat([F.silu(x), self.ln(x), x.softmax(-1), torch.exp(x)], dim=1)
            )

    with march_context("bernoulli"), pytest.raises(UnsupportedOperationError) as error:
        prepare_qat_fx(Net(), {"": QC8}, allow_float_islands=False)
    text = str(error.value)
    assert "4 cannot" in text and "bernoulli" in text
    for name in ("SiLU", "LayerNorm", "Softmax", "Exp"):
        assert f"normalization.{name}" in text or f"elementwise.{name}" in text, name
    assert "BatchNorm" not in text and "Clamp" not in text
