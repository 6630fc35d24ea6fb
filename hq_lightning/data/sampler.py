"""A shuffling sampler whose order depends only on a seed and the epoch number."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """Shuffles ``range(num_samples)`` with a generator seeded by ``seed + epoch``.

    Lightning calls ``set_epoch`` at the start of every epoch, so the order of epoch ``e`` is the
    same in an uninterrupted run and in a run resumed from a checkpoint, and creating extra
    iterators (for calibration, say) never shifts the order of later epochs. torch's
    ``RandomSampler`` draws its seed from the global RNG instead, which a resumed run does not
    restore.

    Args:
        num_samples: size of the dataset.
        seed: base seed of the permutation.

    Example:
        >>> sampler = EpochSeededRandomSampler(5, seed=0)
        >>> first = list(sampler)
        >>> first == list(sampler)
        True
        >>> sampler.set_epoch(1)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"Expected `num_samples` to be an int >= 0, but got {num_samples!r}.")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
