"""Integer ReLU6 on its own (not fused into a Conv/Linear): ``QuantizedReLU6``.

Example:
    >>> import torch
    >>> relu6 = QuantizedReLU6(0.1)
    >>> relu6(torch.tensor([-7, 42, 100], dtype=torch.int8)).tolist()
    [0, 42, 60]
"""

from __future__ import annotations

from torch import Tensor, nn

from hq_lightning.dtype import QuantDType
from hq_lightning.functional.integer import relu6, relu6_upper_bound
from hq_lightning.nn.quantized._common import activation_dtype, check_int_input, scale_tensor

__all__ = ["QuantizedReLU6"]


class QuantizedReLU6(nn.Module):
    """``clamp(x, 0, q6)`` with ``q6`` the integer standing for 6.0 at the input's scale.

    Scale-preserving: the output has the input's scale and dtype. ``q6`` follows the rule of a
    fused ReLU6 (docs/integer-arithmetic.md, section 5) and is derived from the ``scale`` buffer on
    every call, so editing that buffer (or tracing) keeps it consistent.

    Args:
        scale: the input's (and output's) per-tensor scale.
        dtype: ``"qint8"`` or ``"qint16"``, the input's dtype.
    """

    def __init__(self, scale: Tensor | float, dtype: QuantDType | str = "qint8") -> None:
        super().__init__()
        self.dtype = activation_dtype(dtype, "dtype")
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        if self.scale.numel() != 1:
            raise ValueError(
                f"Expected `scale` to be one per-tensor scale, but got {self.scale.numel()} values."
            )

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.dtype)
        return relu6(x, relu6_upper_bound(self.scale, self.dtype))

    def extra_repr(self) -> str:
        return f"scale={self.scale.tolist()}, dtype={self.dtype.value}"
