"""Integer clamp on an activation: ``QuantizedClamp`` (``torch.clamp``, ``F.hardtanh``, ``nn.Hardtanh``).

A clamp keeps its input's scale ``s``; its bounds ``a`` and ``b`` become the codes the fake quant
gives them, ``q_a = sat(RNE(fp32(a * fp32(1 / s))))`` (ReLU6's ``q6`` rule, docs/integer-arithmetic.md
section 5), and the integer op is ``clamp(q, q_a, q_b)``. Rounding is monotone, so this equals
fake-quantizing the float clamp of the input's value.

Example:
    >>> import torch
    >>> QuantizedClamp(0.1, "qint8", min=0.0, max=6.0)(torch.tensor([-7, 42, 100], dtype=torch.int8)).tolist()
    [0, 42, 60]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType
from hq_lightning.functional.integer import quantize
from hq_lightning.nn.quantized._common import (
    activation_dtype,
    bounds,
    check_int_input,
    scale_tensor,
)

__all__ = ["QuantizedClamp"]


class QuantizedClamp(nn.Module):
    """``clamp(q, q_min, q_max)`` at the codes standing for ``min`` / ``max`` at the input's scale.

    Args:
        scale: the input's (and output's) per-tensor scale.
        dtype: ``"qint8"`` or ``"qint16"``.
        min: lower bound (float) or ``None``.
        max: upper bound (float) or ``None``.
    """

    def __init__(
        self,
        scale: Tensor | float,
        dtype: QuantDType | str = "qint8",
        min: float | None = None,  # noqa: A002
        max: float | None = None,  # noqa: A002
    ) -> None:
        super().__init__()
        self.dtype = activation_dtype(dtype, "dtype")
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        if self.scale.numel() != 1:
            raise ValueError(
                f"Expected `scale` to be one per-tensor scale, but got {self.scale.numel()} values."
            )
        if min is None and max is None:
            raise ValueError("Expected `min` or `max` to be given, but got neither.")
        self.min, self.max = min, max

    def _bound(self, value: float | None, default: int, x: Tensor) -> Tensor:
        if value is None:
            return torch.full((1,), default, dtype=x.dtype, device=x.device)
        target = torch.full((1,), float(value), device=x.device)
        return quantize(target, self.scale.to(x.device), self.dtype).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.dtype)
        qmin, qmax = bounds(self.dtype)
        return torch.clamp(x, self._bound(self.min, qmin, x), self._bound(self.max, qmax, x))

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale.tolist()}, dtype={self.dtype.value}, min={self.min}, max={self.max}"
        )
