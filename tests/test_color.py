"""Colour-space ops: training-time RGB/BGR -> centered YUV against the BT.601 integer formulas."""

import math

import numpy as np
import pytest
import torch

from hq_lightning.functional import (
    bgr2centered_yuv,
    centered_yuv2bgr,
    centered_yuv2rgb,
    rgb2centered_yuv,
)
from hq_lightning.functional.color import yuv2rgb_fixed_point_params
from hq_lightning.functional.integer import quantize_bias, quantize_multiplier
from hq_lightning.march import march_context

# semantics.md section 7, written out independently of the implementation (numpy integer floor
# division, one line per channel).
_FORMULAS = {
    "full": lambda r, g, b: (
        (77 * r + 150 * g + 29 * b + 128) // 256,
        (-43 * r - 84 * g + 127 * b + 128) // 256 + 128,
        (127 * r - 106 * g - 21 * b + 128) // 256 + 128,
    ),
    "studio": lambda r, g, b: (
        (66 * r + 129 * g + 25 * b + 128) // 256 + 16,
        (-38 * r - 74 * g + 112 * b + 128) // 256 + 128,
        (112 * r - 94 * g - 18 * b + 128) // 256 + 128,
    ),
}


def _grid_pixels(sweep_channel: int, step: int = 5) -> np.ndarray:
    """Every 8-bit value of one channel against a grid of the other two: (3, N) int64."""
    full = np.arange(256, dtype=np.int64)
    coarse = np.unique(np.append(np.arange(0, 256, step, dtype=np.int64), 255))
    axes = [coarse, coarse, coarse]
    axes[sweep_channel] = full
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh])


@pytest.mark.parametrize("swing", ["full", "studio"])
@pytest.mark.parametrize("sweep_channel", [0, 1, 2])
def test_rgb_and_bgr_match_formulas_on_every_8bit_value(swing, sweep_channel):
    rgb = _grid_pixels(sweep_channel)
    expected = np.stack(_FORMULAS[swing](*rgb)) - 128
    image = torch.from_numpy(rgb).float().reshape(1, 3, -1, 1)
    got = rgb2centered_yuv(image, swing=swing).reshape(3, -1).numpy()
    np.testing.assert_array_equal(got, expected)
    got_bgr = bgr2centered_yuv(image.flip(1), swing=swing).reshape(3, -1).numpy()
    np.testing.assert_array_equal(got_bgr, expected)


def test_ranges_of_the_swings():
    rgb = torch.from_numpy(_grid_pixels(0, step=3)).float().reshape(1, 3, -1, 1)
    full = rgb2centered_yuv(rgb, swing="full")
    studio = rgb2centered_yuv(rgb, swing="studio")
    assert full.min() >= -128 and full.max() <= 127
    assert studio[:, 0].min() >= -112 and studio[:, 0].max() <= 107
    assert studio[:, 1:].min() >= -112 and studio[:, 1:].max() <= 112


def test_default_swing_is_studio_and_dtypes():
    rgb8 = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    out = rgb2centered_yuv(rgb8)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    assert torch.equal(out, rgb2centered_yuv(rgb8.double(), swing="studio").float())
    assert rgb2centered_yuv(rgb8.half()).dtype == torch.float16
    # CHW works too
    assert torch.equal(rgb2centered_yuv(rgb8[0]), out[0])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="Expected `swing`"):
        rgb2centered_yuv(torch.zeros(1, 3, 2, 2), swing="limited")
    with pytest.raises(ValueError, match="3 channels"):
        rgb2centered_yuv(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        bgr2centered_yuv(torch.full((1, 3, 2, 2), 300.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        rgb2centered_yuv(np.zeros((1, 3, 2, 2)))


# ---------------------------------------------------------------- deploy-only YUV -> RGB / BGR

_YUV2RGB = {  # semantics.md section 7: rgb = M @ centered (y, u, v) + offset
    "full": (np.array([[1.0, 0.0, 1.402], [1.0, -0.3441, -0.7141], [1.0, 1.772, 0.0]]), 128.0),
    "studio": (
        np.array([[1.164, 0.0, 1.596], [1.164, -0.392, -0.812], [1.164, 2.016, 0.0]]),
        112 * 1.164,
    ),
}

_NORMALISATIONS = [
    ((128.0,), (128.0,), 1 / 128),  # the op's defaults: RGB in [-1, 1)
    ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], 0.0172),  # ImageNet-style, 3 channels
    (torch.tensor([0.0]), torch.tensor([255.0]), torch.tensor(1 / 255)),  # tensors, [0, 1] input
]


def _vec3(v):
    return np.broadcast_to(np.asarray(v.tolist() if torch.is_tensor(v) else v, float).ravel(), 3)


def _float_target(yuv, swing, mean, std, q_scale, bgr):
    """The float formula, in output steps (before rounding): ((M yuv + off) - mean) / std / q."""
    matrix, offset = _YUV2RGB[swing]
    if bgr:
        matrix = matrix[::-1]
    rgb = matrix @ yuv + offset
    return (rgb - _vec3(mean)[:, None]) / _vec3(std)[:, None] / float(q_scale)


def _fixed_point_reference(yuv, swing, mean, std, q_scale, bgr):
    """Slow reference of the documented fixed-point conv, in Python/numpy integers only."""
    matrix, offset = _YUV2RGB[swing]
    if bgr:
        matrix = matrix[::-1]
    mean, std = _vec3(mean), _vec3(std)
    out = np.empty(yuv.shape, dtype=np.int64)
    for c in range(3):
        row_scale = np.abs(matrix[c]).max() / 127
        weight = np.round(matrix[c] / row_scale).astype(np.int64) * int(np.sign(std[c]))
        acc_scale = float(np.float32(row_scale / abs(std[c])))
        bias = int(np.round((offset - mean[c]) / std[c] / acc_scale))
        real = acc_scale / float(np.float32(float(q_scale)))
        frac, exp = math.frexp(real)
        shift = 31 - exp
        mult = round(real * 2.0**shift)
        if mult == 2**31:
            mult, shift = mult // 2, shift - 1
        acc = weight @ yuv + bias
        out[c] = np.clip((acc * mult + (1 << (shift - 1))) >> shift, -128, 127)
    return out


def _yuv_grid(sweep_channel, step=7):
    return _grid_pixels(sweep_channel, step) - 128


@pytest.mark.parametrize("swing", ["full", "studio"])
@pytest.mark.parametrize("bgr", [False, True])
@pytest.mark.parametrize("norm", range(len(_NORMALISATIONS)))
def test_centered_yuv2rgb_is_bit_exact_and_within_one_step(swing, bgr, norm):
    mean, std, q_scale = _NORMALISATIONS[norm]
    op = centered_yuv2bgr if bgr else centered_yuv2rgb
    for sweep in range(3):
        yuv = _yuv_grid(sweep)
        x = torch.from_numpy(yuv).to(torch.int8).reshape(1, 3, -1, 1)
        got = op(x, swing=swing, mean=mean, std=std, q_scale=q_scale)
        assert got.dtype == torch.int8 and got.shape == x.shape
        got = got.reshape(3, -1).numpy().astype(np.int64)
        np.testing.assert_array_equal(got, _fixed_point_reference(yuv, swing, mean, std, q_scale, bgr))
        target = np.clip(np.round(_float_target(yuv, swing, mean, std, q_scale, bgr)), -128, 127)
        assert np.abs(got - target).max() <= 1


def test_yuv_roundtrip_close_to_the_rgb_it_came_from():
    # RGB -> full-swing YUV (8-bit integer formulas) -> fixed-point RGB: the chip's path for a
    # model trained on RGB. The 8-bit YUV alone (floor in each channel, then the 1.772 / 1.402
    # gains of U / V) moves the exact float inverse up to 3.13 RGB units (B) from the source, the
    # fixed point adds at most one step: 4 steps of 1/128 at most, about 0.6 on average.
    rgb = torch.from_numpy(_grid_pixels(1, step=15)).float().reshape(1, 3, -1, 1)
    yuv = rgb2centered_yuv(rgb, swing="full").to(torch.int8)
    back = centered_yuv2rgb(yuv, swing="full").float()
    error = (back - torch.clamp(rgb - 128, -128, 127)).abs()
    assert error.max() <= 4
    assert error.mean() <= 0.7


def test_centered_yuv2rgb_traces_and_rejects_misuse():
    x = torch.randint(-128, 128, (2, 3, 4, 4), dtype=torch.int8)
    traced = torch.jit.trace(lambda t: centered_yuv2rgb(t, "full", q_scale=0.02), (x,))
    y = torch.randint(-128, 128, (1, 3, 5, 3), dtype=torch.int8)
    assert torch.equal(traced(y), centered_yuv2rgb(y, "full", q_scale=0.02))
    with pytest.raises(TypeError, match="deploy-only"):
        centered_yuv2rgb(x.float())
    with march_context("bernoulli2"), pytest.raises(RuntimeError, match="bayes or bayes_e"):
        centered_yuv2rgb(x)
    with march_context("bayes_e"):
        centered_yuv2bgr(x)
    with pytest.raises(ValueError, match="1 or 3 values"):
        centered_yuv2rgb(x, mean=[1.0, 2.0])
    with pytest.raises(ValueError, match="q_scale"):
        centered_yuv2rgb(x, q_scale=0.0)
    with pytest.raises(ValueError, match="Expected `swing`"):
        centered_yuv2rgb(x, swing="bt709")


def test_fixed_point_multipliers_follow_the_integer_kernels():
    for swing in ("full", "studio"):
        for mean, std, q_scale in _NORMALISATIONS:
            p = yuv2rgb_fixed_point_params(swing, mean, std, q_scale)
            m, n = quantize_multiplier(p.weight_scale.double() / p.output_scale)
            assert torch.equal(m, p.multiplier) and torch.equal(n, p.shift)
            assert torch.equal(quantize_bias(p.bias, p.weight_scale.double()), p.quantized_bias)
