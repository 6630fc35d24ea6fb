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
``out_c = (sum_j M[c, j] * yuv_j + offset - mean_c) / std_c``, quantized at ``q_scale``, with
``M``/``offset`` the BT.601 inverse (full: ``R = Y + 1.402 V + 128``...; studio:
``R = 1.164 Y + 1.596 V + 112 * 1.164``...). It runs as the integer 1x1 conv of
``docs/integer-arithmetic.md`` (the kernels of ``hq_lightning.functional.integer``): input scale
1, int8 weight ``W[c, j] = round(M[c, j] / r_c)`` with ``r_c = max_j |M[c, j]| / 127`` (each row's
largest coefficient is exactly 127), per-channel weight scale ``r_c / std_c``, int32 bias
``round((offset - mean_c) / std_c / (r_c / std_c))``, int32 accumulation, then requantization by
the integer multiplier and shift of ``(r_c / std_c) / q_scale`` with round-half-up and int8
saturation. Full swing weights (rows R, G, B over Y, U, V): ``[91, 0, 127]``,
``[127, -44, -91]``, ``[72, 127, 0]``; studio: ``[93, 0, 127]``, ``[127, -43, -89]``,
``[73, 127, 0]``. The largest weight error (the Y weight of R and B: 91 vs 90.58) moves the
result by at most 0.6 of an RGB unit, so the output is within one step of the rounded float
formula for the usual normalisations (tested on every value of each channel).
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hq_lightning.functional.integer.accumulate import ConvPlan
from hq_lightning.functional.integer.rounding import requantize
from hq_lightning.march import March, get_march

__all__ = [
    "rgb2centered_yuv",
    "bgr2centered_yuv",
    "centered_yuv2rgb",
    "centered_yuv2bgr",
    "yuv2rgb_fixed_point_params",
    "YuvToRgbFixedPoint",
]

#: Marches whose hardware has the fixed-point colour conversion (BAYES and BAYES_E, as in the plugin).
YUV2RGB_MARCHES = (March.BAYES, March.BAYES_E)

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


# BT.601 centered YUV -> RGB (0..255 scale): rgb = M @ (y, u, v) + offset, with y, u, v centered.
_YUV2RGB_MATRIX = {
    "full": ((1.0, 0.0, 1.402), (1.0, -0.3441, -0.7141), (1.0, 1.772, 0.0)),
    "studio": ((1.164, 0.0, 1.596), (1.164, -0.392, -0.812), (1.164, 2.016, 0.0)),
}
_YUV2RGB_OFFSET = {"full": 128.0, "studio": 112.0 * 1.164}


def _channel_values(value: float | Sequence[float] | Tensor, name: str) -> tuple[float, ...]:
    """``value`` as 3 Python floats (one per output channel)."""
    if isinstance(value, Tensor):
        values = [float(v) for v in value.detach().flatten().tolist()]
    elif isinstance(value, (int, float)):
        values = [float(value)]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"Expected `{name}` to hold numbers, but got {value!r}.") from None
    else:
        raise TypeError(
            f"Expected `{name}` to be a number, a list of 1 or 3 numbers or a tensor, "
            f"but got {type(value).__name__}."
        )
    if len(values) not in (1, 3):
        raise ValueError(
            f"Expected `{name}` to have 1 or 3 values (one per channel), but got {len(values)}."
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"Expected `{name}` to be finite, but got {values}.")
    return tuple(values * 3) if len(values) == 1 else tuple(values)


def _float32(value: float) -> float:
    """Round a Python float to float32 (scales are float32 in converted models)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _positive_scale(q_scale: float | Tensor) -> float:
    if isinstance(q_scale, Tensor):
        if q_scale.numel() != 1:
            raise ValueError(
                "Expected `q_scale` to be a float or a one-element tensor (the input QuantStub's "
                f"per-tensor scale), but got a tensor of shape {tuple(q_scale.shape)}."
            )
        value = float(q_scale.detach().reshape(()).item())
    elif isinstance(q_scale, (int, float)):
        value = float(q_scale)
    else:
        raise TypeError(
            f"Expected `q_scale` to be a float or a tensor, but got {type(q_scale).__name__}."
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Expected `q_scale` to be a positive finite scale, but got {value}.")
    return _float32(value)


def _multiplier_and_shift(real: float) -> tuple[int, int]:
    """``real ~= m * 2^-n`` by the rule of docs/integer-arithmetic.md, section 3 (one factor)."""
    if real == 0:
        return 0, 0
    _, exponent = math.frexp(real)
    shift = 31 - exponent
    mult = round(math.ldexp(real, shift))  # Python's round is half to even
    if mult == 2**31:
        shift -= 1
        mult = round(math.ldexp(real, shift))
    while shift > 0 and mult % 2 == 0:
        mult //= 2
        shift -= 1
    if shift > 62:
        return 0, 0
    return mult, shift


class YuvToRgbFixedPoint(NamedTuple):
    """The fixed-point 1x1 conv that implements :func:`centered_yuv2rgb`.

    Attributes:
        weight: int8 ``[3, 3, 1, 1]``; row ``c`` is ``round(M[c] / r_c)``, ``r_c = max_j |M[c, j]|
            / 127``, ``M`` the BT.601 YUV -> RGB matrix with rows in output-channel order (the sign
            of a negative ``std_c`` is folded into the row).
        weight_scale: float32 ``[3]``, per output channel ``r_c / |std_c|``.
        bias: float64 ``[3]``, ``(offset - mean_c) / std_c``: the conv's float bias.
        quantized_bias: int32 ``[3]``, ``round_half_even(bias_c / (input_scale * weight_scale_c))``.
        multiplier: int64 ``[3]`` and ``shift`` int64 ``[3]``: the requantization
            ``input_scale * weight_scale_c / output_scale ~= multiplier_c * 2^-shift_c``.
        input_scale: 1.0 (the patched QuantStub passes centered YUV through unchanged).
        output_scale: ``q_scale`` as float32, the scale the model's first layer was converted for.
    """

    weight: Tensor
    weight_scale: Tensor
    bias: Tensor
    quantized_bias: Tensor
    multiplier: Tensor
    shift: Tensor
    input_scale: float
    output_scale: float


@functools.lru_cache(maxsize=64)
def _fixed_point_numbers(
    swing: str, mean: tuple[float, ...], std: tuple[float, ...], q_scale: float, bgr: bool
) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...], tuple[float, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    # Pure Python on purpose: no tensor is created, so the op runs unchanged under torch.jit.trace
    # and torch.export (ONNX) and the cache never holds traced or fake tensors.
    matrix = _YUV2RGB_MATRIX[swing][::-1] if bgr else _YUV2RGB_MATRIX[swing]
    offset = _YUV2RGB_OFFSET[swing]
    weights, scales, biases, qbiases, mults, shifts = [], [], [], [], [], []
    for row, m, s in zip(matrix, mean, std):
        row_scale = max(abs(v) for v in row) / 127.0
        sign = 1 if s > 0 else -1
        weights.append(tuple(sign * round(v / row_scale) for v in row))
        scale = _float32(row_scale / abs(s))
        bias = (offset - m) / s
        scales.append(scale)
        biases.append(bias)
        qbiases.append(min(max(round(bias / scale), -(2**31)), 2**31 - 1))
        mult, shift = _multiplier_and_shift(scale / q_scale)
        mults.append(mult)
        shifts.append(shift)
    return tuple(weights), tuple(scales), tuple(biases), tuple(qbiases), tuple(mults), tuple(shifts)


def _checked_arguments(swing, mean, std, q_scale):
    _check_swing(swing)
    mean_values = _channel_values(mean, "mean")
    std_values = _channel_values(std, "std")
    if any(v == 0 for v in std_values):
        raise ValueError(f"Expected `std` to be non-zero, but got {list(std_values)}.")
    return mean_values, std_values, _positive_scale(q_scale)


def yuv2rgb_fixed_point_params(
    swing: str = "studio",
    mean: float | Sequence[float] | Tensor = (128.0,),
    std: float | Sequence[float] | Tensor = (128.0,),
    q_scale: float | Tensor = 1.0 / 128.0,
    bgr: bool = False,
) -> YuvToRgbFixedPoint:
    """Derive the fixed-point conv of :func:`centered_yuv2rgb` / :func:`centered_yuv2bgr`.

    The float map is ``out_c = (sum_j M[c, j] * yuv_j + offset - mean_c) / std_c``, quantized at
    ``q_scale``. Dividing row ``c`` by ``std_c`` does not change its int8 weights, only its scale,
    so the int8 weights depend on the swing alone: each row's largest coefficient maps to 127.

    Example:
        >>> from hq_lightning.functional.color import yuv2rgb_fixed_point_params
        >>> p = yuv2rgb_fixed_point_params("full")
        >>> p.weight[:, :, 0, 0].tolist()
        [[91, 0, 127], [127, -44, -91], [72, 127, 0]]
    """
    mean_values, std_values, out_scale = _checked_arguments(swing, mean, std, q_scale)
    weight, scale, bias, qbias, mult, shift = _fixed_point_numbers(
        swing, mean_values, std_values, out_scale, bool(bgr)
    )
    return YuvToRgbFixedPoint(
        weight=torch.tensor(weight, dtype=torch.int8).reshape(3, 3, 1, 1),
        weight_scale=torch.tensor(scale, dtype=torch.float32),
        bias=torch.tensor(bias, dtype=torch.float64),
        quantized_bias=torch.tensor(qbias, dtype=torch.int32),
        multiplier=torch.tensor(mult, dtype=torch.int64),
        shift=torch.tensor(shift, dtype=torch.int64),
        input_scale=1.0,
        output_scale=out_scale,
    )


def _check_deploy_input(input: Tensor, op: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"Expected `input` to be a torch.Tensor, but got {type(input).__name__}.")
    if input.dtype not in (torch.int8, torch.int16):
        raise TypeError(
            f"Expected `input` of `{op}` to be the int8 output of a converted model's QuantStub "
            f"(scale 1, centered YUV in -128..127), but got dtype {input.dtype}. `{op}` is a "
            "deploy-only op for models after `convert_fx`; at training time convert the images "
            "with `rgb2centered_yuv` / `bgr2centered_yuv` instead."
        )
    if input.dim() != 4 or input.shape[1] != 3:
        raise ValueError(
            f"Expected `input` of `{op}` to be an NCHW tensor with 3 (Y, U, V) channels, "
            f"but got shape {tuple(input.shape)}."
        )
    march = get_march()
    if march not in YUV2RGB_MARCHES:
        names = " or ".join(m.value for m in YUV2RGB_MARCHES)
        raise RuntimeError(
            f"Expected the march to be {names} for `{op}` (only they run the fixed-point colour "
            f"conversion), but got {march.value!r}. Call `set_march(...)` before using it."
        )


def _centered_yuv2rgb(
    input: Tensor,
    swing: str,
    mean: float | Sequence[float] | Tensor,
    std: float | Sequence[float] | Tensor,
    q_scale: float | Tensor,
    bgr: bool,
) -> Tensor:
    with warnings.catch_warnings():
        # shape checks read traced sizes as Python ints: constant for a trace, as intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _check_deploy_input(input, "centered_yuv2bgr" if bgr else "centered_yuv2rgb")
    mean_values, std_values, out_scale = _checked_arguments(swing, mean, std, q_scale)
    weight, _, _, qbias, mult, shift = _fixed_point_numbers(
        swing, mean_values, std_values, out_scale, bool(bgr)
    )
    device = input.device
    # these tensors depend on the arguments only: constants of a jit trace by design
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        int_weight = torch.tensor(weight, dtype=torch.int8, device=device).reshape(3, 3, 1, 1)
        int_bias = torch.tensor(qbias, dtype=torch.int64, device=device)
        view = (1, 3, 1, 1)
        multiplier = torch.tensor(mult, dtype=torch.int64, device=device).reshape(view)
        right_shift = torch.tensor(shift, dtype=torch.int64, device=device).reshape(view)
        # 2^(n-1) rounding offsets from Python ints: no tensor shift-left to trace or export
        offset = torch.tensor([1 << (n - 1) if n > 0 else 0 for n in shift], device=device)
    # |sum| <= 3 * 127 * 255 < 2^24: one float32 chunk is exact for int8 and int16 (byte-split)
    # inputs, so the plan is spelled out instead of measured from the weight (ConvPlan.build).
    plan = ConvPlan("conv2d", int_weight, 1, 3, [(0, 3)], [int_weight.to(torch.float32)])
    acc = plan.accumulate(input, int_bias)
    return requantize(acc, multiplier, right_shift, -128, 127, torch.int8, offset.reshape(view))


def centered_yuv2rgb(
    input: Tensor,
    swing: str = "studio",
    mean: float | Sequence[float] | Tensor = (128.0,),
    std: float | Sequence[float] | Tensor = (128.0,),
    q_scale: float | Tensor = 1.0 / 128.0,
) -> Tensor:
    """Deploy-only: centered YUV444 -> normalised, quantized RGB, as one fixed-point 1x1 conv.

    Insert it in a *converted* model right after the input QuantStub and set that stub's scale to
    1 (or let :func:`hq_lightning.deploy.patch_yuv_input` do both). It converts YUV to RGB
    (BT.601, ``swing``), normalises with the training ``mean``/``std`` and quantizes at
    ``q_scale``, the trained QuantStub scale the next layer was converted for. Needs march BAYES
    or BAYES_E. The fixed-point weights are those of :func:`yuv2rgb_fixed_point_params`; the
    result is within one output step of the float formula for the default normalisation.

    Args:
        input: int8 ``[N, 3, H, W]`` centered YUV (the QuantStub output at scale 1).
        swing: ``"full"`` (what the chip's pyramid produces) or ``"studio"`` (default).
        mean: normalisation mean of the RGB training images: a number, 1 or 3 values, or a tensor.
        std: normalisation std, same forms as ``mean``.
        q_scale: the trained input QuantStub scale (float or one-element tensor).

    Returns:
        int8 ``[N, 3, H, W]`` RGB at scale ``q_scale``: ``round((rgb - mean) / std / q_scale)``.

    Example:
        >>> import torch
        >>> from hq_lightning.functional import centered_yuv2rgb
        >>> grey = torch.zeros(1, 3, 1, 1, dtype=torch.int8)  # Y = U = V = 128
        >>> centered_yuv2rgb(grey, swing="full").flatten().tolist()
        [0, 0, 0]
    """
    return _centered_yuv2rgb(input, swing, mean, std, q_scale, bgr=False)


def centered_yuv2bgr(
    input: Tensor,
    swing: str = "studio",
    mean: float | Sequence[float] | Tensor = (128.0,),
    std: float | Sequence[float] | Tensor = (128.0,),
    q_scale: float | Tensor = 1.0 / 128.0,
) -> Tensor:
    """Deploy-only: :func:`centered_yuv2rgb` for a model trained on BGR images.

    ``mean`` and ``std`` are in the model's (B, G, R) channel order.

    Example:
        >>> import torch
        >>> from hq_lightning.functional import centered_yuv2bgr
        >>> white = torch.tensor([127, 0, 0], dtype=torch.int8).reshape(1, 3, 1, 1)
        >>> centered_yuv2bgr(white, swing="full").flatten().tolist()
        [127, 127, 127]
    """
    return _centered_yuv2rgb(input, swing, mean, std, q_scale, bgr=True)
