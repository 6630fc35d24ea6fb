"""QAT ``ConvTranspose2d``: weight fake quant per channel on axis 1 (its output channels).

Optionally fused with a kept BN, an add and a ReLU/ReLU6 like the convolutions. ``groups`` must
be 1 when a BN is kept (the BN scale is folded per output channel of the weight's axis 1).

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> deconv = ConvTranspose2d.from_float(torch.nn.ConvTranspose2d(3, 4, 2, 2),
    ...                                     default_qat_8bit_fake_quant_qconfig)
    >>> deconv.weight_fake_quant.ch_axis
    1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn.qat.conv import conv_float_kwargs
from hq_lightning.nn.qat.fused_weighted import FusedWeightedMixin

__all__ = ["ConvTranspose2d"]


class ConvTranspose2d(FusedWeightedMixin, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d`` (prints as ``ConvTransposeBNAddReLU2d`` etc. when fused)."""

    _FLOAT_TYPE = nn.ConvTranspose2d
    _NAME_STEM = "ConvTranspose"
    _NAME_SUFFIX = "2d"
    _WEIGHT_CH_AXIS = 1

    def __init__(self, *args: Any, qconfig: Any, bn: nn.Module | None = None, relu: Any = None,
                 has_add: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if bn is not None and self.groups != 1:
            raise ValueError(
                f"Expected a ConvTranspose2d with a kept BN to have groups=1, but got groups={self.groups}. "
                "Use qat_mode='fuse_bn'."
            )
        self._init_qat(qconfig, bn, relu, has_add)

    @classmethod
    def _float_kwargs(cls, conv: nn.Module) -> dict[str, Any]:
        return {**conv_float_kwargs(conv), "output_padding": conv.output_padding}

    def _weighted_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
