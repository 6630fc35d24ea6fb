"""QAT ``QuantStub`` / ``DeQuantStub``.

``QuantStub`` fake-quantizes its input with the qconfig's activation fake quant; with a fixed
``scale`` (e.g. ``1/128`` for centered YUV input) the scale is pinned by a fixed-scale observer and
``scale`` keeps the float stub's meaning. ``DeQuantStub`` passes its input through: it marks where
the deployed graph ends.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub as FloatQuantStub
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> stub = QuantStub.from_float(FloatQuantStub(scale=1 / 128), qc)
    >>> stub(torch.tensor([0.5, 0.51, 2.0]))
    tensor([0.5000, 0.5078, 0.9922])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hq_lightning.nn.qat.fake_quant_builders import (
    activation_fake_quant,
    fixed_scale_fake_quant,
    qconfig_of,
)

__all__ = ["DeQuantStub", "QuantStub"]


class QuantStub(nn.Module):
    """Fake-quantizes the model input (one input per stub).

    Args:
        scale: fixed scale, or ``None`` to observe it.
        qconfig: the qconfig; its ``activation`` must not be ``None``.

    Attributes:
        activation_post_process: the input's ``FakeQuantize`` (its ``scale`` buffer is the input scale).
    """

    def __init__(self, scale: float | None = None, qconfig: Any = None) -> None:
        super().__init__()
        self.scale = None if scale is None else float(scale)
        self.qconfig = qconfig
        if self.scale is None:
            fake_quant = activation_fake_quant(qconfig)
            if fake_quant is None:
                raise ValueError(
                    "Expected the qconfig of a QuantStub to have an activation fake quant, but got "
                    f"{qconfig!r}: a QuantStub always quantizes; give it a qconfig with an activation "
                    "or set its qconfig to None to keep that part of the model float."
                )
        else:
            fake_quant = fixed_scale_fake_quant(qconfig, self.scale)
        self.activation_post_process = fake_quant

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> QuantStub:
        """Build from a float ``QuantStub`` (ours, with optional ``scale``, or torch's)."""
        qat = cls(scale=getattr(mod, "scale", None), qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_post_process(x)

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale}"


class DeQuantStub(nn.Module):
    """Pass-through marking the end of the quantized part (no fake quant)."""

    def __init__(self, qconfig: Any = None) -> None:
        super().__init__()
        self.qconfig = qconfig
        self.activation_post_process = None

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> DeQuantStub:
        qat = cls(qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
