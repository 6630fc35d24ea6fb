"""What ``convert_fx`` turns each prepared module, function call and ``FloatFunctional`` op into.

Read from the operator registry (:mod:`hq_lightning.quantization.ops`): each entry's integer
**builder** ``builder(ctx) -> nn.Module`` gets a :class:`~.convert.ConvertContext` (the module being
replaced, its node, the propagated qparams of its inputs and output) and returns the integer module
of :mod:`hq_lightning.nn.quantized` that replaces it. Builders only translate: float weights are
quantized with the weight fake quant's scale by the integer modules' ``from_float_params`` (rules
in ``docs/integer-arithmetic.md``, section 2). An entry without a builder runs on integer tensors
as it is (ReLU, MaxPool3d, Identity, reshape...).

Example:
    >>> import torch
    >>> from hq_lightning.nn import qat
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> module_builder(qat.Conv2d(1, 1, 1, qconfig=qc)).__name__
    'build_weighted'
    >>> is_scale_preserving_module(torch.nn.MaxPool2d(2)), module_builder(torch.nn.ReLU())
    (True, None)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hq_lightning.nn import qat
from hq_lightning.quantization import ops
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.qat_mapping import is_dequant, is_quant
from hq_lightning.quantization.ops import Builder, OpKind
from hq_lightning.quantization.ops.stubs import build_dequantize, build_quantize
from hq_lightning.quantization.ops.weighted import out_channels, output_channel_axis

__all__ = [
    "FLOAT_FUNCTIONAL_CLASS_NAMES",
    "NON_TENSOR_METHODS",
    "function_builder",
    "functional_builder",
    "is_dequant",
    "is_elementwise",
    "is_float_functional",
    "is_qat_module",
    "is_quant",
    "is_scale_preserving_module",
    "module_builder",
    "out_channels",
    "output_channel_axis",
]

#: Class names of FloatFunctional modules (ours, its QAT form, torch's), recognised by name.
FLOAT_FUNCTIONAL_CLASS_NAMES = frozenset({"FloatFunctional", "QATFloatFunctional"})

NON_TENSOR_METHODS = qat_mapping.NON_TENSOR_METHODS


def is_scale_preserving_module(module: nn.Module) -> bool:
    """Whether ``module`` keeps its input scale (prepare left it float, without fake quant)."""
    return qat_mapping.is_scale_preserving(module)


def is_qat_module(module: nn.Module) -> bool:
    """A prepared module with a QAT registry entry (weighted / requantizing, not a stub)."""
    spec = ops.lookup_module(module)
    return (
        spec is not None
        and spec.kind in (OpKind.WEIGHTED, OpKind.REQUANTIZE)
        and spec.qat is not None
        and isinstance(module, spec.qat)
    )


def is_float_functional(module: nn.Module) -> bool:
    """A ``FloatFunctional`` (ours, its QAT form, or torch's, recognised by class name)."""
    from hq_lightning.quantization.fx.tracer import is_float_functional as traced_float_functional

    return (
        type(module).__name__ in FLOAT_FUNCTIONAL_CLASS_NAMES
        or traced_float_functional(module)
        or isinstance(module, qat.FloatFunctional)
    )


def is_elementwise(node_op: str, target: Any, module: nn.Module | None = None) -> bool:
    """Whether a scale-preserving op passes a per-channel scale on (acts per element / channel)."""
    if node_op == "call_module":
        spec = ops.lookup_module(module)
    elif node_op == "call_function":
        spec = ops.lookup_function(target)
    else:
        spec = ops.lookup_method(target)
    return spec is not None and spec.elementwise


def module_builder(module: nn.Module) -> Builder | None:
    """The builder replacing ``module`` in the converted model, or ``None`` to keep it."""
    if is_quant(module):
        return build_quantize
    if is_dequant(module):
        return build_dequantize
    spec = ops.lookup_module(module)
    if spec is None:
        return None
    if spec.preserves_scale(module) or is_qat_module(module):
        return spec.integer
    return None


def function_builder(target: Any) -> Builder | None:
    """The builder replacing a scale-preserving function call on integer tensors, or ``None``."""
    spec = ops.lookup_function(target)
    return spec.integer_function if spec is not None and spec.kind is OpKind.PRESERVE else None


def functional_builder(method: str) -> Builder | None:
    """The builder of a ``FloatFunctional`` method's integer module, or ``None`` (no integer form)."""
    spec = ops.lookup_functional(method)
    return spec.integer if spec is not None else None
