"""Input and output stubs of the integer model: ``Quantize`` and ``DeQuantize``."""

from __future__ import annotations

from torch import Tensor, nn

from hq_lightning.dtype import QuantDType
from hq_lightning.functional.integer import dequantize, quantize
from hq_lightning.nn.quantized._common import activation_dtype, scale_tensor

__all__ = ["Quantize", "DeQuantize"]


class Quantize(nn.Module):
    """Float input -> integer: ``clamp(round_half_even(x * fp32(1/scale)), qmin, qmax)``.

    Args:
        scale: the stub's scale (float or one-element tensor), stored in the ``scale`` buffer;
            changing it in place (``traced.quant.scale.fill_(1.0)``) changes later calls.
        dtype: ``"qint8"`` or ``"qint16"``.

    Example:
        >>> import torch
        >>> quant = Quantize(0.5, "qint8")
        >>> quant(torch.tensor([1.0, -0.75, 100.0])).tolist()
        [2, -2, 127]
        >>> _ = quant.scale.fill_(1.0)
        >>> quant(torch.tensor([1.0, -0.75, 100.0])).tolist()
        [1, -1, 100]
    """

    def __init__(self, scale: Tensor | float, dtype: QuantDType | str = "qint8") -> None:
        super().__init__()
        self.dtype = activation_dtype(dtype, "dtype")
        self.register_buffer("scale", scale_tensor(scale, "scale"))

    def forward(self, x: Tensor) -> Tensor:
        return quantize(x, self.scale, self.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale.tolist()}, dtype={self.dtype.value}"


class DeQuantize(nn.Module):
    """Integer -> float32: ``float32(q) * scale``, per tensor or per channel (axis 1).

    Args:
        scale: the input's scale: one value, or ``[C]`` for an int32 per-channel
            (high-precision Conv/Linear) output.
        ch_axis: axis of per-channel scales (1 for NC..., -1 for a Linear's ``[..., C]``).

    Example:
        >>> import torch
        >>> DeQuantize(0.25)(torch.tensor([4, -3], dtype=torch.int8)).tolist()
        [1.0, -0.75]
    """

    def __init__(self, scale: Tensor | float, ch_axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        self.ch_axis = ch_axis if self.scale.numel() > 1 else None
        if self.scale.numel() > 1 and ch_axis is None:
            self.ch_axis = 1

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            raise TypeError(f"Expected `x` to be an integer tensor, but got {x.dtype}.")
        return dequantize(x, self.scale, self.ch_axis)

    def extra_repr(self) -> str:
        return f"scale={self.scale.tolist()[:4]}, ch_axis={self.ch_axis}"
