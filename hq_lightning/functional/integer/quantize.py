"""Float <-> integer conversions: input quantization, dequantization, weight and bias quantization.

Example:
    >>> import torch
    >>> q = quantize(torch.tensor([0.5, -1.0, 3.0]), torch.tensor([0.25]), "qint8")
    >>> q.tolist(), q.dtype
    ([2, -4, 12], torch.int8)
    >>> dequantize(q, torch.tensor([0.25])).tolist()
    [0.5, -1.0, 3.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType, qinfo, torch_dtype

__all__ = ["quantize", "dequantize", "quantize_bias", "channel_view"]


def channel_view(values: Tensor, ch_axis: int | None, ndim: int) -> Tensor:
    """Reshape per-channel ``values`` ``[C]`` to broadcast on axis ``ch_axis`` of an ``ndim`` tensor."""
    if ch_axis is None or math.prod(values.shape) == 1:
        return values.reshape([1] * max(ndim, 1)) if ndim else values.reshape(())
    shape = [1] * ndim
    shape[ch_axis] = -1
    return values.reshape(shape)


def quantize(
    x: Tensor, scale: Tensor, dtype: QuantDType | str, ch_axis: int | None = None
) -> Tensor:
    """``clamp(round_half_even(x * (1 / scale)), qmin, qmax)`` in float32, as an integer tensor.

    ``1 / scale`` is computed in float32, the rule of the fake-quant kernels, so an input stub of
    the converted model quantizes exactly like the fake quant it replaces. Non-finite input, on
    every device and size: NaN becomes code 0, +-inf saturate to ``qmax`` / ``qmin``
    (docs/integer-arithmetic.md, "Non-finite input"); a cast of NaN to an integer would be
    undefined (finite garbage).

    Example:
        >>> quantize(torch.tensor([float("nan"), float("inf"), -float("inf")]), torch.tensor([0.5]), "qint8").tolist()
        [0, 127, -128]
    """
    info = qinfo(dtype)
    inverse = torch.reciprocal(scale.to(torch.float32))
    inverse = channel_view(inverse, ch_axis, x.dim())
    q = torch.round(x.to(torch.float32) * inverse)
    return q.nan_to_num_(nan=0.0).clamp_(info.min, info.max).to(torch_dtype(dtype))


def dequantize(q: Tensor, scale: Tensor, ch_axis: int | None = None) -> Tensor:
    """``float32(q) * scale`` (per tensor, or per channel on ``ch_axis``)."""
    return q.to(torch.float32) * channel_view(scale.to(torch.float32), ch_axis, q.dim())


def quantize_bias(bias: Tensor, accumulator_scale: Tensor) -> Tensor:
    """int32 bias in the accumulator domain: ``round_half_even(b / s_acc)`` in float64, saturated.

    ``accumulator_scale`` is ``s_in * s_w[c]`` (float64, per output channel).
    """
    q = torch.round(bias.to(torch.float64) / accumulator_scale.to(torch.float64))
    info = qinfo("qint32")
    return q.clamp(info.min, info.max).to(torch.int32)
