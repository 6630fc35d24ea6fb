"""The app's deploy group: ``+deploy=yuv +deploy=segments`` leaves every file, the manifest and the
``deployed`` column in the run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hq_lightning.app.build import merge_group_selections
from hq_lightning.deploy import load_manifest, run_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "float_epochs=1", "quant.qat_epochs=1", "data.batch_size=16", "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2", "quant.calibration_batches=2", "callbacks=none",
    "trainer.enable_progress_bar=false",
]


def test_group_selections_merge():
    assert merge_group_selections(["+deploy=yuv", "+deploy=[segments,yuv]"]) == ["+deploy=[yuv,segments]"]
    assert merge_group_selections(["+deploy=yuv", "a=1"]) == ["+deploy=yuv", "a=1"]


@pytest.mark.slow  # a subprocess running every phase and the deployment: ~10 s
def test_app_deploys_yuv_and_segments(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+quant=qat", "march=bayes", "+deploy=yuv",
         "+deploy=segments", *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert list(record["metrics"])[-2:] == ["quantized", "deployed"]
    assert "deployed" in result.stdout + result.stderr  # the table's column
    manifest = load_manifest(run_dir / "deploy" / "manifest.json")  # validates, files present
    assert manifest["yuv"]["swing"] == "full" and manifest["march"] == "bayes"
    assert {p.name for p in (run_dir / "deploy").iterdir()} == {
        "manifest.json", "model.pt", *(s["files"]["torchscript"] for s in manifest["stages"])
    }
    yuv = torch.randint(-128, 128, (2, 3, 16, 16)).float()
    whole = torch.jit.load(str(run_dir / "deploy" / "model.pt"))
    assert torch.equal(run_manifest(run_dir / "deploy" / "manifest.json", yuv), whole(yuv))
