"""scikit-learn's handwritten digits (1797 8x8 images, shipped inside the sklearn wheel)."""

import numpy as np
import torch

from hq_lightning.data.base import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    """The UCI digits from :func:`sklearn.datasets.load_digits` as 1-channel images.

    The data is in scikit-learn's wheel, so it works offline. Pixel values 0..16 are scaled to
    [0, 1], optionally upscaled to ``image_size`` (16 gives the small CNN room for two stride-2
    stages), then normalised to [-1, 1]. The split is 70/15/15 by default.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, image_size=16)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((32, 1, 16, 16), torch.int64)
        >>> len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
        1797
    """

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        return images, labels
