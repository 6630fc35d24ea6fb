"""Building a QAT module's fake-quant modules from its qconfig.

The weight fake quant is per channel on the output-channel axis (0 for Conv/Linear, 1 for
ConvTranspose); the activation fake quant is per tensor, or absent when the qconfig asks for a
high-precision output (``activation=None``).

Example:
    >>> from hq_lightning.quantization.qconfig import (default_qat_8bit_fake_quant_qconfig,
    ...     default_qat_8bit_weight_32bit_out_fake_quant_qconfig)
    >>> weight_fake_quant(default_qat_8bit_fake_quant_qconfig, ch_axis=1, owner="deconv").ch_axis
    1
    >>> activation_fake_quant(default_qat_8bit_weight_32bit_out_fake_quant_qconfig) is None
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["activation_fake_quant", "fixed_scale_fake_quant", "qconfig_of", "weight_fake_quant"]


def qconfig_of(mod: nn.Module, qconfig: Any) -> Any:
    """The qconfig ``from_float`` was given, else the one recorded on the float module."""
    return qconfig if qconfig is not None else getattr(mod, "qconfig", None)


def weight_fake_quant(qconfig: Any, ch_axis: int = 0, owner: str = "module") -> nn.Module:
    """Build ``qconfig.weight()`` quantizing per channel along ``ch_axis``.

    A per-tensor weight factory (``ch_axis=None``) stays per tensor; a per-channel one is rebuilt
    on ``ch_axis`` when it names another axis (ConvTranspose keeps its output channels on axis 1).
    """
    if qconfig is None or getattr(qconfig, "weight", None) is None:
        raise ValueError(
            f"Expected the qconfig of weighted module `{owner}` to have a weight fake quant, "
            f"but got {qconfig!r}. Give it a qconfig with `weight=FakeQuantize.with_args(...)`, "
            "or set its qconfig to None to keep it float."
        )
    fake_quant = qconfig.weight()
    current = getattr(fake_quant, "ch_axis", None)
    if current is not None and current != ch_axis:
        fake_quant = qconfig.weight(ch_axis=ch_axis)
    return fake_quant


def activation_fake_quant(qconfig: Any) -> nn.Module | None:
    """Build ``qconfig.activation()``, or ``None`` for a high-precision output."""
    if qconfig is None or qconfig.activation is None:
        return None
    return qconfig.activation()


def fixed_scale_fake_quant(qconfig: Any, scale: float, owner: str = "QuantStub") -> nn.Module:
    """A fake quant of the activation factory's class and dtype pinned to ``scale``.

    Only the class and ``dtype`` of ``qconfig.activation`` are kept: the observer becomes a
    :class:`~hq_lightning.quantization.observer.FixedScaleObserver` (its other arguments, such as
    an averaging constant or a percentile, mean nothing for a fixed scale). The ``scale`` buffer
    holds the value from construction on, so validation works before any training step.
    """
    from hq_lightning.quantization.observer import FixedScaleObserver

    factory = qconfig.activation if qconfig is not None else None
    if factory is None:
        raise ValueError(
            f"Expected the qconfig of `{owner}` to have an activation fake quant, but got {qconfig!r}."
        )
    cls = getattr(factory, "func", factory)
    dtype = dict(getattr(factory, "keywords", {}) or {}).get("dtype", "qint8")
    fake_quant = cls(observer=FixedScaleObserver.with_args(scale=float(scale)), dtype=dtype)
    with torch.no_grad():
        fixed, _ = fake_quant.calculate_qparams()
        fake_quant.scale.copy_(fixed)
    return fake_quant
