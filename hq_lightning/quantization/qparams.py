"""The scale formula shared by every observer and fake-quant module.

Quantization is symmetric (zero point 0)::

    scale = max(amax, 0) / ((qmax - qmin) / 2)      floored at float32 eps
    BERNOULLI only: scale = 2 ** -clamp(floor(-log2(scale)), 1, 14)

So int8 divides by 127.5 and int16 by 32767.5: a value at ``+amax`` rounds to ``qmax + 1`` and
saturates to ``qmax``. All arithmetic is float32.

Example:
    >>> import torch
    >>> compute_scale(torch.tensor([127.5]), "qint8", "bayes")
    tensor([1.])
    >>> compute_scale(torch.tensor([1.0]), "qint8", "bernoulli")  # 1/127.5 -> 2**-6
    tensor([0.0156])
"""

from __future__ import annotations

import torch

from hq_lightning.dtype import QuantDType, qinfo
from hq_lightning.march import March, get_march, uses_power_of_two_scales
from hq_lightning.quantization.host_float32 import to_float32

__all__ = ["SCALE_EPS", "amax_from_min_max", "compute_scale", "compute_scale_on_host", "half_range", "snap_power_of_two"]

SCALE_EPS = torch.finfo(torch.float32).eps
_MIN_SHIFT, _MAX_SHIFT = 1, 14


def half_range(dtype: QuantDType | str) -> float:
    """``(qmax - qmin) / 2``: what ``amax`` is divided by (127.5 for int8, 32767.5 for int16)."""
    info = qinfo(dtype)
    return (info.max - info.min) / 2.0


def amax_from_min_max(min_val: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``max(-min, max, 0)`` elementwise, in float32."""
    return torch.maximum(-min_val.float(), max_val.float()).clamp_min(0.0)


def snap_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """BERNOULLI scale: ``2 ** -clamp(floor(-log2(scale)), 1, 14)`` (never smaller than ``scale``
    unless the clamp bites)."""
    shift = torch.floor(-torch.log2(scale.float())).clamp(_MIN_SHIFT, _MAX_SHIFT)
    return torch.exp2(-shift)


def compute_scale(
    amax: torch.Tensor, dtype: QuantDType | str, march: March | str | None = None
) -> torch.Tensor:
    """Scale of a symmetric quantizer covering ``[-amax, amax]`` with ``dtype`` on ``march``.

    Args:
        amax: absolute range, any shape (per tensor or per channel); negative values count as 0.
        dtype: quantized dtype (``"qint8"``, ``"qint16"``...).
        march: target march; ``None`` reads :func:`hq_lightning.march.get_march`.

    Returns:
        float32 tensor of the same shape as ``amax``.
    """
    # max(amax, 0) / h floored at eps == max(amax / h, eps) for every float (NaN included): a
    # negative amax / h is below eps either way, so one clamp does both (one small op less per step)
    scale = torch.div(amax.float(), half_range(dtype)).clamp_min_(SCALE_EPS)
    if uses_power_of_two_scales(get_march() if march is None else march):
        scale = snap_power_of_two(scale)
    return scale


def compute_scale_on_host(amax: float, dtype: QuantDType | str, march: March | str) -> float | None:
    """:func:`compute_scale` of one float32 ``amax`` given as a Python float, with the same bits
    (:mod:`hq_lightning.quantization.host_float32`), or ``None`` where the host does not compute
    it: power-of-two marches (their ``log2`` is torch's own) and a quotient outside float32's
    normal range.

    Example:
        >>> compute_scale_on_host(127.5, "qint8", "bayes")
        1.0
        >>> compute_scale_on_host(1.0, "qint8", "bernoulli") is None
        True
    """
    if uses_power_of_two_scales(march):
        return None
    scale = to_float32(amax / half_range(dtype))
    return None if scale is None else max(scale, SCALE_EPS)
