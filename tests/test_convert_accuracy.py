"""Converted (integer) vs fake-quant (VALIDATION) models of ResNet-18 / MobileNetV2 shapes.

The models are small-width versions of ``tests/models.py`` trained for a few epochs on
scikit-learn's digits (upsampled to 3x32x32), then calibrated. Untrained random networks are no
test of a converter: they amplify any rounding difference chaotically (their fake-quant outputs
are already 60-70 % off the float ones for MobileNetV2), so they would measure the network, not
the conversion.

Targets: >= 99 % of output elements within one output step and >= 99.5 % arg-max agreement.
With the float bias of QAT they are missed (ResNet-18 at the edge, MobileNetV2 clearly); they
(nearly) hold once the fake-quant model adds the same int32-grid bias as the chip. Where the converted model is not bit-identical to the fake-quant one, the cause is the bias:
the fake-quant model adds the float bias, the integer model the int32 bias rounded to
``s_in * s_w`` (docs/integer-arithmetic.md, section 2). On depthwise layers ``s_in * s_w`` is close
to an output step, so that rounding alone moves about 0.5 % of their outputs by one step, and
MobileNetV2's depth amplifies it. The tests pin this down: with the bias put on the accumulator
grid in the fake-quant model, every layer matches exactly except for the fake-quant model's own
float32 round-off (about 1e-5 of the elements), and the whole models agree within the targets or
close to them (MobileNetV2 98.4-99.9 % within one step: even those rare differences grow with
depth).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import FakeQuantState, convert_fx, prepare_qat_fx, set_fake_quantize
from hq_lightning.quantization.fx.convert import propagate_qparams
from hq_lightning.quantization.qconfig import default_calib_8bit_fake_quant_qconfig
from tests.models import mobilenet_v2, resnet18

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1300], order[1300:]
    return images[train], labels[train], images[test], labels[test]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _calibrated(float_model: nn.Module, x: torch.Tensor) -> nn.Module:
    prepared = prepare_qat_fx(float_model, {"": default_calib_8bit_fake_quant_qconfig})
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for i in range(0, 512, 128):
            prepared(x[i : i + 128])
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def _agreement(prepared: nn.Module, converted: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    (classifier,) = [m for m in prepared.modules() if isinstance(m, qat.Linear)]
    step = classifier.activation_post_process.scale
    with torch.no_grad():
        fake, integer = prepared(x), converted(x)
    within_one_step = ((fake - integer).abs() <= step * (1 + 1e-5)).float().mean().item()
    argmax = (fake.argmax(1) == integer.argmax(1)).float().mean().item()
    return within_one_step, argmax


def _bias_on_accumulator_grid(prepared: nn.Module) -> None:
    # what the chip adds: the bias rounded to s_in * s_w (done here to the fake-quant model)
    env = propagate_qparams(prepared)
    modules = dict(prepared.named_modules())
    for node in prepared.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, qat.FusedWeightedMixin) and module.bias is not None:
            s_acc = env[node.args[0]].scale.double() * module.weight_fake_quant.scale.double()
            with torch.no_grad():
                module.bias.copy_(torch.round(module.bias.double() / s_acc) * s_acc)


def _layers_match_in_isolation(
    prepared: nn.Module, converted: nn.Module, x: torch.Tensor, min_exact: float = 0.99
) -> None:
    """Each integer conv/linear fed the fake-quant model's own input codes reproduces its output
    codes within one step, and exactly for at least ``min_exact`` of the elements."""
    fake_io: dict[str, tuple] = {}
    for name, module in prepared.named_modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.register_forward_hook(lambda m, i, o, name=name: fake_io.__setitem__(name, (i, o)))
    with torch.no_grad():
        prepared(x)
    integer_modules = dict(converted.named_modules())
    assert fake_io
    for name, (inputs, output) in fake_io.items():
        layer = integer_modules[name]
        codes = [torch.round(inputs[0] / layer.input_scale).to(torch.int8)]
        if len(inputs) > 1:
            codes.append(torch.round(inputs[1] / layer.addend_scale).to(torch.int8))
        with torch.no_grad():
            integer = layer(*codes).double()
        expected = torch.round(output.double() / layer.output_scale.double())
        difference = (integer - expected).abs()
        assert difference.max() <= 1, name
        assert (difference == 0).double().mean() >= min_exact, name


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_converted_model_follows_the_fake_quant_model(digits, arch):
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)  # the initial weights
    if arch == "resnet18":
        model, epochs = resnet18(width=8, num_classes=10), 4
    else:
        model, epochs = mobilenet_v2(width_mult=0.35, num_classes=10, last_channel=128), 4
    float_model = _train(model, x_train, y_train, epochs)
    prepared = _calibrated(float_model, x_train)
    converted = convert_fx(prepared)
    _layers_match_in_isolation(prepared, converted, x_test[:64])
    within, argmax = _agreement(prepared, converted, x_test)
    print(f"{arch}: within one step {within:.4f}, arg-max agreement {argmax:.4f}")
    # measured (float bias, see the module docstring): ResNet-18 98.8-99.9 % within one step and
    # 99.4-99.8 % arg-max; MobileNetV2 88-90 % and 97-98 %
    floor_within, floor_argmax = (0.97, 0.98) if arch == "resnet18" else (0.8, 0.95)
    assert within >= floor_within and argmax >= floor_argmax
    with torch.no_grad():
        accuracy = (converted(x_test).argmax(1) == y_test).float().mean().item()
        float_accuracy = (float_model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= float_accuracy - 0.03

    # with the bias on the int32 grid in the fake-quant model too, every layer agrees exactly but
    # for float32 round-off of the fake-quant conv (~1e-5 of the elements), and the whole models
    # agree far better (measured: 99.9-100 % / 100 % for ResNet-18, 98.4-99.9 % / 99.6-100 % for
    # MobileNetV2, whose depth still amplifies those rare one-step differences)
    _bias_on_accumulator_grid(prepared)
    converted = convert_fx(prepared)
    _layers_match_in_isolation(prepared, converted, x_test[:64], min_exact=0.999)
    within_grid, argmax_grid = _agreement(prepared, converted, x_test)
    print(f"{arch} with the bias on the int32 grid: within one step {within_grid:.4f}, arg-max {argmax_grid:.4f}")
    assert within_grid >= max(within, 0.98) and argmax_grid >= 0.99
