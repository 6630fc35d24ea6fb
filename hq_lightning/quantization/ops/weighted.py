"""Registry entries: Conv1d/2d/3d, ConvTranspose2d and Linear, fused with BN / add / ReLU(6) or not.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_module
    >>> lookup_module(torch.nn.Linear(2, 2)).integer.__name__
    'build_weighted'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from hq_lightning.dtype import QuantDType
from hq_lightning.nn import qat
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization.ops._context import activation_name, per_tensor
from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = ["INTEGER_WEIGHTED", "build_weighted", "out_channels", "output_channel_axis"]

#: QAT weighted class -> integer class.
INTEGER_WEIGHTED: dict[type[nn.Module], type[nn.Module]] = {
    qat.Conv1d: nnq.QuantizedConv1d,
    qat.Conv2d: nnq.QuantizedConv2d,
    qat.Conv3d: nnq.QuantizedConv3d,
    qat.ConvTranspose2d: nnq.QuantizedConvTranspose2d,
    qat.Linear: nnq.QuantizedLinear,
}


def out_channels(module: nn.Module) -> int:
    """Output channels of a weighted QAT module (ConvTranspose: ``weight.shape[1] * groups``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.out_channels)


def output_channel_axis(module: nn.Module) -> int:
    """Axis of the output channels of a weighted module's output (Linear: last, conv: 1)."""
    return -1 if isinstance(module, nn.Linear) else 1


def build_weighted(ctx: ConvertContext) -> nn.Module:
    """Weighted QAT module (Conv/ConvTranspose/Linear, fused BN / add / ReLU(6)) -> integer layer.

    The BN-folded float weight is quantized per channel with the weight fake quant's scale, the
    bias to int32 at ``s_in * s_w``; the output is requantized to the output fake quant's scale,
    or stays the int32 accumulator (high-precision output).
    """
    module = ctx.module
    x = per_tensor(ctx, ctx.inputs[0] if ctx.inputs else None, "input")
    kwargs: dict[str, Any] = {"input_dtype": x.dtype, "activation": activation_name(module)}
    out = ctx.output
    high_precision = out.dtype is QuantDType.qint32
    kwargs["output_dtype"] = out.dtype
    if getattr(module, "has_add", False):
        addend = per_tensor(ctx, ctx.inputs[1] if len(ctx.inputs) > 1 else None, "added operand")
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
    integer_cls = INTEGER_WEIGHTED[type(module)]
    return integer_cls.from_float_params(
        weight.detach().float(),
        bias.detach().float(),
        module.weight_fake_quant.scale.detach().float(),
        x.scale,
        None if high_precision else out.scale,
        **kwargs,
    )


_WEIGHTED_SUMMARY = (
    "int8/int16 x int8 per-channel weights, exact int32 accumulation + int32 bias; fused add in "
    "the accumulator; requantize by multiplier/shift, round half up; fused ReLU/ReLU6 as a clamp"
)
_REF = "tests/reference/integer_ref.py::ref_conv2d, ref_conv_output"
for _name, _float, _qat in (
    ("conv1d", nn.Conv1d, qat.Conv1d),
    ("conv2d", nn.Conv2d, qat.Conv2d),
    ("conv3d", nn.Conv3d, qat.Conv3d),
    ("conv_transpose2d", nn.ConvTranspose2d, qat.ConvTranspose2d),
    ("linear", nn.Linear, qat.Linear),
):
    register_op(OpSpec(
        _name, OpKind.WEIGHTED, _WEIGHTED_SUMMARY, modules=(_float,), qat=_qat,
        integer=build_weighted,
        reference="tests/reference/integer_ref.py::ref_conv_transpose2d" if _name == "conv_transpose2d" else _REF,
    ))  # fmt: skip
