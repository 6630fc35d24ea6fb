"""QAT ``Conv1d`` / ``Conv2d`` / ``Conv3d``: fake-quantized weight and output, optionally fused
with a kept BN, an add and a ReLU/ReLU6 (see :mod:`hq_lightning.nn.qat.fused_weighted`).

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> conv = Conv2d.from_float(torch.nn.Conv2d(3, 4, 3), default_qat_8bit_fake_quant_qconfig)
    >>> conv(torch.rand(1, 3, 8, 8)).shape
    torch.Size([1, 4, 6, 6])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hq_lightning.nn.qat.fused_weighted import FusedWeightedMixin

__all__ = ["Conv1d", "Conv2d", "Conv3d"]


def conv_float_kwargs(conv: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a float convolution (``ConvTranspose`` adds ``output_padding``)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


class _ConvNd(FusedWeightedMixin):
    def __init__(self, *args: Any, qconfig: Any, bn: nn.Module | None = None, relu: Any = None,
                 has_add: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_qat(qconfig, bn, relu, has_add)

    @classmethod
    def _float_kwargs(cls, conv: nn.Module) -> dict[str, Any]:
        return conv_float_kwargs(conv)

    def _weighted_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class Conv1d(_ConvNd, nn.Conv1d):
    """QAT ``nn.Conv1d`` (prints as ``ConvBNAddReLU1d`` etc. when fused)."""

    _FLOAT_TYPE = nn.Conv1d
    _NAME_SUFFIX = "1d"


class Conv2d(_ConvNd, nn.Conv2d):
    """QAT ``nn.Conv2d`` (prints as ``ConvBNAddReLU2d`` etc. when fused)."""

    _FLOAT_TYPE = nn.Conv2d
    _NAME_SUFFIX = "2d"


class Conv3d(_ConvNd, nn.Conv3d):
    """QAT ``nn.Conv3d`` (prints as ``ConvBNAddReLU3d`` etc. when fused)."""

    _FLOAT_TYPE = nn.Conv3d
    _NAME_SUFFIX = "3d"
