"""Module namespaces mirroring the plugin: ``nn.quantized`` (FloatFunctional and integer modules),
``nn.qat`` (fake-quant training modules) and ``nn.intrinsic`` (fused float modules)."""

from hq_lightning.nn import intrinsic, qat, quantized

__all__ = ["intrinsic", "qat", "quantized"]
