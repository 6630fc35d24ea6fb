"""Which float / fused module becomes which QAT module, and what needs no QAT module, as data.

- :data:`FLOAT_TO_QAT`: float module type -> QAT class (``from_float(mod, qconfig)``).
- Fused ``nn.intrinsic`` modules (attributes ``conv``, optional ``bn`` / ``relu``, add flag) map by
  the type of their ``conv``: a ``ConvBNAddReLU2d`` around an ``nn.Conv2d`` becomes a
  ``qat.Conv2d`` carrying the BN / add / ReLU.
- Scale-preserving modules, functions and tensor methods keep their input scale, get no fake
  quant and stay as they are; nearest ``Upsample`` is one of them.

Example:
    >>> import torch
    >>> qat_class_for(torch.nn.Conv2d(1, 1, 1)).__name__
    'Conv2d'
    >>> is_scale_preserving(torch.nn.Upsample(scale_factor=2)), qat_class_for(torch.nn.ReLU())
    (True, None)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization.stubs import is_dequant_stub, is_quant_stub

__all__ = [
    "FLOAT_TO_QAT",
    "NON_TENSOR_METHODS",
    "SCALE_PRESERVING_FUNCTIONS",
    "SCALE_PRESERVING_METHODS",
    "SCALE_PRESERVING_MODULES",
    "is_dequant",
    "is_fused_module",
    "is_quant",
    "is_scale_preserving",
    "qat_class_for",
]

FLOAT_TO_QAT: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: qat.Conv1d,
    nn.Conv2d: qat.Conv2d,
    nn.Conv3d: qat.Conv3d,
    nn.ConvTranspose2d: qat.ConvTranspose2d,
    nn.Linear: qat.Linear,
    nn.AvgPool2d: qat.AvgPool2d,
    nn.AdaptiveAvgPool2d: qat.AdaptiveAvgPool2d,
    nn.Upsample: qat.Upsample,
}

SCALE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool2d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Flatten,
    nn.Unflatten,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ZeroPad2d,
)

SCALE_PRESERVING_FUNCTIONS = frozenset(
    {
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.relu,
        torch.chunk,
        torch.split,
        F.relu,
        F.relu6,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_max_pool2d,
        F.dropout,
        F.pixel_shuffle,
        F.pixel_unshuffle,
        operator.getitem,
    }
)

SCALE_PRESERVING_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "permute",
        "transpose",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "relu",
        "chunk",
        "split",
        "expand",
        "expand_as",
        "repeat",
        "detach",
        "clone",
        "__getitem__",
    }
)

#: Tensor methods / attributes whose result is no tensor (shapes, counts).
NON_TENSOR_METHODS = frozenset({"size", "dim", "numel", "shape", "ndim", "dtype", "device", "__len__"})

_INTRINSIC_PACKAGE = "hq_lightning.nn.intrinsic"


def is_fused_module(module: nn.Module) -> bool:
    """True for a fused float module of ``hq_lightning.nn.intrinsic`` (has a ``conv``)."""
    return type(module).__module__.startswith(_INTRINSIC_PACKAGE) and isinstance(getattr(module, "conv", None), nn.Module)


def is_scale_preserving(module: nn.Module) -> bool:
    """True for modules that keep their input's scale (no fake quant, stay float)."""
    if isinstance(module, nn.Upsample):
        return module.mode == "nearest"
    return isinstance(module, SCALE_PRESERVING_MODULES)


def _float_functional_qat_class(module: nn.Module) -> type[nn.Module] | None:
    from hq_lightning.quantization.fx.tracer import is_float_functional

    return qat.FloatFunctional if is_float_functional(module) else None


def is_quant(module: nn.Module) -> bool:
    """A QuantStub, prepared (``qat.QuantStub``) or not (ours or torch's)."""
    return isinstance(module, qat.QuantStub) or is_quant_stub(module)


def is_dequant(module: nn.Module) -> bool:
    """A DeQuantStub, prepared (``qat.DeQuantStub``) or not (ours or torch's)."""
    return isinstance(module, qat.DeQuantStub) or is_dequant_stub(module)


def qat_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The QAT class replacing ``module``, or ``None`` when it stays as it is."""
    if is_quant_stub(module):
        return qat.QuantStub
    if is_dequant_stub(module):
        return qat.DeQuantStub
    if is_scale_preserving(module):
        return None
    if is_fused_module(module):
        return FLOAT_TO_QAT.get(type(module.conv))
    functional = _float_functional_qat_class(module)
    if functional is not None:
        return functional
    return FLOAT_TO_QAT.get(type(module))
