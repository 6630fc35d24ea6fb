"""Freeze / unfreeze the BatchNorms kept for QAT (``prepare_qat_fx(..., qat_mode="with_bn")``)
across a whole model or one submodule.

A frozen BN stops updating its running statistics and normalises with them, so the module runs
the folded conv that convert deploys. No parameter is added or removed: optimizers and DDP
wrappers stay valid. Freezing BN for the last part of QAT is a common schedule.

Example:
    >>> import torch
    >>> from hq_lightning.nn import qat
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> net = torch.nn.Sequential(qat.Conv2d(1, 2, 1, qconfig=qc, bn=torch.nn.BatchNorm2d(2)))
    >>> freeze_bn(net)
    1
    >>> net.train()[0].bn.training
    False
"""

from __future__ import annotations

from torch import nn

from hq_lightning.nn.qat.fused_weighted import FusedWeightedMixin

__all__ = ["freeze_bn", "unfreeze_bn"]


def _with_bn(model: nn.Module) -> list[FusedWeightedMixin]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    return [m for m in model.modules() if isinstance(m, FusedWeightedMixin) and m.bn is not None]


def freeze_bn(model: nn.Module) -> int:
    """Freeze every kept BN under ``model``; returns how many were frozen."""
    modules = _with_bn(model)
    for module in modules:
        module.freeze_bn()
    return len(modules)


def unfreeze_bn(model: nn.Module) -> int:
    """Undo :func:`freeze_bn` under ``model``; returns how many were unfrozen."""
    modules = _with_bn(model)
    for module in modules:
        module.unfreeze_bn()
    return len(modules)
