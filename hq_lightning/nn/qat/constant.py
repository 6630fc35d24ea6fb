"""QAT constant operand: the parameter through a weight-like fake quant (see ``nn.quantized.constant``).

Example:
    >>> import torch
    >>> from hq_lightning.nn.quantized.constant import ConstantOperand as FloatConstant
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> c = ConstantOperand.from_float(FloatConstant(ch_axis=0), qc)
    >>> out = c(torch.tensor([[1.0], [0.01]]))  # per channel: each row keeps 8 bits of its own
    >>> torch.allclose(out, torch.tensor([[1.0], [0.01]]), rtol=1e-2)
    True
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hq_lightning.nn.qat.attention import constant_fake_quant
from hq_lightning.nn.qat.fake_quant_builders import qconfig_of
from hq_lightning.nn.quantized.constant import ConstantOperand as _FloatConstantOperand

__all__ = ["ConstantOperand"]


class ConstantOperand(_FloatConstantOperand):
    """``weight_fake_quant(value)``: per tensor, or per channel along ``ch_axis``."""

    def __init__(self, ch_axis: int | None = None, qconfig: Any = None) -> None:
        super().__init__(ch_axis)
        self.qconfig = qconfig
        self.weight_fake_quant = constant_fake_quant(qconfig, ch_axis, "constant operand")

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> ConstantOperand:
        qat = cls(mod.ch_axis, qconfig_of(mod, qconfig))
        owner = getattr(mod, "_hq_owner_path", None)
        if owner is not None:
            qat._hq_owner_path = owner
        qat.train(mod.training)
        return qat

    def forward(self, value: Tensor) -> Tensor:
        return self.weight_fake_quant(value)

    def output_qparams(self) -> tuple[Tensor, Any, int | None]:
        """``(scale, dtype, ch_axis)`` of the codes, for ``convert_fx`` (the op has no quantized input)."""
        fq = self.weight_fake_quant
        return fq.scale.detach().clone().flatten(), fq.dtype, self.ch_axis

    def _get_name(self) -> str:
        return "QATConstantOperand"
