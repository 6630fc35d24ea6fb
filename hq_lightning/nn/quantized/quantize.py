"""Input and output stubs of the integer model: ``Quantize`` and ``DeQuantize``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import dequantize, quantize, quantize_multiplier, requantize
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor
from hq_lightning.quantization.nonfinite import (
    nonfinite_flags,
    record_nonfinite,
    register_nonfinite,
)

__all__ = ["Quantize", "DeQuantize"]


class Quantize(nn.Module):
    """Float input -> integer: ``clamp(round_half_even(x * fp32(1/scale)), qmin, qmax)``.

    A stub at a segment boundary (a QuantStub fed by an integer tensor of the whole model, float
    input once its stage is split off) is built with ``input_scale``: integer input is then
    requantized, ``sat(RHU_n(x * m))`` with ``M = input_scale / scale`` (the rule of a one-input
    ``cat``, docs/integer-arithmetic.md section 6), and float input is quantized as above.

    Non-finite float input: NaN becomes code 0 and +-inf saturate (the rule of
    docs/integer-arithmetic.md, "Non-finite input"); each batch holding one is counted on the
    device, without a host read, and reported by
    :func:`~hq_lightning.quantization.nonfinite.check_nonfinite` (e.g. after an evaluation).

    Args:
        scale: the stub's scale (float or one-element tensor), stored in the ``scale`` buffer;
            changing it in place (``traced.quant.scale.fill_(1.0)``) changes later calls.
        dtype: ``"qint8"`` or ``"qint16"``.
        input_scale: the scale of an integer input (``input_scale`` buffer), or None (default)
            for a stub that only takes float input.

    Example:
        >>> import torch
        >>> quant = Quantize(0.5, "qint8")
        >>> quant(torch.tensor([1.0, -0.75, 100.0])).tolist()
        [2, -2, 127]
        >>> _ = quant.scale.fill_(1.0)
        >>> quant(torch.tensor([1.0, -0.75, 100.0])).tolist()
        [1, -1, 100]
        >>> boundary = Quantize(0.5, "qint8", input_scale=0.25)
        >>> boundary(torch.tensor([5, -6, 127], dtype=torch.int8)).tolist()  # 2.5 -> 3 (half up)
        [3, -3, 64]
    """

    def __init__(
        self,
        scale: Tensor | float,
        dtype: QuantDType | str = "qint8",
        *,
        input_scale: Tensor | float | None = None,
    ) -> None:
        super().__init__()
        self.dtype = activation_dtype(dtype, "dtype")
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        self.register_buffer(
            "input_scale", None if input_scale is None else scale_tensor(input_scale, "input_scale")
        )
        register_nonfinite(self)

    #: check_nonfinite's note for this module: what happened to the values
    nonfinite_note = "NaN became code 0 and +-inf saturated to qmax / qmin: fix the input producing them."

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            if x.numel() and not _exporting():  # an exported graph only computes
                record_nonfinite(self, *nonfinite_flags(x))
            return quantize(x, self.scale, self.dtype)
        if self.input_scale is None:
            raise TypeError(
                f"Expected `x` to be a float tensor, but got {x.dtype}: this Quantize has no "
                "`input_scale` to requantize integer input with (convert_fx sets it for a "
                "QuantStub fed by an integer tensor)."
            )
        # derived from the buffers on every call, so editing them (or a trace) stays consistent
        m, n = quantize_multiplier(self.input_scale.double() / self.scale.double())
        lo, hi = bounds(self.dtype)
        return requantize(x, m, n, lo, hi, torch_dtype(self.dtype))

    def extra_repr(self) -> str:
        text = f"scale={self.scale.tolist()}, dtype={self.dtype.value}"
        if self.input_scale is not None:
            text += f", input_scale={self.input_scale.tolist()}"
        return text


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


class DeQuantize(nn.Module):
    """Integer -> float32: ``float32(q) * scale``, per tensor or per channel (axis 1).

    Args:
        scale: the input's scale: one value, or ``[C]`` for an int32 per-channel
            (high-precision Conv/Linear) output.
        ch_axis: axis of per-channel scales (1 for NC..., -1 for a Linear's ``[..., C]``).

    Example:
        >>> import torch
        >>> DeQuantize(0.25)(torch.tensor([4, -3], dtype=torch.int8)).tolist()
        [1.0, -0.75]
    """

    def __init__(self, scale: Tensor | float, ch_axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale_tensor(scale, "scale"))
        self.ch_axis = ch_axis if self.scale.numel() > 1 else None
        if self.scale.numel() > 1 and ch_axis is None:
            self.ch_axis = 1

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            raise TypeError(f"Expected `x` to be an integer tensor, but got {x.dtype}.")
        return dequantize(x, self.scale, self.ch_axis)

    def extra_repr(self) -> str:
        return f"scale={self.scale.tolist()[:4]}, ch_axis={self.ch_axis}"
