"""What ``convert_fx`` turns each prepared module / ``FloatFunctional`` op into, as data.

Each table maps a QAT module type, a ``FloatFunctional`` method name or a function to a
**builder**: ``builder(ctx) -> nn.Module`` gets a :class:`~.convert.ConvertContext` (the module
being replaced, its node, the propagated qparams of its inputs and output) and returns the integer
module of :mod:`hq_lightning.nn.quantized` that replaces it. Builders only translate: float
weights are quantized with the weight fake quant's scale by the integer modules'
``from_float_params`` (rules in ``docs/integer-arithmetic.md``, section 2).

- :data:`QAT_MODULE_BUILDERS`: QAT module type -> builder.
- :data:`SCALE_PRESERVING_MODULE_BUILDERS`: float module types kept by prepare (no fake quant,
  output scale = input scale) that need an integer counterpart; those absent from it
  (ReLU, MaxPool, Identity, Dropout, Flatten...) run on integer tensors as they are.
- :data:`FLOAT_FUNCTIONAL_BUILDERS`: ``FloatFunctional`` method -> builder.
- :data:`FUNCTION_BUILDERS`: scale-preserving functions that need an integer module
  (``F.relu6`` must clamp at the integer that stands for 6.0, not at the integer 6). ReLU
  (module, ``F.relu``, ``torch.relu``, ``.relu()``) runs on integer tensors as it is.

Example:
    >>> import torch
    >>> from hq_lightning.nn import qat
    >>> QAT_MODULE_BUILDERS[qat.Conv2d].__name__
    'build_weighted'
    >>> is_scale_preserving_module(torch.nn.MaxPool2d(2)), module_builder(torch.nn.ReLU())
    (True, None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.dtype import QuantDType
from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.qat_mapping import is_dequant, is_quant

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext, QParams

__all__ = [
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_METHODS",
    "ELEMENTWISE_MODULES",
    "FLOAT_FUNCTIONAL_BUILDERS",
    "FLOAT_FUNCTIONAL_CLASS_NAMES",
    "FUNCTION_BUILDERS",
    "NON_TENSOR_METHODS",
    "QAT_MODULE_BUILDERS",
    "SCALE_PRESERVING_FUNCTIONS",
    "SCALE_PRESERVING_METHODS",
    "SCALE_PRESERVING_MODULE_BUILDERS",
    "is_dequant",
    "is_float_functional",
    "is_quant",
    "is_scale_preserving_module",
    "module_builder",
    "out_channels",
    "output_channel_axis",
]

Builder = Callable[["ConvertContext"], nn.Module]

#: Class names of FloatFunctional modules (ours, its QAT form, torch's), recognised by name.
FLOAT_FUNCTIONAL_CLASS_NAMES = frozenset({"FloatFunctional", "QATFloatFunctional"})

SCALE_PRESERVING_FUNCTIONS = qat_mapping.SCALE_PRESERVING_FUNCTIONS
SCALE_PRESERVING_METHODS = qat_mapping.SCALE_PRESERVING_METHODS
NON_TENSOR_METHODS = qat_mapping.NON_TENSOR_METHODS

#: Scale-preserving ops that act elementwise (or per channel), so a per-channel scale survives them.
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool2d, nn.MaxPool3d,
)
ELEMENTWISE_FUNCTIONS = frozenset({torch.relu, F.relu, F.dropout, F.max_pool2d, F.max_pool3d})
ELEMENTWISE_METHODS = frozenset({"relu", "contiguous", "clone", "detach"})


# --------------------------------------------------------------------------- helpers


def out_channels(module: nn.Module) -> int:
    """Output channels of a weighted QAT module (ConvTranspose: ``weight.shape[1] * groups``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)


def output_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels of a weighted module's output (Linear: last, conv: 1)."""
    return -1 if isinstance(module, nn.Linear) else 1


def _activation_name(module: nn.Module) -> str | None:
    relu = getattr(module, "relu", None)
    if relu is None:
        return None
    return "relu6" if isinstance(relu, nn.ReLU6) else "relu"


# --------------------------------------------------------------------------- builders


def build_quantize(ctx: ConvertContext) -> nn.Module:
    """``QuantStub`` -> :class:`~hq_lightning.nn.quantized.Quantize` (its ``scale`` is a buffer).

    A stub fed by an integer tensor (a segment boundary) gets that tensor's scale as
    ``input_scale``: in the whole model it requantizes, in a stage split off at it (float input)
    it quantizes.
    """
    from hq_lightning.quantization.fx.convert import QParams

    quantized = [q for q in ctx.inputs if isinstance(q, QParams)]
    input_scale = _per_tensor(ctx, quantized[0], "input").scale if quantized else None
    return nnq.Quantize(ctx.output.scale, ctx.output.dtype, input_scale=input_scale)


def build_dequantize(ctx: ConvertContext) -> nn.Module:
    """``DeQuantStub`` -> :class:`~hq_lightning.nn.quantized.DeQuantize` with the propagated scale."""
    q = ctx.input
    return nnq.DeQuantize(q.scale, q.ch_axis)


def _per_tensor(ctx: ConvertContext, qparams: QParams | None, what: str) -> QParams:
    if not hasattr(qparams, "scale"):
        raise RuntimeError(
            f"Expected the {what} of `{ctx.path}` to be quantized, but got a float tensor: put a "
            "QuantStub before it."
        )
    if qparams.per_channel or qparams.dtype not in (QuantDType.qint8, QuantDType.qint16):
        raise RuntimeError(
            f"Expected the {what} of `{ctx.path}` to be a per-tensor qint8/qint16 activation, but "
            f"got {qparams}: a high-precision (int32) Conv/Linear output can only feed a "
            "DeQuantStub. Give that Conv/Linear an 8/16-bit output qconfig."
        )
    return qparams


_INTEGER_WEIGHTED: dict[type[nn.Module], type[nn.Module]] = {
    qat.Conv1d: nnq.QuantizedConv1d,
    qat.Conv2d: nnq.QuantizedConv2d,
    qat.Conv3d: nnq.QuantizedConv3d,
    qat.ConvTranspose2d: nnq.QuantizedConvTranspose2d,
    qat.Linear: nnq.QuantizedLinear,
}


def build_weighted(ctx: ConvertContext) -> nn.Module:
    """Weighted QAT module (Conv/ConvTranspose/Linear, fused BN / add / ReLU(6)) -> integer layer.

    The BN-folded float weight is quantized per channel with the weight fake quant's scale, the
    bias to int32 at ``s_in * s_w``; the output is requantized to the output fake quant's scale,
    or stays the int32 accumulator (high-precision output).
    """
    module = ctx.module
    x = _per_tensor(ctx, ctx.inputs[0] if ctx.inputs else None, "input")
    kwargs: dict[str, Any] = {
        "input_dtype": x.dtype,
        "activation": _activation_name(module),
    }
    out = ctx.output
    high_precision = out.dtype is QuantDType.qint32
    kwargs["output_dtype"] = out.dtype
    if getattr(module, "has_add", False):
        addend = _per_tensor(ctx, ctx.inputs[1] if len(ctx.inputs) > 1 else None, "added operand")
        kwargs["addend_scale"] = addend.scale
        kwargs["addend_dtype"] = addend.dtype
    if not isinstance(module, nn.Linear):
        if module.padding_mode != "zeros":
            raise RuntimeError(
                f"Expected `{ctx.path}` to use padding_mode='zeros', but got "
                f"{module.padding_mode!r}, which has no integer conversion."
            )
        kwargs.update(
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups
        )
        if isinstance(module, nn.ConvTranspose2d):
            kwargs["output_padding"] = module.output_padding
    weight, bias = module.folded_weight_bias()
    integer_cls = _INTEGER_WEIGHTED[type(module)]
    return integer_cls.from_float_params(
        weight.detach().float(),
        bias.detach().float(),
        module.weight_fake_quant.scale.detach().float(),
        x.scale,
        None if high_precision else out.scale,
        **kwargs,
    )


def build_avg_pool(ctx: ConvertContext) -> nn.Module:
    """QAT ``AvgPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedAvgPool2d`."""
    module = ctx.module
    x = _per_tensor(ctx, ctx.input, "input")
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
    x = _per_tensor(ctx, ctx.input, "input")
    return nnq.QuantizedAdaptiveAvgPool2d(
        ctx.module.output_size, input_scale=x.scale, output_scale=ctx.output.scale,
        output_dtype=ctx.output.dtype,
    )


def _interpolate(ctx: ConvertContext, module: nn.Module, requantize: bool) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if requantize:
        x = _per_tensor(ctx, ctx.input, "input")
        kwargs = {"input_scale": x.scale, "output_scale": ctx.output.scale, "output_dtype": ctx.output.dtype}
    return nnq.QuantizedInterpolate(
        size=module.size,
        scale_factor=module.scale_factor,
        mode=module.mode,
        align_corners=module.align_corners,
        **kwargs,
    )


def build_upsample(ctx: ConvertContext) -> nn.Module:
    """QAT ``Upsample`` (bilinear) -> :class:`~hq_lightning.nn.quantized.QuantizedInterpolate`."""
    return _interpolate(ctx, ctx.module, requantize=True)


def build_nearest_upsample(ctx: ConvertContext) -> nn.Module:
    """Float nearest ``nn.Upsample`` (scale-preserving) -> integer nearest interpolation."""
    return _interpolate(ctx, ctx.module, requantize=False)


def build_max_pool2d(ctx: ConvertContext) -> nn.Module:
    """``nn.MaxPool2d`` -> :class:`~hq_lightning.nn.quantized.QuantizedMaxPool2d` (scale unchanged)."""
    m = ctx.module
    return nnq.QuantizedMaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


def build_relu6(ctx: ConvertContext) -> nn.Module:
    """Standalone ``nn.ReLU6`` / ``F.relu6`` on an integer tensor ->
    :class:`~hq_lightning.nn.quantized.QuantizedReLU6`: clamps at the integer standing for 6.0 at the
    input's scale (the rule of a fused ReLU6), not at the integer 6."""
    x = _per_tensor(ctx, ctx.input, "input")
    return nnq.QuantizedReLU6(x.scale, x.dtype)


def build_functional(ctx: ConvertContext) -> nn.Module:
    """``FloatFunctional`` op -> :class:`~hq_lightning.nn.quantized.QFunctional` with static scales.

    One ``QFunctional`` per call: it knows the scale of each tensor input in call order.
    """
    from hq_lightning.quantization.fx.convert import NON_TENSOR

    tensors = [q for q in ctx.inputs if q is not NON_TENSOR]  # sizes passed as arguments
    scales = [_per_tensor(ctx, q, f"tensor input {i}").scale for i, q in enumerate(tensors)]
    return nnq.QFunctional(torch.cat(scales), ctx.output.scale, ctx.output.dtype)


def unsupported_on_integers(ctx: ConvertContext) -> nn.Module:
    """Builder of scale-preserving ops that give wrong results on integer tensors (no kernel yet)."""
    what = type(ctx.module).__name__ if ctx.module is not None else ctx.node.target
    raise RuntimeError(
        f"Expected `{ctx.path}` ({getattr(what, '__name__', what)}) to have an integer kernel, but "
        "it has none: torch has no integer adaptive max pool / 1-d max pool. Move the op outside "
        "the QuantStub/DeQuantStub region (a DeQuantStub before it)."
    )


# --------------------------------------------------------------------------- tables

QAT_MODULE_BUILDERS: dict[type[nn.Module], Builder] = {
    qat.QuantStub: build_quantize,
    qat.DeQuantStub: build_dequantize,
    qat.Conv1d: build_weighted,
    qat.Conv2d: build_weighted,
    qat.Conv3d: build_weighted,
    qat.ConvTranspose2d: build_weighted,
    qat.Linear: build_weighted,
    qat.AvgPool2d: build_avg_pool,
    qat.AdaptiveAvgPool2d: build_adaptive_avg_pool,
    qat.Upsample: build_upsample,
}

#: Scale-preserving float modules replaced on integer tensors (the others run as they are).
SCALE_PRESERVING_MODULE_BUILDERS: dict[type[nn.Module], Builder] = {
    nn.MaxPool2d: build_max_pool2d,
    nn.Upsample: build_nearest_upsample,
    nn.ReLU6: build_relu6,
    nn.MaxPool1d: unsupported_on_integers,
    nn.AdaptiveMaxPool2d: unsupported_on_integers,
}

FLOAT_FUNCTIONAL_BUILDERS: dict[str, Builder] = {
    method: build_functional
    for method in (
        "add", "add_relu", "sub", "mul", "matmul", "cat", "stack", "sum", "mean",
        "add_scalar", "mul_scalar",
    )
}

#: Scale-preserving functions replaced on integer tensors (the others run as they are).
FUNCTION_BUILDERS: dict[Any, Builder] = {
    F.relu6: build_relu6,
    F.max_pool1d: unsupported_on_integers,
    F.adaptive_max_pool2d: unsupported_on_integers,
}


def is_scale_preserving_module(module: nn.Module) -> bool:
    """Whether ``module`` keeps its input scale (prepare left it float, without fake quant)."""
    return qat_mapping.is_scale_preserving(module)


def is_float_functional(module: nn.Module) -> bool:
    """A ``FloatFunctional`` (ours, its QAT form, or torch's, recognised by class name)."""
    from hq_lightning.quantization.fx.tracer import is_float_functional as traced_float_functional

    qat_class = getattr(qat, "FloatFunctional", None)
    return (
        type(module).__name__ in FLOAT_FUNCTIONAL_CLASS_NAMES
        or traced_float_functional(module)
        or (qat_class is not None and isinstance(module, qat_class))
    )


def module_builder(module: nn.Module) -> Builder | None:
    """The builder replacing ``module`` in the converted model, or ``None`` to keep it."""
    if is_quant(module):
        return build_quantize
    if is_dequant(module):
        return build_dequantize
    builder = QAT_MODULE_BUILDERS.get(type(module))
    if builder is not None:
        return builder
    if is_scale_preserving_module(module):
        return SCALE_PRESERVING_MODULE_BUILDERS.get(type(module))
    return None
