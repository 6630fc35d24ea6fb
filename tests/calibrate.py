"""Prepare a float model and calibrate it: the step most convert, sensitivity and GPU tests start from.

Shared by several test files and by ``bench/``.

Example:
    >>> import torch
    >>> from tests.models import resnet18
    >>> model = calibrated(resnet18(width=4, num_classes=3), [torch.rand(2, 3, 16, 16)])
    >>> model(torch.rand(1, 3, 16, 16)).shape
    torch.Size([1, 3])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hq_lightning.quantization import FakeQuantState, prepare_qat_fx, set_fake_quantize
from hq_lightning.quantization.qconfig import default_calib_8bit_fake_quant_qconfig

__all__ = ["calibrated"]


def calibrated(
    float_model: nn.Module,
    batches: Iterable[torch.Tensor],
    qconfig_dict: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> nn.Module:
    """``prepare_qat_fx`` then one no-grad eval pass per batch in ``FakeQuantState.CALIBRATION``.

    Args:
        float_model: the float model (not modified).
        batches: the calibration inputs, one forward each.
        qconfig_dict: for ``prepare_qat_fx``; default ``{"": default_calib_8bit_fake_quant_qconfig}``.
        validate: switch to ``FakeQuantState.VALIDATION`` at the end (else stay in CALIBRATION).
    """
    if qconfig_dict is None:
        qconfig_dict = {"": default_calib_8bit_fake_quant_qconfig}
    prepared = prepare_qat_fx(float_model, qconfig_dict).eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    if validate:
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared
