"""Exact integer accumulation of convolutions and linear layers on float hardware paths.

Every product of an int8/int16 activation and an int8 weight is an integer, and a float32 sum of
integers is exact while every partial sum stays within 2^24 in magnitude, whatever the order of
summation. So the weight's per-group input channels are cut into chunks small enough that
``max|x| * sum |w|`` over a chunk's taps stays <= 2^24 for every output channel (greedy, maximal;
``chunk_channels`` is the cruder uniform rule ``kernel_area * max|w|`` per channel) and each chunk
runs as an ordinary float32 convolution; chunk results are summed in float64 (exact below 2^53). int16 activations
are split into a signed high byte and an unsigned low byte, ``x = 256 * hi + lo``, both run in the
same float32 call (stacked on the batch axis) and are recombined exactly. On CUDA the whole sum
runs in float64 with cuDNN disabled (im2col + DGEMM, no Winograd/FFT transforms, no TF32).
Autocast is switched off around the float32 convolutions (it would lower them to bf16/fp16).
The result is saturated to int32: the accumulator of ``docs/integer-arithmetic.md``, section 4.

Example:
    >>> import torch
    >>> w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    >>> x = torch.randint(-128, 128, (1, 3, 5, 5), dtype=torch.int8)
    >>> plan = ConvPlan.build(w, "conv2d", groups=1, activation_dtype=torch.int8)
    >>> acc = plan.accumulate(x, bias=None, stride=1, padding=1, dilation=1)
    >>> bool((acc == torch.conv2d(x.double(), w.double(), padding=1).long()).all())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hq_lightning.functional.integer.float_requant import abs_weight, accumulator_range

__all__ = ["EXACT_FLOAT32_BOUND", "ConvPlan", "chunk_channels"]

#: float32 represents every integer of magnitude <= 2^24.
EXACT_FLOAT32_BOUND = 2**24
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_KINDS = ("conv1d", "conv2d", "conv3d", "conv_transpose2d", "linear")


def chunk_channels(kernel_area: int, max_abs_weight: int, max_abs_input: int) -> int:
    """Input channels per chunk if every weight were ``max_abs_weight`` (0: none fits).

    A uniform lower bound on the chunk size; ``ConvPlan.build`` uses the actual ``sum |w|``.
    """
    per_channel = kernel_area * max(max_abs_weight, 1) * max_abs_input
    return EXACT_FLOAT32_BOUND // per_channel


def _max_abs_input(activation_dtype: torch.dtype) -> int:
    # int8 values reach |-128|; int16 is split into bytes, the unsigned low byte reaches 255.
    return 128 if activation_dtype == torch.int8 else 255


def _abs_weight_sums(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """``[C_out, C_in/groups]``: sum of ``|w|`` over the kernel taps, per output and input channel."""
    if transposed:  # [C_in, C_out/g, k...] -> [g * C_out/g, C_in/g, k...]
        cpg = weight.shape[0] // groups
        weight = weight.reshape(groups, cpg, weight.shape[1], -1).transpose(1, 2)
        weight = weight.reshape(-1, cpg, weight.shape[-1])
    rows, channels = weight.shape[0], weight.shape[1]
    taps = math.prod(weight.shape[2:])
    magnitudes = abs_weight(weight).reshape(rows * channels, taps)
    if taps == 1:
        return magnitudes.reshape(rows, channels).to(torch.int64)
    # float32 sums of at most 2^16 taps of |w| <= 128 are exact (< 2^24); summing over the
    # leading axis of the transposed view is vectorised, unlike a reduction over a short last axis
    wide = torch.float32 if weight.dtype == torch.int8 and taps <= 2**16 else torch.float64
    sums = magnitudes.to(wide).t().sum(0)
    return sums.to(torch.int64).reshape(rows, channels)


def _chunk_bounds(abs_sums: Tensor, activation_dtype: torch.dtype) -> list[tuple[int, int]]:
    """Greedy maximal input-channel ranges with ``max|x| * sum_range |w| <= 2^24`` for every output.

    Any partial sum of a chunk is at most ``sum |x_k| |w_k| <= max|x| sum |w_k|`` in magnitude,
    so it is an exact float32 integer whatever the order. Empty: one channel alone does not fit.
    """
    limit = EXACT_FLOAT32_BOUND // _max_abs_input(activation_dtype)
    channels = abs_sums.shape[1]
    cumulative = torch.nn.functional.pad(abs_sums.cumsum(1), (1, 0))  # [C_out, cpg + 1]
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < channels:
        # channels [start, stop) fit iff max_c (cum[c, stop] - cum[c, start]) <= limit (monotone)
        used = (cumulative[:, start + 1 :] - cumulative[:, start : start + 1]).amax(0)
        fitting = int((used <= limit).sum())
        if fitting == 0:
            return []
        bounds.append((start, start + fitting))
        start += fitting
    return bounds


@dataclass
class ConvPlan:
    """Precomputed float32 weight chunks of one integer conv/linear layer.

    Attributes:
        kind: one of ``conv1d``, ``conv2d``, ``conv3d``, ``conv_transpose2d``, ``linear``.
        weight: the int8 weight (layout of the float op).
        groups: conv groups.
        channels_per_group: input channels per group.
        bounds: ``(start, stop)`` input-channel ranges within a group, one per chunk: greedy and
            maximal with ``max|x| * sum |w| <= 2^24`` over a chunk's taps for every output channel.
        chunks: float32 weight slices, one per chunk; empty means "float64 path only".
    """

    kind: str
    weight: Tensor
    groups: int
    channels_per_group: int
    bounds: list[tuple[int, int]]
    chunks: list[Tensor]

    @classmethod
    def build(
        cls, weight: Tensor, kind: str, groups: int, activation_dtype: torch.dtype
    ) -> ConvPlan:
        """Cut ``weight`` into exact float32 chunks for activations of ``activation_dtype``."""
        if kind not in _KINDS:
            raise ValueError(f"Expected `kind` to be one of {_KINDS}, but got {kind!r}.")
        transposed = kind == "conv_transpose2d"
        cpg = weight.shape[0] // groups if transposed else weight.shape[1]
        bounds = _chunk_bounds(_abs_weight_sums(weight, groups, transposed), activation_dtype)
        as_float = weight.to(torch.float32)  # converted once, sliced per chunk
        chunks = [cls._slice_weight(as_float, a, b, groups, cpg, transposed) for a, b in bounds]
        return cls(kind, weight, groups, cpg, bounds, chunks)

    @staticmethod
    def _slice_weight(
        w: Tensor, start: int, stop: int, groups: int, cpg: int, transposed: bool
    ) -> Tensor:
        if start == 0 and stop == cpg:
            return w.contiguous()  # one chunk: the whole float32 weight
        if not transposed:
            return w[:, start:stop].contiguous()
        grouped = w.reshape(groups, cpg, *w.shape[1:])[:, start:stop]
        return grouped.reshape(groups * (stop - start), *w.shape[1:]).contiguous()

    def _slice_input(self, x: Tensor, start: int, stop: int) -> Tensor:
        if len(self.bounds) == 1:
            return x
        if self.kind == "linear":
            return x[..., start:stop]
        if self.groups == 1:
            return x[:, start:stop]
        n, _, *spatial = x.shape
        grouped = x.reshape(n, self.groups, self.channels_per_group, *spatial)[:, :, start:stop]
        return grouped.reshape(n, self.groups * (stop - start), *spatial)

    def _run(self, x: Tensor, weight: Tensor, stride, padding, dilation, output_padding) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # autocast would lower the float32 conv to bf16/fp16 and round the exact sums
            with torch.autocast(x.device.type, enabled=False):
                return self._run(x, weight, stride, padding, dilation, output_padding)
        if self.kind == "linear":
            return F.linear(x, weight)
        if self.kind == "conv_transpose2d":
            return F.conv_transpose2d(
                x, weight, None, stride, padding, output_padding, self.groups, dilation
            )
        op = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
        return op(x, weight, None, stride, padding, dilation, self.groups)

    def _sum_float64(
        self, x: Tensor, weight: Tensor, stride, padding, dilation, output_padding
    ) -> Tensor:
        # float64 holds every int32-range sum exactly; cuDNN off keeps to im2col + DGEMM.
        with torch.backends.cudnn.flags(enabled=False):
            return self._run(
                x.to(torch.float64),
                weight.to(device=x.device, dtype=torch.float64),
                stride,
                padding,
                dilation,
                output_padding,
            )

    def _sum_float32_chunks(self, x: Tensor, stride, padding, dilation, output_padding) -> Tensor:
        if x.dtype == torch.int16:
            wide = x.to(torch.int32)
            parts = torch.cat([wide >> 8, wide & 255], dim=0).to(torch.float32)
        else:
            parts = x.to(torch.float32)
        total: Tensor | None = None
        for (start, stop), chunk in zip(self.bounds, self.chunks):
            partial = self._run(
                self._slice_input(parts, start, stop),
                chunk,
                stride,
                padding,
                dilation,
                output_padding,
            )
            if total is None:
                # one chunk of int8 activations stays float32 (exact below 2^24)
                wide = len(self.chunks) > 1 or x.dtype == torch.int16
                total = partial.to(torch.float64) if wide else partial
            else:
                total.add_(partial)  # float64 += float32 in place: no float64 temporary
        assert total is not None
        if x.dtype == torch.int16:
            high, low = total.chunk(2, dim=0)
            total = torch.add(low, high, alpha=256)  # exact: integers below 2^53
        return total

    def accumulate_float(
        self,
        x: Tensor,
        stride=1,
        padding=0,
        dilation=1,
        output_padding=0,
        weight: Tensor | None = None,
    ) -> Tensor:
        """The exact bias-free sum ``sum_k x_k * w_k`` as float32 (one chunk, int8) or float64.

        Every element is an integer held exactly; nothing is saturated yet (see ``accumulate``).
        """
        if x.is_cuda or not self.chunks:
            weight = self.weight if weight is None else weight
            return self._sum_float64(x, weight, stride, padding, dilation, output_padding)
        return self._sum_float32_chunks(x, stride, padding, dilation, output_padding)

    def accumulator_range(self, activation_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Static per-output-channel ``(min, max)`` of ``accumulate_float`` (int64)."""
        return accumulator_range(self.weight, self.kind, self.groups, activation_dtype)

    def accumulate(
        self,
        x: Tensor,
        bias: Tensor | None,
        stride=1,
        padding=0,
        dilation=1,
        output_padding=0,
        weight: Tensor | None = None,
    ) -> Tensor:
        """``saturate_int32(sum_k x_k * w_k + bias)`` as an int64 tensor (exact).

        ``weight`` (default: the planned one) is the int8 weight on the input's device; the
        float32 chunks are used on CPU, the float64 path on CUDA or when no chunk fits.
        """
        total = self.accumulate_float(x, stride, padding, dilation, output_padding, weight)
        acc = total.to(torch.int64)
        if bias is not None:
            shape = [1] * acc.dim()
            shape[-1 if self.kind == "linear" else 1] = -1
            acc = acc + bias.to(torch.int64).reshape(shape)
        return acc.clamp(_INT32_MIN, _INT32_MAX)
