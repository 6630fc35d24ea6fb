"""``QFunctional``: the integer counterpart of ``FloatFunctional`` (same method names).

One instance stands for one generated op (``_generated_add_0`` ...), so it knows the static scales
of that op's inputs and output. Rules: docs/integer-arithmetic.md, section 6.

Example:
    >>> import torch
    >>> f = QFunctional([0.5, 0.25], 0.5)
    >>> f.add(torch.tensor([2, -3], dtype=torch.int8), torch.tensor([4, 5], dtype=torch.int8)).tolist()
    [4, 0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import quantize_multiplier, quantize_multipliers
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor

__all__ = ["QFunctional"]


def _rhu(value: Tensor, shift: Tensor) -> Tensor:
    offset = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)
    return (value + offset) >> shift


class QFunctional(nn.Module):
    """Integer elementwise/reduction ops with static scales.

    Args:
        input_scales: the scale of each tensor input, in call order (one per element of a
            ``cat``/``stack`` list; two for ``add``/``sub``/``mul``/``matmul``).
        output_scale: the op's output scale.
        output_dtype: ``"qint8"`` or ``"qint16"``.

    Buffers: ``input_scale`` ``[k]``, ``output_scale`` ``[1]``, ``multiplier``/``shift`` ``[k]``
    (input i -> output, for cat/stack/sum/mean/add_scalar), and with two inputs
    ``pair_multiplier`` ``[2]`` / ``pair_shift`` (add, sub) and ``product_multiplier`` /
    ``product_shift`` (mul, matmul).
    """

    def __init__(
        self,
        input_scales: Sequence[float] | Tensor,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer(
            "input_scale", scale_tensor(torch.as_tensor(input_scales), "input_scales")
        )
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        s_in = self.input_scale.to(torch.float64)
        s_out = self.output_scale.to(torch.float64)
        m, n = quantize_multiplier(s_in / s_out)
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", n)
        if s_in.numel() == 2:
            (m0, m1), n2 = quantize_multipliers(s_in[:1] / s_out, s_in[1:] / s_out)
            self.register_buffer("pair_multiplier", torch.cat([m0, m1]))
            self.register_buffer("pair_shift", n2)
            mp, np_ = quantize_multiplier(s_in[:1] * s_in[1:] / s_out)
            self.register_buffer("product_multiplier", mp)
            self.register_buffer("product_shift", np_)
        self.qmin, self.qmax = bounds(self.output_dtype)

    def _out(self, value: Tensor, lo: int | None = None) -> Tensor:
        return value.clamp(self.qmin if lo is None else lo, self.qmax).to(
            torch_dtype(self.output_dtype)
        )

    def _need(self, count: int, op: str) -> None:
        if self.input_scale.numel() != count:
            raise ValueError(
                f"Expected `input_scales` to have {count} entries for `{op}`, but this QFunctional "
                f"was built with {self.input_scale.numel()}."
            )

    def _pair_sum(self, x: Tensor, y: Tensor, sign: int) -> Tensor:
        self._need(2, "add/sub")
        value = x.to(torch.int64) * self.pair_multiplier[0] + sign * (
            y.to(torch.int64) * self.pair_multiplier[1]
        )
        return _rhu(value, self.pair_shift)

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        return self._out(self._pair_sum(x, y, 1))

    def add_relu(self, x: Tensor, y: Tensor) -> Tensor:
        return self._out(self._pair_sum(x, y, 1), lo=0)

    def sub(self, x: Tensor, y: Tensor) -> Tensor:
        return self._out(self._pair_sum(x, y, -1))

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        self._need(2, "mul")
        product = x.to(torch.int64) * y.to(torch.int64)
        return self._out(_rhu(product * self.product_multiplier, self.product_shift))

    def matmul(self, x: Tensor, y: Tensor, x_trans: bool = False, y_trans: bool = False) -> Tensor:
        self._need(2, "matmul")
        from hq_lightning.functional.integer.attention import matmul_requantize

        a = x.transpose(-1, -2) if x_trans else x
        b = y.transpose(-1, -2) if y_trans else y
        if a.dim() == 1 or b.dim() == 1:  # torch.matmul's vector forms
            out = self.matmul(a.unsqueeze(0) if a.dim() == 1 else a, b.unsqueeze(-1) if b.dim() == 1 else b)
            return out.squeeze(-1 if b.dim() == 1 else -2) if a.dim() != 1 or b.dim() != 1 else out.reshape(())
        # exact int64 sum (docs/integer-arithmetic.md, section 10), multiplier sized for K
        real = self.input_scale[:1].double() * self.input_scale[1:].double() / self.output_scale.double()
        return matmul_requantize(a, b, real, self.output_dtype)

    def _requant_input(self, x: Tensor, index: int) -> Tensor:
        return _rhu(x.to(torch.int64) * self.multiplier[index], self.shift[index])

    def cat(self, tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
        self._need(len(tensors), "cat")
        return self._out(torch.cat([self._requant_input(t, i) for i, t in enumerate(tensors)], dim))

    def stack(self, tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
        self._need(len(tensors), "stack")
        return self._out(
            torch.stack([self._requant_input(t, i) for i, t in enumerate(tensors)], dim)
        )

    def sum(self, x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
        self._need(1, "sum")
        total = x.to(torch.int64).sum() if dim is None else x.to(torch.int64).sum(dim, keepdim)
        return self._out(self._requant_input(total, 0))

    def mean(self, x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
        self._need(1, "mean")
        wide = x.to(torch.int64)
        total = wide.sum() if dim is None else wide.sum(dim, keepdim)
        count = x.numel() // max(total.numel(), 1)
        real = self.input_scale.to(torch.float64) / (count * self.output_scale.to(torch.float64))
        m, n = quantize_multiplier(real)
        return self._out(_rhu(total * m, n))

    def add_scalar(self, x: Tensor, other: float) -> Tensor:
        self._need(1, "add_scalar")
        m, n = self.multiplier[0], self.shift[0]
        k = torch.round(
            torch.ldexp(
                torch.tensor(float(other), dtype=torch.float64) / self.output_scale.double(), n
            )
        ).clamp(-(2.0**62), 2.0**62)
        return self._out(_rhu(x.to(torch.int64) * m + k.to(torch.int64), n))

    def mul_scalar(self, x: Tensor, other: float) -> Tensor:
        self._need(1, "mul_scalar")
        real = self.input_scale.double() * abs(float(other)) / self.output_scale.double()
        m, n = quantize_multiplier(real)
        sign = int(math.copysign(1, other)) if other != 0 else 0
        return self._out(_rhu(x.to(torch.int64) * (m * sign), n))

    def extra_repr(self) -> str:
        return f"input_scale={self.input_scale.tolist()}, output_scale={self.output_scale.tolist()}, {self.output_dtype.value}"
