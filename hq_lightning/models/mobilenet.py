"""A small MobileNetV2-style CNN: the embedded default model of hq_lightning."""

import torch
from torch import nn

from hq_lightning.quantization import DeQuantStub, QuantStub


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
             groups: int = 1, relu6: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu6:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear), plus ``x +`` when shapes allow.

    The residual ``+`` traces to a generated add that fuses with the project conv and its BN
    (conv output as the second operand), which is the Conv-BN-Add pattern the chip keeps in
    high precision.

    Example:
        >>> block = InvertedResidual(8, 8, stride=1, expand_ratio=2)
        >>> block(torch.zeros(1, 8, 4, 4)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"Expected `stride` to be 1 or 2, but got {stride!r}.")
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(_conv_bn(in_channels, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers.append(_conv_bn(hidden, out_channels, 1, relu6=False))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNetV2(nn.Module):
    """MobileNetV2-like classifier for small images, with input QuantStub and output DeQuantStub.

    Stem conv-BN-ReLU6, a stack of inverted-residual blocks (two stride-2 stages), a 1x1
    conv-BN-ReLU6, flatten and a linear classifier. The spatial size at the classifier is
    ``image_size / 4`` (``image_size`` must be divisible by 4). The input stub observes its
    scale unless ``input_scale`` pins it (e.g. ``1 / 128`` for inputs in [-1, 1)).

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        image_size: side of the square input.
        width: channels after the stem; later stages use ``2 * width``.
        expand_ratio: hidden-channel multiplier of the inverted residuals.
        input_scale: fixed scale of the input QuantStub, or ``None`` to observe it.

    Example:
        >>> model = TinyMobileNetV2(num_classes=10, in_channels=1, image_size=16)
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 16,
        width: int = 16,
        expand_ratio: int = 2,
        input_scale: float | None = None,
    ) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ValueError(f"Expected `image_size` to be divisible by 4, but got {image_size!r}.")
        wide = 2 * width
        self.quant = QuantStub(scale=input_scale)
        self.stem = _conv_bn(in_channels, width, 3)
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 1, expand_ratio),
            InvertedResidual(width, wide, 2, expand_ratio),
            InvertedResidual(wide, wide, 1, expand_ratio),
            InvertedResidual(wide, wide, 2, expand_ratio),
            InvertedResidual(wide, wide, 1, expand_ratio),
        )
        self.head = _conv_bn(wide, wide, 1)
        self.classifier = nn.Linear(wide * (image_size // 4) ** 2, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.stem(x)
        x = self.blocks(x)
        x = self.head(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return self.dequant(x)
