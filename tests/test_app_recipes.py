"""Every recipe runs on tiny settings (in-process: the recipes' own `main(argv)`)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["--float-epochs", "1", "--qat-epochs", "1", "--limit-batches", "2"]


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_has_a_test():
    tested = {
        "add_callback_to_existing_trainer",
        "qconfig_sweep",
        "rgb_model_yuv_deploy",
        "retinanet_wrap",
        "two_stage_segments",
    }
    assert {p.stem for p in RECIPES.glob("*.py")} == tested


def test_add_callback_to_existing_trainer(tmp_path):
    table = _recipe("add_callback_to_existing_trainer").main([*TINY, "--output-dir", str(tmp_path)])
    assert list(table) == ["float", "calibration", "qat", "quantized"]
    scripted = torch.jit.load(str(tmp_path / "quantized.pt"))
    assert scripted(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow  # a two-job sweep: tens of seconds on 2 shared cores
def test_qconfig_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    header, rows = _recipe("qconfig_sweep").main(
        [
            "--observers",
            "percentile,mse",
            "--averaging-constants",
            "0.01",
            "--",
            "float_epochs=1",
            "quant.qat_epochs=1",
            "data.batch_size=16",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=2",
            "quant.calibration_batches=2",
            "callbacks=none",
            "logger=csv",
            "quant.export=[]",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert header[1] == "quant.calibration.activation.observer.path"
    assert [row[1] for row in rows] == ["percentile", "mse"]
    assert "quantized/val/acc" in header
    record = json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())
    assert "quant.calibration.activation.observer.path=mse" in record["overrides"]
    assert (tmp_path / "sweep" / "summary.md").is_file()


@pytest.mark.slow  # trains, converts, patches and traces: tens of seconds on 2 shared cores
def test_rgb_model_yuv_deploy(tmp_path):
    result = _recipe("rgb_model_yuv_deploy").main(
        [*TINY, "--output-dir", str(tmp_path)]
    )
    # the YUV-deployed model, validated on the same images through rgb2centered_yuv, decides
    # almost like the converted model (full recipe: 0.9741 both, 270 images)
    assert abs(result["deployed_on_yuv_acc"] - result["converted_on_rgb_acc"]) <= 0.05
    scripted = torch.jit.load(result["torchscript"])
    assert scripted(torch.zeros(1, 3, 16, 16)).shape == (1, 10)


def test_retinanet_wrap():
    result = _recipe("retinanet_wrap").main(["--steps", "3"])
    assert all(math.isfinite(v) for v in result.values())
    assert 0.0 <= result["converted_mean_iou"] <= 1.0


def test_two_stage_segments(tmp_path):
    result = _recipe("two_stage_segments").main([*TINY, "--output-dir", str(tmp_path)])
    assert [Path(p).name for p in result["stages"]] == [
        "stage0_bpu.pt",
        "stage1_cpu.pt",
        "stage2_bpu.pt",
    ]
    assert Path(result["manifest"]).is_file()
    for path in result["stages"]:
        assert isinstance(torch.jit.load(path), torch.jit.ScriptModule)


@pytest.fixture(autouse=True)
def _restore_march():
    from hq_lightning.march import get_march, set_march

    before = get_march()
    yield
    set_march(before)
