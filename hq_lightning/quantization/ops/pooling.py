"""Registry entries: average pools (window sum + requantization) and max pools (values pass through).

Example:
    >>> import torch.nn.functional as F
    >>> from hq_lightning.quantization.ops import lookup_spelling
    >>> [spec.name for spec, _ in lookup_spelling(F.avg_pool2d)]
    ['avg_pool2d']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, Spelling, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = [
    "build_adaptive_avg_pool",
    "build_avg_pool",
    "build_max_pool2d",
    "unsupported_on_integers",
]


def build_avg_pool(ctx: ConvertContext) -> nn.Module:
    """QAT ``AvgPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedAvgPool2d`."""
    module = ctx.module
    x = per_tensor(ctx, ctx.input, "input")
    if module.divisor_override is not None:
        raise RuntimeError(
            f"Expected `{ctx.path}` to have divisor_override=None, but got {module.divisor_override}."
        )
    return nnq.QuantizedAvgPool2d(
        module.kernel_size,
        module.stride,
        module.padding,
        input_scale=x.scale,
        output_scale=ctx.output.scale,
        output_dtype=ctx.output.dtype,
        ceil_mode=module.ceil_mode,
        count_include_pad=module.count_include_pad,
    )


def build_adaptive_avg_pool(ctx: ConvertContext) -> nn.Module:
    """QAT ``AdaptiveAvgPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedAdaptiveAvgPool2d`."""
    x = per_tensor(ctx, ctx.input, "input")
    return nnq.QuantizedAdaptiveAvgPool2d(
        ctx.module.output_size, input_scale=x.scale, output_scale=ctx.output.scale,
        output_dtype=ctx.output.dtype,
    )


def build_max_pool2d(ctx: ConvertContext) -> nn.Module:
    """``nn.MaxPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedMaxPool2d` (scale unchanged)."""
    m = ctx.module
    return nnq.QuantizedMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def unsupported_on_integers(ctx: ConvertContext) -> nn.Module:
    """Builder of scale-preserving ops that give wrong results on integer tensors (no kernel yet)."""
    what = type(ctx.module).__name__ if ctx.module is not None else ctx.node.target
    raise RuntimeError(
        f"Expected `{ctx.path}` ({getattr(what, '__name__', what)}) to have an integer kernel, but "
        "it has none: torch has no integer adaptive max pool / 1-d max pool. Move the op outside "
        "the QuantStub/DeQuantStub region (a DeQuantStub before it)."
    )


_AVG_POOL2D = Spelling(
    F.avg_pool2d,
    ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None},
)  # fmt: skip

register_op(OpSpec(
    "avg_pool2d", OpKind.REQUANTIZE,
    "exact int32 window sum, requantized with multiplier/shift for s_in / (count * s_out)",
    modules=(nn.AvgPool2d,), spellings=(_AVG_POOL2D,), qat=qat.AvgPool2d, integer=build_avg_pool,
    reference="tests/test_quantized_modules.py::test_pools_and_interpolate_match_reference",
))  # fmt: skip
register_op(OpSpec(
    "adaptive_avg_pool2d", OpKind.REQUANTIZE,
    "exact int32 sum over each adaptive window, per-window-size multiplier/shift",
    modules=(nn.AdaptiveAvgPool2d,),
    spellings=(Spelling(F.adaptive_avg_pool2d, ("output_size",)),),
    qat=qat.AdaptiveAvgPool2d, integer=build_adaptive_avg_pool,
    reference="tests/test_quantized_modules.py::test_pools_and_interpolate_match_reference",
))  # fmt: skip
register_op(OpSpec(
    "max_pool2d", OpKind.PRESERVE, "max of integer codes (values pass through, scale unchanged)",
    modules=(nn.MaxPool2d,), functions=(F.max_pool2d,), integer=build_max_pool2d, elementwise=True,
    reference="tests/test_quantized_modules.py::test_pools_and_interpolate_match_reference",
))  # fmt: skip
register_op(OpSpec(
    "max_pool3d", OpKind.PRESERVE, "max of integer codes (torch's integer kernel)",
    modules=(nn.MaxPool3d,), functions=(F.max_pool3d,), elementwise=True,
    reference="max of integers is exact by definition",
))  # fmt: skip
register_op(OpSpec(
    "max_pool1d", OpKind.PRESERVE, "no integer kernel yet: refused by convert_fx",
    modules=(nn.MaxPool1d,), functions=(F.max_pool1d,), integer=unsupported_on_integers,
    integer_function=unsupported_on_integers,
    error="no integer form",
))  # fmt: skip
register_op(OpSpec(
    "adaptive_max_pool2d", OpKind.PRESERVE, "no integer kernel yet: refused by convert_fx",
    modules=(nn.AdaptiveMaxPool2d,), functions=(F.adaptive_max_pool2d,),
    integer=unsupported_on_integers, integer_function=unsupported_on_integers,
    error="no integer form",
))  # fmt: skip
