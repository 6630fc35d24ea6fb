"""The digits of :class:`DigitsDataModule` in colour: RGB images for YUV-input deployment."""

import numpy as np
import torch
import torch.nn.functional as F

from hq_lightning.data.base import InMemoryImageDataModule


class ColourDigitsDataModule(InMemoryImageDataModule):
    """scikit-learn's digits as 3-channel RGB images, each with a random ink and paper colour.

    Pixels are 8-bit RGB values (0..255, integers, as a camera delivers them) normalised with
    ``(x - pixel_mean) / pixel_std``, ``pixel_mean = pixel_std = 128``: the normalisation the YUV
    input patch (``DeploymentCallback(yuv=True)``) reads to turn validation images back into
    pixels and then into centered YUV.

    Args:
        colour_seed: seed of the random colours (fixed per image, independent of ``seed``).
        **kwargs: as :class:`InMemoryImageDataModule` (``image_size`` default 16).

    Example:
        >>> dm = ColourDigitsDataModule(batch_size=8)
        >>> dm.setup()
        >>> x, _ = next(iter(dm.val_dataloader()))
        >>> tuple(x.shape), bool(((x * 128 + 128) == (x * 128 + 128).round()).all())
        ((8, 3, 16, 16), True)
    """

    pixel_mean = (128.0, 128.0, 128.0)
    pixel_std = (128.0, 128.0, 128.0)

    def __init__(self, colour_seed: int = 0, image_size: int | None = 16, **kwargs) -> None:
        super().__init__(image_size=image_size, **kwargs)
        self.colour_seed = int(colour_seed)

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        ink = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
        if self.image_size is not None:
            ink = F.interpolate(ink, size=self.image_size, mode="bilinear", align_corners=False)
        generator = torch.Generator().manual_seed(self.colour_seed)
        n = ink.shape[0]
        fg = 128 + 127 * torch.rand(n, 3, 1, 1, generator=generator)
        bg = 100 * torch.rand(n, 3, 1, 1, generator=generator)
        rgb = (bg + (fg - bg) * ink).round().clamp(0, 255)
        return rgb, torch.from_numpy(bunch.target.astype(np.int64))

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.pixel_mean).reshape(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std).reshape(1, 3, 1, 1)
        return (images - mean) / std
