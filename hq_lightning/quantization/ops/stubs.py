"""Registry entries: ``QuantStub`` and ``DeQuantStub``, where the integer part of a model starts and ends.

Example:
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> from hq_lightning.quantization import QuantStub
    >>> lookup_module(QuantStub()).name
    'quant_stub'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization import stubs
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_dequantize", "build_quantize"]


def build_quantize(ctx: ConvertContext) -> nn.Module:
    """``QuantStub`` -> :class:`~hq_lightning.nn.quantized.Quantize` (its ``scale`` is a buffer).

    A stub fed by an integer tensor (a segment boundary) gets that tensor's scale as
    ``input_scale``: in the whole model it requantizes, in a stage split off at it (float input)
    it quantizes.
    """
    from hq_lightning.quantization.fx.convert import QParams

    quantized = [q for q in ctx.inputs if isinstance(q, QParams)]
    input_scale = per_tensor(ctx, quantized[0], "input").scale if quantized else None
    return nnq.Quantize(ctx.output.scale, ctx.output.dtype, input_scale=input_scale)


def build_dequantize(ctx: ConvertContext) -> nn.Module:
    """``DeQuantStub`` -> :class:`~hq_lightning.nn.quantized.DeQuantize` with the propagated scale."""
    q = ctx.input
    return nnq.DeQuantize(q.scale, q.ch_axis)


register_op(OpSpec(
    "quant_stub", OpKind.STUB,
    "float -> int: clamp(round_half_even(x * fp32(1 / s)))",
    modules=(stubs.QuantStub, qat.QuantStub), qat=qat.QuantStub, integer=build_quantize,
    reference="tests/reference/integer_ref.py::ref_quantize",
))  # fmt: skip
register_op(OpSpec(
    "dequant_stub", OpKind.STUB, "int -> float: q * s (float32)",
    modules=(stubs.DeQuantStub, qat.DeQuantStub), qat=qat.DeQuantStub, integer=build_dequantize,
    elementwise=True, reference="tests/reference/integer_ref.py::ref_dequantize",
))  # fmt: skip
