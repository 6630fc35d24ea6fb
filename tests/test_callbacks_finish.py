"""The end of the workflow survives faults (issue 12, items 1 and 9).

A full disk during export leaves the checkpoints and no half-written file, and says what to do; a
fit resumed from the last checkpoint then converts, validates and exports; a fit resumed after the
workflow finished does not redo it. Every artefact is written atomically. The full disk is
simulated by making the one function that writes bytes raise ENOSPC (no real disk is filled).
"""

import errno
import os
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_callbacks import classifier, digits, make_trainer

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.deploy import atomic_write, export_torchscript
from hq_lightning.deploy.atomic_write import (
    ArtefactWriteError,
    save_atomically,
    write_bytes_atomically,
)

torch.set_num_threads(1)
_REAL_WRITE = atomic_write._write_file


def _disk_full(handle, data, path):
    handle.write(data[: len(data) // 2])  # a partial write, as a full disk leaves it
    raise OSError(errno.ENOSPC, "No space left on device")


def _disk_full_for_models(handle, data, path):
    if os.path.basename(path).startswith("quantized"):
        _disk_full(handle, data, path)
    else:
        _REAL_WRITE(handle, data, path)


def _fit(tmp_path, ckpt_path=None):
    callback = QuantizationCallback(float_epochs=1, calibration_batches=2,
                                    output_dir=tmp_path / "quantized")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer = make_trainer(tmp_path, [callback, checkpoint], max_epochs=2, limit_train_batches=2,
                           limit_val_batches=2, enable_checkpointing=True)
    module = classifier()
    trainer.fit(module, digits(), ckpt_path=ckpt_path)
    return trainer, callback, module


def test_write_is_atomic_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_atomically({"old": torch.zeros(1)}, path)
    monkeypatch.setattr(atomic_write, "_write_file", _disk_full)
    with pytest.raises(ArtefactWriteError, match=r"model\.pt.*disk is full.*Free disk space") as info:
        save_atomically({"new": torch.ones(1000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    assert list(torch.load(path, weights_only=True)) == ["old"]  # the old file is untouched

    monkeypatch.undo()
    monkeypatch.setattr(atomic_write.shutil, "disk_usage", lambda _: SimpleNamespace(free=10))
    with pytest.raises(ArtefactWriteError, match="disk is full"):
        write_bytes_atomically(tmp_path / "other.bin", b"x" * 100)  # refused before writing
    assert not (tmp_path / "other.bin").exists()


def test_torchscript_export_to_a_full_disk_raises_instead_of_aborting(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_write, "_write_file", _disk_full)
    model = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(ArtefactWriteError, match=r"scripted\.pt.*disk is full"):
        export_torchscript(model, (torch.randn(2, 3),), tmp_path / "scripted.pt")
    assert os.listdir(tmp_path) == []


def test_full_disk_at_export_then_resume_finishes_the_workflow_once(tmp_path, monkeypatch):
    # the disk fills up during training: the plan (written at setup) fits, the models do not
    monkeypatch.setattr(atomic_write, "_write_file", _disk_full_for_models)
    with pytest.raises(ArtefactWriteError) as info:
        _fit(tmp_path)
    message = str(info.value)
    assert "quantized_state_dict.pt" in message and "disk is full" in message
    assert str(tmp_path / "ckpt") in message and "resume_from=last" in message
    out = tmp_path / "quantized"
    assert sorted(os.listdir(out)) == ["plan.json", "plan.md"]  # no model half-written
    last = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    assert last.is_file()

    # space freed: resuming from the last checkpoint skips training and finishes the workflow
    monkeypatch.undo()
    trainer, callback, _ = _fit(tmp_path, ckpt_path=last)
    assert callback.finished and callback.phase == "done"
    assert {"quantized.pt", "quantized_state_dict.pt"} <= set(os.listdir(out))
    assert "quantized" in callback.metrics_table
    scripted = torch.jit.load(str(out / "quantized.pt"))
    assert scripted(torch.zeros(2, 1, 16, 16)).shape == (2, 10)

    # a checkpoint written after the workflow finished records it: resuming does not redo it
    finished = tmp_path / "finished.ckpt"
    trainer.save_checkpoint(finished)
    for name in os.listdir(out):
        os.remove(out / name)
    _, callback, _ = _fit(tmp_path, ckpt_path=finished)
    assert callback.finished and callback.quantized_model is None
    assert not any(name.startswith("quantized") for name in os.listdir(out))
