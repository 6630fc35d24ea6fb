"""QuantizationCallback under two-process CPU DDP (gloo): identical scales, accuracy as one process;
``ddp_spawn`` hands rank 0's QAT and converted models back to the main process.

``strategy="ddp"`` relaunches its script once per rank and ``ddp_spawn`` re-imports its main
module, so each run lives in a script started as a subprocess.
"""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from test_callbacks import make_trainer
from torch import fx

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.callbacks._spawn_handoff import MainProcessHandoff
from hq_lightning.data import DigitsDataModule
from hq_lightning.models import ClassificationModule, TinyMobileNetV2
from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
from hq_lightning.quantization import convert_fx, prepare_qat_fx
from hq_lightning.quantization.state import FakeQuantState, set_fake_quantize

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


SPAWN_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch import fx
    from hq_lightning.callbacks import QuantizationCallback
    from hq_lightning.data import DigitsDataModule
    from hq_lightning.models import ClassificationModule, TinyMobileNetV2
    from hq_lightning.quantization import FakeQuantize

    class SaveRankState(Callback):
        def __init__(self, out):
            self.out = out

        def on_train_end(self, trainer, pl_module):
            scales = {n: m.scale.clone() for n, m in pl_module.model.named_modules()
                      if isinstance(m, FakeQuantize)}
            torch.save({"scales": scales, "state": pl_module.state_dict()},
                       f"{self.out}/rank{trainer.global_rank}.pt")

    if __name__ == "__main__":  # spawn re-imports this file in every worker
        out = sys.argv[1]
        torch.set_num_threads(1)
        pl.seed_everything(0)
        callback = QuantizationCallback(float_epochs=1, calibration_batches=2)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0,
                             limit_train_batches=3, limit_val_batches=2, default_root_dir=out,
                             callbacks=[callback, SaveRankState(out)])
        module = ClassificationModule(TinyMobileNetV2(image_size=16, width=8))
        trainer.fit(module, DigitsDataModule(batch_size=32, image_size=16))
        # what the main process ends with, for the test to compare with the ranks' files
        torch.save({"phase": callback.phase, "table": callback.metrics_table,
                    "exported": callback.exported_files,
                    "is_graph_module": isinstance(module.model, fx.GraphModule),
                    "state": module.state_dict(), "quantized": callback.quantized_model},
                   f"{out}/main.pt")
""")


@pytest.mark.slow
def test_ddp_spawn_hands_the_quantized_model_to_the_main_process(tmp_path):
    script = tmp_path / "fit_spawn.py"
    script.write_text(SPAWN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["scales"].keys() == rank1["scales"].keys() and len(rank0["scales"]) > 10
    for key in rank0["scales"]:
        assert torch.equal(rank0["scales"][key], rank1["scales"][key]), key

    main = torch.load(tmp_path / "main.pt", weights_only=False)
    assert main["phase"] == "done" and main["is_graph_module"]
    assert list(main["table"]) == ["float", "calibration", "qat", "quantized"]
    # the main process holds rank 0's trained QAT model: weights, BN statistics and scales
    assert main["state"].keys() == rank0["state"].keys()
    for key, value in rank0["state"].items():
        assert torch.equal(main["state"][key], value), key

    # ... and rank 0's converted model, which is what converting that QAT model gives
    module = ClassificationModule(TinyMobileNetV2(image_size=16, width=8))
    module.model = prepare_qat_fx(module.model, default_qat_8bit_fake_quant_qconfig, qat_mode="with_bn")
    module.load_state_dict(main["state"])
    module.eval()
    set_fake_quantize(module.model, FakeQuantState.VALIDATION)
    reconverted = convert_fx(module.model)
    quantized = main["quantized"]
    images = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(quantized(images), reconverted(images))
        scripted = torch.jit.load(main["exported"]["torchscript"])
        assert torch.equal(scripted(images[:1]), quantized(images[:1]))


def test_handoff_rebuilds_the_main_process_module_before_the_weights_load(tmp_path):
    """The spawn launcher's steps by hand, in one process (fast; the test above runs the real one)."""
    def trainer_with(callback):
        return make_trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=2, limit_val_batches=1)

    torch.manual_seed(0)
    main_callback = QuantizationCallback(float_epochs=1, calibration_batches=1, export=())
    main_module = ClassificationModule(TinyMobileNetV2(image_size=16, width=8))
    main_trainer = trainer_with(main_callback)
    # the worker gets pickled copies, trains and converts
    worker_callback, worker_module = pickle.loads(pickle.dumps((main_callback, main_module)))
    trainer_with(worker_callback).fit(worker_module, DigitsDataModule(batch_size=32, image_size=16))
    message = pickle.dumps(MainProcessHandoff(worker_callback._handoff_token,
                                              worker_callback._handoff_payload()))

    def recover(trainer):  # like _MultiProcessingLauncher.launch: read the queue, then load
        pickle.loads(message)
        trainer.lightning_module.load_state_dict(worker_module.state_dict(), strict=False)

    main_trainer.strategy._lightning_module = main_module  # what trainer.fit sets before launching
    recover(main_trainer)
    assert isinstance(main_module.model, fx.GraphModule)
    assert main_callback.phase == "done" and list(main_callback.metrics_table)[-1] == "quantized"
    for key, value in worker_module.state_dict().items():
        assert torch.equal(main_module.state_dict()[key], value), key
    images = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(main_callback.quantized_model(images), worker_callback.quantized_model(images))
