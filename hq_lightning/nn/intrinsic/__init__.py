"""hq_lightning.nn.intrinsic: fused float modules (Conv/ConvTranspose/Linear + BN + Add + ReLU/ReLU6)
made by ``fuse_fx``; see :mod:`hq_lightning.nn.intrinsic.fused` for the naming scheme."""

from hq_lightning.nn.intrinsic import fused as _fused

# Every generated class (ConvBN2d, ConvAddReLU2d, LinearReLU, ...) plus FusedModule, fused_class.
globals().update({name: getattr(_fused, name) for name in _fused.__all__})
__all__ = list(_fused.__all__)
