"""Integer interpolation: nearest (pass-through) and fixed-point bilinear.

Example:
    >>> import torch
    >>> up = QuantizedInterpolate(scale_factor=2, mode="nearest")
    >>> up(torch.tensor([[[[1, -2]]]], dtype=torch.int8)).tolist()
    [[[[1, 1, -2, -2], [1, 1, -2, -2]]]]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import (
    BILINEAR_FRACTION_BITS,
    bilinear_accumulate,
    quantize_multiplier,
    rounding_right_shift,
)
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor

__all__ = ["QuantizedInterpolate"]


class QuantizedInterpolate(nn.Module):
    """``F.interpolate`` on integer NCHW tensors.

    Args:
        size / scale_factor: as ``F.interpolate`` (output size ``floor(in * scale_factor)``).
        mode: ``"nearest"`` (pass-through, scale unchanged) or ``"bilinear"``.
        align_corners: bilinear only.
        input_scale / output_scale / output_dtype: bilinear only (requantization,
            ``M = s_in / s_out * 2^-16``).
    """

    def __init__(
        self,
        size=None,
        scale_factor=None,
        mode: str = "nearest",
        align_corners: bool | None = None,
        *,
        input_scale: Tensor | float | None = None,
        output_scale: Tensor | float | None = None,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"Expected `mode` to be 'nearest' or 'bilinear', but got {mode!r}.")
        if (size is None) == (scale_factor is None):
            raise ValueError(
                "Expected exactly one of `size` and `scale_factor`, but got both or neither."
            )
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners = bool(align_corners)
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        if mode == "bilinear":
            if input_scale is None or output_scale is None:
                raise ValueError(
                    "Expected `input_scale` and `output_scale` for bilinear, but got None."
                )
            self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
            self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
            real = torch.ldexp(
                self.input_scale.double() / self.output_scale.double(),
                torch.tensor(-2 * BILINEAR_FRACTION_BITS),
            )
            m, n = quantize_multiplier(real)
            self.register_buffer("multiplier", m)
            self.register_buffer("shift", n)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        if self.size is not None:
            return (
                tuple(self.size) if isinstance(self.size, (tuple, list)) else (self.size, self.size)
            )
        sf = self.scale_factor
        sy, sx = (sf, sf) if not isinstance(sf, (tuple, list)) else sf
        return math.floor(x.shape[-2] * sy), math.floor(x.shape[-1] * sx)

    def forward(self, x: Tensor) -> Tensor:
        size = self._out_size(x)
        if self.mode == "nearest":
            # every output is a copy of an input value: exact through float32
            return F.interpolate(x.to(torch.float32), size=size, mode="nearest").to(x.dtype)
        acc = bilinear_accumulate(x, size, self.align_corners)
        lo, hi = bounds(self.output_dtype)
        out = rounding_right_shift(acc * self.multiplier, self.shift)
        return out.clamp(lo, hi).to(torch_dtype(self.output_dtype))
