"""DeploymentCallback with QuantizationCallback in a Trainer: YUV-deployed accuracy beside the
converted one, files and manifest at fit end, deployment and the deployed/ metric from a finished
checkpoint in trainer.validate/test, and the resume rules (a crashed phase is finished, a finished
one not redone)."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hq_lightning.callbacks import DeploymentCallback, QuantizationCallback
from hq_lightning.data import ColourDigitsDataModule
from hq_lightning.deploy import load_manifest, run_manifest
from hq_lightning.models import ClassificationModule, TinyMobileNetV2

torch.set_num_threads(1)


def _module():
    pl.seed_everything(0, verbose=False)
    return ClassificationModule(TinyMobileNetV2(in_channels=3, image_size=16, width=8), lr=1e-2)


def _run(tmp_path, deploy_dir, ckpt_path=None, fn="fit", **trainer_kwargs):
    quantization = QuantizationCallback(march="bayes", float_epochs=2, calibration_batches=4,
                                        output_dir=tmp_path / "quantized")
    deployment = DeploymentCallback(yuv=True, segments="auto", output_dir=deploy_dir)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(
        max_epochs=3, callbacks=[deployment, quantization, checkpoint], logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=6,
        num_sanity_val_steps=0, default_root_dir=tmp_path, **trainer_kwargs,
    )
    data = ColourDigitsDataModule(batch_size=64)
    getattr(trainer, fn)(_module(), datamodule=data, ckpt_path=ckpt_path)
    return trainer, quantization, deployment


@pytest.mark.slow  # trains three times on 1257 colour digits, then validate and test: ~7 s on one thread
def test_fit_deploys_and_resume_rules(tmp_path):
    deploy_dir = tmp_path / "deploy"
    deploy_dir.write_text("a file where the directory should be")  # the phase will crash
    with pytest.raises(Exception, match="deploy"):
        _run(tmp_path, deploy_dir)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    deploy_dir.unlink()

    # resumed after the crash: the phase runs (the training loop is already over)
    trainer, quantization, deployment = _run(tmp_path, deploy_dir, ckpt_path=str(last))
    assert deployment.status == "done"
    manifest = load_manifest(deployment.manifest_path)
    assert manifest["source"]["checkpoint"] == str(last)
    assert [s["device"] for s in manifest["stages"]] == ["bpu"]  # no inner split point
    assert manifest["yuv"]["mean"] == [128.0] * 3  # read from the datamodule

    # the YUV-deployed model, validated on the same images through rgb2centered_yuv
    table = quantization.metrics_table
    converted, deployed = table["quantized"]["val/acc"], table["deployed"]["val/acc"]
    # measured: equal here (270 images); the 8-bit YUV conversion moves logits by a few steps
    assert abs(deployed - converted) <= 2 / 270
    assert trainer.callback_metrics["deployed/val/acc"] == pytest.approx(deployed)

    # the files reproduce the deployed model
    images, _ = next(iter(trainer.datamodule.val_dataloader()))
    from hq_lightning.callbacks.deployment import YuvFeed

    yuv = YuvFeed(torch.nn.Identity(), 128.0, 128.0, "full")(images[:1])
    assert torch.equal(run_manifest(deployment.manifest_path, yuv), deployment.deployment.model(yuv))

    # resumed after success: not redone (the manifest of these weights is there)
    stamp = os.stat(deployment.manifest_path).st_mtime_ns
    done_ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(done_ckpt)
    _, _, again = _run(tmp_path, deploy_dir, ckpt_path=str(done_ckpt))
    assert again.status == "done" and again.deployment is None
    assert os.stat(deployment.manifest_path).st_mtime_ns == stamp

    # trainer.validate from the finished checkpoint deploys into a new directory and validates
    # the YUV-deployed model (a second pass of the validate loop) on the same images
    other = tmp_path / "deploy_from_validate"
    validator, checked, from_ckpt = _run(tmp_path, other, ckpt_path=str(done_ckpt), fn="validate")
    validated = load_manifest(from_ckpt.manifest_path)
    assert validated["source"]["fingerprint"] == manifest["source"]["fingerprint"]
    assert validated["source"]["checkpoint"] == str(done_ckpt)
    again_deployed = validator.callback_metrics["deployed/val/acc"]
    assert abs(float(again_deployed) - deployed) <= 2 / 270
    # the final table of validate: the scheduled pass and the deployed one, over the same images
    assert list(checked.evaluation_table) == ["validate", "deployed"]
    assert checked.evaluation_table["deployed"]["val/acc"] == pytest.approx(float(again_deployed))
    assert checked.evaluation_images == {"validate": 270, "deployed": 270}
    # the unprefixed figures stay those of the scheduled pass (the restored model), not the deployed one
    # the unprefixed figures stay those of the scheduled pass (the restored model: the quantized
    # arithmetic), not the deployed pass's
    assert float(validator.callback_metrics["val/loss"]) == pytest.approx(table["quantized"]["val/loss"])
    assert float(validator.callback_metrics["val/loss"]) != pytest.approx(table["deployed"]["val/loss"])
    assert checked.evaluation_table["validate"]["val/loss"] == pytest.approx(table["quantized"]["val/loss"])

    # trainer.test: the files of these weights are there (not rewritten); the deployed model is
    # still measured, with the module's test_step on the test images
    stamp = os.stat(from_ckpt.manifest_path).st_mtime_ns
    tester, tested, _ = _run(tmp_path, other, ckpt_path=str(done_ckpt), fn="test")
    assert os.stat(from_ckpt.manifest_path).st_mtime_ns == stamp
    test_images = len(tester.datamodule.test_dataloader().dataset)
    assert tested.evaluation_images == {"test": test_images, "deployed": test_images}
    deployed_test = tested.evaluation_table["deployed"]["test/acc"]
    assert float(tester.callback_metrics["deployed/test/acc"]) == pytest.approx(deployed_test)
    assert float(tester.callback_metrics["test/acc"]) == pytest.approx(tested.evaluation_table["test"]["test/acc"])
    assert abs(deployed_test - tested.evaluation_table["test"]["test/acc"]) <= 2 / test_images


def test_deployment_needs_one_quantization_callback(tmp_path):
    trainer = pl.Trainer(max_epochs=1, callbacks=[DeploymentCallback(yuv=True, mean=128.0, std=128.0)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="exactly one QuantizationCallback"):
        trainer.fit(_module(), datamodule=ColourDigitsDataModule(batch_size=64))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="swing"):
        DeploymentCallback(swing="tv")
    with pytest.raises(ValueError, match="export"):
        DeploymentCallback(export=("tflite",))
    with pytest.raises(ValueError, match="segments"):
        DeploymentCallback(segments=[])
