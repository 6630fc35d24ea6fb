"""QAT ``QuantStub`` / ``DeQuantStub``.

``QuantStub`` fake-quantizes its input with the qconfig's activation fake quant; with a fixed
``scale`` (e.g. ``1/128`` for centered YUV input) the scale is pinned by a fixed-scale observer and
``scale`` keeps the float stub's meaning. ``DeQuantStub`` passes its input through: it marks where
the deployed graph ends.

Input dtypes: a ``QuantStub`` quantizes real values, so an integer (or bool, complex) tensor is an
error naming the stub and the fix (``x.float()``, e.g. ``x.float() / 255`` for uint8 images). A
floating tensor of any dtype is quantized from its float32 value, as the integer model's
``Quantize`` does, and handed on in the model's dtype (that of the stub's own ``scale``: float32
unless the model was cast with ``.double()``/``.half()``), so float64 data (numpy's default) or
half inputs run unchanged where they used to fail inside the next conv.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub as FloatQuantStub
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> stub = QuantStub.from_float(FloatQuantStub(scale=1 / 128), qc)
    >>> stub(torch.tensor([0.5, 0.51, 2.0]))
    tensor([0.5000, 0.5078, 0.9922])
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from hq_lightning.nn.qat.fake_quant_builders import (
    activation_fake_quant,
    fixed_scale_fake_quant,
    qconfig_of,
)

__all__ = ["DeQuantStub", "QuantStub"]


class QuantStub(nn.Module):
    """Fake-quantizes the model input (one input per stub).

    Args:
        scale: fixed scale, or ``None`` to observe it.
        qconfig: the qconfig; its ``activation`` must not be ``None``.

    Attributes:
        activation_post_process: the input's ``FakeQuantize`` (its ``scale`` buffer is the input scale).
    """

    def __init__(self, scale: float | None = None, qconfig: Any = None) -> None:
        super().__init__()
        self.scale = None if scale is None else float(scale)
        self.qconfig = qconfig
        if self.scale is None:
            fake_quant = activation_fake_quant(qconfig)
            if fake_quant is None:
                raise ValueError(
                    "Expected the qconfig of a QuantStub to have an activation fake quant, but got "
                    f"{qconfig!r}: a QuantStub always quantizes; give it a qconfig with an activation "
                    "or set its qconfig to None to keep that part of the model float."
                )
        else:
            fake_quant = fixed_scale_fake_quant(qconfig, self.scale)
        self.activation_post_process = fake_quant

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> QuantStub:
        """Build from a float ``QuantStub`` (ours, with optional ``scale``, or torch's)."""
        qat = cls(scale=getattr(mod, "scale", None), qconfig=qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            self._refuse(x)
        if x.dtype != torch.float32:
            x = x.float()  # the integer model quantizes x.to(float32): the same codes
        y = self.activation_post_process(x)
        model_dtype = self._model_dtype()
        return y if model_dtype == torch.float32 else y.to(model_dtype)

    def _model_dtype(self) -> torch.dtype:
        # the stub's own scale follows .double()/.half() of the model (read without a refresh)
        fake_quant = self.activation_post_process
        scale = fake_quant._parameters.get("scale")
        if scale is None:
            scale = fake_quant._buffers.get("scale")
        return scale.dtype if scale is not None and scale.is_floating_point() else torch.float32

    def _refuse(self, x: Any) -> None:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        name = _path_on_the_call_stack(self)
        raise TypeError(
            f"Expected the input of QuantStub {f'`{name}` ' if name else ''}to be a floating point "
            f"tensor, but got a {got}: a QuantStub quantizes real values. Convert the input before "
            "the model, e.g. `x.float() / 255` for uint8 images or `x.float()` for integer features "
            "(in a DataModule transform or at the top of forward)."
        )

    def extra_repr(self) -> str:
        return "" if self.scale is None else f"scale={self.scale}"


def _path_on_the_call_stack(module: nn.Module, depth: int = 16) -> str | None:
    """The path of ``module`` in the nearest calling module on the stack (for error messages)."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner is not module:
                for name, child in owner.named_modules():
                    if child is module:
                        return name
    finally:
        del frame
    return None


class DeQuantStub(nn.Module):
    """Pass-through marking the end of the quantized part (no fake quant)."""

    def __init__(self, qconfig: Any = None) -> None:
        super().__init__()
        self.qconfig = qconfig
        self.activation_post_process = None

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: Any = None) -> DeQuantStub:
        qat = cls(qconfig_of(mod, qconfig))
        qat.train(mod.training)
        return qat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
