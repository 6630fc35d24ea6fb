"""Integer pooling: average pools (window sum + requantization) and max pool (pass-through).

Example:
    >>> import torch
    >>> pool = QuantizedAdaptiveAvgPool2d(1, input_scale=0.1, output_scale=0.1)
    >>> pool(torch.tensor([[[[1, 2], [3, 5]]]], dtype=torch.int8)).tolist()
    [[[[3]]]]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from hq_lightning.dtype import QuantDType, torch_dtype
from hq_lightning.functional.integer import (
    adaptive_avg_pool_sums,
    avg_pool_sum,
    integer_max_pool,
    quantize_multiplier,
    rounding_right_shift,
)
from hq_lightning.nn.quantized._common import activation_dtype, bounds, scale_tensor

__all__ = [
    "QuantizedAdaptiveAvgPool1d",
    "QuantizedAdaptiveAvgPool2d",
    "QuantizedAdaptiveAvgPool3d",
    "QuantizedAvgPool1d",
    "QuantizedAvgPool2d",
    "QuantizedAvgPool3d",
    "QuantizedMaxPool",
    "QuantizedMaxPool2d",
]


class QuantizedAvgPool2d(nn.Module):
    """Window sum (int64) then ``RHU_n(sum * m)``, ``M = s_in / (kh * kw * s_out)``.

    Args: ``kernel_size, stride=None, padding=0`` as ``torch.nn.AvgPool2d`` (``ceil_mode=False``;
    with padding only ``count_include_pad=True``), ``input_scale``, ``output_scale``,
    ``output_dtype``. ``QuantizedAvgPool1d`` / ``QuantizedAvgPool3d``: the same on 1 / 3
    spatial dims.
    """

    _dims = 2

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        *,
        input_scale: Tensor | float,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
        ceil_mode: bool = False,
        count_include_pad: bool = True,
    ) -> None:
        super().__init__()
        tup = _ntuple(self._dims)
        self.kernel_size = tup(kernel_size)
        self.stride = tup(stride if stride is not None and stride != () else kernel_size)
        self.padding = tup(padding)
        if ceil_mode or (not count_include_pad and any(self.padding)):
            raise ValueError(
                "Expected `ceil_mode=False` and (`count_include_pad=True` or no padding): windows "
                f"of one size, but got ceil_mode={ceil_mode}, count_include_pad={count_include_pad}."
            )
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        area = math.prod(self.kernel_size)
        m, n = quantize_multiplier(self.input_scale.double() / (area * self.output_scale.double()))
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", n)

    def forward(self, x: Tensor) -> Tensor:
        total = avg_pool_sum(x, self.kernel_size, self.stride, self.padding)
        lo, hi = bounds(self.output_dtype)
        out = rounding_right_shift(total * self.multiplier, self.shift)
        return out.clamp(lo, hi).to(torch_dtype(self.output_dtype))


class QuantizedAvgPool1d(QuantizedAvgPool2d):
    """:class:`QuantizedAvgPool2d` on ``(N, C, L)``."""

    _dims = 1


class QuantizedAvgPool3d(QuantizedAvgPool2d):
    """:class:`QuantizedAvgPool2d` on ``(N, C, D, H, W)``."""

    _dims = 3


class QuantizedAdaptiveAvgPool2d(nn.Module):
    """torch's adaptive windows; per output position ``M_ij = s_in / (count_ij * s_out)``.

    ``QuantizedAdaptiveAvgPool1d`` / ``3d``: the same on 1 / 3 spatial dims.

    The multipliers depend on the input's spatial size, so they are cached per ``(H, W, device)``
    and recomputed when ``input_scale`` or ``output_scale`` is replaced or changed in place (under
    ``torch.jit.trace`` they are computed in the graph, from the buffers; under ``torch.export``,
    as for ONNX, the values of an eager call at that size are constants).
    """

    _dims = 2

    def __init__(
        self,
        output_size,
        *,
        input_scale: Tensor | float,
        output_scale: Tensor | float,
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        self.output_size = _ntuple(self._dims)(output_size)
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        self._multipliers: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._multipliers_for: tuple = ()

    def _multiplier_shift(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        real = self.input_scale.double() / (counts.double() * self.output_scale.double())
        return quantize_multiplier(real)

    def _cached_multiplier_shift(self, x: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        key = (*x.shape[-self._dims :], x.device)
        if torch.jit.is_tracing():
            return self._multiplier_shift(counts)  # recorded from the buffers, never a stale constant
        if torch.compiler.is_compiling():
            # torch.export (ONNX): the values of an eager call at this size become constants
            # (ONNX has no frexp); without one they are computed in the graph
            cached = self._multipliers.get(key)
            return cached if cached is not None else self._multiplier_shift(counts)
        # the scale tensors themselves (held, so a freed buffer's id cannot be reused) and their
        # in-place versions
        scales = tuple((t, t._version) for t in (self.input_scale, self.output_scale))
        if len(scales) != len(self._multipliers_for) or any(
            new[0] is not old[0] or new[1] != old[1]
            for new, old in zip(scales, self._multipliers_for)
        ):
            self._multipliers, self._multipliers_for = {}, scales
        cached = self._multipliers.get(key)
        if cached is None:
            cached = self._multipliers[key] = self._multiplier_shift(counts)
        return cached

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_multipliers"], state["_multipliers_for"] = {}, ()  # derived, never saved
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_multipliers", {})
        state.setdefault("_multipliers_for", ())
        super().__setstate__(state)

    def forward(self, x: Tensor) -> Tensor:
        sums, counts = adaptive_avg_pool_sums(x, self.output_size)
        m, n = self._cached_multiplier_shift(x, counts)
        lo, hi = bounds(self.output_dtype)
        out = rounding_right_shift(sums * m, n)
        return out.clamp(lo, hi).to(torch_dtype(self.output_dtype))


class QuantizedAdaptiveAvgPool1d(QuantizedAdaptiveAvgPool2d):
    """:class:`QuantizedAdaptiveAvgPool2d` on ``(N, C, L)``."""

    _dims = 1


class QuantizedAdaptiveAvgPool3d(QuantizedAdaptiveAvgPool2d):
    """:class:`QuantizedAdaptiveAvgPool2d` on ``(N, C, D, H, W)``."""

    _dims = 3


class QuantizedMaxPool(nn.Module):
    """A max pool of integer codes (values pass through, the scale is the input's).

    Args:
        kind: the float function's name in ``torch.nn.functional``: ``"max_pool1d"``,
            ``"max_pool3d"``, ``"adaptive_max_pool2d"``...
        **kwargs: its arguments (``kernel_size``, ``stride``..., or ``output_size``).

    Example:
        >>> import torch
        >>> pool = QuantizedMaxPool("max_pool1d", kernel_size=2)
        >>> pool(torch.tensor([[[1, -3, 7, 2]]], dtype=torch.int8)).tolist()
        [[[1, 7]]]
    """

    KINDS = tuple(
        f"{a}max_pool{d}d" for a in ("", "adaptive_") for d in (1, 2, 3)
    )

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"Expected `kind` to be one of {self.KINDS}, but got {kind!r}.")
        self.kind = kind
        self.kwargs = kwargs

    def forward(self, x: Tensor) -> Tensor:
        return integer_max_pool(x, getattr(F, self.kind), **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([self.kind] + [f"{k}={v}" for k, v in self.kwargs.items()])


class QuantizedMaxPool2d(nn.Module):
    """Max pool on integers (pass-through of values; the scale is the input's)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> None:
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        args = (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        if x.is_cuda:  # integer max pool kernels exist on CPU only; float32 holds int16 exactly
            return F.max_pool2d(x.to(torch.float32), *args).to(x.dtype)
        return F.max_pool2d(x, *args)
