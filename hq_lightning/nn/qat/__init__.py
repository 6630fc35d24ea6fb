"""Fake-quant training (QAT) modules, built by ``prepare_qat_fx`` from float / fused modules.

What convert reads (contract, docs/architecture.md):

- every module: ``qconfig``, ``from_float(mod, qconfig)``, ``activation_post_process``
  (``FakeQuantize`` or ``None`` for a high-precision output / a pass-through);
- weighted modules (``Conv1d/2d/3d``, ``ConvTranspose2d``, ``Linear``, fused or not):
  ``weight_fake_quant``, ``folded_weight_bias()``, ``bn`` (kept BN or ``None``), ``has_add``,
  ``relu`` (``nn.ReLU`` / ``nn.ReLU6`` / ``None``) and the float type's own attributes
  (``stride``, ``padding``...).
"""

from hq_lightning.nn.qat.bn_freeze import freeze_bn, unfreeze_bn
from hq_lightning.nn.qat.conv import Conv1d, Conv2d, Conv3d
from hq_lightning.nn.qat.conv_transpose import ConvTranspose2d
from hq_lightning.nn.qat.float_functional import FloatFunctional
from hq_lightning.nn.qat.fused_weighted import FusedWeightedMixin
from hq_lightning.nn.qat.linear import Linear
from hq_lightning.nn.qat.pooling import (
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AdaptiveAvgPool3d,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
)
from hq_lightning.nn.qat.stubs import DeQuantStub, QuantStub
from hq_lightning.nn.qat.upsample import Upsample

__all__ = [
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d",
    "AvgPool1d",
    "AvgPool2d",
    "AvgPool3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose2d",
    "DeQuantStub",
    "FloatFunctional",
    "FusedWeightedMixin",
    "Linear",
    "QuantStub",
    "Upsample",
    "freeze_bn",
    "unfreeze_bn",
]
