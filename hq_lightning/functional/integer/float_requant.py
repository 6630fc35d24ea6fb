"""Requantization in float64 where it is provably bit-exact (docs/integer-arithmetic.md, section 7).

The integer rule ``clamp(RHU_n(acc * m + y * m_y), lo, hi)`` (section 5) is evaluated as
``clamp(floor(t * m' + y * m_y' + c'), lo, hi)`` with ``m' = m 2^-n``, ``m_y' = m_y 2^-n`` and
``c' = (b m + 2^(n-1)) 2^-n`` in float64, where ``t`` is the exact bias-free accumulator and ``b``
the bias. Scaling by ``2^-n`` is exact, so every intermediate is an integer multiple of ``2^-n``
and is exact while ``|t| m + |y| m_y + |b m + 2^(n-1)| <= 2^53`` (any summation order, FMA or not).

That bound is needed only where the output is not saturated: both the integer rule and its float
evaluation are monotone in ``t`` (IEEE rounding is monotone), so if they agree at the last
accumulator value that still saturates the output, they agree beyond it. ``float_requant_factors``
therefore checks each channel on ``[t_lo, t_hi]``, the static accumulator range (from the weights
and the activation range) cut down to the unsaturated window plus its two saturated end points, and
returns ``None`` (use the int64 path) unless every channel passes.

Example:
    >>> import torch
    >>> w = torch.tensor([[3, -2]], dtype=torch.int8)
    >>> acc_min, acc_max = accumulator_range(w, "linear", 1, torch.int8)
    >>> acc_min.tolist(), acc_max.tolist()
    ([-638], [637])
    >>> factors = float_requant_factors(acc_min, acc_max, None, torch.tensor([3]), torch.tensor([2]),
    ...                                 -128, 127)
    >>> t = torch.tensor([[-5.0, 6.0, 400.0]], dtype=torch.float64)
    >>> requantize_float(t, factors, -128, 127, torch.int8, channel_axis=0).tolist()
    [[-4, 5, 127]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hq_lightning.functional.integer.quantize import channel_view

__all__ = [
    "EXACT_FLOAT64_BOUND",
    "FloatRequantFactors",
    "accumulator_range",
    "float_requant_factors",
    "requantize_float",
]

#: float64 represents every integer of magnitude <= 2^53.
EXACT_FLOAT64_BOUND = 2**53
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def abs_weight(weight: Tensor) -> Tensor:
    """``|w|`` exactly, cheaply: for int8 the wrapped ``abs`` read as uint8 (``|-128|`` = 128).

    An int8 ``abs`` maps -128 to itself (bit pattern 0x80), which is 128 as uint8; this avoids
    widening large weights to int64 just to take magnitudes. Other dtypes: int64 ``abs``.
    """
    if weight.dtype == torch.int8:
        return weight.abs().view(torch.uint8)
    return weight.to(torch.int64).abs()


def accumulator_range(
    weight: Tensor, kind: str, groups: int, activation_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-output-channel ``(min, max)`` of the bias-free exact sum ``sum_k x_k w_k`` (int64).

    Each product is at its extreme independently (``x`` over the full range of
    ``activation_dtype``; zero padding is inside that range). For ``conv_transpose2d`` every
    kernel tap is counted, which over-covers the taps one output pixel really sees (still a bound).
    """
    info = torch.iinfo(activation_dtype)
    w = weight
    if kind == "conv_transpose2d":
        # [C_in, C_out/g, k...] -> [g, C_in/g, C_out/g, k...] -> per output channel g*opg + j
        cpg = w.shape[0] // groups
        w = w.reshape(groups, cpg, *w.shape[1:]).transpose(1, 2).reshape(-1, cpg, *w.shape[2:])
    w = w.reshape(w.shape[0], -1)
    # positive + negative = sum |w| and positive - negative = sum w; int32 sums of 8-bit values
    # are exact below 2^23 taps (widened before they combine)
    wide = torch.int32 if weight.dtype == torch.int8 else torch.int64
    absolute = abs_weight(w).sum(1, dtype=wide).to(torch.int64)
    signed = w.sum(1, dtype=wide).to(torch.int64)
    positive = (absolute + signed) // 2
    negative = (absolute - signed) // 2
    acc_max = info.max * positive - info.min * negative
    acc_min = info.min * positive - info.max * negative
    return acc_min, acc_max


@dataclass
class FloatRequantFactors:
    """float64 per-channel factors of the exact float requantization.

    Attributes:
        multiplier: ``m 2^-n`` per channel.
        offset: ``(b m + 2^(n-1)) 2^-n`` per channel (bias and rounding offset folded).
        addend_multiplier: ``m_y 2^-n`` per channel, or None without a fused add.
    """

    multiplier: Tensor
    offset: Tensor
    addend_multiplier: Tensor | None
    #: broadcast views per (channel axis, ndim), made once: reshaping per call cost more than the
    #: elementwise passes on small layers
    _views: dict = field(default_factory=dict, repr=False, compare=False)

    def shaped(self, channel_axis: int, ndim: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(multiplier, offset, addend_multiplier)`` shaped to broadcast over an ``ndim`` tensor."""
        tracing = torch.jit.is_tracing()  # a trace records the reshapes on every invocation
        views = None if tracing else self._views.get((channel_axis, ndim))
        if views is None:
            addend = self.addend_multiplier
            views = (
                channel_view(self.multiplier, channel_axis, ndim),
                channel_view(self.offset, channel_axis, ndim),
                None if addend is None else channel_view(addend, channel_axis, ndim),
            )
            if not tracing:
                self._views[(channel_axis, ndim)] = views
        return views

    def to(self, device: torch.device) -> FloatRequantFactors:
        move = None if self.addend_multiplier is None else self.addend_multiplier.to(device)
        return FloatRequantFactors(self.multiplier.to(device), self.offset.to(device), move)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _channel_is_exact(
    acc_lo: int,
    acc_hi: int,
    bias: int,
    mult: int,
    shift: int,
    out_min: int,
    out_max: int,
    addend_lo: int,
    addend_hi: int,
    bound: int,
) -> bool:
    if mult > bound or abs(addend_hi) > bound or abs(addend_lo) > bound:
        return False  # the float64 factors themselves would not be exact
    constant = bias * mult + ((1 << (shift - 1)) if shift > 0 else 0)
    if mult > 0:
        one = 1 << shift
        # smallest t whose output is out_max for every addend; largest t giving out_min for every addend
        top = _ceil_div(out_max * one - constant - addend_lo, mult)
        bottom = _ceil_div((out_min + 1) * one - constant - addend_hi, mult) - 1
        t_hi = min(max(top, acc_lo), acc_hi)
        t_lo = min(max(bottom, acc_lo), acc_hi)
    else:
        t_lo = t_hi = 0  # the output does not depend on t
    if t_lo + bias < _INT32_MIN or t_hi + bias > _INT32_MAX:
        return False  # int32 saturation of the accumulator could bite inside the window
    worst = max(abs(t_lo), abs(t_hi)) * mult + max(abs(addend_lo), abs(addend_hi)) + abs(constant)
    return worst <= bound


def float_requant_factors(
    acc_min: Tensor,
    acc_max: Tensor,
    bias: Tensor | None,
    multiplier: Tensor,
    shift: Tensor,
    out_min: int,
    out_max: int,
    addend_multiplier: Tensor | None = None,
    addend_dtype: torch.dtype | None = None,
    bound: int = EXACT_FLOAT64_BOUND,
) -> FloatRequantFactors | None:
    """float64 factors of ``requantize_float`` if it is bit-exact for every channel, else None.

    Args:
        acc_min, acc_max: static range of the bias-free accumulator per channel
            (:func:`accumulator_range`).
        bias: int32 bias per channel or None. multiplier, shift: int64 per channel (or one).
        out_min, out_max: the output clamp (after ReLU/ReLU6), integers with ``out_min < out_max``.
        addend_multiplier, addend_dtype: the fused add operand's multiplier and integer dtype.
        bound: largest integer magnitude assumed exact (2^53; tests pass smaller values).
    """
    channels = acc_min.numel()
    mults = multiplier.to(torch.int64).expand(channels).tolist()
    shifts = shift.to(torch.int64).expand(channels).tolist()
    biases = [0] * channels if bias is None else bias.to(torch.int64).tolist()
    add_mults = (
        [0] * channels
        if addend_multiplier is None
        else addend_multiplier.to(torch.int64).expand(channels).tolist()
    )
    y_min, y_max = (
        (0, 0)
        if addend_dtype is None
        else (
            torch.iinfo(addend_dtype).min,
            torch.iinfo(addend_dtype).max,
        )
    )
    for c, (lo, hi) in enumerate(zip(acc_min.tolist(), acc_max.tolist())):
        m_y = add_mults[c]
        if not _channel_is_exact(
            lo,
            hi,
            biases[c],
            mults[c],
            shifts[c],
            out_min,
            out_max,
            y_min * m_y,
            y_max * m_y,
            bound,
        ):
            return None
    scale = torch.ldexp(torch.ones(channels, dtype=torch.float64), -torch.tensor(shifts))
    offsets = [b * m + ((1 << (n - 1)) if n > 0 else 0) for b, m, n in zip(biases, mults, shifts)]
    # every value is an integer of magnitude <= 2^53 here, so the float64 conversions are exact
    return FloatRequantFactors(
        torch.tensor(mults, dtype=torch.float64) * scale,
        torch.tensor(offsets, dtype=torch.float64) * scale,
        None if addend_multiplier is None else torch.tensor(add_mults, dtype=torch.float64) * scale,
    )


def requantize_float(
    total: Tensor,
    factors: FloatRequantFactors,
    out_min: int,
    out_max: int,
    dtype: torch.dtype,
    channel_axis: int = 1,
    addend: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``clamp(floor(t m' + y m_y' + c'), out_min, out_max)`` as ``dtype``; exact under the factors' proof.

    ``total`` (float32 or float64, exact integers, bias-free) is reused as the float64 work
    buffer when it is already float64 (it is overwritten). ``out`` (optional) receives the result.
    """
    multiplier, offset, addend_multiplier = factors.shaped(channel_axis, total.dim())
    value = total if total.dtype == torch.float64 else total.to(torch.float64)
    # mul_ then add_ (measured 2x faster than one broadcast addcmul on CPU); each step is exact
    value.mul_(multiplier)
    value.add_(offset)
    if addend is not None:
        assert addend_multiplier is not None
        term = addend.to(torch.float64)
        value.add_(term.mul_(addend_multiplier))
    if out_min < 0:
        value.floor_()
    # on [0, max] truncation (the float -> int conversion) is floor, so ReLU outputs skip floor_
    value.clamp_(out_min, out_max)
    if out is None:
        return value.to(dtype)
    return out.copy_(value)
