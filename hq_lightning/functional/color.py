"""Colour-space ops between RGB/BGR and centered YUV444 (BT.601, NCHW, 8-bit values).

The chip's image pyramid hands the model centered YUV444 in full swing (each channel ``-128..127``).
Two ways to meet it:

* Training-time preprocessing (recommended): :func:`rgb2centered_yuv` / :func:`bgr2centered_yuv`
  turn the training images into exactly what the chip will produce, with the integer formulas of
  BT.601 (``floor((c . rgb + 128) / 256) + offset - 128``).
* Deploy-time patch for a model already trained on RGB: :func:`centered_yuv2rgb` /
  :func:`centered_yuv2bgr` run on the *converted* (integer) model right after the input QuantStub
  (whose scale is then 1). They convert YUV back to RGB, normalise with the training ``mean`` and
  ``std`` and quantize at the training input scale ``q_scale``, all as one fixed-point 1x1 conv.

Fixed-point weights of the deploy op (see :func:`yuv2rgb_fixed_point_params`): the float map is
``q_c = sum_j A[c, j] * yuv_j + a_c`` with ``A = M / (std_c * q_scale)`` and
``a_c = (offset_c - mean_c) / (std_c * q_scale)``, where ``M``/``offset`` are the BT.601 inverse
(full: ``R = Y + 1.402 V + 128``...; studio: ``R = 1.164 Y + 1.596 V + 112 * 1.164``...). It is
executed as a per-channel quantized conv: int8 weight ``W[c, j] = round(M[c, j] / s_c)`` with
``s_c = max_j |M[c, j]| / 127`` (the largest coefficient of each row lands exactly on 127), input
scale 1, int32 bias ``round((offset_c - mean_c) / std_c / s_c * std_c ...)`` (at scale
``s_c / std_c``), and an integer requantization from scale ``s_c / std_c`` to ``q_scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "rgb2centered_yuv",
    "bgr2centered_yuv",
]

_SWINGS = ("full", "studio")

# BT.601 RGB -> YUV in 8-bit integer arithmetic: yuv = floor((C @ rgb + 128) / 256) + offset.
_RGB2YUV_COEFFS = {
    "full": ((77, 150, 29), (-43, -84, 127), (127, -106, -21)),
    "studio": ((66, 129, 25), (-38, -74, 112), (112, -94, -18)),
}
_RGB2YUV_OFFSETS = {"full": (0, 128, 128), "studio": (16, 128, 128)}


def _check_swing(swing: str) -> str:
    if swing not in _SWINGS:
        raise ValueError(f'Expected `swing` to be "full" or "studio", but got {swing!r}.')
    return swing


def _check_image(input: Tensor, name: str = "input") -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(input).__name__}.")
    if input.dim() < 3 or input.shape[-3] != 3:
        raise ValueError(
            f"Expected `{name}` to be an image tensor with 3 channels at dim -3 (NCHW or CHW), "
            f"but got shape {tuple(input.shape)}."
        )


def _to_centered_yuv(input: Tensor, swing: str, bgr: bool) -> Tensor:
    _check_swing(swing)
    _check_image(input)
    if input.is_complex() or input.dtype == torch.bool:
        raise TypeError(
            f"Expected `input` to be a real image tensor (float or integer), but got {input.dtype}."
        )
    if input.numel() > 0:
        lo, hi = float(input.min()), float(input.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                "Expected `input` to hold 8-bit pixel values in [0, 255] (not normalised to [0, 1]), "
                f"but got values in [{lo}, {hi}]."
            )
    coeffs = torch.tensor(_RGB2YUV_COEFFS[swing], dtype=torch.float64, device=input.device)
    if bgr:
        coeffs = coeffs.flip(1)
    offsets = torch.tensor(_RGB2YUV_OFFSETS[swing], dtype=torch.float64, device=input.device)
    # float64 keeps every intermediate an exact integer (|C @ rgb| < 2^16), so floor is exact for
    # integer-valued pixels; non-integer float pixels follow the same formula.
    rgb = input.to(torch.float64).movedim(-3, -1)
    acc = rgb @ coeffs.T + 128.0
    yuv = torch.floor(acc / 256.0) + offsets - 128.0
    out_dtype = input.dtype if input.is_floating_point() else torch.float32
    return yuv.movedim(-1, -3).to(out_dtype).contiguous()


def rgb2centered_yuv(input: Tensor, swing: str = "studio") -> Tensor:
    """Convert images from RGB to centered YUV444 (BT.601), as the chip's image pyramid does.

    Args:
        input: RGB image(s), channels at dim -3 (``NCHW`` or ``CHW``), values ``0..255``
            (float or integer dtype).
        swing: ``"studio"`` for studio swing (Y: -112..107, U, V: -112..112) or ``"full"`` for
            full swing (Y, U, V: -128..127). Use ``"full"`` to match the chip. Default ``"studio"``.

    Returns:
        Centered YUV (``yuv - 128``), same shape; same dtype for float input, float32 for integer
        input. Each value is an integer: ``floor((c . rgb + 128) / 256) + offset - 128`` with the
        BT.601 8-bit coefficients ``c`` (full: Y ``77, 150, 29``, U ``-43, -84, 127``,
        V ``127, -106, -21``, offsets ``0, 128, 128``; studio: ``66, 129, 25``,
        ``-38, -74, 112``, ``112, -94, -18``, offsets ``16, 128, 128``).

    Example:
        >>> import torch
        >>> from hq_lightning.functional import rgb2centered_yuv
        >>> white = torch.full((1, 3, 1, 1), 255.0)
        >>> rgb2centered_yuv(white, swing="full").flatten().tolist()
        [127.0, 0.0, 0.0]
    """
    return _to_centered_yuv(input, swing, bgr=False)


def bgr2centered_yuv(input: Tensor, swing: str = "studio") -> Tensor:
    """Convert images from BGR to centered YUV444 (BT.601); :func:`rgb2centered_yuv` for BGR order.

    Args:
        input: BGR image(s), channels at dim -3, values ``0..255``.
        swing: ``"studio"`` (default) or ``"full"`` (what the chip produces).

    Returns:
        Centered YUV image(s), as :func:`rgb2centered_yuv`.

    Example:
        >>> import torch
        >>> from hq_lightning.functional import bgr2centered_yuv, rgb2centered_yuv
        >>> rgb = torch.randint(0, 256, (1, 3, 2, 2)).float()
        >>> torch.equal(bgr2centered_yuv(rgb.flip(1)), rgb2centered_yuv(rgb))
        True
    """
    return _to_centered_yuv(input, swing, bgr=True)
