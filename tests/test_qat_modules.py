"""QAT modules against the fake-quant formulas of semantics.md (first batch, so the moving-average
observers hold exactly that batch's min/max), BN handling in "with_bn" mode and state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import FakeQuantState, QConfig, set_fake_quantize
from hq_lightning.quantization.qconfig import (
    default_qat_8bit_fake_quant_qconfig as QC,
)
from hq_lightning.quantization.qconfig import (
    default_qat_8bit_weight_32bit_out_fake_quant_qconfig as QC_INT32_OUT,
)
from hq_lightning.quantization.stubs import DeQuantStub, QuantStub

EPS = torch.finfo(torch.float32).eps


def ref_scale(amax: torch.Tensor) -> torch.Tensor:
    """semantics.md 1: max(amax, eps) / 127.5 for int8."""
    return amax.float().clamp_min(0).clamp_min(EPS) / 127.5


def ref_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(round_half_even(x * (1/scale)), -128, 127) * scale (1/scale in fp32, the contract)."""
    return torch.clamp(torch.round(x * (1.0 / scale)), -128, 127) * scale


def ref_tensor_fq(x: torch.Tensor) -> torch.Tensor:
    return ref_fake_quant(x, ref_scale(x.detach().abs().max()))


def ref_weight_fq(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims)
    shape = [1] * w.dim()
    shape[axis] = -1
    return ref_fake_quant(w, ref_scale(amax).reshape(shape))


@pytest.fixture(autouse=True)
def _seed_one_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared: no thread oversubscription
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "float_mod, shape, qat_cls",
    [
        (nn.Conv1d(3, 4, 3), (2, 3, 9), qat.Conv1d),
        (nn.Conv2d(3, 4, 3, padding=1, groups=1), (2, 3, 6, 6), qat.Conv2d),
        (nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 6, 6), qat.Conv2d),
        (nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4), qat.Conv3d),
        (nn.Linear(5, 3), (4, 5), qat.Linear),
    ],
)
def test_weighted_module_matches_formula(float_mod, shape, qat_cls):
    module = qat_cls.from_float(float_mod, QC)
    assert module.weight is float_mod.weight  # shared, not copied
    x = torch.randn(shape)
    out = module(x)
    w_q = ref_weight_fq(float_mod.weight)
    if isinstance(float_mod, nn.Linear):
        pre = F.linear(x, w_q, float_mod.bias)
    else:
        pre = float_mod._conv_forward(x, w_q, float_mod.bias)
    torch.testing.assert_close(out, ref_tensor_fq(pre), rtol=0, atol=0)
    assert module.weight_fake_quant.ch_axis == 0
    out.sum().backward()
    assert float_mod.weight.grad is not None and float_mod.weight.grad.abs().sum() > 0


def test_conv_transpose_quantizes_weight_on_axis_1():
    float_mod = nn.ConvTranspose2d(3, 5, 2, stride=2)
    module = qat.ConvTranspose2d.from_float(float_mod, QC)
    assert module.weight_fake_quant.ch_axis == 1
    x = torch.randn(2, 3, 4, 4)
    out = module(x)
    pre = F.conv_transpose2d(x, ref_weight_fq(float_mod.weight, axis=1), float_mod.bias, stride=2)
    torch.testing.assert_close(out, ref_tensor_fq(pre), rtol=0, atol=0)
    assert module.weight_fake_quant.scale.shape == (5,)


@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("relu6", F.relu6)])
def test_conv_add_relu_has_one_output_fake_quant_after_relu(act, fn):
    module = qat.Conv2d(3, 4, 3, qconfig=QC, relu=act, has_add=True)
    assert module._get_name() == ("ConvAddReLU2d" if act == "relu" else "ConvAddReLU62d")
    x, addend = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 4, 4) * 4
    out = module(x, addend)
    conv = module._conv_forward(x, ref_weight_fq(module.weight), module.bias)
    # full precision between conv and add: no rounding of `conv` before the add
    torch.testing.assert_close(out, ref_tensor_fq(fn(conv + addend)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Expected `addend`"):
        module(x)


def test_high_precision_output_has_no_output_fake_quant():
    float_mod = nn.Conv2d(3, 4, 3)
    module = qat.Conv2d.from_float(float_mod, QC_INT32_OUT)
    assert module.activation_post_process is None
    x = torch.randn(2, 3, 5, 5)
    expected = float_mod._conv_forward(x, ref_weight_fq(float_mod.weight), float_mod.bias)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


def _conv_bn_pair():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return conv, bn


class _FusedConvBN(nn.Module):
    """Stands in for nn.intrinsic's ConvBN module (attributes `conv`, `bn`, `relu`)."""

    def __init__(self, conv, bn, relu=None):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu


def test_with_bn_in_float_state_is_exactly_conv_then_bn():
    conv, bn = _conv_bn_pair()
    ref_conv, ref_bn = _conv_bn_pair()
    ref_conv.load_state_dict(conv.state_dict())
    ref_bn.load_state_dict(bn.state_dict())
    module = qat.Conv2d.from_float(_FusedConvBN(conv, bn, nn.ReLU()), QC)
    assert module._get_name() == "ConvBNReLU2d"
    set_fake_quantize(module, FakeQuantState.FLOAT)
    x = torch.randn(4, 3, 6, 6)
    out = module(x)
    expected = F.relu(ref_bn(ref_conv(x)))
    assert torch.equal(out, expected)
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    module.eval()
    ref_bn.eval()
    assert torch.equal(module(x), F.relu(ref_bn(ref_conv(x))))


def test_with_bn_qat_folds_running_stats_into_weight_and_uses_batch_stats():
    conv, bn = _conv_bn_pair()
    module = qat.Conv2d.from_float(_FusedConvBN(conv, bn), QC)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(4, 3, 6, 6)
    out = module(x)
    factor = bn.weight / torch.sqrt(running_var + bn.eps)
    w_q = ref_weight_fq(conv.weight * factor.reshape(-1, 1, 1, 1))
    y = conv._conv_forward(x, w_q, None) / factor.reshape(1, -1, 1, 1) + conv.bias.reshape(1, -1, 1, 1)
    ref_bn = nn.BatchNorm2d(4)
    ref_bn.load_state_dict({**bn.state_dict(), "running_mean": running_mean, "running_var": running_var})
    bn_out = ref_bn(y)
    torch.testing.assert_close(out, ref_tensor_fq(bn_out), rtol=0, atol=float(ref_scale(bn_out.detach().abs().max())) * 1.001)
    # the batch statistics were used and running statistics updated
    assert not torch.equal(bn.running_mean, running_mean)
    out.square().sum().backward()
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_with_bn_training_weight_fake_quant_keeps_no_mask():
    """The folded weight ``weight * factor`` is fake-quantized keeping only the weight and the fold
    factor (the STE mask is recomputed in backward), with the same output and gradients as the
    saved-mask path (forced here by cloning the folded weight in a pre-hook)."""
    conv, bn = _conv_bn_pair()
    modules = [qat.Conv2d.from_float(_FusedConvBN(conv, bn), QC)]
    modules.append(copy.deepcopy(modules[0]))
    modules[1].weight_fake_quant.register_forward_pre_hook(lambda m, args: (args[0].clone(),))
    x = torch.randn(4, 3, 6, 6)
    grad = torch.randn(4, 4, 4, 4)
    results = []
    for module in modules:
        captured = {}
        module.weight_fake_quant.register_forward_hook(lambda m, args, out, c=captured: c.update(y=out))
        out = module(x)
        saved = captured["y"].grad_fn.saved_tensors
        out.backward(grad)
        results.append((out, saved, module.weight.grad, module.bn.weight.grad))
    (out_a, saved_a, grad_a, bn_grad_a), (out_b, saved_b, grad_b, bn_grad_b) = results
    assert len(saved_a) == 3 and saved_a[0] is modules[0].weight
    assert len(saved_b) == 1 and saved_b[0].element_size() == 1  # a 1-byte mask
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b) and torch.equal(bn_grad_a, bn_grad_b)
    assert grad_a.abs().sum() > 0


def test_freeze_bn_uses_running_stats_without_changing_parameters():
    conv, bn = _conv_bn_pair()
    module = qat.Conv2d.from_float(_FusedConvBN(conv, bn), QC_INT32_OUT)
    params_before = [id(p) for p in module.parameters()]
    module.freeze_bn()
    module.train()
    assert not module.bn.training
    mean_before = bn.running_mean.clone()
    x = torch.randn(4, 3, 6, 6)
    out = module(x)
    assert torch.equal(bn.running_mean, mean_before)
    weight, bias = module.folded_weight_bias()
    expected = conv._conv_forward(x, ref_weight_fq(weight), bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert [id(p) for p in module.parameters()] == params_before
    module.unfreeze_bn()
    assert module.bn.training


def test_folded_weight_bias_equals_conv_bn_in_eval():
    conv, bn = _conv_bn_pair()
    module = qat.Conv2d.from_float(_FusedConvBN(conv, bn), QC)
    bn.eval()
    weight, bias = module.folded_weight_bias()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(F.conv2d(x, weight, bias), bn(conv(x)), rtol=1e-5, atol=1e-5)
    no_bias = qat.Linear.from_float(nn.Linear(3, 2, bias=False), QC)
    assert torch.equal(no_bias.folded_weight_bias()[1], torch.zeros(2))


def test_quant_stub_observed_and_fixed_scale():
    observed = qat.QuantStub.from_float(QuantStub(), QC)
    x = torch.randn(3, 8) * 3
    torch.testing.assert_close(observed(x), ref_tensor_fq(x), rtol=0, atol=0)
    fixed = qat.QuantStub.from_float(QuantStub(scale=1 / 128), QC)
    assert fixed.scale == 1 / 128
    fixed.eval()  # scale holds before any data
    x = torch.tensor([0.5, 0.51, 2.0, -3.0])
    torch.testing.assert_close(fixed(x), ref_fake_quant(x, torch.tensor(1 / 128)), rtol=0, atol=0)
    assert torch.equal(fixed.activation_post_process.scale, torch.tensor([1 / 128]))
    dequant = qat.DeQuantStub.from_float(DeQuantStub(), QC)
    assert dequant(x) is x and dequant.activation_post_process is None
    with pytest.raises(ValueError, match="Expected the qconfig of a QuantStub"):
        qat.QuantStub.from_float(QuantStub(), QC_INT32_OUT)


@pytest.mark.parametrize(
    "float_mod, qat_cls",
    [
        (nn.AvgPool2d(2), qat.AvgPool2d),
        (nn.AdaptiveAvgPool2d(1), qat.AdaptiveAvgPool2d),
        (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), qat.Upsample),
    ],
)
def test_range_changing_modules_fake_quantize_their_output(float_mod, qat_cls):
    module = qat_cls.from_float(float_mod, QC)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(module(x), ref_tensor_fq(float_mod(x)), rtol=0, atol=0)


def test_nearest_upsample_is_refused_as_qat():
    with pytest.raises(ValueError, match="nearest"):
        qat.Upsample.from_float(nn.Upsample(scale_factor=2), QC)


def test_state_dict_round_trip_before_data_with_kept_bn():
    conv, bn = _conv_bn_pair()
    module = qat.Conv2d.from_float(_FusedConvBN(conv, bn), QC)
    fresh_conv, fresh_bn = _conv_bn_pair()
    fresh = qat.Conv2d.from_float(_FusedConvBN(fresh_conv, fresh_bn), QC)
    fresh.load_state_dict(module.state_dict(), strict=True)
    module(torch.randn(2, 3, 5, 5))  # now the per-channel scale has 4 entries
    fresh.load_state_dict(module.state_dict(), strict=True)
    assert torch.equal(fresh.weight_fake_quant.scale, module.weight_fake_quant.scale)
    fresh.eval()
    module.eval()
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(fresh(x), module(x))


def test_missing_weight_factory_is_a_clear_error():
    with pytest.raises(ValueError, match="weight fake quant"):
        qat.Conv2d.from_float(nn.Conv2d(1, 1, 1), QConfig(activation=QC.activation, weight=None))


@pytest.mark.parametrize(
    "method, args, expected",
    [
        ("add", (torch.tensor([1.0, -0.3, 2.5]), torch.tensor([0.2, 0.1, 1.0])), lambda a, b: a + b),
        ("mul", (torch.tensor([1.0, -0.3, 2.5]), torch.tensor([0.2, 0.1, 1.0])), lambda a, b: a * b),
        ("mul_scalar", (torch.tensor([1.0, -0.3, 2.5]), 0.7), lambda a, b: a * b),
        ("cat", ([torch.tensor([1.0, -0.3]), torch.tensor([4.0])],), lambda xs: torch.cat(xs)),
    ],
)
def test_float_functional_fake_quantizes_every_output(method, args, expected):
    from hq_lightning.nn.quantized.float_functional import FloatFunctional

    module = qat.FloatFunctional.from_float(FloatFunctional(), QC)
    out = getattr(module, method)(*args)
    torch.testing.assert_close(out, ref_tensor_fq(expected(*args)), rtol=0, atol=0)
    high_precision = qat.FloatFunctional.from_float(FloatFunctional(), QC_INT32_OUT)
    assert high_precision.activation_post_process is None
    assert torch.equal(getattr(high_precision, method)(*args), expected(*args))
