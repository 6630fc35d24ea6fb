"""Converted (integer) vs fake-quant (VALIDATION) models of ResNet-18 / MobileNetV2 shapes.

The models are small-width versions of ``tests/models.py`` trained for a few epochs on
scikit-learn's digits (upsampled to 3x32x32), then calibrated. Untrained random networks are no
test of a converter: they amplify any rounding difference chaotically (their fake-quant outputs
are already 60-70 % off the float ones for MobileNetV2), so they would measure the network, not
the conversion.

Targets: >= 99 % of output elements within one output step and >= 99.5 % arg-max agreement.
With the float bias (``prepare_qat_fx(..., bias_fake_quant=False)``) they are missed (ResNet-18 at
the edge, MobileNetV2 clearly): the fake-quant model adds the float bias, the integer model the
int32 bias rounded to ``s_in * s_w`` (docs/integer-arithmetic.md, section 2), and on depthwise
layers ``s_in * s_w`` is close to an output step, so that rounding alone moves about 0.5 % of their
outputs by one step, which MobileNetV2's depth amplifies. By default VALIDATION fake-quantizes the
bias on that grid (``bias_fake_quant=None``); then every layer matches exactly except for the
fake-quant model's own float32 round-off (about 1e-5 of the elements), ResNet-18 meets both
targets and MobileNetV2 the arg-max target, while its depth still amplifies those rare one-step
differences to about 1.6 % of the outputs beyond one step (bench/results/convert.md).

A prepared model wholly in VALIDATION now runs the integer model itself (issue 13), so
``prepared(x)`` equals ``converted(x)`` bit for bit (asserted last, on the trained models). The
comparisons above study the per-module fake-quant arithmetic QAT trains with, run under
``fake_quant_path()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import convert_fx
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from tests.calibrate import calibrated
from tests.models import mobilenet_v2, resnet18

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """The trained models (and so the measured agreement) depend on the float reduction order:
    pin one intra-op thread, as the whole suite runs, so the figures are the same in both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return calibrated(float_model, [x[i : i + 128] for i in range(0, 512, 128)])


def _agreement(prepared: nn.Module, converted: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    (classifier,) = [m for m in prepared.modules() if isinstance(m, qat.Linear)]
    step = classifier.activation_post_process.scale
    with torch.no_grad(), fake_quant_path():
        fake, integer = prepared(x), converted(x)
    within_one_step = ((fake - integer).abs() <= step * (1 + 1e-5)).float().mean().item()
    argmax = (fake.argmax(1) == integer.argmax(1)).float().mean().item()
    return within_one_step, argmax


def _set_bias_fake_quant(prepared: nn.Module, value: bool | None) -> None:
    for module in prepared.modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.bias_fake_quant = value


def _layers_match_in_isolation(
    prepared: nn.Module, converted: nn.Module, x: torch.Tensor, min_exact: float | None = None
) -> float:
    """Each integer conv/linear fed the fake-quant model's own input codes reproduces its output
    codes within one step, and exactly for at least ``min_exact`` of the elements (when given).

    Returns:
        the smallest fraction of exactly equal output codes over the layers.
    """
    worst = 1.0
    fake_io: dict[str, tuple] = {}
    for name, module in prepared.named_modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.register_forward_hook(lambda m, i, o, name=name: fake_io.__setitem__(name, (i, o)))
    with torch.no_grad(), fake_quant_path():
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
        exact = (difference == 0).double().mean().item()
        worst = min(worst, exact)
        if min_exact is not None:
            assert exact >= min_exact, name
    return worst


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_converted_model_follows_the_fake_quant_model(digits, arch):
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)  # the initial weights
    if arch == "resnet18":
        model, epochs = resnet18(width=8, num_classes=10), 4
    else:
        model, epochs = mobilenet_v2(width_mult=0.35, num_classes=10, last_channel=128), 12
    float_model = _train(model, x_train, y_train, epochs)
    prepared = _calibrated(float_model, x_train)
    converted = convert_fx(prepared)

    # the float bias of QAT (bias_fake_quant=False): one step off on ~0.5 % of depthwise outputs
    _set_bias_fake_quant(prepared, False)
    worst_exact = _layers_match_in_isolation(prepared, converted, x_test[:64])
    print(f"{arch} float bias: worst layer exact on {worst_exact:.4f} of its outputs")
    within, argmax = _agreement(prepared, converted, x_test)
    print(f"{arch} float bias: within one step {within:.4f}, arg-max agreement {argmax:.4f}")
    # measured: ResNet-18 98.8-99.9 % within one step and 99.4-99.8 % arg-max; MobileNetV2 88-91 %
    # and 97-98.6 % (bench/results/convert.md)
    floor_within, floor_argmax = (0.97, 0.98) if arch == "resnet18" else (0.8, 0.95)
    assert within >= floor_within and argmax >= floor_argmax

    # the default: VALIDATION adds the bias on the int32 grid s_in * s_w, like the chip. Every
    # layer then matches exactly but for float32 round-off (~1e-5 of the elements: exact values
    # within an fp32 ulp of a rounding boundary, repeated over the digits' constant background)
    _set_bias_fake_quant(prepared, None)
    _layers_match_in_isolation(prepared, converted, x_test[:64], min_exact=0.999)
    within_grid, argmax_grid = _agreement(prepared, converted, x_test)
    print(f"{arch} bias on the int32 grid: within one step {within_grid:.4f}, arg-max {argmax_grid:.4f}")
    # measured: ResNet-18 100 % / 100 %; MobileNetV2 (12 epochs, 92 % accuracy) 99.9 % / 100 %.
    # A barely trained MobileNetV2 (4 epochs) gave 98.4 % / 99.6 %: its 52 layers amplify those
    # rare one-step differences far more while its logits are nearly flat (bench/results/convert.md)
    assert argmax_grid >= 0.995 and within_grid >= 0.99
    assert within_grid >= within

    with torch.no_grad():
        accuracy = (converted(x_test).argmax(1) == y_test).float().mean().item()
        validation = prepared(x_test)  # VALIDATION: the integer model, bit for bit
        assert torch.equal(validation, converted(x_test))
        fake_accuracy = (validation.argmax(1) == y_test).float().mean().item()
        float_accuracy = (float_model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"{arch} accuracy: float {float_accuracy:.4f}, VALIDATION {fake_accuracy:.4f}, converted {accuracy:.4f}")
    assert accuracy >= float_accuracy - 0.03
