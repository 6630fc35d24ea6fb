"""Integer convolutions: ``QuantizedConv1d/2d/3d`` and ``QuantizedConvTranspose2d``.

Example:
    >>> import torch
    >>> conv = QuantizedConv2d.from_float_params(
    ...     torch.randn(4, 3, 3, 3), torch.randn(4), torch.full((4,), 0.02), 0.05, 0.1,
    ...     padding=1, activation="relu")
    >>> out = conv(torch.randint(-128, 128, (1, 3, 8, 8), dtype=torch.int8))
    >>> out.dtype, tuple(out.shape), bool((out >= 0).all())
    (torch.int8, (1, 4, 8, 8), True)
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.utils import _pair, _single, _triple

from hq_lightning.nn.quantized._weighted import QuantizedWeightedModule

__all__ = ["QuantizedConv1d", "QuantizedConv2d", "QuantizedConv3d", "QuantizedConvTranspose2d"]


class _QuantizedConvNd(QuantizedWeightedModule):
    _tuple = staticmethod(_pair)

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        weight_scale,
        input_scale,
        output_scale,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        **kwargs,
    ) -> None:
        if isinstance(padding, str):
            raise ValueError(
                f"Expected `padding` to be an int or a tuple of ints, but got {padding!r}; "
                "give the explicit padding of the float conv."
            )
        super().__init__(
            weight, bias, weight_scale, input_scale, output_scale, groups=groups, **kwargs
        )
        self.stride = self._tuple(stride)
        self.padding = self._tuple(padding)
        self.dilation = self._tuple(dilation)

    def _op_kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


class QuantizedConv1d(_QuantizedConvNd):
    """Integer Conv1d (+ fused add, ReLU/ReLU6, or int32 output); args as :class:`QuantizedConv2d`."""

    _kind = "conv1d"
    _tuple = staticmethod(_single)


class QuantizedConv2d(_QuantizedConvNd):
    """Integer Conv2d: ``out = clamp(RHU_n(acc * m[c] (+ addend * m_y[c])), lo, hi)``.

    Args:
        weight: int8 ``[C_out, C_in/groups, kh, kw]``. bias: int32 ``[C_out]`` or None.
        weight_scale: per-channel ``[C_out]`` (or one) float scale. input_scale: float.
        output_scale: float, or None for a high-precision int32 output at scale ``s_in * s_w``.
        stride, padding, dilation, groups: as ``torch.nn.Conv2d`` (explicit padding only).
        input_dtype / output_dtype: ``"qint8"`` / ``"qint16"`` (``"qint32"`` output = high precision).
        activation: None, ``"relu"`` or ``"relu6"``.
        addend_scale / addend_dtype: the scale and dtype of a fused add operand
            (``forward(x, addend)``); None for no fused add.
    """

    _kind = "conv2d"


class QuantizedConv3d(_QuantizedConvNd):
    """Integer Conv3d; args as :class:`QuantizedConv2d`."""

    _kind = "conv3d"
    _tuple = staticmethod(_triple)


class QuantizedConvTranspose2d(_QuantizedConvNd):
    """Integer ConvTranspose2d; weight ``[C_in, C_out/groups, kh, kw]``, per-channel scales on axis 1.

    Extra arg ``output_padding`` as ``torch.nn.ConvTranspose2d``; otherwise as :class:`QuantizedConv2d`.
    """

    _kind = "conv_transpose2d"
    _weight_ch_axis = 1

    def __init__(self, *args, output_padding=0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output_padding = _pair(output_padding)

    def _op_kwargs(self) -> dict:
        return {**super()._op_kwargs(), "output_padding": self.output_padding}
