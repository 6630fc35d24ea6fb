"""Elementwise functions as integer table lookups (docs/integer-arithmetic.md, section 9).

A converted elementwise function (SiLU, sigmoid, exp, ...) is a table built at convert time from
the **same float function** the QAT model runs, on the exact values the fake quant feeds it
(``fp32(q * s_in)`` for every input code ``q``), with the fake quant's output rounding
(``round_half_even(fp32(y * fp32(1 / s_out)))``, saturated):

- int8 input: one entry per code (256), so the lookup equals the fake-quant op bit for bit;
- int16 input: a **segmented table** interpolated in integers. The 65,536 codes fall into 256
  blocks of 256 codes; block ``b`` is cut into segments of ``2^w_b`` codes (``w_b`` in 0..8) whose
  end points (knots) hold ``RNE(t * 2^F)``, ``F = TABLE_FRACTION_BITS``, ``t`` the unrounded output
  code. A code is ``K0 + (K1 - K0) * frac / 2^w`` rounded half up. Each block takes the coarsest
  ``w`` whose interpolation stays within half an output step of ``t`` on every one of its codes
  (checked exactly at build time), so the output is at most one step from the fake-quant op.

Tables may be per channel (``[C, L]``, PReLU): the lookup then indexes by the channel too.

Example:
    >>> import torch
    >>> s_in, s_out = torch.tensor([0.05]), torch.tensor([1 / 127])
    >>> table = build_table(torch.sigmoid(code_values(s_in, "qint8")), s_out, "qint8")
    >>> lookup_table(torch.tensor([-128, 0, 127], dtype=torch.int8), table, "qint8").tolist()
    [0, 64, 127]
"""

from __future__ import annotations

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType, as_dtype, qinfo, torch_dtype

__all__ = [
    "BLOCK_BITS",
    "TABLE_FRACTION_BITS",
    "build_segmented",
    "build_table",
    "code_values",
    "lookup_segmented",
    "lookup_table",
    "output_codes",
]

#: Fractional bits ``F`` of the int32 knots of a segmented (int16-input) table.
TABLE_FRACTION_BITS = 14
#: A block of a segmented table covers ``2^BLOCK_BITS`` input codes.
BLOCK_BITS = 8


def code_values(scale: Tensor, dtype: QuantDType | str) -> Tensor:
    """float32 ``fp32(q) * s`` for every code ``q`` of ``dtype``, in order (what the fake quant outputs).

    int8: the 256 codes ``-128..127``; int16: the 65,536 codes and ``32768``, the end knot of the
    last block (a real input never has it).
    """
    info = qinfo(dtype)
    top = info.max + (1 if as_dtype(dtype) is QuantDType.qint16 else 0)
    codes = torch.arange(info.min, top + 1, dtype=torch.float32)
    return codes * scale.to(torch.float32).reshape(())


def output_codes(values: Tensor, out_scale: Tensor) -> Tensor:
    """The unrounded output codes ``t = fp32(y * fp32(1 / s_out))`` the fake quant rounds (float32)."""
    return values.to(torch.float32) * torch.reciprocal(out_scale.to(torch.float32).reshape(()))


def build_table(values: Tensor, out_scale: Tensor, out_dtype: QuantDType | str) -> Tensor:
    """A full table: the fake quant of ``values`` (``[..., 256]`` float), as integers of ``out_dtype``.

    ``NaN`` (the float function undefined there: log or sqrt of a negative input) becomes 0;
    ``+-inf`` saturates like the fake quant.
    """
    info = qinfo(out_dtype)
    t = torch.round(output_codes(values, out_scale))
    t = torch.where(torch.isnan(t), torch.zeros_like(t), t)
    return t.clamp(info.min, info.max).to(torch_dtype(out_dtype))


def _clamped_codes(values: Tensor, out_scale: Tensor, out_dtype: QuantDType | str) -> Tensor:
    info = qinfo(out_dtype)
    t = output_codes(values, out_scale).to(torch.float64)
    t = torch.where(torch.isnan(t), torch.zeros_like(t), t)
    # one step beyond the range saturates the same way and keeps knots inside int32
    return t.clamp(info.min - 1, info.max + 1)


def build_segmented(
    values: Tensor, out_scale: Tensor, out_dtype: QuantDType | str
) -> tuple[Tensor, Tensor, Tensor]:
    """A segmented table from ``values`` ``[C, 65537]`` (the float function at ``code_values``).

    Returns:
        ``(levels, offsets, knots)``: ``levels`` int64 ``[C, 256]`` (segment width ``2^w`` of each
        block), ``offsets`` int64 ``[C, 256]`` (index of each block's first knot), ``knots`` int32
        (each block's ``2^(8 - w) + 1`` knots in order, blocks of channel 0 first).
    """
    frac = TABLE_FRACTION_BITS
    if values.dim() != 2 or values.shape[1] != 65537:
        raise ValueError(
            f"Expected `values` of shape [C, 65537] (the int16 codes and the end knot), but got {tuple(values.shape)}."
        )
    channels = values.shape[0]
    t = _clamped_codes(values, out_scale, out_dtype)  # [C, 65537] float64
    every = torch.round(t * 2.0**frac).to(torch.int64)  # the knot at every code, exact scaling
    blocks = 1 << (16 - BLOCK_BITS)
    levels = torch.stack([_block_levels(t[c], every[c]) for c in range(channels)])
    counts = (1 << (BLOCK_BITS - levels)) + 1
    offsets = torch.cumsum(counts.flatten(), 0) - counts.flatten()
    block_of = torch.repeat_interleave(torch.arange(channels * blocks), counts.flatten())
    j = torch.arange(block_of.numel()) - offsets[block_of]
    position = (block_of % blocks) * (1 << BLOCK_BITS) + (j << levels.flatten()[block_of])
    knots = every[block_of // blocks, position].to(torch.int32)
    return levels, offsets.reshape(channels, blocks), knots


def _block_levels(t: Tensor, every: Tensor) -> Tensor:
    """The coarsest segment level of each block of one channel whose interpolation is within 1/2 step."""
    frac = TABLE_FRACTION_BITS
    u = torch.arange(65536, dtype=torch.int64)
    target = t[:65536]
    levels = torch.zeros(1 << (16 - BLOCK_BITS), dtype=torch.int64)
    for w in range(1, BLOCK_BITS + 1):
        start = (u >> w) << w
        k0, k1 = every[start], every[start + (1 << w)]
        num = (k0 << w) + (k1 - k0) * (u - start)  # < 2^39: exact in float64
        err = (num.to(torch.float64) - target * 2.0 ** (frac + w)).abs()
        ok = (err <= 2.0 ** (frac + w - 1)).reshape(levels.numel(), -1).all(dim=1)
        levels = torch.where(ok, torch.full_like(levels, w), levels)
    return levels


def _channel_index(x: Tensor, channels: int, ch_axis: int | None) -> Tensor | None:
    if channels == 1:
        return None
    if ch_axis is None or x.dim() <= ch_axis or x.shape[ch_axis] != channels:
        raise ValueError(
            f"Expected the input to have {channels} channels on axis {ch_axis} (one table per "
            f"channel), but got shape {tuple(x.shape)}."
        )
    shape = [1] * x.dim()
    shape[ch_axis] = channels
    return torch.arange(channels, device=x.device).reshape(shape)


def lookup_table(
    x: Tensor, table: Tensor, in_dtype: QuantDType | str, ch_axis: int | None = None
) -> Tensor:
    """``table[c, q - qmin]`` for each element ``q`` of ``x`` (``table`` ``[L]`` or ``[C, L]``)."""
    index = x.to(torch.int64) - qinfo(in_dtype).min
    if table.dim() == 1:
        return table[index]
    channel = _channel_index(x, table.shape[0], ch_axis)
    flat = table.reshape(-1)
    if channel is None:
        return flat[index]
    return flat[index + channel * table.shape[1]]


def lookup_segmented(
    x: Tensor,
    levels: Tensor,
    offsets: Tensor,
    knots: Tensor,
    out_dtype: QuantDType | str,
    ch_axis: int | None = None,
) -> Tensor:
    """Interpolate a segmented table (:func:`build_segmented`) at the int16 codes ``x``.

    ``u = q + 32768``, block ``b = u >> 8``, ``w = levels[c, b]``, knot
    ``k = offsets[c, b] + ((u & 255) >> w)``, ``frac = u & (2^w - 1)``:
    ``out = sat((K[k] * 2^w + (K[k+1] - K[k]) * frac + 2^(F+w-1)) >> (F + w))``.
    """
    info = qinfo(out_dtype)
    u = x.to(torch.int64) + 32768
    block = u >> BLOCK_BITS
    channel = _channel_index(x, levels.shape[0], ch_axis)
    if channel is not None:
        block = block + channel * levels.shape[1]
    w = levels.reshape(-1)[block]
    r = u & ((1 << BLOCK_BITS) - 1)
    k = offsets.reshape(-1)[block] + (r >> w)
    frac = r & ((1 << w) - 1)
    k0 = knots[k].to(torch.int64)
    k1 = knots[k + 1].to(torch.int64)
    shift = w + TABLE_FRACTION_BITS
    value = (k0 << w) + (k1 - k0) * frac + (1 << (shift - 1))
    return (value >> shift).clamp(info.min, info.max).to(torch_dtype(out_dtype))
