"""Shared machinery of the embedded image-classification DataModules."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hq_lightning.data.sampler import EpochSeededRandomSampler
from hq_lightning.data.split import split_indices


class InMemoryImageDataModule(pl.LightningDataModule):
    """Images held as one tensor, split once, served as ``(image, label)`` batches.

    Subclasses implement :meth:`load_arrays` returning ``(images [N, C, H, W] float in [0, 1],
    labels [N] int64)``. Images are resized to ``image_size`` (bilinear) and normalised to
    ``(x - 0.5) / 0.5``, i.e. [-1, 1], which suits a symmetric int8 input QuantStub.

    Args:
        batch_size: batch size of every loader.
        image_size: side of the square images served; ``None`` keeps the native size.
        val_fraction: share of the samples held out for validation.
        test_fraction: share held out for testing (disjoint from validation).
        seed: seed of the split and of the per-epoch shuffling.
        num_workers: DataLoader workers.
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be an int >= 1, but got {batch_size!r}.")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(
                f"Expected `image_size` to be None or an int >= 1, but got {image_size!r}."
            )
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set = self.val_set = self.test_set = None

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None and tuple(images.shape[-2:]) != (
            self.image_size,
            self.image_size,
        ):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return (images - 0.5) / 0.5

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_arrays()
        images = self.prepare_images(images.float()).contiguous()
        train, val, test = split_indices(len(labels), self.val_fraction, self.test_fraction, self.seed)
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one served image."""
        self.setup()
        return tuple(self.train_set.tensors[0].shape[1:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(len(self.train_set), seed=self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
