"""Per-op precision defaults (issue 10, item 4): softmax's input is int16 where the march has it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hq_lightning.dtype import QuantDType
from hq_lightning.march import march_context
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.precision import apply_input_precision
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.quant(x)
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        return self.dequant(scores.softmax(dim=-1))


def _prepared(march, **kwargs):
    with march_context(march), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(Attention(), {"": QC}, **kwargs)


def _matmul_fake_quant(prepared):
    (matmul,) = [m for name, m in prepared.named_children() if name.startswith("_generated_matmul")]
    return matmul.activation_post_process


@pytest.mark.parametrize("march", ["bayes", "bayes_e", "nash"])
def test_softmax_input_defaults_to_int16_on_marches_that_have_it(march):
    prepared = _prepared(march)
    assert _matmul_fake_quant(prepared).dtype is QuantDType.qint16  # softmax's input
    assert prepared.q.activation_post_process.dtype is QuantDType.qint8  # the rest as configured
    assert apply_input_precision(prepared) == []  # idempotent


def test_qconfig_precision_keeps_the_qconfigs_dtypes():
    assert _matmul_fake_quant(_prepared("bayes", op_precision="qconfig")).dtype is QuantDType.qint8
    with pytest.raises(ValueError, match="Expected `op_precision` to be one of"):
        _prepared("bayes", op_precision="int16")


def test_bernoulli_keeps_int8():
    prepared = _prepared("bernoulli")  # softmax runs as a float island there: no int16 to ask for
    assert all(
        m.dtype is QuantDType.qint8 for name, m in prepared.named_modules() if name.endswith("activation_post_process")
    )


def test_promoted_model_calibrates_converts_and_checkpoints_load_strictly():
    torch.manual_seed(0)
    prepared = _prepared("bayes")
    x = torch.randn(4, 5, 8)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    prepared(x)
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    converted = convert_fx(prepared)
    assert torch.equal(converted(x), prepared(x))
    again = _prepared("bayes")
    again.load_state_dict(prepared.state_dict())  # same rule, same dtypes: strict load
    with pytest.raises(ValueError, match="qint16"):
        _prepared("bayes", op_precision="qconfig").load_state_dict(prepared.state_dict())
