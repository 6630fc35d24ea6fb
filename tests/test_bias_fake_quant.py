"""Bias fake quant of weighted QAT modules on the int32 accumulator grid ``s_in * s_w[c]``.

The expected grid bias is computed here element by element with Python's ``round`` (half to
even) on Python floats: no code shared with the module's path (``quantize_bias``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning import set_march
from hq_lightning.march import March
from hq_lightning.nn import qat
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from hq_lightning.quantization.qconfig import (
    default_qat_8bit_fake_quant_qconfig,
    default_qat_8bit_weight_32bit_out_fake_quant_qconfig,
)

QAT8 = default_qat_8bit_fake_quant_qconfig
OUT32 = default_qat_8bit_weight_32bit_out_fake_quant_qconfig


@pytest.fixture(autouse=True)
def _bayes_seed_one_thread():
    set_march(March.BAYES)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    set_march(March.BAYES)


class Net(nn.Module):
    """stub -> conv+bn+relu (fused as ``relu``) -> maxpool -> flatten -> linear (int32) -> dequant."""

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(self.quant(x)))))
        return self.dequant(self.fc(torch.flatten(x, 1)))


class HighPrecisionConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 6, 3, bias=True)
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def _prepared(model: nn.Module, **kwargs) -> nn.Module:
    names = {"fc": OUT32} if isinstance(model, Net) else {"conv": kwargs.pop("conv_qconfig", QAT8)}
    prepared = prepare_qat_fx(model, {"": QAT8, "module_name": names}, **kwargs)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    with torch.no_grad():
        prepared(torch.randn(4, 3, 8, 8))  # observers see data
    return prepared


def _grid_bias(bias: torch.Tensor, s_in: float, s_w: torch.Tensor) -> torch.Tensor:
    values = []
    for b, w in zip(bias.tolist(), s_w.flatten().tolist()):
        s_acc = float(torch.tensor(s_in, dtype=torch.float32)) * float(torch.tensor(w, dtype=torch.float32))
        values.append(round(b / s_acc) * s_acc)
    return torch.tensor(values, dtype=torch.float32)


def _conv_reference(module: qat.Conv2d, x: torch.Tensor, on_grid: bool) -> torch.Tensor:
    """High-precision conv output from the formulas: fake-quantized input and weight, grid bias."""
    x_q = module.input_fake_quant(x)
    w_q = module.weight_fake_quant(module.weight)
    bias = module.bias.detach()
    if on_grid:
        bias = _grid_bias(bias, module.input_fake_quant.scale.item(), module.weight_fake_quant.scale)
    return F.conv2d(x_q, w_q, bias)


def test_prepare_links_the_input_fake_quant_through_scale_preserving_ops():
    prepared = _prepared(Net(), qat_mode="with_bn")
    assert prepared.relu.input_fake_quant is prepared.quant.activation_post_process
    # fc's input went through maxpool and flatten: the fused conv's output fake quant
    assert prepared.fc.input_fake_quant is prepared.relu.activation_post_process
    assert prepared.fc.activation_post_process is None


def test_the_link_changes_no_state_dict_and_follows_deepcopy():
    prepared = _prepared(Net())
    unlinked = _prepared(Net(), bias_fake_quant=False)
    for module in unlinked.modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.set_input_fake_quant(None)
    assert list(prepared.state_dict()) == list(unlinked.state_dict())
    assert [n for n, _ in prepared.named_modules()] == [n for n, _ in unlinked.named_modules()]
    assert str(prepared) == str(unlinked)
    unlinked.load_state_dict(prepared.state_dict(), strict=True)
    prepared.load_state_dict(unlinked.state_dict(), strict=True)

    copied = copy.deepcopy(prepared)
    assert copied.relu.input_fake_quant is copied.quant.activation_post_process
    assert copied.relu.input_fake_quant is not prepared.quant.activation_post_process
    assert copied.fc.input_fake_quant is copied.relu.activation_post_process
    with torch.no_grad():
        copied.quant.activation_post_process.scale.mul_(2)  # the copy's own scale is used
    assert copied.relu.accumulator_scale()[0] == 2 * prepared.relu.accumulator_scale()[0]


@pytest.mark.parametrize(
    ("march", "option", "in_qat", "in_validation"),
    [
        (March.BAYES, None, False, True),  # default: VALIDATION predicts the deployed model
        (March.BERNOULLI, None, True, True),  # semantics.md: bias quantized during QAT too
        (March.BAYES, True, True, True),
        (March.BERNOULLI, False, False, False),
    ],
)
def test_bias_on_the_grid_per_march_and_option(march, option, in_qat, in_validation):
    set_march(march)
    prepared = _prepared(HighPrecisionConv(), bias_fake_quant=option, conv_qconfig=OUT32)
    conv = prepared.conv
    with torch.no_grad():
        conv.bias.copy_(torch.randn(6))  # large enough to be off the grid
    for module in prepared.modules():
        if isinstance(module, FakeQuantize):
            module.disable_observer()  # QAT with fixed scales, so the reference sees the same ones
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out_qat = prepared(x)
        expected_qat = _conv_reference(conv, x, in_qat)
        assert not torch.equal(expected_qat, _conv_reference(conv, x, not in_qat))  # can fail
        torch.testing.assert_close(out_qat, expected_qat, rtol=0, atol=1e-6)

        prepared.eval()
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        with fake_quant_path():  # the per-module forward (a wholly VALIDATION model runs convert's)
            out_val = prepared(x)
        torch.testing.assert_close(out_val, _conv_reference(conv, x, in_validation), rtol=0, atol=1e-6)

        # CALIBRATION and FLOAT do not fake-quantize the weight: the float bias
        set_fake_quantize(prepared, FakeQuantState.FLOAT)
        assert not conv._bias_fake_quant_active()


def test_gradient_is_straight_through():
    grads = []
    for option in (True, False):
        torch.manual_seed(0)
        prepared = _prepared(HighPrecisionConv(), bias_fake_quant=option, conv_qconfig=OUT32)
        prepared(torch.randn(2, 3, 8, 8)).square().sum().backward()
        grads.append(prepared.conv.bias.grad)
    # same gradient formula (d out / d b = 1); only the forward values differ slightly
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)
    assert grads[0].abs().sum() > 0


class HighPrecisionConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 6, 3, bias=True)
        self.bn = nn.BatchNorm2d(6)
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.bn(self.conv(self.quant(x))))


class HighPrecisionLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(self.pool(self.quant(x)).flatten(1)))


@pytest.mark.parametrize(
    ("model_class", "qat_mode"),
    [(HighPrecisionConvBN, "fuse_bn"), (HighPrecisionConvBN, "with_bn"), (HighPrecisionLinear, "fuse_bn")],
)
def test_validation_equals_the_converted_layer_bit_for_bit_on_bernoulli(model_class, qat_mode):
    # power-of-two scales make the fake-quant float arithmetic of one layer exact, and an int32
    # output has no requantization, so the only difference left between VALIDATION and the
    # integer model is the bias rounding, which bias fake quant removes (a kept BN's bias is
    # folded exactly like convert folds it)
    set_march(March.BERNOULLI)
    model = model_class()
    # the fused conv+bn takes the conv's qconfig and the bn's name
    name, weighted = ("fc", "fc") if model_class is HighPrecisionLinear else ("conv", "bn")
    prepared = prepare_qat_fx(model, {"": QAT8, "module_name": {name: OUT32}}, qat_mode=qat_mode)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    with torch.no_grad():
        for _ in range(3):  # a kept BN updates its running statistics
            prepared(torch.randn(4, 3, 8, 8))
    module = prepared.get_submodule(weighted)
    assert module.input_fake_quant is prepared.quant.activation_post_process
    with torch.no_grad():
        module.bias.add_(torch.randn_like(module.bias) * 0.3)
        if qat_mode == "with_bn":
            module.bn.bias.copy_(torch.randn_like(module.bn.bias) * 0.3)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    converted = convert_fx(prepared)
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad(), fake_quant_path():  # the per-module fake-quant forward
        assert torch.equal(prepared(x), converted(x))
        module.bias_fake_quant = False
        assert not torch.equal(prepared(x), converted(x))
    with torch.no_grad():  # VALIDATION of the whole model is the integer model, whatever the option
        assert torch.equal(prepared(x), converted(x))


def test_unlinked_module_keeps_the_float_bias_and_says_how_to_link():
    conv = qat.Conv2d.from_float(nn.Conv2d(3, 4, 3), QAT8).eval()
    conv.bias_fake_quant = True
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        conv.weight_fake_quant.train()(conv.weight)  # observe the weight once
        conv.weight_fake_quant.eval()
        out = conv(x)
        expected = F.conv2d(x, conv.weight_fake_quant(conv.weight), conv.bias)
    assert torch.equal(out, conv.activation_post_process(expected))
    with pytest.raises(RuntimeError, match="set_input_fake_quant"):
        conv.accumulator_scale()
    with pytest.raises(TypeError, match="Expected `fake_quant` to be a FakeQuantize"):
        conv.set_input_fake_quant(nn.ReLU())


def test_prepare_rejects_a_non_bool_option():
    with pytest.raises(TypeError, match="Expected `bias_fake_quant` to be None"):
        prepare_qat_fx(Net(), {"": QAT8}, bias_fake_quant="yes")
