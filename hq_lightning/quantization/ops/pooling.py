"""Registry entries: average pools (window sum + requantization) and max pools (values pass through).

1-D, 2-D and 3-D, plain and adaptive. Function spellings (``F.avg_pool1d``, which is
``torch.avg_pool1d``, ``F.max_pool3d``, ``F.adaptive_max_pool2d``...) become the module at fuse
time; calls with ``return_indices=True`` and average pools with windows of several sizes
(``ceil_mode``) run as float islands.

Example:
    >>> import torch.nn.functional as F
    >>> from hq_lightning.quantization.ops import lookup_spelling
    >>> [spec.name for spec, _ in lookup_spelling(F.avg_pool2d)]
    ['avg_pool2d']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
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
    "build_max_pool",
    "build_max_pool2d",
]

_AVG = {1: nnq.QuantizedAvgPool1d, 2: nnq.QuantizedAvgPool2d, 3: nnq.QuantizedAvgPool3d}
_ADAPTIVE_AVG = {
    1: nnq.QuantizedAdaptiveAvgPool1d, 2: nnq.QuantizedAdaptiveAvgPool2d, 3: nnq.QuantizedAdaptiveAvgPool3d,
}  # fmt: skip


def _dims(module: nn.Module) -> int:
    for dims in (1, 2, 3):
        if type(module).__name__.endswith(f"{dims}d"):
            return dims
    raise ValueError(f"Expected a 1-d, 2-d or 3-d pool, but got {type(module).__name__}.")


def build_avg_pool(ctx: ConvertContext) -> nn.Module:
    """QAT ``AvgPool1d/2d/3d`` -> :class:`~hq_lightning.nn.quantized.QuantizedAvgPool2d` (1d, 3d)."""
    module = ctx.module
    x = per_tensor(ctx, ctx.input, "input")
    if getattr(module, "divisor_override", None) is not None:
        raise RuntimeError(
            f"Expected `{ctx.path}` to have divisor_override=None, but got {module.divisor_override}."
        )
    return _AVG[_dims(module)](
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
    """QAT ``AdaptiveAvgPool1d/2d/3d`` -> ``QuantizedAdaptiveAvgPool1d/2d/3d``."""
    x = per_tensor(ctx, ctx.input, "input")
    return _ADAPTIVE_AVG[_dims(ctx.module)](
        ctx.module.output_size, input_scale=x.scale, output_scale=ctx.output.scale,
        output_dtype=ctx.output.dtype,
    )  # fmt: skip


def build_max_pool2d(ctx: ConvertContext) -> nn.Module:
    """``nn.MaxPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedMaxPool2d` (scale unchanged)."""
    m = ctx.module
    return nnq.QuantizedMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def build_max_pool(ctx: ConvertContext) -> nn.Module:
    """``nn.MaxPool1d/3d``, ``nn.AdaptiveMaxPool1d/2d/3d`` -> :class:`~hq_lightning.nn.quantized.QuantizedMaxPool`."""
    m = ctx.module
    dims = _dims(m)
    if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        return nnq.QuantizedMaxPool(f"adaptive_max_pool{dims}d", output_size=m.output_size)
    return nnq.QuantizedMaxPool(
        f"max_pool{dims}d", kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
        dilation=m.dilation, ceil_mode=m.ceil_mode,
    )  # fmt: skip


def check_pool(node: Any, module: nn.Module | None) -> str | None:
    """Why a pool module has no integer form (windows of several sizes, indices, divisor)."""
    if module is None:
        return None
    if getattr(module, "return_indices", False):
        return "return_indices=True (the indices are no activation)"
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        padded = any(p != 0 for p in ((module.padding,) if isinstance(module.padding, int) else module.padding))
        if module.ceil_mode or (padded and not module.count_include_pad):
            return "ceil_mode=True or count_include_pad=False with padding (windows of several sizes)"
        if getattr(module, "divisor_override", None) is not None:
            return f"divisor_override={module.divisor_override}"
    return None


_REF = "tests/test_graph_coverage.py::test_pool_kernels_match_the_reference (tests/reference/pooling_ref.py)"
_AVG_PARAMS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None}
_MAX_PARAMS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
_AVG_SUMMARY = "exact int32 window sum, requantized with multiplier/shift for s_in / (count * s_out)"
_ADAPTIVE_SUMMARY = "exact int32 sum over each adaptive window, per-window-size multiplier/shift"

for _d, _float, _qat, _fn in (
    (1, nn.AvgPool1d, qat.AvgPool1d, torch.avg_pool1d),
    (2, nn.AvgPool2d, qat.AvgPool2d, F.avg_pool2d),
    (3, nn.AvgPool3d, qat.AvgPool3d, F.avg_pool3d),
):
    _params = _AVG_PARAMS if _d > 1 else _AVG_PARAMS[:-1]
    register_op(OpSpec(
        f"avg_pool{_d}d", OpKind.REQUANTIZE, _AVG_SUMMARY, modules=(_float,),
        spellings=(Spelling(_fn, _params, {k: v for k, v in _AVG_DEFAULTS.items() if k in _params}),),
        qat=_qat, integer=build_avg_pool, check=check_pool, reference=_REF,
    ))  # fmt: skip
for _d, _float, _qat, _fn in (
    (1, nn.AdaptiveAvgPool1d, qat.AdaptiveAvgPool1d, torch.adaptive_avg_pool1d),
    (2, nn.AdaptiveAvgPool2d, qat.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),
    (3, nn.AdaptiveAvgPool3d, qat.AdaptiveAvgPool3d, F.adaptive_avg_pool3d),
):
    register_op(OpSpec(
        f"adaptive_avg_pool{_d}d", OpKind.REQUANTIZE, _ADAPTIVE_SUMMARY, modules=(_float,),
        spellings=(Spelling(_fn, ("output_size",)),), qat=_qat, integer=build_adaptive_avg_pool,
        reference=_REF,
    ))  # fmt: skip
register_op(OpSpec(
    "max_pool2d", OpKind.PRESERVE, "max of integer codes (values pass through, scale unchanged)",
    modules=(nn.MaxPool2d,), functions=(F.max_pool2d,), integer=build_max_pool2d, elementwise=True,
    check=check_pool,
    reference="tests/test_quantized_modules.py::test_pools_and_interpolate_match_reference",
))  # fmt: skip
for _d, _float, _fn in ((1, nn.MaxPool1d, F.max_pool1d), (3, nn.MaxPool3d, F.max_pool3d)):
    register_op(OpSpec(
        f"max_pool{_d}d", OpKind.PRESERVE,
        "max of integer codes (through float32, exact; scale unchanged)",
        modules=(_float,),
        spellings=(Spelling(_fn, _MAX_PARAMS, _MAX_DEFAULTS, fixed={"return_indices": False}),),
        integer=build_max_pool, elementwise=True, check=check_pool, reference=_REF,
    ))  # fmt: skip
for _d, _float, _fn in (
    (1, nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d),
    (2, nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d),
    (3, nn.AdaptiveMaxPool3d, F.adaptive_max_pool3d),
):
    register_op(OpSpec(
        f"adaptive_max_pool{_d}d", OpKind.PRESERVE,
        "max over each adaptive window of integer codes (through float32, exact; scale unchanged)",
        modules=(_float,),
        spellings=(Spelling(_fn, ("output_size", "return_indices"), {"return_indices": False},
                            fixed={"return_indices": False}),),
        integer=build_max_pool, elementwise=True, check=check_pool, reference=_REF,
    ))  # fmt: skip
