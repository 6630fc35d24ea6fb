"""The app's `quant.report=true` / `+quant=auto_int16` and `hq-report ckpt=... data=...`."""

import json
from pathlib import Path

import pytest

from hq_lightning.app.report_cli import main, parse_arguments
from tests.test_app_cli import _tiny, _train


def test_arguments_are_checked():
    assert parse_arguments(["ckpt=a.ckpt", "data=digits", "out=o"]) == ("a.ckpt", "o", 4, ["data=digits"])
    with pytest.raises(ValueError, match="ckpt="):
        parse_arguments(["data=digits"])
    with pytest.raises(ValueError, match="key=value"):
        parse_arguments(["ckpt"])
    with pytest.raises(ValueError, match="batches"):
        parse_arguments(["ckpt=a", "batches=0"])
    assert main(["data=digits"]) == 2


def test_auto_int16_on_a_march_without_int16_stops_before_training(tmp_path):
    result = _train(["+quant=auto_int16", "march=bernoulli2", *_tiny()], tmp_path, expect_ok=False)
    assert result.returncode != 0 and "march with int16" in result.stderr + result.stdout


@pytest.mark.slow  # a subprocess running every phase, then the report from its checkpoint
def test_app_report_and_hq_report_from_its_checkpoint(tmp_path):
    _train(["+quant=auto_int16", "march=bayes", "quant.report_batches=2", "hydra.run.dir=run", *_tiny()], tmp_path)
    report = tmp_path / "run" / "report"
    for name in ("calibration", "quantized"):
        assert (report / f"{name}.md").is_file() and (report / f"{name}_sqnr.png").is_file()
    promoted = json.loads((report / "calibration.json").read_text())["int16_layers"]
    assert 1 <= len(promoted) <= 3
    (ckpt,) = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert main([f"ckpt={ckpt}", "data=digits", "batches=2", f"out={tmp_path / 'again'}"]) == 0
    data = json.loads((tmp_path / "again" / "checkpoint.json").read_text())
    assert data["int16_layers"] == promoted
    rows = {row["path"]: row for row in data["layers"]}
    assert all(rows[p]["dtype"] == "qint16" for p in promoted)
    assert Path(tmp_path / "again" / "checkpoint_histograms.png").is_file()
