"""Integer kernels of converted models; the arithmetic is defined in ``docs/integer-arithmetic.md``.

Every kernel is exact: integer results equal the slow reference in ``tests/reference`` bit for bit.
"""

from hq_lightning.functional.integer.accumulate import EXACT_FLOAT32_BOUND, ConvPlan, chunk_channels
from hq_lightning.functional.integer.activation import relu6, relu6_upper_bound
from hq_lightning.functional.integer.float_requant import (
    EXACT_FLOAT64_BOUND,
    FloatRequantFactors,
    accumulator_range,
    float_requant_factors,
    requantize_float,
)
from hq_lightning.functional.integer.interpolate import (
    BILINEAR_FRACTION_BITS,
    bilinear_accumulate,
    bilinear_taps,
)
from hq_lightning.functional.integer.multiplier import (
    ACCUMULATOR_MAGNITUDE,
    ACTIVATION_MAGNITUDE,
    MAX_SHIFT,
    MULTIPLIER_BITS,
    quantize_multiplier,
    quantize_multipliers,
)
from hq_lightning.functional.integer.pooling import (
    adaptive_avg_pool_sums,
    adaptive_windows,
    avg_pool_sum,
    integer_max_pool,
)
from hq_lightning.functional.integer.quantize import (
    channel_view,
    dequantize,
    quantize,
    quantize_bias,
)
from hq_lightning.functional.integer.rounding import (
    requantize,
    rounding_offset,
    rounding_right_shift,
    saturate,
)

__all__ = [
    "ACCUMULATOR_MAGNITUDE",
    "ACTIVATION_MAGNITUDE",
    "BILINEAR_FRACTION_BITS",
    "EXACT_FLOAT32_BOUND",
    "EXACT_FLOAT64_BOUND",
    "FloatRequantFactors",
    "MAX_SHIFT",
    "MULTIPLIER_BITS",
    "ConvPlan",
    "accumulator_range",
    "adaptive_avg_pool_sums",
    "adaptive_windows",
    "avg_pool_sum",
    "integer_max_pool",
    "bilinear_accumulate",
    "bilinear_taps",
    "channel_view",
    "chunk_channels",
    "dequantize",
    "float_requant_factors",
    "quantize",
    "quantize_bias",
    "quantize_multiplier",
    "quantize_multipliers",
    "relu6",
    "relu6_upper_bound",
    "requantize",
    "requantize_float",
    "rounding_offset",
    "rounding_right_shift",
    "saturate",
]
