"""QAT ``FloatFunctional``: the same operator methods, with a fake quant on every output.

Generated modules (``_generated_add_0``...) and user-written ``FloatFunctional`` become this at
prepare; the graph keeps calling the same method names.

Example:
    >>> import torch
    >>> from hq_lightning.nn.quantized.float_functional import FloatFunctional as FloatFF
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> ff = FloatFunctional.from_float(FloatFF(), qc)
    >>> ff.add(torch.tensor([1.0, 0.3]), torch.tensor([1.0, 0.0]))  # scale 2/127.5, 2.0 saturates to 127
    tensor([1.9922, 0.2980])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, qconfig_of
from hq_lightning.nn.quantized.float_functional import FloatFunctional as _FloatFunctional
from hq_lightning.utils.fx_helper import record_module_method_call

__all__ = ["FloatFunctional"]


class FloatFunctional(_FloatFunctional):
    """Operators with an output fake quant (``None`` for a high-precision output).

    Args:
        qconfig: the qconfig whose ``activation`` builds ``activation_post_process``.
    """

    def __init__(self, qconfig: Any = None) -> None:
        super().__init__()
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> FloatFunctional:
        """Build from our or torch's float ``FloatFunctional`` (keeps ``_hq_owner_path``)."""
        qat = cls(qconfig_of(mod, qconfig))
        owner = getattr(mod, "_hq_owner_path", None)
        if owner is not None:
            qat._hq_owner_path = owner
        qat.train(mod.training)
        return qat

    def _run(self, op: str, args: tuple, kwargs: dict, compute: Any) -> Any:
        traced = record_module_method_call(self, op, args, kwargs)
        if traced is not None:
            return traced
        out = compute()
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out
