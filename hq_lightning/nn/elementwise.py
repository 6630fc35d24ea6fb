"""Float modules for elementwise torch functions that have no ``nn`` module of their own.

The fuse-time rewrite turns ``torch.exp(x)``, ``x.sqrt()``, ``x ** 2``, ``x.clamp(0, 6)``,
``x / y`` ... on activations into these modules (registry spellings,
:mod:`hq_lightning.quantization.ops.elementwise`), so each can carry a qconfig, an output fake
quant in QAT and an integer table in the converted model. In a float model they compute exactly
the torch function they stand for.

Example:
    >>> import torch
    >>> Pow(2.0)(torch.tensor([3.0])).tolist(), Clamp(min=0.0)(torch.tensor([-1.0, 2.0])).tolist()
    ([9.0], [0.0, 2.0])
    >>> Div()(torch.tensor([3.0]), torch.tensor([2.0])).tolist(), Div(4)(torch.tensor([2.0])).tolist()
    ([1.5], [0.5])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Abs", "Clamp", "Div", "Exp", "Log", "Pow", "Reciprocal", "Rsqrt", "Sqrt"]


class _Unary(nn.Module):
    fn = staticmethod(torch.exp)

    def forward(self, x: Tensor) -> Tensor:
        return type(self).fn(x)


class Exp(_Unary):
    """``torch.exp``."""

    fn = staticmethod(torch.exp)


class Log(_Unary):
    """``torch.log`` (natural logarithm)."""

    fn = staticmethod(torch.log)


class Sqrt(_Unary):
    """``torch.sqrt``."""

    fn = staticmethod(torch.sqrt)


class Rsqrt(_Unary):
    """``torch.rsqrt``."""

    fn = staticmethod(torch.rsqrt)


class Reciprocal(_Unary):
    """``torch.reciprocal``."""

    fn = staticmethod(torch.reciprocal)


class Abs(_Unary):
    """``torch.abs``."""

    fn = staticmethod(torch.abs)


class Pow(nn.Module):
    """``torch.pow(x, exponent)`` with a constant (Python number) exponent."""

    def __init__(self, exponent: float) -> None:
        super().__init__()
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
            raise TypeError(
                f"Expected `exponent` to be a Python number, but got {type(exponent).__name__}."
            )
        self.exponent = exponent

    def forward(self, x: Tensor) -> Tensor:
        return torch.pow(x, self.exponent)

    def extra_repr(self) -> str:
        return f"exponent={self.exponent}"


class Clamp(nn.Module):
    """``torch.clamp(x, min, max)`` with constant bounds (either may be ``None``)."""

    def __init__(self, min: float | None = None, max: float | None = None) -> None:  # noqa: A002
        super().__init__()
        if min is None and max is None:
            raise ValueError("Expected `min` or `max` to be given, but got neither.")
        for name, value in (("min", min), ("max", max)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise TypeError(
                    f"Expected `{name}` to be a Python number or None, but got {value!r}."
                )
        if min is not None and max is not None and min > max:
            raise ValueError(f"Expected `min` <= `max`, but got min={min}, max={max}.")
        self.min, self.max = min, max

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.min, self.max)

    def extra_repr(self) -> str:
        return f"min={self.min}, max={self.max}"


class Div(nn.Module):
    """``x / other``: ``other`` a tensor given to ``forward`` or a constant given here.

    Args:
        other: a constant divisor (Python number), or ``None`` when ``forward`` gets the divisor.
    """

    def __init__(self, other: float | None = None) -> None:
        super().__init__()
        if other is not None and (isinstance(other, bool) or not isinstance(other, (int, float))):
            raise TypeError(f"Expected `other` to be a Python number or None, but got {other!r}.")
        self.other = other

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if (other is None) == (self.other is None):
            raise ValueError(
                "Expected exactly one divisor: the constant given at construction or the tensor "
                f"given to forward, but got other={self.other!r} and a {type(other).__name__}."
            )
        return torch.div(x, self.other if other is None else other)

    def extra_repr(self) -> str:
        return "" if self.other is None else f"other={self.other}"
