"""Registry entries: ReLU and ReLU6 on integer tensors.

ReLU clamps at the integer 0 (0.0 at any scale), so it runs as it is; ReLU6 must clamp at the
integer standing for 6.0 at the input's scale, so it becomes :class:`~hq_lightning.nn.quantized.QuantizedReLU6`.

Example:
    >>> import torch.nn.functional as F
    >>> from hq_lightning.quantization.ops import lookup_function
    >>> lookup_function(F.relu6).integer_function.__name__
    'build_relu6'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_relu6"]


def build_relu6(ctx: ConvertContext) -> nn.Module:
    """Standalone ``nn.ReLU6`` / ``F.relu6`` on an integer tensor ->
    :class:`~hq_lightning.nn.quantized.QuantizedReLU6`: clamps at the integer standing for 6.0 at the
    input's scale (the rule of a fused ReLU6), not at the integer 6."""
    x = per_tensor(ctx, ctx.input, "input")
    return nnq.QuantizedReLU6(x.scale, x.dtype)


register_op(OpSpec(
    "relu", OpKind.PRESERVE, "max(q, 0) on integer codes; scale unchanged",
    modules=(nn.ReLU,), functions=(torch.relu, F.relu, torch.relu_, F.relu_), methods=("relu", "relu_"),
    elementwise=True,
    reference="max of integers is exact by definition",
))  # fmt: skip
register_op(OpSpec(
    "relu6", OpKind.PRESERVE, "clamp(q, 0, q6), q6 the integer standing for 6.0 at the input scale",
    modules=(nn.ReLU6,), functions=(F.relu6,), integer=build_relu6, integer_function=build_relu6,
    reference="tests/reference/integer_ref.py::ref_relu6",
))  # fmt: skip
