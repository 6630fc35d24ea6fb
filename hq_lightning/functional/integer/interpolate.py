"""Fixed-point bilinear interpolation weights and exact integer accumulation.

Each output sample is ``sum w_y[i] * w_x[j] * x[i, j]`` over its 2x2 source neighbours, where the
1-D weights are ``2^F - l`` and ``l`` with ``l = round_half_even(lambda * 2^F)`` and
``F = BILINEAR_FRACTION_BITS``. The sum carries a factor ``2^(2F)`` that requantization removes.

Example:
    >>> import torch
    >>> x = torch.tensor([[[[0, 100]]]], dtype=torch.int8)
    >>> bilinear_accumulate(x, (1, 4), align_corners=True)[0, 0, 0].tolist()
    [0, 2176000, 4377600, 6553600]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BILINEAR_FRACTION_BITS", "bilinear_taps", "bilinear_accumulate"]

#: Fractional bits of the 1-D bilinear weights.
BILINEAR_FRACTION_BITS = 8


def bilinear_taps(
    in_size: int,
    out_size: int,
    align_corners: bool,
    fraction_bits: int = BILINEAR_FRACTION_BITS,
    scale_factor: float | None = None,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Source indices ``i0, i1`` and integer weights ``w0, w1`` (``w0 + w1 = 2^F``) per output index.

    Source coordinate (float64): ``align_corners``: ``d * (in - 1) / (out - 1)`` (0 when
    ``out == 1``); otherwise ``max((d + 0.5) * r - 0.5, 0)`` with ``r = 1 / scale_factor`` when
    the call gave a scale factor (torch's rule, ``recompute_scale_factor`` unset), else
    ``r = in / out``.
    """
    one = 1 << fraction_bits
    ratio = 1.0 / scale_factor if scale_factor else in_size / out_size
    i0s, i1s, w0s, w1s = [], [], [], []
    for d in range(out_size):
        if align_corners:
            src = d * ((in_size - 1) / (out_size - 1)) if out_size > 1 else 0.0
        else:
            src = max((d + 0.5) * ratio - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        frac = round((src - i0) * one)  # Python round: half to even
        frac = min(max(frac, 0), one)
        i0s.append(i0)
        i1s.append(min(i0 + 1, in_size - 1))
        w0s.append(one - frac)
        w1s.append(frac)
    return i0s, i1s, w0s, w1s


def bilinear_accumulate(
    x: Tensor,
    size: tuple[int, int],
    align_corners: bool,
    fraction_bits: int = BILINEAR_FRACTION_BITS,
    scale_factors: tuple[float, float] | None = None,
) -> Tensor:
    """int64 ``sum w_y * w_x * x`` over the 2x2 neighbours of every output pixel (NCHW).

    ``scale_factors``: the call's ``(sy, sx)`` when it gave a scale factor (see
    :func:`bilinear_taps`), else ``None`` (the ratio of the sizes).
    """
    if x.dim() != 4:
        raise ValueError(f"Expected `x` to be 4-D (N, C, H, W), but got {x.dim()}-D.")
    height, width = int(x.shape[-2]), int(x.shape[-1])  # plain ints under torch.jit.trace too
    size = (int(size[0]), int(size[1]))
    sy, sx = scale_factors if scale_factors is not None else (None, None)
    taps_y = bilinear_taps(height, size[0], align_corners, fraction_bits, sy)
    taps_x = bilinear_taps(width, size[1], align_corners, fraction_bits, sx)
    ys = [torch.tensor(v, device=x.device) for v in taps_y]
    xs = [torch.tensor(v, device=x.device) for v in taps_x]
    wide = x.to(torch.int64)
    rows = wide[:, :, ys[0]] * ys[2].view(-1, 1) + wide[:, :, ys[1]] * ys[3].view(-1, 1)
    return rows[..., xs[0]] * xs[2] + rows[..., xs[1]] * xs[3]
