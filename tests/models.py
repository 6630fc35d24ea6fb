"""Float models shaped like torchvision's ResNet-18 and MobileNetV2, written the way users write them.

They use plain ``+`` for residuals and functional ``F.relu`` / ``F.relu6``, wrap the network in
``QuantStub`` / ``DeQuantStub`` and need no torchvision (which does not install beside the CPU
torch build here). Defaults reproduce the real layer shapes (ResNet-18: 11.7 M parameters,
MobileNetV2: 3.5 M); ``width`` / ``width_mult`` and ``num_classes`` shrink them for fast tests.

Shared by several test files and by ``bench/``.

Example:
    >>> import torch
    >>> net = resnet18(width=8, num_classes=10)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.quantization.stubs import DeQuantStub, QuantStub

__all__ = ["BasicBlock", "InvertedResidual", "MobileNetV2", "ResNet18", "mobilenet_v2", "resnet18"]


class Stubbed(nn.Module):
    """``QuantStub -> model -> DeQuantStub``, the dequant on every tensor the model returns (a dict,
    a tuple or a list too): how a user marks a torchvision model's quantized part."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant, self.model, self.dequant = QuantStub(), model, DeQuantStub()

    def forward(self, x: torch.Tensor):
        out = self.model(self.quant(x))
        if isinstance(out, dict):
            return {k: self.dequant(v) for k, v in out.items()}
        if isinstance(out, (tuple, list)):
            return tuple(self.dequant(v) for v in out)
        return self.dequant(out)


def _spread_batch_norm_affine(model: nn.Module) -> None:
    # non-trivial BN weight and bias so that BN folding is exercised by tests
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu, conv-bn, ``+`` shortcut, relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout (7x7 stem, max pool, 4 stages of 2 blocks, fc).

    Args:
        width: channels of the first stage (64 in the real network); stages use 1x, 2x, 4x, 8x.
        num_classes: outputs of the classifier.
    """

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, width * 2, width * 4, width * 8]
        in_planes = width
        stages = []
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.dequant = DeQuantStub()
        _spread_batch_norm_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.dequant(self.fc(x))


def _make_divisible(v: float, divisor: int = 8) -> int:
    # torchvision's channel rounding, so width_mult=1.0 gives the real channel counts
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Module):
    """Conv2d -> BatchNorm2d -> functional ReLU6."""

    def __init__(self, in_planes: int, out_planes: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, ``+`` shortcut when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers.append(ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden))
        self.conv = nn.Sequential(*layers)
        self.project = nn.Conv2d(hidden, oup, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(oup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_bn(self.project(self.conv(x)))
        if self.use_res_connect:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` layout.

    Args:
        width_mult: channel multiplier (1.0 is the real network).
        num_classes: outputs of the classifier.
        last_channel: channels of the last 1x1 conv before width scaling (1280 in the real network).
    """

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, last_channel: int = 1280) -> None:
        super().__init__()
        self.quant = QuantStub()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTINGS:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        self.dequant = DeQuantStub()
        _spread_batch_norm_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier(self.dropout(x))
        return self.dequant(x)


def resnet18(width: int = 64, num_classes: int = 1000) -> ResNet18:
    """ResNet-18-shaped float model (real shapes with the defaults)."""
    return ResNet18(width=width, num_classes=num_classes)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, last_channel: int = 1280) -> MobileNetV2:
    """MobileNetV2-shaped float model (real shapes with the defaults)."""
    return MobileNetV2(width_mult=width_mult, num_classes=num_classes, last_channel=last_channel)
