"""Deploy a model trained on RGB images to the chip's centered-YUV input (the YUV input patch).

The chip's image pyramid delivers centered YUV444 (full swing, -128..127). Training on YUV is the
better fix; for a model already trained on RGB, the ``DeploymentCallback(yuv=True)`` inserts the
fixed-point ``centered_yuv2rgb`` right after the converted input QuantStub (whose scale becomes 1)
so the integer model takes YUV directly, at the cost of a little accuracy.

Here: colourised digits (RGB 0..255, normalised as (x - 128) / 128, ``ColourDigitsDataModule``),
trained float -> calibration -> QAT -> converted with the ``QuantizationCallback``; at the end of
fit the ``DeploymentCallback`` patches the converted model, validates it with the module's own
``validation_step`` on the same validation images converted by ``rgb2centered_yuv`` (the
``deployed`` column beside ``quantized``), exports it and writes ``deploy/manifest.json``.

    python recipes/rgb_model_yuv_deploy.py
    python recipes/rgb_model_yuv_deploy.py --float-epochs 1 --qat-epochs 1 --limit-batches 2
"""

from __future__ import annotations

import argparse
import os
import tempfile

import lightning.pytorch as pl

from hq_lightning.callbacks import DeploymentCallback, QuantizationCallback
from hq_lightning.data import ColourDigitsDataModule
from hq_lightning.models import ClassificationModule, TinyMobileNetV2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hq_recipe_yuv_")

    pl.seed_everything(0, verbose=False)
    data = ColourDigitsDataModule(batch_size=64, image_size=16)  # pixel_mean = pixel_std = 128
    # the input stub's scale is pinned to 1/128 for inputs in [-1, 1): the conversion's q_scale
    net = TinyMobileNetV2(num_classes=10, in_channels=3, image_size=16, input_scale=1 / 128)
    module = ClassificationModule(net, num_classes=10, lr=1e-2)
    quantization = QuantizationCallback(
        submodule="model",
        march="bayes",  # centered_yuv2rgb exists on BAYES and BAYES_E
        float_epochs=args.float_epochs,
        calibration_batches=8,
        output_dir=output_dir,
        export=(),
    )
    deployment = DeploymentCallback(yuv=True, swing="full")  # mean/std from the datamodule
    trainer = pl.Trainer(
        max_epochs=args.float_epochs + args.qat_epochs,
        callbacks=[quantization, deployment],
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)

    table = quantization.metrics_table
    result = {
        "converted_on_rgb_acc": table["quantized"]["val/acc"],
        "deployed_on_yuv_acc": table["deployed"]["val/acc"],
        "manifest": deployment.manifest_path,
        "torchscript": os.path.join(os.path.dirname(deployment.manifest_path), "model.pt"),
    }
    for name, value in result.items():
        print(f"{name:22s} {value:.4f}" if isinstance(value, float) else f"{name:22s} {value}")
    return result


if __name__ == "__main__":
    main()
