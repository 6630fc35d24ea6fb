"""QuantizationCallback checkpoints: interrupt in every phase, resume exactly; load in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_callbacks import FailOnTrainStep, Recorder, classifier, digits, make_trainer, scales

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.callbacks.quantization import default_calibration_step

torch.set_num_threads(1)

FLOAT_EPOCHS, MAX_EPOCHS, BATCHES = 2, 4, 4


class Interrupted(RuntimeError):
    pass


class InterruptAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"simulated crash at the start of epoch {self.epoch}")


class CrashingCalibration:
    """A calibration step that crashes after a few batches (crash in the middle of calibration)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pl_module, batch):
        self.calls += 1
        if self.calls == 2:
            raise Interrupted("simulated crash during calibration")
        default_calibration_step(pl_module, batch)


def run(tmp_path, name, extra_callbacks=(), ckpt_path=None, calibration_step=None):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=FLOAT_EPOCHS, calibration_batches=3,
                                    convert_at_end=False, calibration_step=calibration_step)
    recorder = Recorder(callback)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, save_top_k=-1)
    module = classifier()
    trainer = make_trainer(tmp_path, [callback, recorder, checkpoint, *extra_callbacks],
                           max_epochs=MAX_EPOCHS, limit_train_batches=BATCHES, limit_val_batches=2,
                           enable_checkpointing=True)
    trainer.fit(module, digits(), ckpt_path=ckpt_path)
    return module, callback, recorder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("reference")
    module, callback, recorder = run(tmp_path, "ckpt")
    assert recorder.phases == ["float", "float", "qat", "qat"]
    return tmp_path, module, callback, recorder


def ckpt(directory, epoch):
    return directory / f"epoch={epoch}-step={BATCHES * (epoch + 1)}.ckpt"


@pytest.mark.parametrize(
    ("phase", "resume_epoch"),
    [("float", 0), ("calibration", FLOAT_EPOCHS - 1), ("qat", FLOAT_EPOCHS)],
)
def test_interrupt_and_resume_continues_identically(tmp_path, reference, phase, resume_epoch):
    ref_dir, ref_module, ref_callback, ref_recorder = reference
    if phase == "calibration":
        with pytest.raises(Interrupted, match="during calibration"):
            run(tmp_path, "ckpt", calibration_step=CrashingCalibration())
    else:
        with pytest.raises(Interrupted):
            run(tmp_path, "ckpt", extra_callbacks=[InterruptAtEpoch(resume_epoch + 1)])
    path = ckpt(tmp_path / "ckpt", resume_epoch)
    assert path.is_file() and not ckpt(tmp_path / "ckpt", resume_epoch + 1).exists()
    saved_phase = torch.load(path, weights_only=False)["callbacks"][ref_callback.state_key]["phase"]
    assert saved_phase == ("qat" if phase == "qat" else "float")

    module, callback, recorder = run(tmp_path, "resumed", ckpt_path=path)
    assert recorder.phase_at_fit_start == saved_phase  # restored before the strategy set up
    expected_phases = ref_recorder.phases[resume_epoch + 1:]
    assert recorder.phases == expected_phases
    assert recorder.losses, "the resumed run trained"
    for step, loss in recorder.losses.items():
        assert loss == pytest.approx(ref_recorder.losses[step], abs=1e-6), (phase, step)
    ref_scales, got_scales = scales(ref_module.model), scales(module.model)
    assert ref_scales.keys() == got_scales.keys()
    for key in ref_scales:
        assert torch.allclose(got_scales[key], ref_scales[key], rtol=0, atol=1e-7), key
    ref_state, got_state = ref_module.state_dict(), module.state_dict()
    for key in ref_state:
        assert torch.allclose(got_state[key].float(), ref_state[key].float(), atol=1e-6), key


def test_validate_predict_and_test_from_a_qat_checkpoint(reference, tmp_path):
    ref_dir, ref_module, ref_callback, _ = reference
    path = ckpt(ref_dir / "ckpt", MAX_EPOCHS - 1)
    limits = dict(limit_val_batches=2, limit_test_batches=2, limit_predict_batches=2)
    trainer = make_trainer(tmp_path, [ref_callback], max_epochs=1, **limits)  # no re-prepare
    (expected,) = trainer.test(ref_module, digits(), verbose=False)

    module = classifier()
    callback = QuantizationCallback(float_epochs=FLOAT_EPOCHS)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1, **limits)
    (validated,) = trainer.validate(module, digits(), ckpt_path=path, verbose=False)
    assert callback.phase == "qat" and callback.calibrated
    assert validated["val/acc"] > 0.1
    predictions = trainer.predict(module, digits(), ckpt_path=path)
    assert torch.cat(predictions).shape == (2 * 64,)
    (tested,) = trainer.test(module, digits(), ckpt_path=path, verbose=False)
    assert tested["test/acc"] == pytest.approx(expected["test/acc"], abs=1e-6)

    # the path assigned to trainer.ckpt_path beforehand (Lightning's user-managed form)
    callback = QuantizationCallback(float_epochs=FLOAT_EPOCHS)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1, **limits)
    trainer.ckpt_path = path
    (assigned,) = trainer.validate(classifier(), digits(), verbose=False)
    assert callback.phase == "qat"
    assert assigned["val/acc"] == pytest.approx(validated["val/acc"], abs=1e-6)

    # a fresh process knows nothing but the checkpoint file
    script = textwrap.dedent(f"""
        import json, torch, lightning.pytorch as pl
        torch.set_num_threads(1)
        from hq_lightning.callbacks import QuantizationCallback
        from hq_lightning.data import DigitsDataModule
        from hq_lightning.models import ClassificationModule, TinyMobileNetV2
        module = ClassificationModule(TinyMobileNetV2(image_size=16, width=8))
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             limit_test_batches=2, callbacks=[QuantizationCallback(float_epochs={FLOAT_EPOCHS})])
        (result,) = trainer.test(module, DigitsDataModule(batch_size=64, image_size=16),
                                 ckpt_path={str(path)!r}, verbose=False)
        print("RESULT" + json.dumps(result))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    fresh = json.loads(line[len("RESULT"):])
    assert fresh["test/acc"] == pytest.approx(expected["test/acc"], abs=1e-6)
    assert fresh["test/loss"] == pytest.approx(expected["test/loss"], abs=1e-5)


def test_checkpoint_without_callback_state_is_rejected(tmp_path, reference):
    # a float checkpoint: refused before its weights meet the prepared structure
    module = classifier()
    trainer = make_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                           enable_checkpointing=True)
    trainer.fit(module, digits())
    path = trainer.checkpoint_callback.best_model_path
    trainer = make_trainer(tmp_path, [QuantizationCallback(), FailOnTrainStep()], max_epochs=2)
    with pytest.raises(RuntimeError, match="saved without this callback"):
        trainer.fit(classifier(), digits(), ckpt_path=path)

    # QAT weights without the callback's state (save_weights_only=True): the phase is unknown
    ref_dir = reference[0]
    checkpoint = torch.load(ckpt(ref_dir / "ckpt", MAX_EPOCHS - 1), weights_only=False)
    weights_only = {k: v for k, v in checkpoint.items() if k != "callbacks"}
    torch.save(weights_only, tmp_path / "weights_only.ckpt")
    trainer = make_trainer(tmp_path, [QuantizationCallback(float_epochs=FLOAT_EPOCHS)], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"weights_only.ckpt.*to hold the state of QuantizationCallback"):
        trainer.validate(classifier(), digits(), ckpt_path=tmp_path / "weights_only.ckpt", verbose=False)
