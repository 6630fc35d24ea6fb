"""Float ``QuantStub`` / ``DeQuantStub``: the boundaries of the quantized part of a model.

Both are identities in the float model; prepare swaps ``QuantStub`` for a fake-quantizing module
(a fixed scale when ``scale`` is given, e.g. ``1/128`` for centered YUV input in [-1, 1)) and
convert turns the pair into quantize / dequantize. ``is_quant_stub`` / ``is_dequant_stub`` also
recognise the stubs of torch's own (deprecated) quantization package by class name and module
path, without importing that package.

Example:
    >>> import torch
    >>> stub = QuantStub(scale=1 / 128)
    >>> stub(torch.ones(2)), stub.scale
    (tensor([1., 1.]), 0.0078125)
    >>> is_quant_stub(stub), is_dequant_stub(DeQuantStub())
    (True, True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["QuantStub", "DeQuantStub", "is_quant_stub", "is_dequant_stub"]

# Module paths of torch's own stub classes, as path components: matched by name only, because
# hq_lightning never imports torch's deprecated quantization package.
_TORCH_STUB_MODULES = (("torch", "ao", "quantization"), ("torch", "quantization"), ("torch", "nn", "quantized"))


class QuantStub(nn.Module):
    """Marks where quantization starts (one input per stub).

    Args:
        scale: fixed input scale, or ``None`` to observe it like any activation.
    """

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and (
            not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
        ):
            raise ValueError(f"Expected `scale` to be None or a finite number > 0, but got {scale!r}.")
        self.scale = None if scale is None else float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale}"


class DeQuantStub(nn.Module):
    """Marks where quantization ends (the end of the deployed graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _is_torch_class(module: object, name: str) -> bool:
    cls = type(module)
    parts = tuple(cls.__module__.split("."))
    return cls.__name__ == name and any(parts[: len(p)] == p for p in _TORCH_STUB_MODULES)


def is_quant_stub(module: object) -> bool:
    """True for our :class:`QuantStub` (or a subclass) and torch's ``QuantStub``."""
    return isinstance(module, QuantStub) or _is_torch_class(module, "QuantStub")


def is_dequant_stub(module: object) -> bool:
    """True for our :class:`DeQuantStub` (or a subclass) and torch's ``DeQuantStub``."""
    return isinstance(module, DeQuantStub) or _is_torch_class(module, "DeQuantStub")
