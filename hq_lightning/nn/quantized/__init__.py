"""hq_lightning.nn.quantized: ``FloatFunctional`` (float operators as modules) and the integer
modules convert produces (docs/integer-arithmetic.md)."""

from hq_lightning.nn.quantized.activation import QuantizedReLU6
from hq_lightning.nn.quantized.conv import (
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedConv3d,
    QuantizedConvTranspose2d,
)
from hq_lightning.nn.quantized.float_functional import FloatFunctional
from hq_lightning.nn.quantized.functional_modules import QFunctional
from hq_lightning.nn.quantized.interpolate import Interpolate, QuantizedInterpolate
from hq_lightning.nn.quantized.linear import QuantizedLinear
from hq_lightning.nn.quantized.pooling import (
    QuantizedAdaptiveAvgPool1d,
    QuantizedAdaptiveAvgPool2d,
    QuantizedAdaptiveAvgPool3d,
    QuantizedAvgPool1d,
    QuantizedAvgPool2d,
    QuantizedAvgPool3d,
    QuantizedMaxPool,
    QuantizedMaxPool2d,
)
from hq_lightning.nn.quantized.quantize import DeQuantize, Quantize

__all__ = [
    "DeQuantize",
    "FloatFunctional",
    "Interpolate",
    "QFunctional",
    "Quantize",
    "QuantizedAdaptiveAvgPool1d",
    "QuantizedAdaptiveAvgPool2d",
    "QuantizedAdaptiveAvgPool3d",
    "QuantizedAvgPool1d",
    "QuantizedAvgPool2d",
    "QuantizedAvgPool3d",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvTranspose2d",
    "QuantizedInterpolate",
    "QuantizedLinear",
    "QuantizedMaxPool",
    "QuantizedMaxPool2d",
    "QuantizedReLU6",
]
