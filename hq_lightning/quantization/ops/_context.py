"""Helpers the integer builders of the op families share: reading a builder's input qparams.

Example:
    >>> from hq_lightning.quantization.ops._context import activation_name
    >>> import torch
    >>> activation_name(torch.nn.Conv2d(1, 1, 1)) is None
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from hq_lightning.dtype import QuantDType

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext, QParams

__all__ = ["activation_name", "per_tensor"]


def per_tensor(ctx: ConvertContext, qparams: Any, what: str) -> QParams:
    """``qparams`` of a builder input, checked to be a per-tensor qint8/qint16 activation."""
    if not hasattr(qparams, "scale"):
        raise RuntimeError(
            f"Expected the {what} of `{ctx.path}` to be quantized, but got a float tensor: put a "
            "QuantStub before it."
        )
    if qparams.per_channel or qparams.dtype not in (QuantDType.qint8, QuantDType.qint16):
        raise RuntimeError(
            f"Expected the {what} of `{ctx.path}` to be a per-tensor qint8/qint16 activation, but "
            f"got {qparams}: a high-precision (int32) Conv/Linear output can only feed a "
            "DeQuantStub. Give that Conv/Linear an 8/16-bit output qconfig."
        )
    return qparams


def activation_name(module: nn.Module) -> str | None:
    """``"relu"`` / ``"relu6"`` for a weighted module with a fused activation, else ``None``."""
    relu = getattr(module, "relu", None)
    if relu is None:
        return None
    return "relu6" if isinstance(relu, nn.ReLU6) else "relu"
