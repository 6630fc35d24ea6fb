"""bench/gpu_suite.sh runs end to end (issue 15 item 4): on CPU at tiny sizes, writing to a temporary
directory, so the suite is one command away from its first GPU figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_run_on_cpu_writes_every_section(tmp_path):
    pytest.importorskip("torchvision")
    results = ROOT / "bench" / "results" / "gpu.md"
    before = results.stat().st_mtime_ns if results.exists() else None
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    for heading in ("## 1. QAT step", "## 2. Fake quant", "## 3. Converted", "## 4. `pytest -m gpu` (exit status 0)"):
        assert heading in report
    for variant in ("| hq fuse_bn |", "| torch.ao |", "| hq fuse_bn compiled |", "| torch.ao compiled |"):
        assert variant in report
    assert "| resnet18 |" in report.split("## 3.")[1]
    # stage 1 warmed the three compiled steps (float, hq, torch.ao) side by side, none failed
    assert "compile warm-ups (3 in parallel):" in report
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # bench/results untouched
