"""Quantized dtypes: ``qint8``, ``qint16`` (activations, weights) and ``qint32`` (accumulators).

Every API accepts the :class:`QuantDType` member or its string.

Example:
    >>> from hq_lightning.dtype import as_dtype, qinfo, qint8, torch_dtype
    >>> as_dtype("qint8") is qint8
    True
    >>> info = qinfo("qint16")
    >>> (info.min, info.max, info.bits)
    (-32768, 32767, 16)
    >>> torch_dtype(qint8)
    torch.int8
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

__all__ = [
    "QuantDType",
    "QInfo",
    "qint8",
    "qint16",
    "qint32",
    "as_dtype",
    "qinfo",
    "torch_dtype",
]


class QuantDType(str, enum.Enum):
    """Signed symmetric integer dtypes of the accelerator."""

    qint8 = "qint8"
    qint16 = "qint16"
    qint32 = "qint32"

    def __str__(self) -> str:
        return self.value


qint8 = QuantDType.qint8
qint16 = QuantDType.qint16
qint32 = QuantDType.qint32


class QInfo(NamedTuple):
    """Integer range of a quantized dtype."""

    min: int
    max: int
    bits: int


_INFO = {
    QuantDType.qint8: QInfo(-128, 127, 8),
    QuantDType.qint16: QInfo(-32768, 32767, 16),
    QuantDType.qint32: QInfo(-(2**31), 2**31 - 1, 32),
}
_TORCH = {
    QuantDType.qint8: torch.int8,
    QuantDType.qint16: torch.int16,
    QuantDType.qint32: torch.int32,
}

_BY_NAME = {member.value: member for member in QuantDType}


def as_dtype(dtype: QuantDType | str) -> QuantDType:
    """Validate ``dtype`` (member or string such as ``"qint8"``) and return the member.

    ``torch.qint8`` / ``torch.qint32`` are accepted too, since users carry them over from torch.

    Raises:
        ValueError: if ``dtype`` names no quantized dtype.
    """
    if isinstance(dtype, QuantDType):
        return dtype
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = dtype
    if isinstance(name, str):
        # a dict lookup, not a loop over the enum: torch.compile before 2.12 cannot trace iterating
        # an Enum class, and fake quant resolves its dtype string inside the compiled step
        member = _BY_NAME.get(name.strip().lower())
        if member is not None:
            return member
    valid = ", ".join(repr(m.value) for m in QuantDType)
    raise ValueError(
        f"Expected `dtype` to be a QuantDType or one of the strings {valid}, but got {dtype!r}."
    )


def qinfo(dtype: QuantDType | str) -> QInfo:
    """Return ``QInfo(min, max, bits)`` of ``dtype``."""
    return _INFO[as_dtype(dtype)]


def torch_dtype(dtype: QuantDType | str) -> torch.dtype:
    """Return the torch integer dtype that stores ``dtype`` (``torch.int8/int16/int32``)."""
    return _TORCH[as_dtype(dtype)]
