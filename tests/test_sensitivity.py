"""Per-layer sensitivity report and its mixed-precision fallback (hq_lightning.quantization.sensitivity)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.dtype import QuantDType
from hq_lightning.march import March, get_march, march_context, set_march
from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_calib_16bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
    default_qat_16bit_fake_quant_qconfig,
)
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    QuantStub,
    SensitivityReport,
    layer_sensitivity,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization import sensitivity as sensitivity_module
from tests.calibrate import calibrated


@pytest.fixture(autouse=True)
def _bayes_march():
    before = get_march()
    set_march(March.BAYES)
    yield
    set_march(before)


class Chain(nn.Module):
    """quant -> fc1 -> relu -> fc2 -> relu -> fc3 -> dequant, with fc2 made sensitive on request.

    ``"activation"``: fc2's output has one channel at ~300 (fc3 ignores it), so fc2's per-tensor
    int8 output scale crushes every other channel. ``"weight"``: fc2 has one huge weight per output
    channel on an input that is always 0, so its per-channel int8 weight scales crush the others.
    Neither changes the float output path through the other layers.
    """

    def __init__(self, outlier: str | None = None) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():
            if outlier == "activation":
                self.fc2.bias[0] = 300.0
                self.fc3.weight[:, 0] = 0.0
            elif outlier == "weight":
                self.fc1.weight[0] = 0.0
                self.fc1.bias[0] = -1.0  # relu -> input 0 of fc2 is always 0
                self.fc2.weight[:, 0] = 50.0

    def forward(self, x):
        x = F.relu(self.fc1(self.quant(x)))
        return self.dequant(self.fc3(F.relu(self.fc2(x))))


class ConvNet(nn.Module):
    """conv+bn+ReLU module (fused and named 'relu1'), conv + residual add, mean, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = x + self.conv2(x)
        return self.dequant(self.fc(x.mean((2, 3))))


def _batches(shape, n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(n)]


def _calibrated(float_model, batches, qconfig=default_qat_8bit_fake_quant_qconfig):
    return calibrated(float_model, batches, {"": qconfig})


def _chain(outlier=None, seed=0):
    torch.manual_seed(seed)
    float_model = Chain(outlier)
    batches = _batches((16, 4))
    return float_model, _calibrated(float_model, batches), batches


def _int16_layers(model):
    return {
        path
        for path, module in model.named_modules()
        if not isinstance(module, FakeQuantize)
        and isinstance(getattr(module, "activation_post_process", None), FakeQuantize)
        and module.activation_post_process.dtype is QuantDType.qint16
    }


def _merge(base, fragment):
    return {**base, "module_name": {**base.get("module_name", {}), **fragment["module_name"]}}


@pytest.mark.parametrize("outlier", ["activation", "weight"])
@pytest.mark.parametrize("metric", ["sqnr", "mse", "cosine"])
def test_the_deliberately_sensitive_layer_ranks_first(outlier, metric):
    _, model, batches = _chain(outlier)
    report = layer_sensitivity(model, batches, metric=metric)
    assert report.rows[0].path == "fc2"
    assert {row.path for row in report} == {"quant", "fc1", "fc2", "fc3"}
    values = [row.value for row in report]
    assert values == sorted(values, reverse=report.larger_is_worse)
    # the sensitive layer alone degrades the output far more than the next one
    first, second = report.rows[0].value, report.rows[1].value
    if metric == "sqnr":
        assert first < second - 10.0
    elif metric == "mse":
        assert first > 10.0 * second
    else:
        assert 1.0 - first > 10.0 * (1.0 - second)


def test_all_but_mode_finds_the_same_layer():
    _, model, batches = _chain("activation")
    report = layer_sensitivity(model, batches, mode="all_but")
    assert report.mode == "all_but"
    assert report.rows[0].path == "fc2"
    # leaving the worst layer float recovers most of the whole-model loss
    assert report.rows[0].value > report.quantized_value + 10.0


def test_values_follow_the_metric_formulas_with_only_one_layer_quantized():
    _, model, batches = _chain("activation")
    model.eval()
    set_fake_quantize(model, FakeQuantState.FLOAT)
    with torch.no_grad():
        reference = torch.cat([model(x).flatten() for x in batches]).double()
        set_fake_quantize(model.fc2, FakeQuantState.VALIDATION)  # fc2 alone
        only_fc2 = torch.cat([model(x).flatten() for x in batches]).double()
        set_fake_quantize(model, FakeQuantState.VALIDATION)
        everything = torch.cat([model(x).flatten() for x in batches]).double()

    def sqnr(out):
        return 10 * math.log10(reference.square().sum().item() / (out - reference).square().sum().item())

    expected = {
        "sqnr": sqnr,
        "mse": lambda out: (out - reference).square().mean().item(),
        "cosine": lambda out: F.cosine_similarity(out, reference, dim=0).item(),
    }
    for metric, formula in expected.items():
        report = layer_sensitivity(model, batches, metric=metric)
        by_path = {row.path: row.value for row in report}
        assert by_path["fc2"] == pytest.approx(formula(only_fc2), rel=1e-9, abs=1e-12)
        assert report.quantized_value == pytest.approx(formula(everything), rel=1e-9, abs=1e-12)


def test_callable_metric_is_an_error_averaged_over_batches():
    _, model, batches = _chain("activation")

    def max_abs_error(reference, output):
        return (output - reference).abs().max()

    report = layer_sensitivity(model, batches, metric=max_abs_error)
    assert report.metric == "max_abs_error" and report.larger_is_worse
    assert report.rows[0].path == "fc2"
    assert report.rows[0].value > report.rows[-1].value


def test_output_fn_picks_the_compared_tensor():
    _, model, batches = _chain("activation")
    calls = []

    def first_column(output):
        calls.append(output.shape)
        return output[:, 0]

    report = layer_sensitivity(model, batches, output_fn=first_column)
    assert report.rows[0].path == "fc2"
    assert len(calls) == len(batches) * (len(report) + 2)  # reference, whole model, one per layer


def _snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {p: (m.fake_quant_enabled, m.observer_enabled) for p, m in model.named_modules() if isinstance(m, FakeQuantize)}
    modes = {p: m.training for p, m in model.named_modules()}
    return state, flags, modes


def _assert_unchanged(model, snapshot):
    state, flags, modes = snapshot
    after_state, after_flags, after_modes = _snapshot(model)
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    assert after_flags == flags
    assert after_modes == modes


def test_scales_states_and_modes_are_restored_from_a_mixed_qat_state():
    torch.manual_seed(0)
    float_model = ConvNet()
    batches = _batches((4, 2, 6, 6))
    model = _calibrated(float_model, batches)
    # QAT everywhere (observers live in train mode!) but the head validating and in eval
    model.train()
    set_fake_quantize(model, FakeQuantState.QAT)
    model.fc.eval()
    set_fake_quantize(model.fc, FakeQuantState.VALIDATION)
    snapshot = _snapshot(model)
    report = layer_sensitivity(model, batches)
    _assert_unchanged(model, snapshot)
    assert {row.path for row in report} == {"quant", "relu1", "_generated_add_0", "_generated_mean_0", "fc"}


def test_states_are_restored_after_an_error():
    _, model, batches = _chain("activation")
    model.train()
    set_fake_quantize(model, FakeQuantState.QAT)
    snapshot = _snapshot(model)
    calls = []

    def failing(output):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return output

    with pytest.raises(RuntimeError, match="boom"):
        layer_sensitivity(model, batches, output_fn=failing)
    _assert_unchanged(model, snapshot)


def test_int16_fallback_lands_exactly_on_the_reported_layers_of_a_fused_model():
    torch.manual_seed(0)
    float_model = ConvNet()
    batches = _batches((4, 2, 6, 6))
    report = layer_sensitivity(_calibrated(float_model, batches), batches)
    assert {row.path: row.module_type for row in report}["relu1"] == "ConvReLU2d"
    for top_k in (2, len(report)):
        fragment = report.fallback_qconfig_dict(top_k, float_model=float_model)
        assert set(fragment["module_name"].values()) == {default_qat_16bit_fake_quant_qconfig}
        merged = _merge({"": default_qat_8bit_fake_quant_qconfig}, fragment)
        reprepared = prepare_qat_fx(float_model, merged)
        assert _int16_layers(reprepared) == set(report.most_sensitive(top_k))
        # weights stay int8; the fused conv's key is the float conv it absorbed
        assert all(m.dtype is QuantDType.qint8 for p, m in reprepared.named_modules() if p.endswith("weight_fake_quant"))
    assert "conv1" in report.fallback_qconfig_dict(len(report), float_model=float_model)["module_name"]
    with pytest.raises(ValueError, match="Expected `float_model`"):
        report.fallback_qconfig_dict(len(report))
    with pytest.raises(ValueError, match="fusing it gives no module"):
        report.fallback_qconfig_dict(len(report), float_model=Chain())


def test_int16_fallback_repairs_the_sensitive_layer():
    float_model, model, batches = _chain("activation")
    report = layer_sensitivity(model, batches)
    fragment = report.fallback_qconfig_dict(1)  # no fusion renamed a layer: prepared paths are float paths
    assert fragment == {"module_name": {"fc2": default_qat_16bit_fake_quant_qconfig}}
    assert report.fallback_qconfig_dict(1, float_model=float_model) == fragment
    assert report.fallback_qconfig_dict(0) == {"module_name": {}}
    merged = _merge({"": default_qat_8bit_fake_quant_qconfig}, fragment)
    repaired = calibrated(float_model, batches, merged, validate=False)
    assert _int16_layers(repaired) == {"fc2"}
    after = layer_sensitivity(repaired, batches)
    before_fc2 = {row.path: row.value for row in report}["fc2"]
    after_fc2 = {row.path: row.value for row in after}["fc2"]
    assert after_fc2 > before_fc2 + 30.0  # int16 has 256x finer steps: ~48 dB
    assert after.quantized_value > report.quantized_value + 10.0
    # an int16 fallback skips layers already int16: the next fallback goes elsewhere
    assert "fc2" not in after.fallback_qconfig_dict(2)["module_name"]


def test_bernoulli2_has_no_int16_so_the_fallback_is_float():
    torch.manual_seed(0)
    float_model = Chain("activation")
    batches = _batches((16, 4))
    with march_context(March.BERNOULLI2):
        model = _calibrated(float_model, batches)
    report = layer_sensitivity(model, batches)
    assert report.march is March.BERNOULLI2
    assert report.rows[0].path == "fc2"
    with pytest.warns(UserWarning, match="int16 is unavailable on march 'bernoulli2'"):
        fragment = report.fallback_qconfig_dict(1)
    assert fragment == {"module_name": {"fc2": None}}
    assert "int16 is unavailable on march bernoulli2" in report.to_markdown()
    with pytest.raises(ValueError, match="no int16"):
        report.fallback_qconfig_dict(1, default_qat_16bit_fake_quant_qconfig)
    with march_context(March.BERNOULLI2):
        reprepared = prepare_qat_fx(float_model, _merge({"": default_qat_8bit_fake_quant_qconfig}, fragment))
    # stays float (the fused float LinearReLU, no fake quant) while the others are quantized
    assert not any(isinstance(m, FakeQuantize) for m in reprepared.fc2.modules())
    assert isinstance(reprepared.fc3.activation_post_process, FakeQuantize)
    assert not _int16_layers(reprepared)


def test_calibration_model_gets_the_calibration_int16_qconfig():
    torch.manual_seed(0)
    float_model = Chain("activation")
    batches = _batches((16, 4))
    model = _calibrated(float_model, batches, default_calib_8bit_fake_quant_qconfig)
    report = layer_sensitivity(model, batches)
    assert report.kind == "calibration"
    assert report.fallback_qconfig_dict(1) == {"module_name": {"fc2": default_calib_16bit_fake_quant_qconfig}}
    with pytest.raises(ValueError, match="Expected `qconfig` to be a calibration qconfig"):
        report.fallback_qconfig_dict(1, default_qat_16bit_fake_quant_qconfig)
    assert report.fallback_qconfig_dict(2, None) == {"module_name": {"fc2": None, report.rows[1].path: None}}


def test_markdown_lists_every_layer_in_rank_order():
    _, model, batches = _chain("activation")
    report = layer_sensitivity(model, batches)
    text = report.to_markdown()
    assert str(report) == text
    assert "| rank | layer | type | dtype | sqnr |" in text
    positions = [text.index(f"`{row.path}`") for row in report]
    assert positions == sorted(positions)
    assert "| 1 | `fc2` | LinearReLU | qint8 |" in text
    assert "most_sensitive='fc2'" in repr(report)
    assert isinstance(report, SensitivityReport) and len(report) == 4 and report[0].path == "fc2"


def test_bad_input_gets_clear_errors():
    _, model, batches = _chain()
    with pytest.raises(ValueError, match="Expected `metric` to be one of"):
        layer_sensitivity(model, batches, metric="psnr")
    with pytest.raises(ValueError, match="Expected `mode` to be one of"):
        layer_sensitivity(model, batches, mode="leave_one_out")
    with pytest.raises(ValueError, match="at least one model input"):
        layer_sensitivity(model, [])
    with pytest.raises(ValueError, match="prepared by prepare_qat_fx"):
        layer_sensitivity(Chain(), batches)
    with pytest.raises(TypeError, match="Expected `prepared_model` to be an nn.Module"):
        layer_sensitivity("model", batches)
    uncalibrated = prepare_qat_fx(Chain(), {"": default_qat_8bit_fake_quant_qconfig})
    with pytest.raises(ValueError, match="has observed no data"):
        layer_sensitivity(uncalibrated, batches)
    report = layer_sensitivity(model, batches)
    with pytest.raises(ValueError, match="Expected `top_k` to be an int >= 0"):
        report.fallback_qconfig_dict(-1)
    with pytest.raises(ValueError, match="Expected `qconfig` to be a QConfig, None"):
        report.fallback_qconfig_dict(1, "int8")


def test_docstring_example_runs():
    result = doctest.testmod(sensitivity_module)
    assert result.attempted > 0 and result.failed == 0
