"""QuantizationCallback under two-process CPU DDP (gloo): identical scales, accuracy as one process.

``strategy="ddp"`` relaunches its script once per rank, so the run lives in a script started as
a subprocess (the test process itself would be relaunched otherwise).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    torch.set_num_threads(1)
    from hq_lightning.callbacks import QuantizationCallback
    from hq_lightning.data import DigitsDataModule
    from hq_lightning.models import ClassificationModule, TinyMobileNetV2
    from hq_lightning.quantization import FakeQuantize

    out, devices = sys.argv[1], int(sys.argv[2])

    class SaveRankScales(Callback):
        def on_train_end(self, trainer, pl_module):
            found = {n: m.scale.clone() for n, m in pl_module.model.named_modules()
                     if isinstance(m, FakeQuantize)}
            torch.save(found, f"{out}/scales_rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=2, calibration_batches=4)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=devices,
                         strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
                         callbacks=[callback, SaveRankScales()])
    trainer.fit(ClassificationModule(TinyMobileNetV2(image_size=16, width=8)),
                DigitsDataModule(batch_size=32, image_size=16))
    if trainer.is_global_zero:
        with open(f"{out}/table.json", "w") as f:
            json.dump(callback.metrics_table, f)
""")


def run(directory, devices):
    directory.mkdir()
    script = directory / "fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, str(script), str(directory), str(devices)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=directory)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((directory / "table.json").read_text())


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    single = run(tmp_path / "single", 1)
    ddp = run(tmp_path / "ddp", 2)
    rank0 = torch.load(tmp_path / "ddp" / "scales_rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "scales_rank1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert list(ddp) == ["float", "calibration", "qat", "quantized"]
    single_acc, ddp_acc = single["quantized"]["val/acc"], ddp["quantized"]["val/acc"]
    assert single_acc > 0.85 and abs(ddp_acc - single_acc) < 0.06, (single_acc, ddp_acc)
    assert (tmp_path / "ddp" / "quantized" / "quantized.pt").is_file()
