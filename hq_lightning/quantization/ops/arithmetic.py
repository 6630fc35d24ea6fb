"""Registry entries: tensor operators, generated as ``FloatFunctional`` methods (``_generated_add_0``).

``x + y``, ``torch.cat``, ``x * 0.5``, ``x.mean(1)``, ``x @ y``... become calls of a generated
``FloatFunctional`` (see :mod:`hq_lightning.quantization.fx.functional_ops`), which carries the output
fake quant in QAT and becomes a :class:`~hq_lightning.nn.quantized.QFunctional` with static scales at
convert. ``functions`` and ``methods`` of these entries are the spellings rewritten into the method.

Example:
    >>> import operator
    >>> from hq_lightning.quantization.ops import lookup_function
    >>> spec = lookup_function(operator.add)
    >>> spec.functional, spec.form
    (('add',), 'binary')
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from torch import nn

from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_functional", "build_mul"]


def build_functional(ctx: ConvertContext) -> nn.Module:
    """``FloatFunctional`` op -> :class:`~hq_lightning.nn.quantized.QFunctional` with static scales.

    One ``QFunctional`` per call: it knows the scale of each tensor input in call order.
    """
    from hq_lightning.quantization.fx.convert import NON_TENSOR

    tensors = [q for q in ctx.inputs if q is not NON_TENSOR]  # sizes passed as arguments
    scales = [per_tensor(ctx, q, f"tensor input {i}").scale for i, q in enumerate(tensors)]
    return nnq.QFunctional(torch.cat(scales), ctx.output.scale, ctx.output.dtype)


def build_mul(ctx: ConvertContext) -> nn.Module:
    """``mul``: a :class:`~hq_lightning.nn.quantized.QFunctional`, or with a per-channel constant
    operand (``layer_scale * x``) a :class:`~hq_lightning.nn.quantized.constant.QuantizedChannelMul`."""
    from hq_lightning.nn.quantized.constant import QuantizedChannelMul
    from hq_lightning.quantization.fx.convert import NON_TENSOR

    tensors = [q for q in ctx.inputs if q is not NON_TENSOR]
    channel = [q for q in tensors if getattr(q, "per_channel", False) and q.dtype.value != "qint32"]
    if len(tensors) != 2 or not channel:
        return build_functional(ctx)
    other = per_tensor(ctx, tensors[1] if tensors[0] is channel[0] else tensors[0], "activation operand")
    return QuantizedChannelMul(other.scale, channel[0].scale, channel[0].ch_axis, ctx.output.scale, ctx.output.dtype)


_REF = "tests/test_quantized_modules.py::test_qfunctional_matches_reference"
_PAIR = "each operand times its own multiplier, one shared shift, summed in int64, rounded once"


def _functional(name: str, form: str, summary: str, functions=(), methods=(), integer=build_functional, **kw) -> None:
    register_op(OpSpec(
        name, OpKind.FUNCTIONAL, summary, functions=tuple(functions), methods=tuple(methods),
        functional=(name,), form=form, integer=integer, **{"reference": _REF if integer else "", **kw},
    ))  # fmt: skip


_functional("add", "binary", _PAIR, (operator.add, operator.iadd, torch.add), ("add",))
_functional("sub", "binary", _PAIR, (operator.sub, operator.isub, torch.sub), ("sub",))
_functional("add_relu", "binary", _PAIR + ", clamped at 0")
_functional(
    "mul", "binary",
    "int64 product, one multiplier/shift for s_x * s_y / s_out (one per channel for a per-channel "
    "constant operand)",
    (operator.mul, operator.imul, torch.mul), ("mul",), integer=build_mul,
)
_functional(
    "matmul", "binary",
    "exact int64 sum of products (float32/float64 chunks proved exact), multiplier/shift for "
    "s_x * s_y / s_out sized for K, requantized",
    (operator.matmul, operator.imatmul, torch.matmul, torch.bmm, torch.mm),
    ("matmul", "bmm", "mm", "__matmul__"),
    reference="tests/test_ops_attention.py::test_every_matmul_spelling_is_an_exact_integer_matmul",
)
_functional("add_scalar", "scalar", "x * m plus the constant at the output scale, one rounding")
_functional("mul_scalar", "scalar", "one multiplier/shift for |c| * s_in / s_out, sign applied")
_functional(
    "cat", "list", "each input requantized to the output scale, then concatenated",
    (torch.cat, torch.concat, torch.concatenate),
)
_functional("stack", "list", "each input requantized to the output scale, then stacked", (torch.stack,))
_functional("sum", "reduce", "exact int64 sum, requantized", (torch.sum,), ("sum",))
_functional("mean", "reduce", "exact int64 sum, requantized by s_in / (count * s_out)", (torch.mean,), ("mean",))
_functional(
    "maximum", "binary", "no integer form yet: refused by convert_fx",
    (torch.maximum,), ("maximum",), integer=None, error="no integer form",
)
_functional(
    "minimum", "binary", "no integer form yet: refused by convert_fx",
    (torch.minimum,), ("minimum",), integer=None, error="no integer form",
)
