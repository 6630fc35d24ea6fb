"""Bad input to a prepared model gets a clear error, not a silent wrong result (issue 12).

* a state_dict of another march or dtype (item 4): refused by name, before the scale is copied;
* a non-float tensor fed to a QuantStub (item 11): an error naming the stub and the fix; float64
  and half inputs are quantized from their float32 value and handed on in the model's dtype.
"""

import io
import warnings

import pytest
import torch
from torch import nn

from hq_lightning.march import march_context
from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
    default_qat_16bit_fake_quant_qconfig,
)
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    LearnableFakeQuantize,
    QConfig,
    QuantStub,
    convert_fx,
    copy_calibration_state,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.march_record import decode_march_record
from hq_lightning.quantization.observer import MovingAveragePerChannelMinMaxObserver

LEARNABLE = QConfig(
    activation=LearnableFakeQuantize.with_args(averaging_constant=0.01),
    weight=LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1),
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.relu(self.conv(self.quant(x))))


def _prepared(march="bayes", qconfig=default_qat_8bit_fake_quant_qconfig, calibrate=True):
    torch.manual_seed(0)
    with march_context(march):
        model = prepare_qat_fx(Net(), {"": qconfig})
    if calibrate:
        model.eval()
        set_fake_quantize(model, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            model(torch.randn(4, 3, 8, 8) * 3)
        set_fake_quantize(model, FakeQuantState.VALIDATION)
    return model


def _scales(model):
    return {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, FakeQuantize)}


# ---------------------------------------------------------------- item 4: march and dtype recorded
def test_the_record_is_a_readable_tensor_that_survives_a_weights_only_round_trip():
    model = _prepared()
    state = model.state_dict()
    (key,) = [k for k in state if k.endswith("weight_fake_quant._extra_state")]
    record = state[key]
    assert record.dtype == torch.uint8
    assert decode_march_record(record) == {"march": "bayes", "dtype": "qint8"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = _prepared(calibrate=False)
    fresh.load_state_dict(loaded, strict=True)
    assert all(torch.equal(a, _scales(model)[n]) for n, a in _scales(fresh).items())


@pytest.mark.parametrize("strict", [True, False])
def test_a_bayes_state_is_refused_by_a_bernoulli_model(strict):
    """It used to load and convert to a scale that is not a power of two."""
    bayes = _prepared("bayes")
    bernoulli = _prepared("bernoulli", calibrate=False)
    before = _scales(bernoulli)
    with pytest.raises(
        ValueError,
        match=r"Expected the checkpoint's march to be bernoulli \(this model's\), but got bayes at "
        r"`quant.activation_post_process`: .*set_march\('bayes'\).*copy_float_state",
    ):
        bernoulli.load_state_dict(bayes.state_dict(), strict=strict)
    # refused before the module's state is copied
    assert torch.equal(bernoulli.quant.activation_post_process.scale, before["quant.activation_post_process"])


def test_an_int16_state_is_refused_by_an_int8_model():
    """It used to load and saturate every code (output error 100 %)."""
    int16 = _prepared("bayes", default_qat_16bit_fake_quant_qconfig)
    int8 = _prepared("bayes", calibrate=False)
    with pytest.raises(ValueError, match=r"Expected the checkpoint's dtype to be qint8 \(this model's\), but got qint16"):
        int8.load_state_dict(int16.state_dict(), strict=True)


@pytest.mark.parametrize("qconfig", [default_qat_8bit_fake_quant_qconfig, LEARNABLE], ids=["fake_quant", "learnable"])
def test_a_state_saved_before_the_record_still_loads_strictly_with_one_warning(qconfig):
    model = _prepared(qconfig=qconfig)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    fresh = _prepared(qconfig=qconfig, calibrate=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user sees: once, not once per fake quant
        fresh.load_state_dict(old, strict=True)
    assert [str(w.message)[:50] for w in caught if w.category is UserWarning] == [
        "Loaded fake-quant scales without a march/dtype rec"
    ]
    assert all(torch.equal(a, _scales(model)[n]) for n, a in _scales(fresh).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded state loads without a word
        fresh.load_state_dict(model.state_dict(), strict=True)
        # and a partial load that does not touch the fake quants says nothing either
        weights = {k: v for k, v in model.state_dict().items() if k.endswith((".weight", ".bias"))}
        fresh.load_state_dict(weights, strict=False)


def test_learnable_scales_check_the_record_too():
    bayes = _prepared("bayes", LEARNABLE)
    int16 = QConfig(activation=LearnableFakeQuantize.with_args(dtype="qint16"), weight=LEARNABLE.weight)
    other = _prepared("bayes", int16, calibrate=False)
    with pytest.raises(ValueError, match=r"dtype to be qint16 \(this model's\), but got qint8 at `quant.activation_post_process`"):
        other.load_state_dict(bayes.state_dict(), strict=True)


def test_a_garbled_record_is_a_clear_error():
    model = _prepared()
    state = model.state_dict()
    state["quant.activation_post_process._extra_state"] = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"Expected a fake quant's `_extra_state` to be the uint8 record"):
        _prepared(calibrate=False).load_state_dict(state)


def test_copy_calibration_state_refuses_another_march():
    calibrated = _prepared("bayes", default_calib_8bit_fake_quant_qconfig)
    qat = _prepared("bernoulli", calibrate=False)
    with pytest.raises(ValueError, match=r"Expected the calibrated model's march to be bernoulli \(this model's\), but got bayes"):
        copy_calibration_state(calibrated, qat)
    same = _prepared("bayes", calibrate=False)
    assert copy_calibration_state(calibrated, same)  # the same march hands over as before
    assert isinstance(convert_fx(same), nn.Module)


# ---------------------------------------------------------------- item 11: what a QuantStub accepts
@pytest.mark.parametrize(
    "state", [FakeQuantState.QAT, FakeQuantState.CALIBRATION, FakeQuantState.VALIDATION, FakeQuantState.FLOAT]
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_an_integer_input_names_the_stub_and_the_fix(state, dtype):
    """It used to run on and fail inside the conv with torch's dtype error (or pass through)."""
    model = _prepared(calibrate=state is FakeQuantState.VALIDATION)
    model.train(state is FakeQuantState.QAT)
    set_fake_quantize(model, state)
    images = torch.randint(0, 2 if dtype is torch.bool else 255, (2, 3, 8, 8)).to(dtype)
    with pytest.raises(
        TypeError,
        match=rf"Expected the input of QuantStub `quant` to be a floating point tensor, but got a {dtype} "
        r"tensor of shape \(2, 3, 8, 8\): .*`x.float\(\) / 255` for uint8 images",
    ):
        model(images)
    stub = model.quant
    with pytest.raises(TypeError, match=r"Expected the input of QuantStub to be a floating point tensor, but got a list"):
        stub([1.0, 2.0])  # called on its own, there is no model to name it in


@pytest.mark.parametrize("state", [FakeQuantState.QAT, FakeQuantState.VALIDATION])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_inputs_are_quantized_from_their_float32_value(state, dtype):
    """float64 (numpy's default) and half inputs used to fail inside the conv: now the stub
    quantizes x.to(float32), as the integer model's Quantize does, and hands on float32."""
    x = (torch.randn(2, 3, 8, 8) * 2).to(dtype)
    model = _prepared()
    model.train(state is FakeQuantState.QAT)
    set_fake_quantize(model, state)
    expected = model(x.float())
    if state is FakeQuantState.QAT:  # a QAT step moved the observers: run the twin on a copy
        model = _prepared()
        model.train()
        set_fake_quantize(model, state)
    got = model(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    if state is FakeQuantState.VALIDATION:
        assert torch.equal(convert_fx(model)(x), got)


def test_a_model_cast_to_float64_gets_float64_from_its_stub():
    model = _prepared().double()
    x = torch.randn(2, 3, 8, 8)
    assert model.quant(x).dtype == torch.float64
    assert torch.equal(model(x), model(x.double()))  # float32 input no longer fails in the conv
