"""``QConfig`` and the named default qconfigs.

A qconfig pairs two factories: ``activation`` builds the output fake quant of a module and
``weight`` the weight fake quant. ``activation=None`` keeps the output in high precision (int32
after convert) - for a Conv/Linear that feeds the model output.

Factories accept call-time overrides; a QAT module whose weight has its output channels elsewhere
passes the axis itself, e.g. ConvTranspose builds ``qconfig.weight(ch_axis=1)``. The qconfig never
encodes that axis.

Example:
    >>> from hq_lightning.quantization import (FakeQuantize, MovingAveragePerChannelMinMaxObserver,
    ...     MovingAveragePerTensorMinMaxObserver, QConfig)
    >>> qc = QConfig(
    ...     activation=FakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver,
    ...                                       dtype="qint8", averaging_constant=0),
    ...     weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
    ...                                   dtype="qint8", ch_axis=0, averaging_constant=1))
    >>> qc.kind
    'qat'
    >>> default_calib_8bit_fake_quant_qconfig.kind
    'calibration'
"""

from __future__ import annotations

from typing import Any

from hq_lightning.quantization.fake_quantize import CalibFakeQuantize, FakeQuantize
from hq_lightning.quantization.observer import (
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    PercentileObserver,
)

__all__ = [
    "QConfig",
    "default_qat_8bit_fake_quant_qconfig",
    "default_qat_8bit_fixed_act_fake_quant_qconfig",
    "default_qat_16bit_fake_quant_qconfig",
    "default_qat_16bit_fixed_act_fake_quant_qconfig",
    "default_qat_8bit_weight_32bit_out_fake_quant_qconfig",
    "default_calib_8bit_fake_quant_qconfig",
    "default_calib_16bit_fake_quant_qconfig",
    "default_calib_8bit_weight_32bit_out_fake_quant_qconfig",
]


def _built_class(factory: Any) -> type | None:
    target = getattr(factory, "cls", factory)
    return target if isinstance(target, type) else None


class QConfig:
    """How a module is quantized: an ``activation`` and a ``weight`` fake-quant factory.

    Args:
        activation: factory (e.g. ``FakeQuantize.with_args(...)``) for the output, or ``None`` for
            a high-precision output.
        weight: factory for the weight, or ``None`` for modules without weights.

    Equal by value, printable and picklable.
    """

    __slots__ = ("activation", "weight")

    def __init__(self, activation: Any = None, weight: Any = None) -> None:
        for name, factory in (("activation", activation), ("weight", weight)):
            if factory is not None and (not callable(factory) or isinstance(factory, FakeQuantize)):
                raise TypeError(
                    f"Expected `{name}` to be a factory such as FakeQuantize.with_args(...) or None, "
                    f"but got {factory!r}: pass the factory, not a built module."
                )
        object.__setattr__(self, "activation", activation)
        object.__setattr__(self, "weight", weight)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("QConfig is immutable: build a new QConfig instead.")

    @property
    def kind(self) -> str:
        """``"calibration"`` if a factory builds a :class:`CalibFakeQuantize`, else ``"qat"``."""
        for factory in (self.activation, self.weight):
            cls = _built_class(factory)
            if cls is not None and issubclass(cls, CalibFakeQuantize):
                return "calibration"
        return "qat"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QConfig):
            return NotImplemented
        return self.activation == other.activation and self.weight == other.weight

    def __hash__(self) -> int:
        return hash((self.activation, self.weight))

    def __repr__(self) -> str:
        return f"QConfig(activation={self.activation!r}, weight={self.weight!r})"

    def __reduce__(self):
        return (QConfig, (self.activation, self.weight))


_weight_8bit = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, dtype="qint8", ch_axis=0, averaging_constant=1
)
_calib_weight_8bit = CalibFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, dtype="qint8", ch_axis=0, averaging_constant=1
)


def _qat_act(dtype: str, averaging_constant: float):
    return FakeQuantize.with_args(
        observer=MovingAveragePerTensorMinMaxObserver, dtype=dtype, averaging_constant=averaging_constant
    )


def _calib_act(dtype: str):
    return CalibFakeQuantize.with_args(observer=PercentileObserver, dtype=dtype, percentile=99.99)


default_qat_8bit_fake_quant_qconfig = QConfig(activation=_qat_act("qint8", 0.01), weight=_weight_8bit)
default_qat_8bit_fixed_act_fake_quant_qconfig = QConfig(
    activation=_qat_act("qint8", 0.0), weight=_weight_8bit
)
default_qat_16bit_fake_quant_qconfig = QConfig(activation=_qat_act("qint16", 0.01), weight=_weight_8bit)
default_qat_16bit_fixed_act_fake_quant_qconfig = QConfig(
    activation=_qat_act("qint16", 0.0), weight=_weight_8bit
)
default_qat_8bit_weight_32bit_out_fake_quant_qconfig = QConfig(activation=None, weight=_weight_8bit)

default_calib_8bit_fake_quant_qconfig = QConfig(activation=_calib_act("qint8"), weight=_calib_weight_8bit)
default_calib_16bit_fake_quant_qconfig = QConfig(
    activation=_calib_act("qint16"), weight=_calib_weight_8bit
)
default_calib_8bit_weight_32bit_out_fake_quant_qconfig = QConfig(
    activation=None, weight=_calib_weight_8bit
)
