"""YUV input patch: the chapter's RGB888 sample, ``patch_yuv_input`` and RGB-vs-YUV parity."""

import contextlib
import io

import pytest
import torch

from hq_lightning import set_march
from hq_lightning.deploy import export_torchscript, patch_yuv_input
from hq_lightning.functional import (
    bgr2centered_yuv,
    centered_yuv2bgr,
    centered_yuv2rgb,
    rgb2centered_yuv,
)
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.chapter_samples import insert_centered_yuv2rgb_by_hand, rgb888_converted


@pytest.fixture(autouse=True)
def _bayes():
    set_march("bayes")
    yield
    set_march("bayes")


def test_chapter_rgb888_sample_runs_and_prints_the_inserted_node():
    # user-guide-expert.md, "RGB888 数据部署", with the package name replaced
    traced = rgb888_converted()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print("Before centered_yuv2rgb")
        traced.graph.print_tabular()
        insert_centered_yuv2rgb_by_hand(traced)
        print("\nAfter centered_yuv2rgb")
        traced.graph.print_tabular()
    before, after = out.getvalue().split("After centered_yuv2rgb")
    assert "centered_yuv2rgb" not in before.split("\n", 1)[1]
    line = next(row for row in after.splitlines() if row.startswith("call_function"))
    assert "centered_yuv2rgb" in line and "(quant,)" in line and "{'swing': 'full'}" in line
    yuv = torch.randint(-128, 128, (1, 3, 28, 28)).float()
    y = traced(yuv)
    assert y.dtype == torch.int8 and y.shape == (1, 3, 26, 26)
    # the hand-edited graph traces (export_torchscript checks bit-exactness on its example)
    scripted = export_torchscript(traced, (yuv,))
    other = torch.randint(-128, 128, (2, 3, 28, 28)).float()
    assert torch.equal(scripted(other), traced(other))


class _RgbNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 4, 3)
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv2(self.relu(self.conv1(self.quant(x)))))


def _images(n=8, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: low-resolution noise upsampled, like natural image content
    low = torch.randint(0, 256, (n, 3, size // 3, size // 3), generator=g).float()
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").round()


def _rgb_model(mean, std, bgr=False):
    torch.manual_seed(0)
    qat = prepare_qat_fx(_RgbNet(), {"": default_qat_8bit_fake_quant_qconfig})
    images = _images(32, seed=1)
    if bgr:
        images = images.flip(1)
    qat((images - mean) / std)
    return convert_fx(qat)


@pytest.mark.parametrize("bgr", [False, True])
def test_rgb_model_patched_for_yuv_matches_the_rgb_model(bgr):
    mean = torch.tensor([123.0, 117.0, 104.0]).reshape(1, 3, 1, 1)
    std = torch.tensor([58.0, 57.0, 57.5]).reshape(1, 3, 1, 1)
    model = _rgb_model(mean, std, bgr)
    q_scale = model.quant.scale.clone()
    patched = patch_yuv_input(model, swing="full", mean=mean.flatten(), std=std.flatten(), bgr=bgr)
    assert torch.equal(model.quant.scale, q_scale)  # not in place
    assert patched.quant.scale.item() == 1.0
    op = centered_yuv2bgr if bgr else centered_yuv2rgb
    (node,) = [n for n in patched.graph.nodes if n.op == "call_function" and n.target is op]
    assert node.args[0].target == "quant" and node.kwargs["swing"] == "full"
    assert node.kwargs["q_scale"] == q_scale.item()

    rgb = _images(8, seed=2)
    x = rgb.flip(1) if bgr else rgb
    yuv = (bgr2centered_yuv(x, "full") if bgr else rgb2centered_yuv(x, "full"))
    # first layer input: the int8 RGB the RGB model's stub makes vs the patched conversion.
    # RGB -> 8-bit YUV loses up to 3.13 RGB units (floor per channel, 1.772 gain of U into B),
    # the fixed point adds one step: |diff| <= 3.13 / (std * q_scale) + 1 steps.
    rgb_int = model.quant((x - mean) / std).int()
    converted_input = op(patched.quant(yuv), "full", mean.flatten(), std.flatten(), q_scale).int()
    bound = 3.13 / (std.min().item() * q_scale.item()) + 1
    assert (converted_input - rgb_int).abs().max().item() <= bound
    # model outputs: that input error (measured: at most 2-3 steps, 0.46-0.59 on average) passes
    # through two convs; measured at most 1.8 % of the output range, 0.4 % on average.
    out_rgb, out_yuv = model((x - mean) / std), patched(yuv)
    span = out_rgb.abs().max().item()
    assert (out_yuv - out_rgb).abs().max().item() <= 0.05 * span
    assert (out_yuv - out_rgb).abs().mean().item() <= 0.01 * span


def test_patch_yuv_input_errors():
    model = _rgb_model(128.0, 128.0)
    with pytest.raises(ValueError, match="input_names"):
        patch_yuv_input(model, input_names=["conv1"])
    with pytest.raises(TypeError, match="GraphModule"):
        patch_yuv_input(_RgbNet())
    with pytest.raises(ValueError, match="1 or 3 values"):
        patch_yuv_input(model, mean=[1.0, 2.0])
    patched = patch_yuv_input(model, input_names="quant", swing="studio")
    with pytest.raises(TypeError, match="deploy-only"):
        centered_yuv2rgb(torch.zeros(1, 3, 2, 2))
    set_march("bernoulli2")
    with pytest.raises(RuntimeError, match="bayes or bayes_e"):
        patched(torch.zeros(1, 3, 6, 6))
