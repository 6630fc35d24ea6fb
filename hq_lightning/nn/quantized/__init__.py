"""hq_lightning.nn.quantized: ``FloatFunctional`` (float operators as modules) and the integer
modules convert produces."""

from hq_lightning.nn.quantized.float_functional import FloatFunctional

__all__ = ["FloatFunctional"]
