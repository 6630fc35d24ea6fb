"""Bad input gets a clear error, before training where it can (issue 12, items 6, 7, 8, 10, 13-15).

Tiny runs (a few batches of 16 digits) on one thread; nothing asserts accuracy or time.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch import Callback
from test_callbacks import classifier, digits, make_trainer
from torch import nn

from hq_lightning.app import qconfig_builder
from hq_lightning.app.overrides import check_override_keys, quote_path_overrides
from hq_lightning.app.schema import register_configs
from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.callbacks._checkpoint_file import UnreadableCheckpointError
from hq_lightning.cli import CONFIG_PATH, run
from hq_lightning.models import ClassificationModule
from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
from hq_lightning.quantization import MinMaxObserver, prepare_qat_fx
from hq_lightning.quantization.plan import quantization_plan

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = ["float_epochs=1", "quant.qat_epochs=1", "data.batch_size=16", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", "quant.calibration_batches=2", "callbacks=none",
        "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module", autouse=True)
def _schema():
    register_configs()


def _compose(overrides, output_dir):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", "logger=csv", *overrides])


def _truncate(path: Path, keep: int = 4096) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


# ---------------------------------------------------------------- item 10: truncated checkpoints
def test_truncated_checkpoint_is_named_by_the_callback_and_the_app(tmp_path, monkeypatch):
    first = tmp_path / "outputs" / "first"
    run(_compose(["+quant=qat", *TINY, "quant.export=[]"], first))
    (good,) = (first / "logs" / "checkpoints").glob("*.ckpt")
    bad = good.with_name("epoch=9-step=99.ckpt")
    bad.write_bytes(good.read_bytes())
    _truncate(bad)

    # trainer.fit(ckpt_path=...) with the callback: the file is named, not "[Errno 22]"
    trainer = make_trainer(tmp_path, [QuantizationCallback(float_epochs=1)], max_epochs=2)
    with pytest.raises(UnreadableCheckpointError, match=r"epoch=9-step=99\.ckpt.*truncated") as info:
        trainer.fit(classifier(), digits(), ckpt_path=bad)
    assert str(good) in str(info.value)  # the complete checkpoint beside it is suggested

    # the app refuses it before anything is built; `last` passes over it to the complete one
    with pytest.raises(UnreadableCheckpointError, match="truncated or corrupt"):
        run(_compose(["+quant=qat", *TINY, f"resume_from='{bad}'"], tmp_path / "refused"))
    assert not (tmp_path / "refused" / "logs").exists()
    os.utime(bad)  # the newest file, yet incomplete
    monkeypatch.chdir(tmp_path)
    from hq_lightning.app.resume import resolve_checkpoint

    assert resolve_checkpoint("last", "resume_from", tmp_path / "new") == str(good)
    assert resolve_checkpoint(str(first), "resume_from", tmp_path / "new") == str(good)


# ---------------------------------------------------------------- items 1 and 13: resume_from=last
def test_resume_from_last_converts_a_run_that_stopped_before_export(tmp_path, monkeypatch):
    from hq_lightning.deploy import atomic_write

    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "outputs" / "a", tmp_path / "outputs" / "b"

    write = atomic_write._write_file

    def crash(handle, data, path):  # the disk fills up after the plan was written
        if os.path.basename(path).startswith("quantized"):
            raise OSError(28, "No space left on device")
        write(handle, data, path)

    with monkeypatch.context() as patch:
        patch.setattr(atomic_write, "_write_file", crash)
        with pytest.raises(OSError, match="resume_from=last"):
            run(_compose(["+quant=qat", *TINY], first))
    assert not (first / "quantized.pt").exists()
    table = run(_compose(["+quant=qat", *TINY, "resume_from=last"], second))
    assert "quantized" in table
    assert torch.jit.load(str(second / "quantized.pt"))(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    record = json.loads((second / "metrics.json").read_text())
    assert record["images"]["validation"] == 32  # 2 batches of 16
    assert record["images"]["test"] == 270 and "test/acc" in record["test"]["quantized"]


def test_checkpoint_paths_are_quoted_for_hydra():
    raw = ["+quant=qat", "resume_from=outputs/x/logs/checkpoints/epoch=6-step=70.ckpt",
           "init_from=a=b.ckpt", "resume_from=last", "seed=3"]
    quoted = quote_path_overrides(raw)
    assert quoted[0] == raw[0] and quoted[3:] == raw[3:]
    parsed = OverridesParser.create().parse_overrides(quoted)
    assert parsed[1].value() == "outputs/x/logs/checkpoints/epoch=6-step=70.ckpt"
    assert parsed[2].value() == "a=b.ckpt"


# ---------------------------------------------------------------- item 14: our did-you-mean
@pytest.mark.parametrize(("override", "suggestion"), [
    ("quant.qat.activation.averagin_constant=0.1", "quant.qat.activation.averaging_constant"),
    ("+quant.calibraton_batches=3", "quant.calibration_batches"),
    ("float_epoch=3", "float_epochs"),
])
def test_misspelled_key_names_the_right_one_instead_of_plus(override, suggestion):
    with pytest.raises(ValueError, match=re.escape(f"Did you mean `{suggestion}`")) as info:
        check_override_keys(["+quant=qat", override])
    assert "+" + suggestion not in str(info.value)
    check_override_keys(["+quant=qat", "quant.qat.activation.observer.path=mse", "model.width=4",
                         "+quant.overrides.out={module: classifier, preset: int32_out}",
                         "hydra.run.dir=x", "+experiment=mine"])


@pytest.mark.parametrize(("override", "message"), [
    ("quant.qat.activation.observer.path=fixed_scale",
     "FixedScaleObserver, but it does not take `averaging_constant`. Fix: set "
     "quant.qat.activation.averaging_constant=null"),
    ("quant.qat.activation.dtype=qint9", "Expected `dtype` to be a QuantDType"),
    ("quant.qat.activation.averaging_constant=2", "averaging_constant` to be a number in [0, 1]"),
])
def test_config_value_errors_have_their_own_fix(tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        run(_compose(["+quant=qat", *TINY, override], tmp_path))
    assert "fx_helper.wrap" not in str(info.value)
    assert not (tmp_path / "logs").exists()


def test_misspelled_override_module_gets_a_close_name_not_tracing_advice(tmp_path):
    cfg = _compose(["+quant=qat", *TINY, "+quant.overrides.out={module: clasifier, preset: int32_out}"],
                   tmp_path)
    with pytest.raises(ValueError, match=r"'clasifier'.*Close names: \['classifier'\]") as info:
        run(cfg)
    assert "fx_helper.wrap" not in str(info.value)


# ---------------------------------------------------------------- item 7: qconfig _target_s
@pytest.mark.parametrize("override", [
    "quant.qat.activation.observer._target_=os.mkdir",
    "quant.qat.activation._target_=os.system",
    "quant.qat._target_=builtins.exec",
    "quant.qat.activation.observer.path=os.mkdir",
])
def test_qconfig_targets_are_restricted_to_quantization_classes(tmp_path, override, monkeypatch):
    monkeypatch.chdir(tmp_path)  # os.mkdir(path=<observer path>) would create a directory here
    cfg = _compose(["+quant=qat", override], tmp_path / "run")
    with pytest.raises(ValueError, match="to name an observer, fake-quant or QConfig class") as info:
        qconfig_builder.build_qconfig_trees(cfg.quant)
    assert "hq_lightning.quantization.MinMaxObserver" in str(info.value)  # says what is allowed
    assert "register_qconfig_class" in str(info.value)
    assert os.listdir(tmp_path) == []


class UserObserver(MinMaxObserver):
    pass


def test_a_registered_user_observer_is_accepted(tmp_path):
    path = f"{__name__}.UserObserver"
    cfg = _compose(["+quant=qat", f"quant.qat.activation.observer.path={path}"], tmp_path)
    with pytest.raises(ValueError, match="register_qconfig_class"):
        qconfig_builder.build_qconfig_trees(cfg.quant)
    qconfig_builder.register_qconfig_class(UserObserver)
    try:
        _, qat = qconfig_builder.build_qconfig_trees(cfg.quant)
        assert qat[""].activation.keywords["observer"] is UserObserver
    finally:
        qconfig_builder._REGISTERED.pop(path)
    with pytest.raises(TypeError, match="subclass of hq_lightning.quantization.ObserverBase"):
        qconfig_builder.register_qconfig_class(os.mkdir)


# ---------------------------------------------------------------- item 8: no QuantStub
class NoStubNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.bn(self.conv(x))), 1))


class Steps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def test_missing_quant_stub_fails_at_setup_naming_where_it_goes(tmp_path):
    steps = Steps()
    trainer = make_trainer(tmp_path, [QuantizationCallback(float_epochs=1), steps], max_epochs=2,
                           limit_train_batches=2, limit_val_batches=1)
    with pytest.raises(ValueError, match="to contain a QuantStub") as info:
        trainer.fit(ClassificationModule(NoStubNet()), digits())
    message = str(info.value)
    assert "in front of `model.conv` (Conv2d)" in message
    assert "after `model.fc` (Linear)" in message
    assert "ConvBN" not in message and "(Conv2d), the first" in message
    assert steps.steps == 0  # before the first step


# ---------------------------------------------------------------- item 15: the plan
def test_plan_is_printed_and_saved_before_training(tmp_path, capsys):
    cfg = _compose(["+quant=qat", *TINY, "+quant.overrides.out={module: classifier, preset: int32_out}",
                    "quant.export=[]"], tmp_path)
    run(cfg)
    plan = json.loads((tmp_path / "plan.json").read_text())
    rows = {row["module"]: row for row in plan}
    assert rows["quant"]["source"] == "global" and rows["quant"]["output_dtype"] == "qint8"
    assert rows["classifier"]["source"] == "override out (name classifier)"
    assert rows["classifier"]["output_dtype"] == "int32"
    assert rows["stem.0+stem.1+stem.2"]["float_type"] == "Conv2d+BatchNorm2d+ReLU6"
    assert rows["stem.0+stem.1+stem.2"]["output_observer"] == "MovingAveragePerTensorMinMaxObserver"
    assert "| classifier | Linear | override out" in (tmp_path / "plan.md").read_text()


def test_plan_sources_global_type_name_attribute():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    net[2].qconfig = default_qat_8bit_fake_quant_qconfig
    from hq_lightning.quantization import QuantStub

    model = nn.Sequential(QuantStub(), net)
    tree = {"": default_qat_8bit_fake_quant_qconfig,
            "module_type": [(nn.Conv2d, default_qat_8bit_fake_quant_qconfig)],
            "module_name": [("1.1", default_qat_8bit_fake_quant_qconfig)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, tree)
    sources = {e.module: e.source for e in quantization_plan(model, prepared, tree)}
    assert sources == {"0": "global", "1.0": "type Conv2d", "1.1.0": "name 1.1 (inherited)",
                       "1.2": "attribute"}


# ---------------------------------------------------------------- item 6: documented loads
def test_documented_load_paths_keep_weights_only():
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    module = importlib.import_module("hq_lightning.quantization.fx.graph_module")
    texts = {str(p): p.read_text() for p in docs} | {module.__file__: module.__doc__}
    for where, text in texts.items():
        assert "weights_only=False" not in text, where


def test_a_prepared_and_a_converted_model_round_trip_with_weights_only(tmp_path):
    from hq_lightning.models import TinyMobileNetV2
    from hq_lightning.quantization import convert_fx, set_fake_quantize
    from hq_lightning.quantization.state import FakeQuantState

    def build(convert):
        torch.manual_seed(0)
        model = prepare_qat_fx(TinyMobileNetV2(), {"": default_qat_8bit_fake_quant_qconfig})
        set_fake_quantize(model.train(), FakeQuantState.QAT)
        with torch.no_grad():
            model(torch.randn(8, 1, 16, 16))  # observe once, so every scale exists
        set_fake_quantize(model.eval(), FakeQuantState.VALIDATION)
        return convert_fx(model) if convert else model

    for convert in (False, True):
        saved = build(convert)
        for buffer in saved.buffers():
            if buffer.is_floating_point():
                buffer.add_(0.5)  # differs from a fresh build
        path = tmp_path / "state.pt"
        torch.save(saved.state_dict(), path)
        rebuilt = build(convert)  # the structure comes from code, the numbers from the file
        rebuilt.load_state_dict(torch.load(path, weights_only=True), strict=True)
        x = torch.randn(2, 1, 16, 16)
        assert torch.equal(rebuilt(x), saved(x))


# ---------------------------------------------------------------- docstrings of the new modules
@pytest.mark.parametrize("name", [
    "hq_lightning.app.overrides", "hq_lightning.app.resume", "hq_lightning.app.evaluate",
    "hq_lightning.quantization.plan", "hq_lightning.deploy.atomic_write",
    "hq_lightning.callbacks._checkpoint_file", "hq_lightning.callbacks._stub_check",
    "hq_lightning.callbacks._metrics_table",
])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
