"""Quantize your own LightningModule by adding one callback to your Trainer (no Hydra).

Your module, your network, your data loaders: the only hq_lightning lines are the QuantStub /
DeQuantStub pair at the ends of the part to deploy and the ``QuantizationCallback`` in
``callbacks=[...]``. One ``trainer.fit`` then runs float epochs, calibration, QAT epochs and the
conversion to the integer model, and exports it.

    python recipes/add_callback_to_existing_trainer.py
    python recipes/add_callback_to_existing_trainer.py --float-epochs 1 --qat-epochs 1 --limit-batches 2
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_calib_8bit_weight_32bit_out_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
    default_qat_8bit_weight_32bit_out_fake_quant_qconfig,
)
from hq_lightning.quantization import DeQuantStub, QuantStub


class DigitNet(nn.Module):
    """A user's own network: conv-BN-ReLU features, a residual add and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()  # the integer model starts here ...
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        self.dequant = DeQuantStub()  # ... and ends here

    def forward(self, x):
        x = self.quant(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))  # fuses into one ConvBNAdd(ed)ReLU module
        x = torch.flatten(self.pool(x), 1)
        return self.dequant(self.fc(x))


class LitDigits(pl.LightningModule):
    """A user's own LightningModule: nothing in it knows about quantization."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = DigitNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 8x8 digits in [-1, 1]: 1500 for training, the rest for validation."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, val = order[:1500], order[1500:]
    return (
        DataLoader(TensorDataset(images[train], labels[train]), batch_size, shuffle=True),
        DataLoader(TensorDataset(images[val], labels[val]), 256),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=4)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    parser.add_argument("--march", default="bayes")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hq_recipe_")

    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders()
    quantization = QuantizationCallback(
        submodule="net",  # the attribute of the LightningModule to quantize
        march=args.march,
        # the classifier feeds the model output: keep its output in int32 (no output fake quant)
        calibration_qconfig={
            "": default_calib_8bit_fake_quant_qconfig,
            "module_name": {"fc": default_calib_8bit_weight_32bit_out_fake_quant_qconfig},
        },
        qat_qconfig={
            "": default_qat_8bit_fake_quant_qconfig,
            "module_name": {"fc": default_qat_8bit_weight_32bit_out_fake_quant_qconfig},
        },
        float_epochs=args.float_epochs,
        calibration_batches=8,
        output_dir=output_dir,
        export=("torchscript",),
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
    trainer.fit(LitDigits(), train_loader, val_loader)

    for phase, metrics in quantization.metrics_table.items():
        print(f"{phase:12s} val_acc {metrics['val_acc']:.4f}")
    print("converted model:", type(quantization.quantized_model).__name__)
    for kind, path in quantization.exported_files.items():
        print(f"{kind}: {path}")
    return quantization.metrics_table


if __name__ == "__main__":
    main()
