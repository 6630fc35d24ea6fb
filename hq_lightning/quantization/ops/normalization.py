"""Registry entries: standalone BatchNorm, LayerNorm, GroupNorm, InstanceNorm, softmax, log_softmax
(docs/integer-arithmetic.md,
section 11).

In QAT the float module runs, then the output fake quant (:mod:`hq_lightning.nn.qat.normalization`);
convert builds the integer module (:mod:`hq_lightning.nn.quantized.normalization`). A BatchNorm
right after a conv is folded into it at fuse time and never reaches these entries.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> lookup_module(torch.nn.BatchNorm2d(3)).name, lookup_module(torch.nn.LayerNorm(4)).name
    ('batch_norm2d', 'layer_norm')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.march import March
from hq_lightning.nn.qat import normalization as qn
from hq_lightning.nn.quantized.normalization import (
    QuantizedBatchNorm,
    QuantizedGroupNorm,
    QuantizedInstanceNorm,
    QuantizedLayerNorm,
    QuantizedSoftmax,
)
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, Spelling, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = [
    "build_batch_norm",
    "build_group_norm",
    "build_instance_norm",
    "build_layer_norm",
    "build_softmax",
    "softmax_check",
]

#: Marches with the rsqrt / exp / log tables (the BERNOULLI family: float islands there).
_TABLE_MARCHES = frozenset({March.BAYES, March.BAYES_E, March.NASH})
_NORM_ERROR = "<= 1 step from the fake-quant op (exact int64 statistics, rsqrt rel. error < 1.5e-7)"
_NORM_REF = "tests/reference/norm_ref.py::ref_normalize"


def _io(ctx: ConvertContext) -> dict:
    x = per_tensor(ctx, ctx.input, "input")
    return {"input_scale": x.scale, "output_scale": ctx.output.scale, "input_dtype": x.dtype,
            "output_dtype": ctx.output.dtype}  # fmt: skip


def build_batch_norm(ctx: ConvertContext) -> nn.Module:
    """QAT BatchNorm -> :class:`~hq_lightning.nn.quantized.normalization.QuantizedBatchNorm` (running statistics)."""
    return QuantizedBatchNorm.from_batch_norm(ctx.module, **_io(ctx))


def build_layer_norm(ctx: ConvertContext) -> nn.Module:
    """QAT LayerNorm -> :class:`~hq_lightning.nn.quantized.normalization.QuantizedLayerNorm`."""
    m = ctx.module
    return QuantizedLayerNorm(
        m.normalized_shape, m.weight, m.bias, m.eps, channels_first=m.channels_first, **_io(ctx)
    )


def build_group_norm(ctx: ConvertContext) -> nn.Module:
    """QAT GroupNorm -> :class:`~hq_lightning.nn.quantized.normalization.QuantizedGroupNorm`."""
    m = ctx.module
    return QuantizedGroupNorm(m.num_groups, m.num_channels, m.weight, m.bias, m.eps, **_io(ctx))


def build_instance_norm(ctx: ConvertContext) -> nn.Module:
    """QAT InstanceNorm -> ``QuantizedInstanceNorm`` (batch statistics), or the per-channel affine
    of ``QuantizedBatchNorm`` when it tracks running statistics (what its eval forward uses)."""
    m = ctx.module
    if m.track_running_stats and m.running_mean is not None:
        return QuantizedBatchNorm.from_batch_norm(m, **_io(ctx))
    dims = {qn.InstanceNorm1d: 1, qn.InstanceNorm2d: 2, qn.InstanceNorm3d: 3}
    spatial = next(d for cls, d in dims.items() if isinstance(m, cls))
    return QuantizedInstanceNorm(
        m.num_features, m.weight, m.bias, m.eps, spatial_dims=spatial, **_io(ctx)
    )


for _dims, _float, _qat in (
    (1, nn.BatchNorm1d, qn.BatchNorm1d), (2, nn.BatchNorm2d, qn.BatchNorm2d), (3, nn.BatchNorm3d, qn.BatchNorm3d)
):  # fmt: skip
    register_op(OpSpec(
        f"batch_norm{_dims}d", OpKind.REQUANTIZE,
        "not after a conv: running statistics folded into a per-channel y = a x + b, one signed "
        "multiplier/shift and an offset per channel, rounded once",
        modules=(_float,), qat=_qat, integer=build_batch_norm,
        error="<= 1 step from the fake-quant op (bit-exact against its reference)",
        reference="tests/reference/norm_ref.py::ref_batch_norm",
    ))  # fmt: skip

_NORM_SUMMARY = (
    "exact int64 sum and sum of squares, rsqrt by an interpolated table, normalised value with "
    "16 fractional bits, then the affine part as a multiplier/shift/offset per element; int16 "
    "input recommended (int8 rounds the input to 256 levels)"
)
register_op(OpSpec(
    "layer_norm", OpKind.REQUANTIZE, _NORM_SUMMARY,
    modules=(nn.LayerNorm,),
    spellings=(Spelling(
        F.layer_norm, ("normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5}, fixed={"weight": None, "bias": None},
        build=lambda normalized_shape, eps: nn.LayerNorm(normalized_shape, eps, elementwise_affine=False),
    ),),
    qat=qn.LayerNorm, integer=build_layer_norm, error=_NORM_ERROR, reference=_NORM_REF,
        marches=_TABLE_MARCHES,
))  # fmt: skip
register_op(OpSpec(
    "group_norm", OpKind.REQUANTIZE, _NORM_SUMMARY,
    modules=(nn.GroupNorm,),
    spellings=(Spelling(
        F.group_norm, ("num_groups", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5}, fixed={"weight": None, "bias": None},
        build=lambda num_groups, eps: nn.GroupNorm(num_groups, num_groups, eps, affine=False),
    ),),
    qat=qn.GroupNorm, integer=build_group_norm, error=_NORM_ERROR, reference=_NORM_REF,
        marches=_TABLE_MARCHES,
))  # fmt: skip
for _dims, _float, _qat in (
    (1, nn.InstanceNorm1d, qn.InstanceNorm1d), (2, nn.InstanceNorm2d, qn.InstanceNorm2d),
    (3, nn.InstanceNorm3d, qn.InstanceNorm3d),
):  # fmt: skip
    register_op(OpSpec(
        f"instance_norm{_dims}d", OpKind.REQUANTIZE,
        _NORM_SUMMARY.replace("exact int64", "per (sample, channel): exact int64")
        + "; with track_running_stats: the per-channel affine of batch_norm",
        modules=(_float,), qat=_qat, integer=build_instance_norm, error=_NORM_ERROR, reference=_NORM_REF,
        marches=_TABLE_MARCHES,
    ))  # fmt: skip


def build_softmax(ctx: ConvertContext) -> nn.Module:
    """QAT Softmax / LogSoftmax -> :class:`~hq_lightning.nn.quantized.normalization.QuantizedSoftmax`."""
    io = _io(ctx)
    return QuantizedSoftmax(
        ctx.module.dim, io["input_scale"], io["input_dtype"], io["output_scale"], io["output_dtype"],
        log=isinstance(ctx.module, nn.LogSoftmax),
    )  # fmt: skip


def softmax_check(node, module: nn.Module | None) -> str | None:
    """A softmax without an explicit ``dim`` (torch's legacy implicit dim) has no integer form."""
    if module is not None and getattr(module, "dim", 0) is None:
        return "softmax without an explicit `dim` (give it dim=...)"
    return None


def _softmax_spellings(name: str, module_type: type) -> tuple[Spelling, ...]:
    build = lambda dim: module_type(dim)  # noqa: E731
    fn = getattr(F, name)
    return (
        Spelling(fn, ("dim", "_stacklevel", "dtype"), {"dim": None, "_stacklevel": 3, "dtype": None},
                 build=build, fixed={"dtype": None}, ignored=("inplace", "_stacklevel")),
        Spelling(getattr(torch, name), ("dim", "dtype"), {"dtype": None}, build=build, fixed={"dtype": None}),
        Spelling(name, ("dim", "dtype"), {"dtype": None}, build=build, fixed={"dtype": None}),
    )  # fmt: skip


register_op(OpSpec(
    "softmax", OpKind.REQUANTIZE,
    "exp table indexed by max - q (2^-22 units), exact int64 row sum, one rounded division per "
    "output (the attention softmax's division, no mask)",
    modules=(nn.Softmax,), spellings=_softmax_spellings("softmax", nn.Softmax), qat=qn.Softmax,
    integer=build_softmax, check=softmax_check, marches=_TABLE_MARCHES, input_dtype="qint16",
    error="<= 1 step from the fake-quant op (tested to rows of 256); before rounding within "
    "2^-23 (1 + L p) / s_out of the exact value",
    reference="tests/reference/norm_ref.py::ref_softmax",
))  # fmt: skip
register_op(OpSpec(
    "log_softmax", OpKind.REQUANTIZE,
    "exp table and exact int64 sum as softmax; ln(sum) = k ln 2 + a 2^16-entry table of the "
    "truncated mantissa; (q - max) s_in / s_out minus it, one multiplier/shift",
    modules=(nn.LogSoftmax,), spellings=_softmax_spellings("log_softmax", nn.LogSoftmax),
    qat=qn.LogSoftmax, integer=build_softmax, check=softmax_check, marches=_TABLE_MARCHES,
    input_dtype="qint16",
    error="<= 1 step from the fake-quant op", reference="tests/reference/norm_ref.py::ref_log_softmax",
))  # fmt: skip
