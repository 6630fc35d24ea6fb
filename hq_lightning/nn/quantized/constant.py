"""Constant operands: a parameter or buffer used as an operand of a tensor op on activations.

``fuse_fx`` puts a :class:`ConstantOperand` between such a constant (``get_attr``) and the ops
reading it (ViT's class token before ``expand`` + ``cat``, its positional embedding in an ``add``,
ConvNeXt's ``layer_scale * x``). In the float model it returns the value as it is; prepare makes
it a QAT module with a weight-like fake quant; convert makes it :class:`QuantizedConstant`, which
returns the integer codes computed at convert time. The parameter keeps its place (and its
``state_dict`` key) in the model: the graph still reads it and passes it to the module.

Example:
    >>> import torch
    >>> c = QuantizedConstant(torch.tensor([3, -2], dtype=torch.int8), torch.tensor([0.5]))
    >>> c(torch.zeros(2)).tolist()
    [3, -2]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import quantize_multiplier, requantize
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor

__all__ = ["ConstantOperand", "QuantizedChannelMul", "QuantizedConstant"]


class ConstantOperand(nn.Module):
    """Marks a constant operand of an op on activations (identity in float).

    Args:
        ch_axis: quantize per channel along this axis of the constant (``layer_scale`` of shape
            ``[C, 1, 1]`` multiplying an activation: 0), or ``None`` for per tensor.
    """

    def __init__(self, ch_axis: int | None = None) -> None:
        super().__init__()
        self.ch_axis = ch_axis

    def forward(self, value: Tensor) -> Tensor:
        return value

    def extra_repr(self) -> str:
        return "" if self.ch_axis is None else f"ch_axis={self.ch_axis}"


class QuantizedConstant(nn.Module):
    """The integer codes of a constant operand (computed at convert time).

    ``forward`` ignores its argument (the float parameter the graph passes) and returns ``codes``.

    Args:
        codes: int8/int16 codes.
        scale: ``[1]`` or per channel ``[C]`` along ``ch_axis``.
        ch_axis: axis of ``codes`` a per-channel scale runs along.
    """

    def __init__(self, codes: Tensor, scale: Tensor | float, ch_axis: int | None = None) -> None:
        super().__init__()
        if codes.dtype not in (torch.int8, torch.int16):
            raise TypeError(f"Expected `codes` to be a torch.int8/int16 tensor, but got {codes.dtype}.")
        self.register_buffer("codes", codes.detach().clone())
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        self.ch_axis = ch_axis

    def forward(self, *_ignored: Tensor) -> Tensor:
        return self.codes

    def extra_repr(self) -> str:
        return f"shape={tuple(self.codes.shape)}, dtype={self.codes.dtype}, ch_axis={self.ch_axis}"


class QuantizedChannelMul(nn.Module):
    """``mul`` of an activation and a per-channel constant (ConvNeXt's ``layer_scale * x``).

    ``out = sat(RHU_n[c](x * y * m[c]))`` with ``M[c] = s_x * s_c[c] / s_out``: the ``mul`` rule of
    ``QFunctional`` with one multiplier per channel of the constant. Called as ``.mul(a, b)``
    like the ``FloatFunctional`` it replaces (either operand may be the constant).

    Args:
        activation_scale: ``s_x`` ``[1]``.
        channel_scale: ``s_c`` ``[C]``.
        ch_axis: the constant's channel axis, negative (``-3`` for ``[C, 1, 1]``).
        output_scale: ``s_out``.
        output_dtype: ``qint8`` / ``qint16``.
    """

    def __init__(
        self,
        activation_scale: Tensor | float,
        channel_scale: Tensor,
        ch_axis: int,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        if ch_axis >= 0:
            raise ValueError(f"Expected a negative `ch_axis` (counted from the last axis), but got {ch_axis}.")
        self.register_buffer("activation_scale", scale_tensor(activation_scale, "activation_scale"))
        self.register_buffer("channel_scale", scale_tensor(channel_scale, "channel_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.ch_axis = ch_axis
        real = self.activation_scale.double() * self.channel_scale.double() / self.output_scale.double()
        m, n = quantize_multiplier(real)
        shape = [-1] + [1] * (-ch_axis - 1)
        self.register_buffer("multiplier", m.reshape(shape))
        self.register_buffer("shift", n.reshape(shape))

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        qmin, qmax = bounds(self.output_dtype)
        product = x.to(torch.int64) * y.to(torch.int64)
        return requantize(product, self.multiplier, self.shift, qmin, qmax, torch_dtype(self.output_dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channel_scale.numel()}, ch_axis={self.ch_axis}, {self.output_dtype.value}"
