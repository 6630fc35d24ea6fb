"""The embedded default models: a small MobileNetV2-like CNN and a classification module."""

from hq_lightning.models.classification import ClassificationModule
from hq_lightning.models.mobilenet import InvertedResidual, TinyMobileNetV2

__all__ = ["ClassificationModule", "InvertedResidual", "TinyMobileNetV2"]
