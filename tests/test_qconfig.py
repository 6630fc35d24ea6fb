"""QConfig and the named defaults (semantics.md section 4), stubs."""

import pickle

import pytest
import torch

import hq_lightning.qconfig as top_level_qconfig
from hq_lightning.quantization import (
    CalibFakeQuantize,
    DeQuantStub,
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    QConfig,
    QuantStub,
)
from hq_lightning.quantization import qconfig as qc
from hq_lightning.quantization.stubs import is_dequant_stub, is_quant_stub


def test_all_defaults_exported_at_both_paths():
    for name in qc.__all__:
        assert getattr(top_level_qconfig, name) is getattr(qc, name)
    assert set(top_level_qconfig.__all__) == set(qc.__all__)


def test_qat_8bit_default():
    q = qc.default_qat_8bit_fake_quant_qconfig
    assert q.kind == "qat"
    act, w = q.activation(), q.weight()
    assert type(act) is FakeQuantize and type(w) is FakeQuantize
    assert isinstance(act.activation_post_process, MovingAveragePerTensorMinMaxObserver)
    assert act.activation_post_process.averaging_constant == 0.01 and act.dtype == "qint8"
    assert isinstance(w.activation_post_process, MovingAveragePerChannelMinMaxObserver)
    assert w.activation_post_process.averaging_constant == 1.0 and w.ch_axis == 0 and w.dtype == "qint8"


@pytest.mark.parametrize(
    "name, act_dtype, c",
    [
        ("default_qat_8bit_fixed_act_fake_quant_qconfig", "qint8", 0.0),
        ("default_qat_16bit_fake_quant_qconfig", "qint16", 0.01),
        ("default_qat_16bit_fixed_act_fake_quant_qconfig", "qint16", 0.0),
    ],
)
def test_qat_variants(name, act_dtype, c):
    q = getattr(qc, name)
    act = q.activation()
    assert q.kind == "qat" and act.dtype == act_dtype
    assert act.activation_post_process.averaging_constant == c
    assert q.weight().dtype == "qint8"


def test_32bit_out_defaults():
    assert qc.default_qat_8bit_weight_32bit_out_fake_quant_qconfig.activation is None
    assert qc.default_qat_8bit_weight_32bit_out_fake_quant_qconfig.kind == "qat"
    assert qc.default_calib_8bit_weight_32bit_out_fake_quant_qconfig.activation is None
    assert qc.default_calib_8bit_weight_32bit_out_fake_quant_qconfig.kind == "calibration"


@pytest.mark.parametrize(
    "name, dtype", [("default_calib_8bit_fake_quant_qconfig", "qint8"), ("default_calib_16bit_fake_quant_qconfig", "qint16")]
)
def test_calibration_defaults(name, dtype):
    q = getattr(qc, name)
    assert q.kind == "calibration"
    act = q.activation()
    assert isinstance(act, CalibFakeQuantize) and act.dtype == dtype
    assert type(act.activation_post_process).__name__ in ("PercentileObserver", "MSEObserver")
    assert isinstance(q.weight(), CalibFakeQuantize)


def test_conv_transpose_weight_axis_is_a_call_time_override():
    w = qc.default_qat_8bit_fake_quant_qconfig.weight(ch_axis=1)
    w(torch.randn(3, 5, 2, 2))
    assert w.ch_axis == 1 and w.scale.shape == (5,)


def test_qconfig_value_semantics():
    a = QConfig(activation=FakeQuantize.with_args(dtype="qint8"), weight=None)
    b = QConfig(activation=FakeQuantize.with_args(dtype="qint8"), weight=None)
    assert a == b and hash(a) == hash(b)
    assert a != QConfig(activation=FakeQuantize.with_args(dtype="qint16"))
    assert repr(a) == "QConfig(activation=FakeQuantize.with_args(dtype='qint8'), weight=None)"
    for q in [a] + [getattr(qc, n) for n in qc.__all__ if n != "QConfig"]:
        assert pickle.loads(pickle.dumps(q)) == q
    with pytest.raises(AttributeError, match="immutable"):
        a.activation = None


def test_kind_from_weight_only_and_from_plain_class():
    assert QConfig(activation=None, weight=CalibFakeQuantize.with_args()).kind == "calibration"
    assert QConfig(activation=CalibFakeQuantize).kind == "calibration"
    assert QConfig(activation=FakeQuantize).kind == "qat"


def test_qconfig_rejects_built_modules():
    with pytest.raises(TypeError, match="pass the factory, not a built module"):
        QConfig(activation=FakeQuantize())
    with pytest.raises(TypeError, match="Expected `weight`"):
        QConfig(weight=3)


def test_stubs():
    x = torch.randn(3)
    assert QuantStub()(x) is x and QuantStub().scale is None
    assert QuantStub(scale=1 / 128).scale == 1 / 128
    assert DeQuantStub()(x) is x
    assert is_quant_stub(QuantStub()) and not is_quant_stub(DeQuantStub())
    assert is_dequant_stub(DeQuantStub()) and not is_dequant_stub(QuantStub())
    with pytest.raises(ValueError, match="Expected `scale`"):
        QuantStub(scale=-1.0)


def test_stub_recognition_of_torch_classes_by_name():
    # look-alikes built here, so the test itself never imports torch.ao.quantization
    torch_quant = type("QuantStub", (torch.nn.Module,), {"__module__": "torch.ao.quantization.stubs"})
    torch_dequant = type("DeQuantStub", (torch.nn.Module,), {"__module__": "torch.ao.quantization.stubs"})
    other = type("QuantStub", (torch.nn.Module,), {"__module__": "somebody.else"})
    assert is_quant_stub(torch_quant()) and is_dequant_stub(torch_dequant())
    assert not is_quant_stub(other()) and not is_dequant_stub(torch_quant())
