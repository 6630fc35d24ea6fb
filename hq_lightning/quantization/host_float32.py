"""Float32 arithmetic on Python floats, bit for bit what the same float32 tensor ops compute.

An observer's per-tensor range is two numbers. On the CPU in eager mode, updating them through
tensor ops costs about ten small ops per observed batch (most of a fake quant's fixed cost at small
inputs), where the host has the values already: reading a CPU scalar is no synchronisation. This
module does that arithmetic on the host instead, exactly.

Each operation is computed in float64 and rounded to float32 at once. For ``+ - * /`` of float32
operands that gives the correctly rounded float32 result, the one a float32 kernel computes:
float64 carries more than twice float32's precision (53 >= 2 * 24 + 2 bits), so rounding twice
cannot differ from rounding once. Results a float32 op would overflow or make subnormal (where a
CPU flushing denormals would differ) come back as ``None``; the caller then takes the tensor path.

Example:
    >>> to_float32(0.1)
    0.10000000149011612
    >>> moving_average(1.0, 2.0, 0.01)  # 1 + float32(0.01) * (2 - 1), in float32
    1.0099999904632568
    >>> to_float32(1e39) is None
    True
"""

from __future__ import annotations

import math
import struct

__all__ = ["FLOAT32_MIN_NORMAL", "moving_average", "to_float32"]

#: The smallest positive normal float32 (2 ** -126).
FLOAT32_MIN_NORMAL = 2.0**-126

_FLOAT32 = struct.Struct("f")


def to_float32(value: float) -> float | None:
    """``value`` rounded to the nearest float32 (ties to even), or ``None`` when that is +-inf,
    subnormal or NaN."""
    try:
        rounded = _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:  # beyond float32's range
        return None
    if rounded != 0.0 and not FLOAT32_MIN_NORMAL <= abs(rounded) < math.inf:  # NaN fails too
        return None
    return rounded


def moving_average(value: float, current: float, constant: float) -> float | None:
    """``value + constant * (current - value)`` as float32 tensor ops compute it, one rounding per
    op, ``constant`` first rounded to float32 as a tensor op rounds a Python scalar; ``constant == 1``
    skips the product (the observers' tensor path does too). ``None`` where a step leaves float32's
    normal range."""
    step = to_float32(current - value)
    if step is not None and constant != 1.0:
        factor = to_float32(constant)
        step = None if factor is None else to_float32(factor * step)
    return None if step is None else to_float32(value + step)
