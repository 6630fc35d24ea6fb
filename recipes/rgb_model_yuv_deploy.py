"""Deploy a model trained on RGB images to the chip's centered-YUV input (``patch_yuv_input``).

The chip's image pyramid delivers centered YUV444 (full swing, -128..127). Training on YUV is the
better fix; for a model already trained on RGB, ``hq_lightning.deploy.patch_yuv_input`` inserts
the fixed-point ``centered_yuv2rgb`` right after the converted input QuantStub (whose scale becomes
1) so the integer model takes YUV directly, at the cost of a little accuracy.

Here: colourised digits (RGB 0..255, normalised as (x - 128) / 128), trained float -> calibration
-> QAT -> converted with the QuantizationCallback; then the converted model is evaluated on RGB
and the patched one on the same images converted to centered YUV.

    python recipes/rgb_model_yuv_deploy.py
    python recipes/rgb_model_yuv_deploy.py --float-epochs 1 --qat-epochs 1 --limit-batches 2
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.deploy import export_torchscript, patch_yuv_input
from hq_lightning.functional import rgb2centered_yuv
from hq_lightning.models import ClassificationModule, TinyMobileNetV2

MEAN, STD = 128.0, 128.0


def colourised_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits upscaled to 16x16, each with a random bright ink and dark paper colour (0..255)."""
    digits = load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    ink = F.interpolate(ink, size=16, mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    n = ink.shape[0]
    fg = 128 + 127 * torch.rand(n, 3, 1, 1, generator=generator)
    bg = 100 * torch.rand(n, 3, 1, 1, generator=generator)
    rgb = (bg + (fg - bg) * ink).round().clamp(0, 255)
    return rgb, torch.tensor(digits.target)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--eval-images", type=int, default=None, help="default: all held out")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hq_recipe_yuv_")

    pl.seed_everything(0, verbose=False)
    rgb, labels = colourised_digits()
    normalised = (rgb - MEAN) / STD
    train, val = torch.arange(0, 1400), torch.arange(1400, len(labels))
    train_loader = DataLoader(TensorDataset(normalised[train], labels[train]), 64, shuffle=True)
    val_loader = DataLoader(TensorDataset(normalised[val], labels[val]), 64)

    # the input stub's scale is pinned to 1/128 for inputs in [-1, 1): it becomes the q_scale
    # of the inserted conversion
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
    trainer = pl.Trainer(
        max_epochs=args.float_epochs + args.qat_epochs,
        callbacks=[quantization],
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_loader, val_loader)

    converted = quantization.quantized_model.eval()
    val = val[: args.eval_images]
    patched = patch_yuv_input(converted, swing="full", mean=MEAN, std=STD)
    yuv = rgb2centered_yuv(rgb[val], swing="full").float()  # what the camera pipeline delivers
    with torch.no_grad():
        rgb_pred = converted(normalised[val]).argmax(1)
        yuv_pred = patched(yuv).argmax(1)
    result = {
        "converted_on_rgb_acc": (rgb_pred == labels[val]).float().mean().item(),
        "patched_on_yuv_acc": (yuv_pred == labels[val]).float().mean().item(),
        "prediction_agreement": (rgb_pred == yuv_pred).float().mean().item(),
    }
    for name, value in result.items():
        print(f"{name:22s} {value:.4f}")
    path = f"{output_dir}/yuv_input_model.pt"
    export_torchscript(patched, yuv[:2], path)
    print("deployable YUV-input model:", path)
    result["torchscript"] = path
    return result


if __name__ == "__main__":
    main()
