"""Integer multipliers and shifts that stand for real requantization factors.

A real factor ``M >= 0`` is stored as an integer multiplier ``m`` and a right shift ``n`` with
``M ~= m * 2^-n`` (see ``docs/integer-arithmetic.md``, section 3). Several factors that are
summed before one rounding (a fused add, an elementwise add) are aligned on one shift, the
finest one, so each keeps its own 31 significant bits; the int64 sum of the products is then
rounded once (:func:`quantize_multipliers`).

Example:
    >>> import torch
    >>> m, n = quantize_multiplier(torch.tensor([0.25, 0.1], dtype=torch.float64))
    >>> m.tolist(), n.tolist()
    ([1, 858993459], [2, 33])
    >>> (m1, m2), n = quantize_multipliers(
    ...     torch.tensor([2.0**-20 / 3], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64),
    ...     magnitudes=(2**31, 2**7))
    >>> m1.tolist(), m2.tolist(), n.tolist()  # 31 bits for the small factor, 52 for the large
    ([1431655765], [3152519739159347], [52])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ACCUMULATOR_MAGNITUDE",
    "ACTIVATION_MAGNITUDE",
    "MAX_SHIFT",
    "MULTIPLIER_BITS",
    "SUM_LIMIT",
    "quantize_multiplier",
    "quantize_multipliers",
]

#: The largest multiplier is normalised into [2^(MULTIPLIER_BITS-1), 2^MULTIPLIER_BITS).
MULTIPLIER_BITS = 31
#: A shift above this turns the multiplier into 0 (the result would be 0 for int32 inputs).
MAX_SHIFT = 62
#: Largest magnitude of an int32 accumulator operand (``|-2^31|``).
ACCUMULATOR_MAGNITUDE = 2**31
#: Largest magnitude of an int8/int16 activation operand (``|-2^15|``), the default operand bound.
ACTIVATION_MAGNITUDE = 2**15
#: ``sum_i |x_i| m_i`` must stay below this, so that adding the rounding offset ``2^(n-1) <= 2^61``
#: keeps every partial sum inside int64.
SUM_LIMIT = 3 * 2**61


def _check_reals(reals: Tensor) -> None:
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or reals.numel() == 0:
        return  # no host read under tracing / export (the eager run checked the same scales)
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


def _single_factor(reals: Tensor) -> tuple[Tensor, Tensor]:
    """The rule for one factor, vectorised: ``n = 31 - e``, ``m = RNE(M 2^n)`` (canonical)."""
    _, exponent = torch.frexp(reals)
    shift = MULTIPLIER_BITS - exponent.to(torch.int64)
    top = torch.round(torch.ldexp(reals, shift))
    shift = shift - (top == 2.0**MULTIPLIER_BITS).to(torch.int64)
    mult = torch.round(torch.ldexp(reals, shift)).to(torch.int64)
    strip = torch.minimum(_trailing_zeros(mult), shift).clamp(min=0)
    mult = mult >> strip
    shift = shift - strip
    dead = (reals == 0) | (shift > MAX_SHIFT)
    return torch.where(dead, torch.zeros_like(mult), mult), torch.where(dead, torch.zeros_like(shift), shift)


def _own_shift(real: float) -> int:
    # the shift that gives `real` 31 significant bits: m = RNE(M 2^n) in [2^30, 2^31)
    _, exponent = math.frexp(real)
    shift = MULTIPLIER_BITS - exponent
    if round(math.ldexp(real, shift)) == 2**MULTIPLIER_BITS:
        shift -= 1
    return shift


def _alone_is_zero(real: float, shift: int) -> bool:
    # the one-factor rule: after stripping trailing zeros the shift still exceeds MAX_SHIFT
    mult = round(math.ldexp(real, shift))
    zeros = (mult & -mult).bit_length() - 1
    return shift - min(zeros, shift) > MAX_SHIFT


def _aligned(reals: list[float], magnitudes: Sequence[int]) -> tuple[list[int], int]:
    """One group of factors summed before one rounding (Python ints, exact; see the docs)."""
    shifts = {i: _own_shift(r) for i, r in enumerate(reals) if r > 0}
    if all(_alone_is_zero(reals[i], n) for i, n in shifts.items()):
        return [0] * len(reals), 0  # every factor below 2^-32 (or zero), as one factor alone
    shift = min(max(shifts.values()), MAX_SHIFT)
    while True:
        mults = [round(math.ldexp(r, shift)) for r in reals]  # exact scaling, half to even
        if sum(x * m for x, m in zip(magnitudes, mults)) < SUM_LIMIT:
            break
        shift -= 1
        if shift < 0:
            raise ValueError(
                f"Expected `real multiplier`s whose products with operands of magnitude "
                f"{list(magnitudes)} can be summed in int64, but got {reals}: an output scale "
                "that small against its input scales cannot be requantized."
            )
    while shift > 0 and all(m % 2 == 0 for m in mults):
        mults = [m // 2 for m in mults]
        shift -= 1
    return mults, shift


def quantize_multipliers(
    *reals: Tensor, magnitudes: Sequence[int] | None = None
) -> tuple[list[Tensor], Tensor]:
    """Represent real factors ``M_i`` summed before one rounding by ``m_i * 2^-n`` (one ``n``).

    Each factor first gets its own 31-bit shift ``n_i = 31 - e_i`` (``M_i = f_i 2^e_i``,
    ``f_i in [0.5, 1)``, one less if ``RNE(M_i 2^n_i)`` rounds up to ``2^31``); the common shift is
    the finest, ``n = min(max_i n_i, 62)``, so every factor keeps at least 31 significant bits
    (larger factors get more), and ``m_i = RNE(M_i 2^n)``. If ``sum_i X_i m_i`` reaches
    :data:`SUM_LIMIT` (``X_i`` the operand magnitudes), ``n`` drops one at a time until it fits
    in int64, taking bits from the finest factor only. Then common trailing zero bits are
    stripped while ``n > 0`` (a power of two is a pure shift). When every factor alone would
    be 0 (its own canonical shift above 62: below ``2^-32``), or all are zero, ``m_i = 0, n = 0``.

    Args:
        reals: float64 factors (broadcastable; one group per element).
        magnitudes: largest ``|x_i|`` of each factor's integer operand: :data:`ACCUMULATOR_MAGNITUDE`
            for an int32 accumulator, ``2^7``/``2^15`` for int8/int16; default
            :data:`ACTIVATION_MAGNITUDE` for each.

    Returns:
        ``([m_1, ...], n)``, all int64 tensors of the broadcast shape.
    """
    stacked = torch.stack(torch.broadcast_tensors(*[r.to(torch.float64) for r in reals]))
    _check_reals(stacked)
    if magnitudes is None:
        magnitudes = [ACTIVATION_MAGNITUDE] * len(reals)
    if len(magnitudes) != len(reals):
        raise ValueError(
            f"Expected one operand magnitude per factor ({len(reals)}), but got {len(magnitudes)}."
        )
    if len(reals) == 1 and magnitudes[0] * 2**MULTIPLIER_BITS <= SUM_LIMIT:
        mult, shift = _single_factor(stacked[0])
        return [mult], shift
    shape = stacked.shape[1:]
    columns = stacked.reshape(len(reals), -1).t().tolist()
    groups = [_aligned(column, magnitudes) for column in columns]
    mults = torch.tensor([g[0] for g in groups], dtype=torch.int64).reshape(-1, len(reals))
    shift = torch.tensor([g[1] for g in groups], dtype=torch.int64).reshape(shape)
    return [mults[:, i].reshape(shape) for i in range(len(reals))], shift


def quantize_multiplier(real: Tensor) -> tuple[Tensor, Tensor]:
    """Represent real factors ``M`` (float64 tensor) by ``(m, n)`` with ``M ~= m * 2^-n``.

    ``|M - m * 2^-n| <= 2^-31 * M`` for every ``M`` in ``[2^-32, 2^31)``.
    """
    mults, shift = quantize_multipliers(real)
    return mults[0], shift
