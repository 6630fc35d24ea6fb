"""Integer normalisations: ``QuantizedBatchNorm``, ``QuantizedLayerNorm``, ``QuantizedGroupNorm``,
``QuantizedInstanceNorm`` (docs/integer-arithmetic.md, section 11; kernels in
:mod:`hq_lightning.functional.integer.normalization`).

Example:
    >>> import torch
    >>> bn = QuantizedBatchNorm(torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0]), 0.1, 0.1)
    >>> bn(torch.tensor([[10, 10], [-5, 0]], dtype=torch.int8)).tolist()  # y = a x + b per channel
    [[20, 15], [-10, 10]]
    >>> ln = QuantizedLayerNorm((4,), None, None, 1e-5, input_scale=0.1, output_scale=0.05)
    >>> ln(torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)).tolist()
    [[-27, -9, 9, 27]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hq_lightning.dtype import QuantDType
from hq_lightning.functional.integer.normalization import (
    NORM_FRACTION_BITS,
    affine_factors,
    affine_requantize,
    max_reduced_elements,
    normalized_codes,
)
from hq_lightning.nn.quantized._common import activation_dtype, check_int_input, scale_tensor

__all__ = [
    "QuantizedBatchNorm",
    "QuantizedGroupNorm",
    "QuantizedInstanceNorm",
    "QuantizedLayerNorm",
    "QuantizedSoftmax",
    "eps_term",
]


def _float64(value: Tensor | float | None, default: float, shape: Sequence[int]) -> Tensor:
    if value is None:
        return torch.full(tuple(shape), default, dtype=torch.float64)
    return torch.as_tensor(value).detach().to(torch.float64).reshape(tuple(shape)).clone()


def eps_term(eps: float, count: int, input_scale: Tensor) -> Tensor:
    """``E = RNE(eps N^2 / s_in^2)`` (float64, clamped to ``[0, 2^61]``) as int64: ``eps`` in code units."""
    s = input_scale.to(torch.float64).reshape(-1)[:1]
    value = torch.round(float(eps) * float(count) ** 2 / (s * s))
    return value.clamp(0, 2.0**61).to(torch.int64)


class QuantizedBatchNorm(nn.Module):
    """``sat(RHU_n[c](q * m[c] + k[c]))``: ``y = a[c] x + b[c]`` per channel (axis 1).

    Args:
        weight: ``a[c] = gamma / sqrt(var + eps)`` (float64 from the BN's running statistics).
        bias: ``b[c] = beta - mean * a[c]``.
        input_scale, output_scale: per-tensor scales.
        input_dtype, output_dtype: ``"qint8"`` / ``"qint16"``.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        input_scale: Tensor | float,
        output_scale: Tensor | float,
        input_dtype: QuantDType | str = "qint8",
        output_dtype: QuantDType | str = "qint8",
    ) -> None:
        super().__init__()
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        a = torch.as_tensor(weight).to(torch.float64).reshape(-1)
        b = torch.as_tensor(bias).to(torch.float64).reshape(-1)
        m, n, k = affine_factors(a * self.input_scale.double(), b, self.output_scale)
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", n)
        self.register_buffer("offset", k)

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm, input_scale, output_scale,
                        input_dtype="qint8", output_dtype="qint8") -> QuantizedBatchNorm:  # fmt: skip
        """From a BatchNorm's running statistics (float64: ``a = gamma / sqrt(var + eps)``)."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                "Expected a BatchNorm with running statistics (track_running_stats=True), but got "
                "none: its eval output depends on each batch, which has no static integer form."
            )
        c = bn.num_features
        gamma = _float64(bn.weight, 1.0, (c,))
        beta = _float64(bn.bias, 0.0, (c,))
        a = gamma / torch.sqrt(bn.running_var.detach().double() + float(bn.eps))
        b = beta - bn.running_mean.detach().double() * a
        return cls(a, b, input_scale, output_scale, input_dtype, output_dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.input_dtype)
        shape = [1] * x.dim()
        shape[1 if x.dim() > 1 else 0] = -1
        return affine_requantize(
            x, self.multiplier.view(shape), self.shift.view(shape), self.offset.view(shape),
            self.output_dtype,
        )  # fmt: skip


class _Normalize(nn.Module):
    """Statistics over the last axis of a view, then the affine part per ``affine_shape`` element."""

    def __init__(self, weight, bias, affine_shape, eps, input_scale, output_scale, input_dtype,
                 output_dtype) -> None:  # fmt: skip
        super().__init__()
        self.eps = float(eps)
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        if weight is None and bias is None:
            affine_shape = (1,)  # no affine part: one factor for every element
        gamma = _float64(weight, 1.0, affine_shape)
        beta = _float64(bias, 0.0, affine_shape)
        m, n, k = affine_factors(
            torch.ldexp(gamma, torch.tensor(-NORM_FRACTION_BITS)), beta, self.output_scale
        )
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", n)
        self.register_buffer("offset", k)

    def _normalize(self, x: Tensor, rows: Tensor) -> Tensor:
        count = rows.shape[-1]
        if count > max_reduced_elements(self.input_dtype):
            raise ValueError(
                f"Expected at most {max_reduced_elements(self.input_dtype)} elements per statistic "
                f"for a {self.input_dtype.value} input (int64 sums), but got {count}."
            )
        return normalized_codes(rows, eps_term(self.eps, count, self.input_scale)).reshape(x.shape)

    def _affine(self, z: Tensor, view: Sequence[int]) -> Tensor:
        if self.multiplier.numel() == 1:
            view = [1] * len(view)
        return affine_requantize(
            z, self.multiplier.view(*view), self.shift.view(*view), self.offset.view(*view),
            self.output_dtype,
        )  # fmt: skip


class QuantizedLayerNorm(_Normalize):
    """Integer ``LayerNorm`` over the trailing ``normalized_shape`` (or over axis 1 with
    ``channels_first=True``, the ``LayerNorm2d`` of ConvNeXt-style models)."""

    def __init__(self, normalized_shape, weight, bias, eps, input_scale, output_scale,
                 input_dtype="qint8", output_dtype="qint8", channels_first: bool = False) -> None:  # fmt: skip
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.channels_first = bool(channels_first)
        super().__init__(weight, bias, self.normalized_shape, eps, input_scale, output_scale,
                         input_dtype, output_dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.input_dtype)
        if self.channels_first:
            return self._layer_norm(x.movedim(1, -1)).movedim(-1, 1)
        return self._layer_norm(x)

    def _layer_norm(self, x: Tensor) -> Tensor:
        dims = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - dims :]) != self.normalized_shape:
            raise ValueError(
                f"Expected the input's trailing shape to be {self.normalized_shape}, but got {tuple(x.shape)}."
            )
        z = self._normalize(x, x.reshape(*x.shape[: x.dim() - dims], -1))
        return self._affine(z, self.normalized_shape)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, channels_first={self.channels_first}"


class QuantizedGroupNorm(_Normalize):
    """Integer ``GroupNorm``: statistics per (sample, group), affine per channel."""

    def __init__(self, num_groups, num_channels, weight, bias, eps, input_scale, output_scale,
                 input_dtype="qint8", output_dtype="qint8") -> None:  # fmt: skip
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        super().__init__(weight, bias, (self.num_channels,), eps, input_scale, output_scale,
                         input_dtype, output_dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.input_dtype)
        if x.dim() < 2 or (self.multiplier.numel() > 1 and x.shape[1] != self.num_channels):
            raise ValueError(
                f"Expected {self.num_channels} channels on axis 1, but got {tuple(x.shape)}."
            )
        z = self._normalize(x, x.reshape(x.shape[0], self.num_groups, -1))
        return self._affine(z, [-1] + [1] * (x.dim() - 2))


class QuantizedInstanceNorm(_Normalize):
    """Integer ``InstanceNorm1d/2d/3d`` (batch statistics): per (sample, channel), affine per channel.

    ``spatial_dims`` (1, 2, 3) tells a batched input (``2 + spatial_dims`` axes) from an
    unbatched one (``1 + spatial_dims``).
    """

    def __init__(self, num_features, weight, bias, eps, input_scale, output_scale,
                 input_dtype="qint8", output_dtype="qint8", spatial_dims: int = 2) -> None:  # fmt: skip
        self.num_features = int(num_features)
        self.spatial_dims = int(spatial_dims)
        super().__init__(weight, bias, (self.num_features,), eps, input_scale, output_scale,
                         input_dtype, output_dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        check_int_input(x, self.input_dtype)
        channel_axis = x.dim() - 1 - self.spatial_dims
        if channel_axis not in (0, 1):
            raise ValueError(
                f"Expected a {1 + self.spatial_dims}-d (unbatched) or {2 + self.spatial_dims}-d input, "
                f"but got shape {tuple(x.shape)}."
            )
        z = self._normalize(x, x.flatten(channel_axis + 1))
        return self._affine(z, [-1] + [1] * self.spatial_dims)


class QuantizedSoftmax(nn.Module):
    """Integer ``softmax`` / ``log_softmax`` along ``dim``.

    softmax: an exp table with 22 fractional bits
    (:func:`~hq_lightning.functional.integer.normalization.exp_table`), then the exact int64 row
    sum and one rounded division of :func:`~hq_lightning.functional.integer.attention.masked_softmax`
    (the attention's softmax, no mask; its 16-bit table can be two steps off for int16 outputs);
    log_softmax: :func:`~hq_lightning.functional.integer.normalization.log_softmax_codes`.

    Args:
        dim: the axis the probabilities sum over.
        input_scale, input_dtype, output_scale, output_dtype: per-tensor qparams.
        log: ``True`` for ``log_softmax``.
    """

    def __init__(self, dim: int, input_scale, input_dtype, output_scale, output_dtype="qint8",
                 log: bool = False) -> None:  # fmt: skip
        super().__init__()
        from hq_lightning.functional.integer.attention import softmax_reciprocal
        from hq_lightning.functional.integer.normalization import exp_table, log_softmax_factors

        if not isinstance(dim, int):
            raise ValueError(
                f"Expected `dim` to be an int, but got {dim!r}: give softmax an explicit dim."
            )
        self.dim, self.log = dim, bool(log)
        self.input_dtype = activation_dtype(input_dtype, "input_dtype")
        self.output_dtype = activation_dtype(output_dtype, "output_dtype")
        self.register_buffer("input_scale", scale_tensor(input_scale, "input_scale"))
        self.register_buffer("output_scale", scale_tensor(output_scale, "output_scale"))
        self.register_buffer("exp_table", exp_table(self.input_scale, self.input_dtype))
        if self.log:
            m, n, c1, log_table = log_softmax_factors(self.input_scale, self.output_scale)
            self.register_buffer("multiplier", m)
            self.register_buffer("shift", n)
            self.register_buffer("log2_term", c1)
            self.register_buffer("log_table", log_table)
        else:
            m, n = softmax_reciprocal(self.output_scale)
            self.register_buffer("multiplier", m)
            self.register_buffer("shift", n)

    def forward(self, x: Tensor) -> Tensor:
        from hq_lightning.functional.integer.attention import masked_softmax
        from hq_lightning.functional.integer.normalization import log_softmax_codes

        check_int_input(x, self.input_dtype)
        z = x.movedim(self.dim, -1)
        if self.log:
            out = log_softmax_codes(
                z, self.exp_table, self.multiplier, self.shift, self.log2_term, self.log_table,
                self.output_dtype,
            )  # fmt: skip
        else:
            out = masked_softmax(
                z, self.exp_table, None, self.multiplier, self.shift, self.output_dtype
            )
        return out.movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, log={self.log}"
