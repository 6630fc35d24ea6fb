"""QAT ``Upsample`` for interpolating modes (bilinear...): output fake quant.

Nearest upsampling only repeats values, keeps the input scale and stays a float ``nn.Upsample``
(see :func:`hq_lightning.quantization.fx.qat_mapping.is_scale_preserving`).

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> up = Upsample.from_float(torch.nn.Upsample(scale_factor=2, mode="bilinear"), qc)
    >>> up(torch.rand(1, 1, 2, 2)).shape
    torch.Size([1, 1, 4, 4])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, qconfig_of
from hq_lightning.nn.qat.output_fake_quant import OutputFakeQuantMixin

__all__ = ["Upsample"]


class Upsample(OutputFakeQuantMixin, nn.Upsample):
    """QAT ``nn.Upsample``: same arguments plus ``qconfig``; output fake quant.

    ``forward(x, size=None)``: a ``size`` given when it runs (``y.shape[-2:]``, from a float
    :class:`~hq_lightning.nn.quantized.Interpolate`) replaces the constant size / scale factor.
    """

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.mode == "nearest":
            raise ValueError(
                "Expected a QAT Upsample to interpolate (mode='bilinear', ...), but got mode='nearest': "
                "nearest upsampling keeps its input scale, keep the float nn.Upsample."
            )
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.Upsample, qconfig: Any = None) -> Upsample:
        qat = cls(
            size=mod.size, scale_factor=mod.scale_factor, mode=mod.mode, align_corners=mod.align_corners,
            recompute_scale_factor=mod.recompute_scale_factor,
            qconfig=qconfig_of(mod, qconfig),
        )
        qat.train(mod.training)
        return qat

    def forward(self, x: torch.Tensor, size: Any = None) -> torch.Tensor:
        if size is None:
            out = nn.Upsample.forward(self, x)
        else:
            out = F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out
