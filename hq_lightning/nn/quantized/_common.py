"""Helpers shared by the integer modules: scale buffers and dtype checks."""

from __future__ import annotations

import torch
from torch import Tensor

from hq_lightning.dtype import QuantDType, as_dtype, qinfo, torch_dtype


def scale_tensor(value: Tensor | float, name: str) -> Tensor:
    """A float32 1-D scale tensor from a tensor or a float; positive and finite."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(
            f"Expected `{name}` to be positive finite scale(s), but got {t.tolist()[:8]}."
        )
    return t


def activation_dtype(dtype: QuantDType | str, name: str) -> QuantDType:
    """qint8 or qint16 (activations); qint32 is only an accumulator/high-precision output."""
    d = as_dtype(dtype)
    if d not in (QuantDType.qint8, QuantDType.qint16):
        raise ValueError(f"Expected `{name}` to be 'qint8' or 'qint16', but got {d.value!r}.")
    return d


def check_int_input(x: Tensor, dtype: QuantDType, name: str = "input") -> None:
    """Reject a tensor that is not the integer dtype this module was converted for."""
    if x.dtype != torch_dtype(dtype):
        raise TypeError(
            f"Expected `{name}` to be a {torch_dtype(dtype)} tensor ({dtype.value}), but got "
            f"{x.dtype}; integer modules take the outputs of Quantize or other integer modules."
        )


def bounds(dtype: QuantDType) -> tuple[int, int]:
    info = qinfo(dtype)
    return info.min, info.max
