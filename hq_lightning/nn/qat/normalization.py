"""QAT normalisations: the float module, then an output fake quant.

``BatchNorm1d/2d/3d`` not folded into a conv (DenseNet's pre-activation BN), ``LayerNorm``,
``GroupNorm``, ``InstanceNorm1d/2d/3d``, ``Softmax`` and ``LogSoftmax`` keep their float forward (batch statistics in
training, running statistics in eval for BN; true gradients) and fake-quantize the output. The
QAT module is the float module retyped: it shares the float module's Parameters and buffers.

A subclass of ``nn.LayerNorm`` with its own ``forward`` (torchvision ConvNeXt's ``LayerNorm2d``,
which permutes NCHW to NHWC and back) is recognised by probing: if it normalises over axis 1,
the QAT module does so with ``channels_first=True``; any other override is refused.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> ln = LayerNorm.from_float(torch.nn.LayerNorm(8), qc)
    >>> ln(torch.randn(2, 8)).shape, ln.channels_first
    (torch.Size([2, 8]), False)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, qconfig_of
from hq_lightning.nn.qat.output_fake_quant import OutputFakeQuantMixin

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LogSoftmax",
    "RetypedQATMixin",
    "Softmax",
]


class RetypedQATMixin(OutputFakeQuantMixin):
    """``from_float`` retypes a shallow copy of the float module (same Parameters and buffers)."""

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> nn.Module:
        qat = cls.__new__(cls)
        qat.__dict__.update(mod.__dict__)
        for key, value in list(qat.__dict__.items()):
            if isinstance(value, (dict, set)):
                qat.__dict__[key] = type(value)(value)  # own registries, same tensors
        qat.qconfig = qconfig_of(mod, qconfig)
        qat.activation_post_process = activation_fake_quant(qat.qconfig)
        qat.train(mod.training)
        return qat


class BatchNorm1d(RetypedQATMixin, nn.BatchNorm1d):
    """QAT ``nn.BatchNorm1d``."""


class BatchNorm2d(RetypedQATMixin, nn.BatchNorm2d):
    """QAT ``nn.BatchNorm2d``."""


class BatchNorm3d(RetypedQATMixin, nn.BatchNorm3d):
    """QAT ``nn.BatchNorm3d``."""


class GroupNorm(RetypedQATMixin, nn.GroupNorm):
    """QAT ``nn.GroupNorm``."""


class InstanceNorm1d(RetypedQATMixin, nn.InstanceNorm1d):
    """QAT ``nn.InstanceNorm1d``."""


class InstanceNorm2d(RetypedQATMixin, nn.InstanceNorm2d):
    """QAT ``nn.InstanceNorm2d``."""


class InstanceNorm3d(RetypedQATMixin, nn.InstanceNorm3d):
    """QAT ``nn.InstanceNorm3d``."""


def _channels_first(mod: nn.LayerNorm) -> bool:
    """Whether ``mod`` (an ``nn.LayerNorm``, maybe a subclass) normalises over its last axes or axis 1."""
    if type(mod).forward is nn.LayerNorm.forward:
        return False
    shape = tuple(mod.normalized_shape)
    if len(shape) == 1:
        x = torch.randn(2, shape[0], 3, 5, generator=torch.Generator().manual_seed(0))
        args = (mod.weight, mod.bias, mod.eps)
        with torch.no_grad():
            expected = F.layer_norm(x.permute(0, 2, 3, 1), shape, *args).permute(0, 3, 1, 2)
            try:
                got = mod(x)
            except RuntimeError:
                got = None
        if got is not None and got.shape == x.shape and torch.allclose(got, expected, atol=1e-5):
            return True
    raise ValueError(
        f"Expected an nn.LayerNorm, or a subclass normalising over axis 1 (ConvNeXt's LayerNorm2d), "
        f"but got {type(mod).__name__} with a forward of its own that does neither: wrap it "
        "(hq_lightning.utils.fx_helper.wrap) or give it qconfig None to keep it float."
    )


class LayerNorm(RetypedQATMixin, nn.LayerNorm):
    """QAT ``nn.LayerNorm``; ``channels_first`` normalises over axis 1 (``LayerNorm2d``)."""

    channels_first: bool = False

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> LayerNorm:
        channels_first = _channels_first(mod)
        qat = super().from_float(mod, qconfig)
        qat.channels_first = channels_first
        return qat

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_first:
            out = super(OutputFakeQuantMixin, self).forward(x.movedim(1, -1)).movedim(-1, 1)
        else:
            out = super(OutputFakeQuantMixin, self).forward(x)
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out


class _DimQAT(OutputFakeQuantMixin):
    """``from_float`` copies ``dim``; the float module's forward, then the output fake quant."""

    def __init__(self, dim: int | None = None, qconfig: Any = None) -> None:
        super().__init__(dim)
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> nn.Module:
        qat = cls(mod.dim, qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat


class Softmax(_DimQAT, nn.Softmax):
    """QAT ``nn.Softmax``."""


class LogSoftmax(_DimQAT, nn.LogSoftmax):
    """QAT ``nn.LogSoftmax``."""
