"""Colour-space ops: training-time RGB/BGR -> centered YUV against the BT.601 integer formulas."""

import numpy as np
import pytest
import torch

from hq_lightning.functional import bgr2centered_yuv, rgb2centered_yuv

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
