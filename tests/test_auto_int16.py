"""Sensitivity-driven int16: auto_int16 promotes the layer a planted high-range activation ruins."""

import pytest
import torch
from torch import nn

from hq_lightning.march import march_context
from hq_lightning.qconfig import default_calib_8bit_fake_quant_qconfig
from hq_lightning.quantization import DeQuantStub, QuantStub, prepare_qat_fx
from hq_lightning.quantization.sensitivity import auto_int16, promote_to_int16
from tests.calibrate import calibrated


def _planted():
    """Three Linear layers; the middle one's output has one channel at ~1000 next to channels
    at ~1: with one int8 scale for the whole tensor the small channels round to a few steps."""
    torch.manual_seed(0)
    model = nn.Sequential(QuantStub(), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4), DeQuantStub())
    with torch.no_grad():
        model[2].bias[0] = 1000.0
        model[3].weight[:, 0] = 0.0  # the model output does not depend on the outlier channel
    return model.eval()


def test_auto_int16_promotes_the_planted_layer_and_repairs_the_output():
    model = _planted()
    batches = [torch.randn(32, 8) for _ in range(3)]
    prepared = calibrated(model, batches)
    decision = auto_int16(prepared, batches, max_layers=1)
    assert decision.ranking.rows[0].path == "2"
    assert decision.promoted == ("2",)
    assert prepared.get_submodule("2").activation_post_process.dtype.value == "qint16"
    assert prepared.get_submodule("1").activation_post_process.dtype.value == "qint8"
    assert decision.sqnr_after > decision.sqnr_before + 20.0
    assert "`2`" in decision.to_markdown() and decision.to_dict()["promoted"] == ["2"]


def test_auto_int16_stops_at_the_sqnr_floor():
    model = _planted()
    batches = [torch.randn(32, 8) for _ in range(2)]
    prepared = calibrated(model, batches)
    reached = auto_int16(prepared, batches, max_layers=3, sqnr_floor=0.0)
    assert reached.promoted == () and "floor" in reached.reason  # already above 0 dB
    prepared = calibrated(model, batches)
    decision = auto_int16(prepared, batches, max_layers=3, sqnr_floor=25.0)
    assert decision.promoted == ("2",)  # one promotion reaches the floor: no more
    assert decision.sqnr_after >= 25.0 > decision.sqnr_before and "floor" in decision.reason
    assert [path for path, _ in decision.steps] == ["2"]


def test_promotion_keeps_state_dict_keys_and_restores_from_a_checkpoint():
    model = _planted()
    batches = [torch.randn(16, 8)]
    prepared = calibrated(model, batches)
    buffers = {k: v.shape for k, v in prepared.named_buffers()}
    keys = set(prepared.state_dict())
    promote_to_int16(prepared, ["2"])
    assert {k: v.shape for k, v in prepared.named_buffers()} == buffers  # no buffer added or reshaped
    assert set(prepared.state_dict()) == keys
    saved = prepared.state_dict()
    fresh = calibrated(model, [])  # same structure, int8
    promote_to_int16(fresh, ["2"], recompute_scale=False)  # the dtypes first, as the callback does
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.get_submodule("2").activation_post_process.scale, saved["2.activation_post_process.scale"])
    with torch.no_grad():
        x = torch.randn(4, 8)
        assert torch.equal(fresh(x), prepared(x))


def test_auto_int16_refuses_a_march_without_int16():
    with march_context("bernoulli2"):
        prepared = prepare_qat_fx(_planted(), {"": default_calib_8bit_fake_quant_qconfig})
    with pytest.raises(ValueError, match="march with int16"):
        auto_int16(prepared, [torch.randn(2, 8)])
    with pytest.raises(ValueError, match="march with int16"):
        promote_to_int16(prepared, ["2"])
