"""torchvision's fx-wrapped helpers recognised as scale-preserving registry ops (issues 10, 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.islands import float_islands
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import _patch_merging_pad  # noqa: E402
from torchvision.ops import StochasticDepth  # noqa: E402


class DropPathBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.drop(self.conv(x)) + x[:, :1])


class PatchMerge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):  # x: N, H, W, C as in Swin
        return self.dequant(_patch_merging_pad(self.fc(self.quant(x))))


def _calibrated(model, x):
    prepared = prepare_qat_fx(model, {"": QC})
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    prepared(x)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def test_stochastic_depth_reads_training_at_run_time():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5)
    prepared = _calibrated(DropPathBlock(), x)
    assert float_islands(prepared) == []
    assert isinstance(prepared.drop, StochasticDepth)  # one leaf, not traced through
    converted = convert_fx(prepared)
    assert torch.equal(converted(x), prepared(x))  # identity in eval, on integer codes
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    assert prepared(x).shape == (16, 4, 5, 5)
    ones = torch.ones(64, 2)
    rows = prepared.drop(ones)  # the live module: training drops whole rows, scales the rest
    kept = rows[:, 0] != 0
    assert 0 < int(kept.sum()) < 64 and torch.equal(rows[kept], torch.full_like(rows[kept], 2.0))


def test_patch_merging_pad_passes_integer_codes_through():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 7, 3)  # odd H and W: the helper pads with zeros
    prepared = _calibrated(PatchMerge(), x)
    assert float_islands(prepared) == []
    converted = convert_fx(prepared)
    out = converted(x)
    assert out.shape == (2, 3, 4, 12)
    assert torch.equal(out, prepared(x))
