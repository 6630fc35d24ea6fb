"""Registry entry: constant operands (a parameter or buffer read by an op on activations).

:func:`~hq_lightning.quantization.fx.constant_operands.insert_constant_operands` puts a
``ConstantOperand`` after such a ``get_attr``; prepare gives it a weight-like fake quant
(:class:`hq_lightning.nn.qat.constant.ConstantOperand`), convert replaces it with its integer codes.

Example:
    >>> from hq_lightning.nn.quantized.constant import ConstantOperand
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> lookup_module(ConstantOperand()).name
    'constant'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hq_lightning.functional.integer import quantize
from hq_lightning.nn.qat.constant import ConstantOperand as QATConstantOperand
from hq_lightning.nn.quantized.constant import ConstantOperand, QuantizedConstant
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_constant", "constant_value"]


def constant_value(ctx: ConvertContext, index: int = 0):
    """The float value of the ``get_attr`` a builder's node reads as argument ``index``."""
    node = ctx.node.args[index]
    obj = ctx.node.graph.owning_module
    for atom in str(node.target).split("."):
        obj = getattr(obj, atom)
    return obj.detach()


def build_constant(ctx: ConvertContext) -> nn.Module:
    """QAT ``ConstantOperand`` -> :class:`~hq_lightning.nn.quantized.constant.QuantizedConstant`.

    The codes are the fake quant's: ``sat(RNE(c * fp32(1 / s)))`` per tensor or per channel.
    """
    out = ctx.output
    axis = out.ch_axis
    value = constant_value(ctx)
    codes = quantize(value, out.scale, out.dtype, None if axis is None else axis % value.dim())
    return QuantizedConstant(codes, out.scale, axis)


register_op(OpSpec(
    "constant", OpKind.REQUANTIZE,
    "a parameter/buffer operand of an op on activations: int codes computed at convert time "
    "(weight-like fake quant: per tensor, per channel for a constant multiplying an activation)",
    modules=(ConstantOperand,), qat=QATConstantOperand, integer=build_constant, dtypes=("qint8", "qint16"),
    reference="tests/test_ops_attention.py::test_constant_operands_convert_to_codes",
))  # fmt: skip
