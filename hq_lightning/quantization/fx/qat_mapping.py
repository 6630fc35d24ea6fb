"""What prepare does with each module, read from the operator registry (:mod:`hq_lightning.quantization.ops`).

- A float module matching a ``weighted`` or ``requantize`` registry entry becomes that entry's QAT
  class (``from_float(mod, qconfig)``).
- Fused ``nn.intrinsic`` modules (attributes ``conv``, optional ``bn`` / ``relu``, add flag) map by
  the type of their ``conv``: a ``ConvBNAddReLU2d`` around an ``nn.Conv2d`` becomes a
  ``qat.Conv2d`` carrying the BN / add / ReLU.
- ``preserve`` entries (and ``requantize`` entries' ``preserve_when`` instances, e.g. nearest
  ``Upsample``) keep their input scale, get no fake quant and stay as they are.

Example:
    >>> import torch
    >>> qat_class_for(torch.nn.Conv2d(1, 1, 1)).__name__
    'Conv2d'
    >>> is_scale_preserving(torch.nn.Upsample(scale_factor=2)), qat_class_for(torch.nn.ReLU())
    (True, None)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import ops
from hq_lightning.quantization.ops import OpKind
from hq_lightning.quantization.stubs import is_dequant_stub, is_quant_stub

__all__ = [
    "NON_TENSOR_METHODS",
    "is_dequant",
    "is_fused_module",
    "is_quant",
    "is_scale_preserving",
    "is_scale_preserving_function",
    "is_scale_preserving_method",
    "qat_class_for",
]

#: Tensor methods / attributes whose result is no tensor (shapes, counts).
NON_TENSOR_METHODS = frozenset({"size", "dim", "numel", "shape", "ndim", "dtype", "device", "__len__"})

_INTRINSIC_PACKAGE = "hq_lightning.nn.intrinsic"


def is_fused_module(module: nn.Module) -> bool:
    """True for a fused float module of ``hq_lightning.nn.intrinsic`` (has a ``conv``)."""
    return type(module).__module__.startswith(_INTRINSIC_PACKAGE) and isinstance(getattr(module, "conv", None), nn.Module)


def is_scale_preserving(module: nn.Module) -> bool:
    """True for modules that keep their input's scale (no fake quant, stay float)."""
    if is_quant(module) or is_dequant(module):
        return False
    spec = ops.lookup_module(module)
    return spec is not None and spec.preserves_scale(module)


def is_scale_preserving_function(target: Any) -> bool:
    """A ``call_function`` target that runs on quantized tensors as it is, keeping the scale."""
    spec = ops.lookup_function(target)
    return spec is not None and spec.kind is OpKind.PRESERVE


def is_scale_preserving_method(name: Any) -> bool:
    """A Tensor method that runs on quantized tensors as it is, keeping the scale."""
    spec = ops.lookup_method(name)
    return spec is not None and spec.kind is OpKind.PRESERVE


def _float_functional_qat_class(module: nn.Module) -> type[nn.Module] | None:
    from hq_lightning.quantization.fx.tracer import is_float_functional

    return qat.FloatFunctional if is_float_functional(module) else None


def is_quant(module: nn.Module) -> bool:
    """A QuantStub, prepared (``qat.QuantStub``) or not (ours or torch's)."""
    return isinstance(module, qat.QuantStub) or is_quant_stub(module)


def is_dequant(module: nn.Module) -> bool:
    """A DeQuantStub, prepared (``qat.DeQuantStub``) or not (ours or torch's)."""
    return isinstance(module, qat.DeQuantStub) or is_dequant_stub(module)


def _requantizing_qat_class(module_or_type: Any) -> type[nn.Module] | None:
    spec = ops.lookup_module(module_or_type)
    if spec is None or spec.kind not in (OpKind.WEIGHTED, OpKind.REQUANTIZE):
        return None
    return spec.qat


def qat_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The QAT class replacing ``module``, or ``None`` when it stays as it is."""
    if is_quant_stub(module):
        return qat.QuantStub
    if is_dequant_stub(module):
        return qat.DeQuantStub
    if is_scale_preserving(module):
        return None
    if is_fused_module(module):
        return _requantizing_qat_class(type(module.conv))
    functional = _float_functional_qat_class(module)
    if functional is not None:
        return functional
    if type(module).__module__.startswith("hq_lightning.nn.qat"):
        return None  # prepared already
    return _requantizing_qat_class(module)
