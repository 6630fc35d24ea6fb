"""QAT elementwise functions: the float function, then an output fake quant.

SiLU, sigmoid, GELU, exp, ... compute new values, so their output gets its own scale; the float
module's own ``forward`` computes them (true gradients) and ``activation_post_process`` rounds
the output (straight-through gradient). In the converted model each becomes a table built from
:meth:`TableQATMixin.float_forward`, the very function run here
(:class:`~hq_lightning.nn.quantized.lookup.QuantizedLookup`). In-place variants are never in place here.

``Div`` (``x / y`` of two activations) fake-quantizes ``1 / y`` with its own fake quant
(``reciprocal_post_process``), multiplies, then fake-quantizes the product: the integer model
looks ``1 / y`` up in a table and multiplies in integers.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> silu = SiLU.from_float(torch.nn.SiLU(inplace=True), qc)
    >>> silu.inplace, silu(torch.linspace(-4, 4, 9)).shape
    (False, torch.Size([9]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hq_lightning.nn import elementwise as float_modules
from hq_lightning.nn.qat.fake_quant_builders import activation_fake_quant, qconfig_of
from hq_lightning.nn.qat.output_fake_quant import OutputFakeQuantMixin

__all__ = [
    "ELU",
    "GELU",
    "Abs",
    "Div",
    "Exp",
    "Hardsigmoid",
    "Hardswish",
    "LeakyReLU",
    "Log",
    "Mish",
    "PReLU",
    "Pow",
    "Reciprocal",
    "Rsqrt",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Sqrt",
    "TableQATMixin",
    "Tanh",
]


class TableQATMixin(OutputFakeQuantMixin):
    """Output fake quant after the float function; ``float_forward`` is that function alone.

    Subclasses list the constructor arguments ``from_float`` copies in ``_ARGS``.
    """

    _ARGS: tuple[str, ...] = ()

    def __init__(self, *args: Any, qconfig: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if hasattr(self, "inplace"):
            # the input is the previous op's fake-quant output, which backward may need
            self.inplace = False
        self.qconfig = qconfig
        self.activation_post_process = activation_fake_quant(qconfig)

    def float_forward(self, x: Tensor) -> Tensor:
        """The float function (what the integer table is built from), without the fake quant."""
        return super(OutputFakeQuantMixin, self).forward(x)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> TableQATMixin:
        kwargs = {name: getattr(mod, name) for name in cls._ARGS}
        qat = cls(**kwargs, qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat


class Hardswish(TableQATMixin, nn.Hardswish):
    """QAT ``nn.Hardswish``."""


class Hardsigmoid(TableQATMixin, nn.Hardsigmoid):
    """QAT ``nn.Hardsigmoid``."""


class SiLU(TableQATMixin, nn.SiLU):
    """QAT ``nn.SiLU``."""


class Sigmoid(TableQATMixin, nn.Sigmoid):
    """QAT ``nn.Sigmoid``."""


class Tanh(TableQATMixin, nn.Tanh):
    """QAT ``nn.Tanh``."""


class GELU(TableQATMixin, nn.GELU):
    """QAT ``nn.GELU`` (``approximate`` ``'none'`` or ``'tanh'``)."""

    _ARGS = ("approximate",)


class LeakyReLU(TableQATMixin, nn.LeakyReLU):
    """QAT ``nn.LeakyReLU``."""

    _ARGS = ("negative_slope",)


class ELU(TableQATMixin, nn.ELU):
    """QAT ``nn.ELU``."""

    _ARGS = ("alpha",)


class Softplus(TableQATMixin, nn.Softplus):
    """QAT ``nn.Softplus``."""

    _ARGS = ("beta", "threshold")


class Mish(TableQATMixin, nn.Mish):
    """QAT ``nn.Mish``."""


class PReLU(TableQATMixin, nn.PReLU):
    """QAT ``nn.PReLU``: the float model's ``weight`` Parameter keeps training (one table per channel)."""

    _ARGS = ("num_parameters",)

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> PReLU:
        qat = super().from_float(mod, qconfig)
        qat.weight = mod.weight
        return qat


class Exp(TableQATMixin, float_modules.Exp):
    """QAT ``torch.exp``."""


class Log(TableQATMixin, float_modules.Log):
    """QAT ``torch.log``."""


class Sqrt(TableQATMixin, float_modules.Sqrt):
    """QAT ``torch.sqrt``."""


class Rsqrt(TableQATMixin, float_modules.Rsqrt):
    """QAT ``torch.rsqrt``."""


class Reciprocal(TableQATMixin, float_modules.Reciprocal):
    """QAT ``torch.reciprocal``."""


class Abs(TableQATMixin, float_modules.Abs):
    """QAT ``torch.abs``."""


class Pow(TableQATMixin, float_modules.Pow):
    """QAT ``torch.pow(x, exponent)`` with a constant exponent."""

    _ARGS = ("exponent",)


class Div(TableQATMixin, float_modules.Div):
    """QAT ``x / y``: ``fq(x * fq_r(1 / y))``, ``fq_r`` = ``reciprocal_post_process``; with a
    constant divisor ``c`` (``other``): ``fq(x / c)`` (a table in the integer model).

    Args:
        other: the constant divisor, or ``None`` (the divisor is ``forward``'s second input).
        qconfig: its ``activation`` builds the fake quants.
    """

    _ARGS = ("other",)

    def __init__(self, other: float | None = None, qconfig: Any = None) -> None:
        super().__init__(other, qconfig=qconfig)
        self.reciprocal_post_process = activation_fake_quant(qconfig) if other is None else None

    def float_forward(self, x: Tensor) -> Tensor:
        """``x / c`` for the constant divisor (the table's function)."""
        return float_modules.Div.forward(self, x)

    def forward(self, x: Tensor, other: Tensor | None = None) -> Tensor:
        if other is None:
            out = float_modules.Div.forward(self, x)
        else:
            if self.other is not None:
                float_modules.Div.forward(self, x, other)  # raises: two divisors
            r = torch.reciprocal(other)
            if self.reciprocal_post_process is not None:
                r = self.reciprocal_post_process(r)
            out = x * r
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out
