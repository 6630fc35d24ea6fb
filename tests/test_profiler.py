"""Per-layer similarity, the model check, the report files and plots (hq_lightning.quantization.profiler)."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_calib_16bit_fake_quant_qconfig,
)
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx
from hq_lightning.quantization.fx.qat_mapping import is_dequant as is_dequant_stub_or_prepared
from hq_lightning.quantization.profiler import (
    check_model,
    float_layer_map,
    layer_similarity,
    write_report,
)
from tests.calibrate import calibrated


class Residual(nn.Module):
    """conv+bn+relu (fused), a conv whose output is added to the stub output (fused ConvAdd),
    and a plain add of two activations (a generated FloatFunctional call)."""

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.conv2(a) + a  # fused: ConvAdd2d named _generated_add_0
        c = torch.relu(self.conv3(b))
        return self.dequant(c + b)  # not fusable (relu in between): a generated add call


def _trained_residual():
    torch.manual_seed(0)
    model = Residual()
    model.bn1.running_mean.uniform_(-0.2, 0.2)
    model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _hooked_outputs(model, path, batch):
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    return seen[0]


def _sqnr(ref, out):
    ref, out = ref.double(), out.double()
    return 10 * math.log10(float(ref.pow(2).sum()) / float((out - ref).pow(2).sum()))


def test_rows_match_float_layers_through_fusion_adds_and_conversion():
    float_model = _trained_residual()
    batches = [torch.randn(4, 2, 6, 6) for _ in range(2)]
    prepared = calibrated(float_model, batches)
    converted = convert_fx(prepared)
    report = layer_similarity(float_model, prepared, batches, converted=converted)

    paths = [row.path for row in report.layers]
    assert paths[0] == "quant"
    assert "relu1" in paths  # conv1+bn1+relu1 fused, named after the ReLU
    assert report["relu1"].float_layers == ("conv1", "bn1", "relu1")
    assert report["relu1"].module_type == "ConvBNReLU2d" or "ReLU" in report["relu1"].module_type
    fused_add = report["_generated_add_0"]
    assert fused_add.float_layers == ("conv2", "add")  # the add of the root's forward
    generated = [row for row in report.layers if row.path.startswith("_generated_add") and row.path != "_generated_add_0"]
    assert len(generated) == 1 and generated[0].float_layers == ("add",)
    assert set(report.models) == {"fake_quant", "converted"}
    assert report.rows[0].worst_sqnr() == min(row.worst_sqnr() for row in report.layers)

    # the fused row compares the fake-quant output with the float ReLU's output
    ref = torch.cat([_hooked_outputs(float_model, "relu1", b).reshape(-1) for b in batches])
    with torch.no_grad():  # the fake-quant modules called one by one (VALIDATION state)
        out = torch.cat([prepared.relu1(prepared.quant(b)).reshape(-1) for b in batches])
    assert report["relu1"].stats["fake_quant"].sqnr == pytest.approx(_sqnr(ref, out), rel=1e-9)
    # the converted row dequantizes the integer output with the layer's scale
    codes = torch.cat([_hooked_outputs(converted, "relu1", b).reshape(-1) for b in batches])
    assert codes.dtype == torch.int8
    scale = float(prepared.relu1.activation_post_process.scale)
    assert report["relu1"].stats["converted"].sqnr == pytest.approx(_sqnr(ref, codes.double() * scale), rel=1e-6)
    steps = float((codes.double() * scale - ref.double()).abs().max()) / scale
    assert report["relu1"].stats["converted"].max_error_steps == pytest.approx(steps, rel=1e-6)
    assert report["relu1"].clip_range == pytest.approx((-128 * scale, 127 * scale))
    lo, hi = report["relu1"].float_range
    assert lo >= 0.0 and hi == pytest.approx(float(ref.max()))


def test_float_reference_may_be_the_prepared_model_itself():
    float_model = _trained_residual()
    batches = [torch.randn(4, 2, 6, 6)]
    prepared = calibrated(float_model, batches)
    flags = [(m.fake_quant_enabled, m.observer_enabled) for m in prepared.modules() if hasattr(m, "fake_quant_enabled")]
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    direct = layer_similarity(float_model, prepared, batches)
    via_prepared = layer_similarity(prepared, prepared, batches, float_layers=float_layer_map(float_model))
    for a, b in zip(direct.layers, via_prepared.layers):
        assert a.path == b.path and a.float_layers == b.float_layers
        assert a.stats["fake_quant"].sqnr == pytest.approx(b.stats["fake_quant"].sqnr, rel=1e-5)
    assert flags == [(m.fake_quant_enabled, m.observer_enabled) for m in prepared.modules() if hasattr(m, "fake_quant_enabled")]
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in state.items())


def test_saturation_counts_clipped_codes():
    torch.manual_seed(0)
    float_model = nn.Sequential(QuantStub(), nn.Linear(8, 8), DeQuantStub()).eval()
    prepared = calibrated(float_model, [torch.randn(64, 8) * 0.1])  # ranges from small inputs
    x = torch.randn(64, 8)  # 10x larger than what the ranges were calibrated on
    report = layer_similarity(float_model, prepared, [x])
    scale = prepared.get_submodule("0").activation_post_process.scale
    codes = torch.round(x * (1 / scale)).clamp(-128, 127)
    expected = float(((codes == -128) | (codes == 127)).double().mean())
    assert report["0"].stats["fake_quant"].saturation == pytest.approx(expected)
    assert expected > 0.3


def test_converted_only_and_argument_errors():
    float_model = _trained_residual()
    batches = [torch.randn(2, 2, 6, 6)]
    prepared = calibrated(float_model, batches)
    converted = convert_fx(prepared)
    report = layer_similarity(float_model, prepared, batches, converted=converted, compare_fake_quant=False)
    assert report.models == ("converted",)
    with pytest.raises(ValueError, match="Expected `converted`"):
        layer_similarity(float_model, prepared, batches, compare_fake_quant=False)
    with pytest.raises(ValueError, match="at least one model input"):
        layer_similarity(float_model, prepared, [])
    with pytest.raises(TypeError, match="GraphModule"):
        layer_similarity(float_model, float_model, batches)


# --------------------------------------------------------------------------- model check


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        return self.dequant(self.fc2(self.fc1(self.quant(x))))


def _kinds(report):
    return {(f.kind, f.severity, f.path) for f in report.findings}


def test_check_clean_model_has_no_finding():
    prepared = calibrated(_Net(), [torch.randn(4, 4)])
    report = check_model(prepared, torch.randn(4, 4))
    assert report.findings == () and report.ok
    assert "No problem found" in report.to_markdown()


def test_check_finds_observers_that_never_saw_data():
    class Unused(_Net):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(4, 4)  # never called

    prepared = calibrated(Unused(), [torch.randn(4, 4)])
    report = check_model(prepared)
    assert ("never_observed", "error", "spare.activation_post_process") in _kinds(report)
    assert ("never_observed", "error", "spare.weight_fake_quant") in _kinds(report)
    assert not report.ok
    fresh = calibrated(_Net(), [])
    assert [f.path for f in check_model(fresh).of_kind("never_observed")] == ["<all>"]
    assert check_model(fresh, torch.randn(2, 4)).findings == ()


def test_check_finds_scales_at_the_floor():
    model = _Net()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.zero_()
    prepared = calibrated(model, [torch.randn(4, 4)])
    kinds = _kinds(check_model(prepared))
    assert ("scale_at_floor", "warning", "fc1.activation_post_process") in kinds
    assert ("scale_at_floor", "info", "fc1.weight_fake_quant") in kinds


def test_check_finds_ops_left_in_float():
    qconfig = {"": default_calib_8bit_fake_quant_qconfig, "module_name": {"fc2": None}}
    prepared = calibrated(_Net(), [torch.randn(4, 4)], qconfig)
    # prepare dequantizes before a float module itself: it stays float, outside the BPU
    assert ("float_op", "warning", "fc2") in _kinds(check_model(prepared))
    # without that DeQuantStub the float module is fed by a quantized tensor: convert refuses it
    for node in list(prepared.graph.nodes):
        if node.op == "call_module" and is_dequant_stub_or_prepared(prepared.get_submodule(node.target)) and node.target != "dequant":
            node.replace_all_uses_with(node.args[0])
            prepared.graph.erase_node(node)
    prepared.recompile()
    assert ("float_op", "error", "fc2") in _kinds(check_model(prepared))


def test_check_finds_a_shared_module_with_one_fake_quant():
    class Twice(_Net):
        def forward(self, x):
            return self.dequant(self.fc2(self.fc1(self.fc1(self.quant(x)))))

    report = check_model(calibrated(Twice(), [torch.randn(4, 4)]))
    assert [(f.kind, f.path) for f in report.findings] == [("shared_fake_quant", "fc1")]


def test_check_finds_a_missing_quant_stub():
    class TwoInputs(_Net):
        def forward(self, x, y):
            return self.dequant(self.fc1(self.quant(x)) + y)  # y is never quantized

    prepared = calibrated(TwoInputs(), [])
    report = check_model(prepared, (torch.randn(2, 4), torch.randn(2, 4)))
    (finding,) = report.of_kind("missing_quant_stub")
    assert finding.severity == "error" and "`y`" in finding.message


def test_check_finds_int16_on_a_march_without_int16():
    prepared = calibrated(_Net(), [torch.randn(4, 4)], {"": default_calib_16bit_fake_quant_qconfig})
    assert check_model(prepared).findings == ()  # built for bayes: int16 exists
    report = check_model(prepared, march="bernoulli2")
    paths = {f.path for f in report.of_kind("int16_unsupported")}
    assert "fc1.activation_post_process" in paths and "quant.activation_post_process" in paths


# --------------------------------------------------------------------------- report files and plots


def test_report_files_have_one_row_per_layer(tmp_path):
    pytest.importorskip("matplotlib")
    float_model = _trained_residual()
    batches = [torch.randn(4, 2, 6, 6)]
    prepared = calibrated(float_model, batches)
    report = layer_similarity(float_model, prepared, batches, converted=convert_fx(prepared), title="calibration")
    files = write_report(report, tmp_path, name="calibration", check=check_model(prepared), plots=True)
    assert set(files) == {"markdown", "json", "sqnr_plot", "histogram_plot"}
    for key in ("sqnr_plot", "histogram_plot"):
        assert Path(files[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = Path(files["markdown"]).read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(report.layers)
    assert table[0].split("|")[2].strip() == f"`{report.rows[0].path}`"  # worst first
    assert f"Worst layer: `{report.rows[0].path}`" in markdown
    assert "## Model check" in markdown and "calibration_sqnr.png" in markdown
    data = json.loads(Path(files["json"]).read_text())
    assert [layer["path"] for layer in data["layers"]] == [row.path for row in report.rows]
    assert data["check"]["ok"] is True


def test_plots_are_drawn_without_a_display(tmp_path):
    pytest.importorskip("matplotlib")
    script = textwrap.dedent(
        f"""
        import torch, matplotlib
        from torch import nn
        from hq_lightning.quantization import DeQuantStub, QuantStub
        from hq_lightning.quantization.profiler import layer_similarity, plot_histograms, plot_sqnr
        from tests.calibrate import calibrated
        model = nn.Sequential(QuantStub(), nn.Linear(4, 4), nn.ReLU(), DeQuantStub()).eval()
        batches = [torch.randn(8, 4)]
        report = layer_similarity(model, calibrated(model, batches), batches)
        plot_sqnr(report, {str(tmp_path / 'sqnr.png')!r})
        plot_histograms(report, {str(tmp_path / 'hist.png')!r})
        print(matplotlib.get_backend())
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    env["PYTHONPATH"] = os.getcwd()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "agg"
    assert (tmp_path / "sqnr.png").stat().st_size > 1000 and (tmp_path / "hist.png").stat().st_size > 1000


def test_missing_matplotlib_says_what_to_install(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        from hq_lightning.quantization.profiler.plots import require_matplotlib
        try:
            require_matplotlib()
        except ImportError as err:
            print(err)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "pip install matplotlib" in out.stdout


def test_docstring_examples_run():
    import doctest
    import importlib

    for name in ("similarity", "model_check", "plots", "report"):
        if name == "plots":
            pytest.importorskip("matplotlib")
        module = importlib.import_module(f"hq_lightning.quantization.profiler.{name}")
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, name
    for name in ("hq_lightning.quantization.sensitivity", "hq_lightning.app.report_cli"):
        result = doctest.testmod(importlib.import_module(name))
        assert result.failed == 0 and result.attempted > 0, name
