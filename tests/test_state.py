"""FakeQuantState / set_fake_quantize: the train/eval coupling of semantics.md section 3."""

import pytest
import torch
from torch import nn

from hq_lightning.quantization import FakeQuantize, FakeQuantState, set_fake_quantize


def make_model():
    model = nn.Sequential()
    model.backbone = nn.Sequential(nn.Linear(2, 2), FakeQuantize(averaging_constant=1.0))
    model.head = nn.Sequential(nn.Linear(2, 2), FakeQuantize(averaging_constant=1.0))
    return model


def fq_flags(model):
    return [
        (m.training, m.fake_quant_enabled, m.observer_enabled)
        for m in model.modules()
        if isinstance(m, FakeQuantize)
    ]


def test_qat():
    model = make_model().train()
    set_fake_quantize(model, FakeQuantState.QAT)
    assert fq_flags(model) == [(True, True, True)] * 2


def test_calibration_puts_only_fake_quant_back_in_train():
    model = make_model().eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    assert fq_flags(model) == [(True, False, True)] * 2
    assert not model.training and not model.backbone[0].training
    x = torch.randn(4, 2)
    y = model.backbone(x)
    assert torch.equal(y, model.backbone[0](x))  # fake quant off
    expected = torch.tensor([y.abs().max().item()]) / 127.5
    assert torch.equal(model.backbone[1].scale, expected)  # observer updated


def test_validation_freezes_observers():
    model = make_model().eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    model(torch.randn(4, 2))
    scale = model.head[1].scale.clone()
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    assert fq_flags(model) == [(False, True, False)] * 2
    model(torch.randn(4, 2) * 100)
    assert torch.equal(model.head[1].scale, scale)


def test_float_any_mode():
    for mode in (True, False):
        model = make_model().train(mode)
        set_fake_quantize(model, "float")
        assert [f[1:] for f in fq_flags(model)] == [(False, False)] * 2
        x = torch.randn(3, 2)
        assert torch.equal(model(x), model.head[0](model.backbone[0](x)))


def test_submodule_states_mix():
    model = make_model().train()
    set_fake_quantize(model, FakeQuantState.QAT)
    model.backbone.eval()
    set_fake_quantize(model.backbone, FakeQuantState.VALIDATION)
    assert fq_flags(model) == [(False, True, False), (True, True, True)]


@pytest.mark.parametrize(
    "state, mode, fix",
    [
        (FakeQuantState.QAT, False, "call model.train() before set_fake_quantize(model, FakeQuantState.QAT)"),
        (
            FakeQuantState.CALIBRATION,
            True,
            "call model.eval() before set_fake_quantize(model, FakeQuantState.CALIBRATION)",
        ),
        (
            FakeQuantState.VALIDATION,
            True,
            "call model.eval() before set_fake_quantize(model, FakeQuantState.VALIDATION)",
        ),
    ],
)
def test_wrong_order_errors_say_the_right_order(state, mode, fix):
    model = make_model().train(mode)
    with pytest.raises(RuntimeError) as info:
        set_fake_quantize(model, state)
    assert fix in str(info.value)
    assert fq_flags(model) == [(mode, True, True)] * 2  # nothing changed


def test_bad_state_and_model():
    with pytest.raises(ValueError, match="Expected `state` to be one of"):
        set_fake_quantize(make_model(), "training")
    with pytest.raises(TypeError, match="Expected `model` to be an nn.Module"):
        set_fake_quantize([1, 2], FakeQuantState.FLOAT)


def test_strings_accepted():
    model = make_model().eval()
    set_fake_quantize(model, "CALIBRATION")
    assert fq_flags(model) == [(True, False, True)] * 2
    assert FakeQuantState.QAT == "qat"
