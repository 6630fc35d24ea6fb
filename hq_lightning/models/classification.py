"""A generic LightningModule for image classification around any ``nn.Module``."""

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training of ``model`` with accuracy for validation and test.

    ``forward`` delegates to ``self.model`` with all positional and keyword arguments, so the
    quantization callback can replace ``model`` by a prepared or converted graph without touching
    this class. Batches are ``(images, labels)``. Logged names: ``train/loss``, ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        model: the network returning logits.
        num_classes: number of classes of the accuracy metric.
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty of the optimizer.
        cosine_epochs: if set, a cosine annealing schedule over this many epochs.

    Example:
        >>> module = ClassificationModule(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 3)
        >>> module(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 1e-2,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        cosine_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"Expected `optimizer` to be 'adam' or 'sgd', but got {optimizer!r}.")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images).float()
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images).float()
        self.test_acc(logits, labels)
        self.log("test/loss", F.cross_entropy(logits, labels))
        self.log("test/acc", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=1)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay
            )
        if hp.cosine_epochs is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.cosine_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
