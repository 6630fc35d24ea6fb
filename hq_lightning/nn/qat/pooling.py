"""QAT average pools: the float pool followed by an output fake quant (averaging changes the range).

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> pool = AdaptiveAvgPool2d.from_float(torch.nn.AdaptiveAvgPool2d(1), qc)
    >>> pool(torch.rand(2, 3, 4, 4)).shape
    torch.Size([2, 3, 1, 1])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, qconfig_of
from hq_lightning.nn.qat.output_fake_quant import OutputFakeQuantMixin

__all__ = [
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
]


class AvgPool2d(OutputFakeQuantMixin, nn.AvgPool2d):
    """QAT ``nn.AvgPool2d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AvgPool2d, qconfig: Any = None) -> AvgPool2d:
        qat = cls(
            mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
            mod.divisor_override, qconfig=qconfig_of(mod, qconfig),
        )
        qat.train(mod.training)
        return qat


class AdaptiveAvgPool2d(OutputFakeQuantMixin, nn.AdaptiveAvgPool2d):
    """QAT ``nn.AdaptiveAvgPool2d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, output_size: Any, qconfig: Any = None) -> None:
        super().__init__(output_size)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AdaptiveAvgPool2d, qconfig: Any = None) -> AdaptiveAvgPool2d:
        qat = cls(mod.output_size, qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat


class AvgPool1d(OutputFakeQuantMixin, nn.AvgPool1d):
    """QAT ``nn.AvgPool1d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AvgPool1d, qconfig: Any = None) -> AvgPool1d:
        qat = cls(
            mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
            qconfig=qconfig_of(mod, qconfig),
        )
        qat.train(mod.training)
        return qat


class AvgPool3d(OutputFakeQuantMixin, nn.AvgPool3d):
    """QAT ``nn.AvgPool3d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AvgPool3d, qconfig: Any = None) -> AvgPool3d:
        qat = cls(
            mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
            mod.divisor_override, qconfig=qconfig_of(mod, qconfig),
        )
        qat.train(mod.training)
        return qat


class AdaptiveAvgPool1d(OutputFakeQuantMixin, nn.AdaptiveAvgPool1d):
    """QAT ``nn.AdaptiveAvgPool1d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, output_size: Any, qconfig: Any = None) -> None:
        super().__init__(output_size)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AdaptiveAvgPool1d, qconfig: Any = None) -> AdaptiveAvgPool1d:
        qat = cls(mod.output_size, qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat


class AdaptiveAvgPool3d(OutputFakeQuantMixin, nn.AdaptiveAvgPool3d):
    """QAT ``nn.AdaptiveAvgPool3d``: same arguments plus ``qconfig``; output fake quant."""

    def __init__(self, output_size: Any, qconfig: Any = None) -> None:
        super().__init__(output_size)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.AdaptiveAvgPool3d, qconfig: Any = None) -> AdaptiveAvgPool3d:
        qat = cls(mod.output_size, qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat
