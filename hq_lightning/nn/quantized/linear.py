"""Integer Linear.

Example:
    >>> import torch
    >>> fc = QuantizedLinear.from_float_params(torch.randn(5, 8), None, torch.full((5,), 0.01), 0.1, None)
    >>> out = fc(torch.randint(-128, 128, (2, 8), dtype=torch.int8))
    >>> out.dtype, tuple(fc.output_scale.shape)
    (torch.int32, (5,))
"""

from __future__ import annotations

from hq_lightning.nn.quantized._weighted import QuantizedWeightedModule

__all__ = ["QuantizedLinear"]


class QuantizedLinear(QuantizedWeightedModule):
    """Integer Linear ``[..., in] -> [..., out]``; weight int8 ``[out, in]``; per-channel on the last axis.

    Constructor: ``QuantizedLinear(weight, bias, weight_scale, input_scale, output_scale, *,
    input_dtype, output_dtype, activation, addend_scale, addend_dtype)`` as
    :class:`~hq_lightning.nn.quantized.QuantizedConv2d`, or ``from_float_params`` with float tensors.
    """

    _kind = "linear"
    _out_axis = -1

    def _op_kwargs(self) -> dict:
        return {}
