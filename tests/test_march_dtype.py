"""hq_lightning.march and hq_lightning.dtype: parsing, helpers and clear errors."""

import pytest
import torch

import hq_lightning
from hq_lightning.dtype import QuantDType, as_dtype, qinfo, qint8, qint16, qint32, torch_dtype
from hq_lightning.march import (
    March,
    as_march,
    get_march,
    march_context,
    set_march,
    supports_int16,
    uses_power_of_two_scales,
)


@pytest.mark.parametrize(
    "given, expected",
    [
        (March.BAYES, March.BAYES),
        ("bayes", March.BAYES),
        ("BAYES", March.BAYES),
        ("Bernoulli2", March.BERNOULLI2),
        ("bayes_e", March.BAYES_E),
        ("NASH", March.NASH),
        ("bernoulli", March.BERNOULLI),
    ],
)
def test_as_march_accepts_members_and_any_case(given, expected):
    assert as_march(given) is expected


def test_set_and_get_march_with_string_and_enum():
    with march_context(March.BAYES):
        set_march("bernoulli2")
        assert get_march() is March.BERNOULLI2
        set_march(March.NASH)
        assert get_march() is March.NASH
        assert hq_lightning.get_march() is March.NASH


def test_march_context_restores_previous():
    before = get_march()
    with march_context("bernoulli") as m:
        assert m is March.BERNOULLI and get_march() is March.BERNOULLI
    assert get_march() is before
    with pytest.raises(RuntimeError), march_context("nash"):
        raise RuntimeError("boom")
    assert get_march() is before


def test_march_is_a_str_enum():
    assert March.BAYES == "bayes"
    assert str(March.BAYES_E) == "bayes_e"


@pytest.mark.parametrize("bad", ["bayes2", "", None, 3])
def test_unknown_march_error_lists_valid(bad):
    with pytest.raises(ValueError, match="Expected `march`") as info:
        as_march(bad)
    for m in March:
        assert repr(m.value) in str(info.value)
    with pytest.raises(ValueError):
        set_march(bad)


def test_march_helpers():
    assert [m for m in March if uses_power_of_two_scales(m)] == [March.BERNOULLI]
    assert not supports_int16("bernoulli2") and not supports_int16(March.BERNOULLI)
    assert all(supports_int16(m) for m in ("bayes", "bayes_e", "nash"))


def test_dtypes():
    assert as_dtype("qint8") is qint8 and as_dtype("QINT16") is qint16 and as_dtype(qint32) is qint32
    assert as_dtype(torch.qint8) is qint8
    assert qint8 == "qint8" and isinstance(qint16, QuantDType)
    assert tuple(qinfo("qint8")) == (-128, 127, 8)
    assert (qinfo(qint16).min, qinfo(qint16).max, qinfo(qint16).bits) == (-32768, 32767, 16)
    assert (qinfo("qint32").min, qinfo("qint32").max) == (-(2**31), 2**31 - 1)
    assert torch_dtype("qint8") is torch.int8
    assert torch_dtype(qint16) is torch.int16
    assert torch_dtype("qint32") is torch.int32
    assert hq_lightning.qint8 is qint8 and hq_lightning.qint16 is qint16 and hq_lightning.qint32 is qint32


@pytest.mark.parametrize("bad", ["int8", "quint8", "", None, torch.float32])
def test_unknown_dtype_error_lists_valid(bad):
    with pytest.raises(ValueError, match="Expected `dtype`") as info:
        as_dtype(bad)
    assert "'qint8', 'qint16', 'qint32'" in str(info.value)
    with pytest.raises(ValueError):
        qinfo(bad)
