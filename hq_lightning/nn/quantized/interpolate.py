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

__all__ = ["Interpolate", "QuantizedInterpolate"]

_MODES = ("nearest", "bilinear")


class Interpolate(nn.Upsample):
    """Float ``F.interpolate`` as a module: ``nn.Upsample`` whose forward may take ``size``.

    ``F.interpolate(x, size=y.shape[-2:])`` becomes ``Interpolate(mode=...)`` called as
    ``forward(x, size=y.shape[-2:])``: the shape expression stays in the graph and the size is
    read when the model runs (FPN, DeepLab and LR-ASPP resize to another tensor's size). Built
    with a constant ``size`` or ``scale_factor`` it is an ``nn.Upsample``.

    Example:
        >>> import torch
        >>> up = Interpolate(mode="nearest")
        >>> up(torch.ones(1, 1, 2, 2), size=torch.Size([3, 4])).shape
        torch.Size([1, 1, 3, 4])
    """

    def forward(self, input: Tensor, size=None) -> Tensor:  # noqa: A002 - nn.Upsample's name
        if size is None:
            return super().forward(input)
        return F.interpolate(input, size=size, mode=self.mode, align_corners=self.align_corners)


class QuantizedInterpolate(nn.Module):
    """``F.interpolate`` on integer tensors.

    Args:
        size / scale_factor: as ``F.interpolate`` (output size ``floor(in * scale_factor)``,
            coordinates mapped with ``1 / scale_factor`` as torch does unless
            ``recompute_scale_factor``); both ``None``: the size is given to ``forward`` when the
            model runs (``forward(x, size=y.shape[-2:])``).
        mode: ``"nearest"`` (pass-through, scale unchanged; any number of spatial dims) or
            ``"bilinear"`` (NCHW).
        align_corners: bilinear only.
        recompute_scale_factor: as ``F.interpolate``.
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
        recompute_scale_factor: bool | None = None,
        input_scale: Tensor | float | None = None,
        output_scale: Tensor | float | None = None,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"Expected `mode` to be one of {_MODES}, but got {mode!r}.")
        if size is not None and scale_factor is not None:
            raise ValueError(
                "Expected at most one of `size` and `scale_factor` (none: size given at run "
                "time), but got both."
            )
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners = bool(align_corners)
        self.recompute_scale_factor = recompute_scale_factor
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

    def _scale_factors(self, dims: int) -> tuple[float, ...] | None:
        sf = self.scale_factor
        if sf is None:
            return None
        return tuple(float(v) for v in sf) if isinstance(sf, (tuple, list)) else (float(sf),) * dims

    def _out_size(self, x: Tensor, size) -> tuple[int, ...]:
        dims = x.dim() - 2
        if size is None:
            size = self.size
        if size is not None:
            return tuple(int(v) for v in size) if isinstance(size, (tuple, list, torch.Size)) else (int(size),) * dims
        factors = self._scale_factors(dims)
        if factors is None:
            raise ValueError(
                "Expected `size` at run time (this QuantizedInterpolate was built without a size "
                "or a scale factor), but got None."
            )
        return tuple(math.floor(int(x.shape[2 + d]) * factors[d]) for d in range(dims))

    def forward(self, x: Tensor, size=None) -> Tensor:
        out_size = self._out_size(x, size)
        keep_factors = size is None and self.size is None and not self.recompute_scale_factor
        factors = self._scale_factors(x.dim() - 2) if keep_factors else None
        if self.mode == "nearest":
            # every output is a copy of an input value: exact through float32 (float64 for
            # int32); the float call's own arguments, so its index rule (1 / scale_factor or
            # in / out) is the same
            wide = x.to(torch.float32 if x.dtype in (torch.int8, torch.int16) else torch.float64)
            if factors is not None:
                out = F.interpolate(wide, scale_factor=factors, mode="nearest")
            else:
                out = F.interpolate(wide, size=out_size, mode="nearest")
            return out.to(x.dtype)
        acc = bilinear_accumulate(
            x, out_size, self.align_corners, scale_factors=None if factors is None else factors[:2]
        )
        lo, hi = bounds(self.output_dtype)
        out = rounding_right_shift(acc * self.multiplier, self.shift)
        return out.clamp(lo, hi).to(torch_dtype(self.output_dtype))

    def extra_repr(self) -> str:
        size = "at run time" if self.size is None and self.scale_factor is None else self.size
        return f"size={size}, scale_factor={self.scale_factor}, mode={self.mode!r}, align_corners={self.align_corners}"
