"""Registry entries: ``nn.Upsample`` / ``F.interpolate``: nearest keeps the scale, bilinear requantizes.

``F.interpolate`` / ``F.upsample`` calls become :class:`~hq_lightning.nn.quantized.Interpolate`
modules; a ``size`` computed from another tensor's shape (``y.shape[-2:]``, ``y.size()[2:]``,
``(h * 2, w * 2)`` from ``x.shape``) stays in the graph and is passed to the module's forward
(``Spelling.dynamic``), so the integer model reads it when it runs. Modes other than nearest and
bilinear (and bilinear on other than 4-D input) run as float islands.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> lookup_module(torch.nn.Upsample(scale_factor=2)).name
    'upsample'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import nn

from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.ops._context import per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, Spelling, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["build_nearest_upsample", "build_upsample", "check_upsample", "is_nearest"]


def is_nearest(module: nn.Module) -> bool:
    """A nearest-neighbour ``nn.Upsample``: it only repeats values, so it keeps its input scale."""
    return isinstance(module, nn.Upsample) and module.mode == "nearest"


def _interpolate(ctx: ConvertContext, module: nn.Module, requantize: bool) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if requantize:
        x = per_tensor(ctx, ctx.input, "input")
        kwargs = {"input_scale": x.scale, "output_scale": ctx.output.scale, "output_dtype": ctx.output.dtype}
    return nnq.QuantizedInterpolate(
        size=module.size,
        scale_factor=module.scale_factor,
        mode=module.mode,
        align_corners=module.align_corners,
        recompute_scale_factor=module.recompute_scale_factor,
        **kwargs,
    )


def build_upsample(ctx: ConvertContext) -> nn.Module:
    """QAT ``Upsample`` (bilinear) or float nearest ``nn.Upsample`` -> ``QuantizedInterpolate``."""
    return _interpolate(ctx, ctx.module, requantize=not is_nearest(ctx.module))


def build_nearest_upsample(ctx: ConvertContext) -> nn.Module:
    """Float nearest ``nn.Upsample`` (scale-preserving) -> integer nearest interpolation."""
    return _interpolate(ctx, ctx.module, requantize=False)


def check_upsample(node: Any, module: nn.Module | None) -> str | None:
    """Why an ``Upsample`` call has no integer form (a mode other than nearest / bilinear)."""
    mode = getattr(module, "mode", None)
    if mode not in (None, "nearest", "bilinear"):
        return f"mode={mode!r} (integer kernels: 'nearest', 'bilinear')"
    return None


def _float_interpolate(**ctor: Any) -> nn.Module:
    return nnq.Interpolate(**ctor)


_PARAMS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_DEFAULTS = {
    "size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
    "recompute_scale_factor": None, "antialias": False,
}  # fmt: skip

register_op(OpSpec(
    "upsample", OpKind.REQUANTIZE,
    "nearest: index copy (scale unchanged); bilinear: integer taps with 8 fractional bits, "
    "exact int32 sum, requantized",
    modules=(nn.Upsample,), preserve_when=is_nearest,
    spellings=(
        Spelling(
            F.interpolate, _PARAMS, _DEFAULTS, build=_float_interpolate, fixed={"antialias": False},
            dynamic=("size",),
        ),
        Spelling(
            F.upsample, _PARAMS[:-1], {k: v for k, v in _DEFAULTS.items() if k != "antialias"},
            build=_float_interpolate, dynamic=("size",),
        ),
    ),
    qat=qat.Upsample, integer=build_upsample, check=check_upsample,
    reference="tests/test_quantized_modules.py::test_pools_and_interpolate_match_reference",
))  # fmt: skip
