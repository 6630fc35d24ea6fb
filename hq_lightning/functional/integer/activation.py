"""Integer ReLU6: clamp to ``[0, q6]`` where ``q6`` is the integer the fake quant gives 6.0.

ReLU6 keeps its input scale ``s``, so on integers it clamps at
``q6 = min(qmax, round_half_even(fp32(6 * fp32(1 / s))))`` (docs/integer-arithmetic.md, section 5),
the bound a Conv/Linear with a fused ReLU6 uses too.

Example:
    >>> import torch
    >>> relu6_upper_bound(torch.tensor([0.1]), "qint8").tolist()
    [60]
    >>> relu6(torch.tensor([-5, 30, 90], dtype=torch.int8), torch.tensor([60])).tolist()
    [0, 30, 60]
"""

from __future__ import annotations

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType
from hq_lightning.functional.integer.quantize import quantize

__all__ = ["relu6", "relu6_upper_bound"]


def relu6_upper_bound(scale: Tensor, dtype: QuantDType | str) -> Tensor:
    """The integer standing for 6.0 at ``scale`` (int64, ``[1]``): the fake quant's rule, saturated."""
    six = torch.full((1,), 6.0, device=scale.device)
    return quantize(six, scale.reshape(-1)[:1], dtype).to(torch.int64)


def relu6(x: Tensor, upper: Tensor) -> Tensor:
    """``clamp(x, 0, upper)`` on an integer tensor, keeping its dtype (``upper`` fits in it)."""
    return torch.minimum(x.clamp(min=0), upper.to(device=x.device, dtype=x.dtype))
