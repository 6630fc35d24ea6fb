"""Models written out in the user's chapter (user-guide-expert.md), shared by the tests that run them.

The code is the chapter's, with ``horizon_plugin_pytorch`` replaced by ``hq_lightning``.

Example:
    >>> import torch
    >>> RGB888Net()(torch.rand(1, 3, 8, 8)).shape
    torch.Size([1, 3, 6, 6])
"""

from __future__ import annotations

import torch
from torch import fx

from hq_lightning import set_march
from hq_lightning.functional import centered_yuv2rgb
from hq_lightning.quantization import QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig

__all__ = ["RGB888Net", "insert_centered_yuv2rgb_by_hand", "rgb888_converted"]


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


def rgb888_converted() -> fx.GraphModule:
    """The chapter's RGB888 steps up to ``convert_fx``: one QAT forward on ``[1, 3, 28, 28]``, BAYES."""
    data = torch.rand(1, 3, 28, 28)
    net = RGB888Net()
    set_march("bayes")
    net.set_qconfig()
    qat_net = prepare_qat_fx(net)
    qat_net(data)
    return convert_fx(qat_net)


def insert_centered_yuv2rgb_by_hand(traced: fx.GraphModule) -> None:
    """The chapter's manual graph edit: ``centered_yuv2rgb`` after the input stub, whose scale becomes 1."""
    patterns = ["quant"]
    for n in traced.graph.nodes:
        if any(n.target == pattern for pattern in patterns):
            with traced.graph.inserting_after(n):
                new_node = traced.graph.call_function(centered_yuv2rgb, (n,), {"swing": "full"})
                n.replace_all_uses_with(new_node)
                new_node.args = (n,)
    traced.quant.scale.fill_(1.0)
    traced.recompile()
