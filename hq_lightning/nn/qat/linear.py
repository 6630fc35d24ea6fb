"""QAT ``Linear``: fake-quantized weight (per output channel) and output, optionally fused with a
kept ``BatchNorm1d`` (2-D input), an add and a ReLU/ReLU6.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> fc = Linear.from_float(torch.nn.Linear(8, 2), default_qat_8bit_fake_quant_qconfig)
    >>> fc(torch.rand(3, 8)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn.qat.fused_weighted import FusedWeightedMixin

__all__ = ["Linear"]


class Linear(FusedWeightedMixin, nn.Linear):
    """QAT ``nn.Linear`` (prints as ``LinearBNAddReLU`` etc. when fused)."""

    _FLOAT_TYPE = nn.Linear
    _NAME_STEM = "Linear"
    _NAME_SUFFIX = ""

    def __init__(self, *args: Any, qconfig: Any, bn: nn.Module | None = None, relu: Any = None,
                 has_add: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_qat(qconfig, bn, relu, has_add)

    @classmethod
    def _float_kwargs(cls, linear: nn.Module) -> dict[str, Any]:
        return {"in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None}

    def _weighted_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)
