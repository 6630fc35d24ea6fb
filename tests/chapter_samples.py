"""Models written out in the user's chapter (user-guide-expert.md), shared by the tests that run them.

The code is the chapter's, with ``horizon_plugin_pytorch`` replaced by ``hq_lightning``.

Example:
    >>> import torch
    >>> RGB888Net()(torch.rand(1, 3, 8, 8)).shape
    torch.Size([1, 3, 6, 6])
"""

from __future__ import annotations

import torch

from hq_lightning.quantization import QuantStub
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig

__all__ = ["RGB888Net"]


class RGB888Net(torch.nn.Module):
    """The chapter's "RGB888 数据部署" sample ``Net``: quant -> conv -> bn -> relu, no DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = torch.nn.Conv2d(3, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.relu = torch.nn.ReLU()

    def forward(self, input):
        x = self.quant(input)
        x = self.conv(x)
        x = self.bn(x)
        x = self.relu(x)
        return x

    def set_qconfig(self):
        self.qconfig = default_qat_8bit_fake_quant_qconfig
