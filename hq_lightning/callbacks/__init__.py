"""Lightning callbacks driving quantization (the only core-adjacent place that imports Lightning)."""

from hq_lightning.callbacks.deployment import DeploymentCallback
from hq_lightning.callbacks.quantization import QuantizationCallback, default_calibration_step

__all__ = ["DeploymentCallback", "QuantizationCallback", "default_calibration_step"]
