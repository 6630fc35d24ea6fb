"""Integer multipliers and shifts that stand for real requantization factors.

A real factor ``M >= 0`` is stored as an integer multiplier ``m`` and a right shift ``n`` with
``M ~= m * 2^-n`` (see ``docs/integer-arithmetic.md``, section 3). Several factors that are
summed before one rounding (a fused add, an elementwise add) share one shift.

Example:
    >>> import torch
    >>> m, n = quantize_multiplier(torch.tensor([0.25, 0.1], dtype=torch.float64))
    >>> m.tolist(), n.tolist()
    ([1, 858993459], [2, 33])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MULTIPLIER_BITS", "MAX_SHIFT", "quantize_multiplier", "quantize_multipliers"]

#: The largest multiplier is normalised into [2^(MULTIPLIER_BITS-1), 2^MULTIPLIER_BITS).
MULTIPLIER_BITS = 31
#: A shift above this turns the multiplier into 0 (the result would be 0 for int32 inputs).
MAX_SHIFT = 62


def _check_reals(reals: Tensor) -> None:
    if torch.jit.is_tracing() or reals.numel() == 0:
        return
    if not bool(torch.isfinite(reals).all()) or bool((reals < 0).any()):
        raise ValueError(
            f"Expected `real multiplier` to be finite and >= 0, but got {reals.flatten().tolist()[:8]}."
        )
    if bool((reals >= 2.0**MULTIPLIER_BITS).any()):
        raise ValueError(
            f"Expected `real multiplier` to be < 2^{MULTIPLIER_BITS} (input and output scales "
            f"within a factor 2^31 of each other), but got {float(reals.max())}."
        )


def _trailing_zeros(m: Tensor) -> Tensor:
    # lowest set bit of m (a power of two <= 2^31, exact in float64); 0 has "infinitely many".
    lowest = m & -m
    tz = torch.log2(lowest.clamp(min=1).to(torch.float64)).round().to(torch.int64)
    return torch.where(m == 0, torch.full_like(tz, 64), tz)


def quantize_multipliers(*reals: Tensor) -> tuple[list[Tensor], Tensor]:
    """Represent real factors ``M_i`` (broadcastable, float64) by ``m_i * 2^-n`` with one shared ``n``.

    The shift is chosen from ``max_i M_i``: ``n = 31 - e`` where ``M_max = f * 2^e``,
    ``f in [0.5, 1)``, and ``m_i = round_half_even(M_i * 2^n)``; if the largest rounds up to
    ``2^31`` the shift drops by one. Then common trailing zero bits are stripped while ``n > 0``,
    so a power-of-two factor becomes ``m = 1`` (a pure shift). ``n > 62`` (all ``M_i < 2^-32``)
    or ``M_max = 0`` gives ``m_i = 0, n = 0``.

    Returns:
        ``([m_1, ...], n)``, all int64 tensors of the broadcast shape.
    """
    stacked = torch.stack(torch.broadcast_tensors(*[r.to(torch.float64) for r in reals]))
    _check_reals(stacked)
    largest = stacked.amax(dim=0)
    _, exponent = torch.frexp(largest)
    shift = MULTIPLIER_BITS - exponent.to(torch.int64)
    top = torch.round(torch.ldexp(largest, shift))
    shift = shift - (top == 2.0**MULTIPLIER_BITS).to(torch.int64)
    mult = torch.round(torch.ldexp(stacked, shift.unsqueeze(0))).to(torch.int64)
    common = _trailing_zeros(mult).amin(dim=0)
    strip = torch.minimum(common, shift).clamp(min=0)
    mult = mult >> strip.unsqueeze(0)
    shift = shift - strip
    dead = (largest == 0) | (shift > MAX_SHIFT)
    mult = torch.where(dead.unsqueeze(0), torch.zeros_like(mult), mult)
    shift = torch.where(dead, torch.zeros_like(shift), shift)
    return list(mult.unbind(0)), shift


def quantize_multiplier(real: Tensor) -> tuple[Tensor, Tensor]:
    """Represent real factors ``M`` (float64 tensor) by ``(m, n)`` with ``M ~= m * 2^-n``.

    ``|M - m * 2^-n| <= 2^-31 * M`` for every ``M`` in ``[2^-32, 2^31)``.
    """
    mults, shift = quantize_multipliers(real)
    return mults[0], shift
