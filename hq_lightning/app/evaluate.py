"""The held-out test split, evaluated once at the end of a run, and the images behind each figure.

The main job's validation split is small (270 digits: one image is 0.37 accuracy points), so every
figure the app prints says how many images it is over. The test split is used once, at the end,
on the model the run delivers: the converted integer model with ``+quant`` (swapped in for the
quantized submodule), else the float model.

Example:
    >>> from hq_lightning.app.evaluate import ImageCounter
    >>> counter = ImageCounter("test")
    >>> counter.on_test_batch_start(None, None, (__import__("torch").zeros(5, 1, 8, 8), None), 0)
    >>> counter.images
    5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from hq_lightning.callbacks._metrics_table import images_note
from hq_lightning.callbacks._submodule import get_submodule, set_submodule
from hq_lightning.callbacks.quantization import batch_length

__all__ = ["ImageCounter", "TestResult", "evaluate_test_split", "validate_counting_images"]


class ImageCounter(pl.Callback):
    """Counts the images of the validation or test batches of one evaluation (summed over ranks)."""

    def __init__(self, split: str) -> None:
        if split not in ("validation", "test"):
            raise ValueError(f"Expected `split` to be 'validation' or 'test', but got {split!r}.")
        self.split = split
        self.images = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.split == "validation" and not (trainer is not None and trainer.sanity_checking):
            self.images += batch_length(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.split == "test":
            self.images += batch_length(batch)

    def _reduce(self, trainer: pl.Trainer) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(self.images)), reduce_op="sum")
        self.images = int(total.item())

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.split == "validation" and not trainer.sanity_checking:
            self._reduce(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        if self.split == "test":
            self._reduce(trainer)


@dataclass
class TestResult:
    """One evaluation of the test split."""

    label: str  # which model: "quantized" (the converted one), "qat", "calibration" or "float"
    metrics: dict[str, float]
    images: int

    @property
    def title(self) -> str:
        return f"Test split ({self.label} model)"

    @property
    def note(self) -> str:
        return images_note({self.label: self.images}, split="test")


def validate_counting_images(trainer: pl.Trainer, module: Any, datamodule: Any) -> tuple[dict, int]:
    """``trainer.validate`` once, returning its metrics and the number of validation images."""
    counter = ImageCounter("validation")
    trainer.callbacks.append(counter)
    try:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.callbacks.remove(counter)
    return (dict(results[0]) if results else {}), counter.images


def evaluate_test_split(
    trainer: pl.Trainer, module: Any, datamodule: Any, quantization: Any = None
) -> TestResult | None:
    """Test the model the run delivers on the datamodule's test split; ``None`` without one.

    Args:
        trainer: the trainer that ran ``fit``.
        module: the LightningModule (its ``test_step`` computes the metrics).
        datamodule: a DataModule with a ``test_dataloader``.
        quantization: the run's ``QuantizationCallback``; its converted model, when there is one,
            is put in place of the quantized submodule for the test and taken out afterwards.
    """
    if datamodule is None or not is_overridden("test_dataloader", datamodule):
        return None
    if not is_overridden("test_step", module) or trainer.limit_test_batches == 0:
        return None
    label, restore = "float", None
    if quantization is not None:
        converted = quantization.quantized_model
        label = "quantized" if converted is not None else quantization.phase
        if converted is not None:
            restore = get_submodule(module, quantization.submodule)
            set_submodule(module, quantization.submodule, converted)
    counter = ImageCounter("test")
    trainer.callbacks.append(counter)
    try:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.callbacks.remove(counter)
        if restore is not None:
            set_submodule(module, quantization.submodule, restore)
    metrics = {name: float(value) for name, value in (results[0] if results else {}).items()}
    return TestResult(label=label, metrics=metrics, images=counter.images)
