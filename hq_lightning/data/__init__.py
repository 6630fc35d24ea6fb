"""Real datasets that install offline with the package (no download at run time)."""

from hq_lightning.data.base import InMemoryImageDataModule
from hq_lightning.data.colour_digits import ColourDigitsDataModule
from hq_lightning.data.digits import DigitsDataModule
from hq_lightning.data.mnist import MNISTDataModule
from hq_lightning.data.sampler import EpochSeededRandomSampler

__all__ = [
    "ColourDigitsDataModule",
    "DigitsDataModule",
    "EpochSeededRandomSampler",
    "InMemoryImageDataModule",
    "MNISTDataModule",
]
