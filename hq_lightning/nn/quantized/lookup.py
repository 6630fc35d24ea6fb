"""Integer elementwise functions by table lookup: ``QuantizedLookup`` and ``QuantizedDiv``.

Rules: docs/integer-arithmetic.md, section 9 (kernels in
:mod:`hq_lightning.functional.integer.lookup`). An int8 input indexes a full table (the
fake-quant op bit for bit); an int16 input interpolates a segmented table (at most one output
step from the fake-quant op).

Example:
    >>> import torch
    >>> lut = QuantizedLookup.from_function(torch.sigmoid, 0.05, "qint8", 1 / 127, "qint8")
    >>> lut(torch.tensor([-128, 0, 127], dtype=torch.int8)).tolist()
    [0, 64, 127]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import quantize_multiplier, rounding_right_shift
from hq_lightning.functional.integer.lookup import (
    build_segmented,
    build_table,
    code_values,
    lookup_segmented,
    lookup_table,
)
from hq_lightning.nn.quantized._common import (
    activation_dtype,
    bounds,
    check_int_input,
    scale_tensor,
)

__all__ = ["QuantizedDiv", "QuantizedLookup", "table_values"]


def table_values(
    fn: Callable[[Tensor], Tensor], scale: Tensor, dtype: QuantDType, channels: int = 1
) -> Tensor:
    """``fn`` at every input code's float value, ``[channels, L]`` float32.

    With ``channels > 1`` ``fn`` gets the values as ``[L, channels]`` (channel axis 1, as a
    per-channel module such as ``nn.PReLU`` expects them) and returns that shape.
    """
    xs = code_values(scale, dtype)
    if channels == 1:
        return fn(xs).to(torch.float32).reshape(1, -1)
    return fn(xs[:, None].expand(-1, channels).contiguous()).to(torch.float32).t().contiguous()


class QuantizedLookup(nn.Module):
    """``y = T[x]``: a table built from a float function at convert time.

    Args:
        values: the float function at every input code's value (``table_values``), ``[C, L]``;
            ``C > 1`` for one table per channel.
        input_scale: the input's per-tensor scale.
        input_dtype: ``"qint8"`` (full table) or ``"qint16"`` (segmented table).
        output_scale: the output's scale.
        output_dtype: ``"qint8"`` or ``"qint16"``.
        ch_axis: the channel axis of the input when ``C > 1``.

    Buffers: ``input_scale``, ``output_scale``; int8 input: ``table`` ``[C, 256]``; int16 input:
    ``levels``, ``offsets`` ``[C, 256]`` and ``knots`` (int32).
    """

    def __init__(
        self,
        values: Tensor,
        input_scale: Tensor | float,
        input_dtype: QuantDType | str,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
        ch_axis: int | None = None,
    ) -> None:
        super().__init__()
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        values = torch.as_tensor(values, dtype=torch.float32)
        values = values.reshape(1, -1) if values.dim() == 1 else values
        expected = 256 if self.input_dtype is QuantDType.qint8 else 65537
        if values.dim() != 2 or values.shape[1] != expected:
            raise ValueError(
                f"Expected `values` of shape [C, {expected}] for a {self.input_dtype.value} input, "
                f"but got {tuple(values.shape)}."
            )
        if values.shape[0] > 1 and ch_axis is None:
            raise ValueError(
                f"Expected `ch_axis` for {values.shape[0]} per-channel tables, but got None."
            )
        self.ch_axis = ch_axis
        if self.input_dtype is QuantDType.qint8:
            self.register_buffer("table", build_table(values, self.output_scale, self.output_dtype))
        else:
            levels, offsets, knots = build_segmented(values, self.output_scale, self.output_dtype)
            self.register_buffer("levels", levels)
            self.register_buffer("offsets", offsets)
            self.register_buffer("knots", knots)

    @classmethod
    def from_function(
        cls,
        fn: Callable[[Tensor], Tensor],
        input_scale: Tensor | float,
        input_dtype: QuantDType | str,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
        channels: int = 1,
        ch_axis: int | None = None,
    ) -> QuantizedLookup:
        """Evaluate ``fn`` at every input code (see :func:`table_values`) and build the table."""
        scale = scale_tensor(input_scale, "input_scale")
        dtype = activation_dtype(input_dtype, "input_dtype")
        with torch.no_grad():
            values = table_values(fn, scale, dtype, channels)
        return cls(values, scale, dtype, output_scale, output_dtype, ch_axis=ch_axis)

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.input_dtype)
        if self.input_dtype is QuantDType.qint8:
            return lookup_table(x, self.table, self.input_dtype, self.ch_axis)
        return lookup_segmented(
            x, self.levels, self.offsets, self.knots, self.output_dtype, self.ch_axis
        )

    def extra_repr(self) -> str:
        return (
            f"input_scale={self.input_scale.tolist()}, {self.input_dtype.value} -> "
            f"output_scale={self.output_scale.tolist()}, {self.output_dtype.value}"
        )


class QuantizedDiv(nn.Module):
    """``x / y`` of two integer activations: ``r = T[y]`` (reciprocal table), then
    ``sat(RHU_n(x * r * m))`` with ``m 2^-n = s_x s_r / s_out``.

    Args:
        x_scale, x_dtype: the dividend's scale and dtype.
        reciprocal: the :class:`QuantizedLookup` of ``1 / y`` (its output scale is ``s_r``).
        output_scale, output_dtype: the quotient's.
    """

    def __init__(
        self,
        x_scale: Tensor | float,
        x_dtype: QuantDType | str,
        reciprocal: QuantizedLookup,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        self.x_dtype = activation_dtype(x_dtype, "x_dtype")
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.reciprocal = reciprocal
        self.register_buffer("x_scale", scale_tensor(x_scale, "x_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        real = self.x_scale.double() * reciprocal.output_scale.double() / self.output_scale.double()
        m, n = quantize_multiplier(real)
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", n)
        self.qmin, self.qmax = bounds(self.output_dtype)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        """``x / other`` (``other``: the divisor's codes, the name ``torch.div`` gives it)."""
        check_int_input(x, self.x_dtype, "x")
        r = self.reciprocal(other)
        product = x.to(torch.int64) * r.to(torch.int64) * self.multiplier
        out = rounding_right_shift(product, self.shift)
        return out.clamp(self.qmin, self.qmax).to(torch_dtype(self.output_dtype))

    def extra_repr(self) -> str:
        return f"x_scale={self.x_scale.tolist()}, output_scale={self.output_scale.tolist()}, {self.output_dtype.value}"
