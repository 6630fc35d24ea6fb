"""Hydra app end to end: the CLI in a subprocess (main job, fast_dev_run, a two-job sweep, an early
error) and the run function in-process (float only, PTQ, overrides reaching the prepared model).

Every run is tiny (a few batches of 16 digits); none asserts accuracy or time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from hq_lightning.app.qconfig_builder import build_qconfig_trees
from hq_lightning.app.schema import register_configs
from hq_lightning.cli import CONFIG_PATH, run

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "float_epochs=1",
    "quant.qat_epochs=1",
    "data.batch_size=16",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "quant.calibration_batches=2",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
]


def _train(args, tmp_path, expect_ok=True):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _tiny(quant: bool = True) -> list[str]:
    return [a for a in TINY if quant or not a.startswith("quant.")]


@pytest.mark.slow  # a subprocess running every phase: tens of seconds on 2 shared cores
def test_main_job_runs_all_phases_and_leaves_exports_in_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = _train(["+quant=qat", "march=bayes", *_tiny(), f"hydra.run.dir={run_dir}"], tmp_path)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert list(record["metrics"]) == ["float", "calibration", "qat", "quantized"]
    for metrics in record["metrics"].values():
        assert 0.0 <= metrics["val/acc"] <= 1.0
    assert record["march"] == "bayes"
    assert "+quant=qat" in record["overrides"]
    assert "Quantization phases" in result.stdout + result.stderr
    if platform.libc_ver()[0] == "glibc":
        assert "malloc thresholds: fixed" in result.stdout + result.stderr
    # the converted model is deployable: the TorchScript export runs on a float image batch
    scripted = torch.jit.load(str(run_dir / "quantized.pt"))
    logits = scripted(torch.zeros(3, 1, 16, 16))
    assert logits.shape == (3, 10)
    assert (run_dir / "logs" / "metrics.csv").is_file()


def test_fast_dev_run_still_converts(tmp_path):
    run_dir = tmp_path / "run"
    _train(
        [
            "+quant=qat",
            "march=bayes",
            "trainer.fast_dev_run=true",
            "data.batch_size=8",
            "quant.calibration_batches=1",
            "callbacks=none",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    record = json.loads((run_dir / "metrics.json").read_text())
    assert "quantized" in record["metrics"]


@pytest.mark.slow  # a subprocess running two jobs: tens of seconds on 2 shared cores
def test_two_job_sweep_collects_one_table(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = _train(
        [
            "-m",
            "+quant=qat",
            "quant.qat.activation.averaging_constant=0.01,0.1",
            *_tiny(),
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    for job in ("0", "1"):
        assert (sweep_dir / job / "metrics.json").is_file()
        assert (sweep_dir / job / "quantized.pt").is_file()
    lines = (sweep_dir / "summary.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["job", "quant.qat.activation.averaging_constant"]
    assert "quantized/val/acc" in header
    assert [line.split(",")[:2] for line in lines[1:]] == [["0", "0.01"], ["1", "0.1"]]
    assert "sweep summary (2 jobs)" in result.stdout


# ---------------------------------------------------------------- in-process runs


@pytest.fixture(scope="module", autouse=True)
def _schema():
    register_configs()


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "logger=csv", *overrides])


def test_float_only_without_quant(tmp_path):
    table = run(_compose(_tiny(quant=False), tmp_path))
    assert list(table) == ["float"]
    assert set(table["float"]) >= {"val/acc", "val/loss"}
    assert not (tmp_path / "quantized.pt").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["float"]["val/acc"] == (
        pytest.approx(table["float"]["val/acc"])
    )


def test_int16_on_bernoulli2_stops_before_training(tmp_path):
    cfg = _compose(["+quant=int16_act", "march=bernoulli2", *_tiny()], tmp_path)
    with pytest.raises(ValueError, match="Expected `march` to be one of bayes, bayes_e, nash"):
        run(cfg)
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "metrics.json").exists()


def test_ptq_calibrates_and_converts_without_qat(tmp_path):
    overrides = [a for a in _tiny() if a != "quant.qat_epochs=1"]
    table = run(_compose(["+quant=calib", *overrides, "quant.export=[]"], tmp_path))
    assert list(table) == ["float", "calibration", "quantized"]
    assert (tmp_path / "quantized_state_dict.pt").is_file()
    assert not (tmp_path / "quantized.pt").exists()


def test_override_aliases_reach_the_prepared_model(tmp_path):
    from hq_lightning.models import TinyMobileNetV2
    from hq_lightning.quantization import prepare_qat_fx

    cfg = _compose(
        [
            "+quant=qat",
            "+quant.overrides.out={module: classifier, preset: int32_out}",
            "+quant.overrides.head={module: head.0, qat: {activation: {observer: {path: minmax}, "
            "averaging_constant: 0.5}}}",
        ],
        tmp_path,
    )
    calibration, qat = build_qconfig_trees(cfg.quant)
    prepared = prepare_qat_fx(TinyMobileNetV2(), qat)
    assert prepared.classifier.activation_post_process is None  # int32 output
    assert prepared.classifier.weight_fake_quant is not None
    # head.0 (conv) fuses with its BN and ReLU6 into head.2, which keeps the conv's qconfig
    observer = prepared.head[2].activation_post_process.activation_post_process
    assert type(observer).__name__ == "MinMaxObserver"
    assert observer.averaging_constant == 0.5
    other = prepared.stem[2].activation_post_process.activation_post_process
    assert type(other).__name__ == "MovingAveragePerTensorMinMaxObserver"
    calibrated = prepare_qat_fx(TinyMobileNetV2(), calibration)
    assert calibrated.classifier.activation_post_process is None


def test_ptq_of_saved_float_weights(tmp_path):
    from hydra.utils import instantiate

    from hq_lightning.app.build import load_float_weights

    float_dir, ptq_dir = tmp_path / "float", tmp_path / "ptq"
    run(_compose(_tiny(quant=False), float_dir))
    (checkpoint,) = (float_dir / "logs" / "checkpoints").glob("*.ckpt")
    cfg = _compose(
        ["+quant=calib", *_tiny(), "float_epochs=0", f"init_from='{checkpoint}'"], ptq_dir
    )
    module = instantiate(cfg.model)
    load_float_weights(module, str(checkpoint))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    table = run(cfg)
    assert list(table) == ["calibration", "quantized"]
    with pytest.raises(FileNotFoundError, match="Expected `init_from`"):
        load_float_weights(module, str(tmp_path / "missing.ckpt"))


def test_resume_from_continues_the_schedule(tmp_path):
    import csv

    first, second = tmp_path / "first", tmp_path / "second"
    run(_compose(_tiny(quant=False), first))
    (checkpoint,) = (first / "logs" / "checkpoints").glob("*.ckpt")
    overrides = [a for a in _tiny(quant=False) if not a.startswith("float_epochs")]
    run(_compose([*overrides, "float_epochs=2", f"resume_from='{checkpoint}'"], second))
    with open(second / "logs" / "metrics.csv") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("epoch")}
    # epoch 0 came from the checkpoint; the final validate logs under the epoch counter (2)
    assert "1" in epochs and "0" not in epochs


def test_strict_float_islands_option_reaches_the_callback(tmp_path):
    from hq_lightning.app.build import build_quantization_callback

    cfg = _compose(["+quant=qat", "quant.allow_float_islands=false"], tmp_path)
    callback = build_quantization_callback(cfg, build_qconfig_trees(cfg.quant), str(tmp_path))
    assert callback.allow_float_islands is False
    default = _compose(["+quant=qat"], tmp_path)
    assert build_quantization_callback(default, build_qconfig_trees(default.quant), None).allow_float_islands
