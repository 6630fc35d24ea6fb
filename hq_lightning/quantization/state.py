"""Fake-quant states and ``set_fake_quantize``.

=============  ==========================================  ==========  =========
state          model mode                                  fake quant  observers
=============  ==========================================  ==========  =========
QAT            ``train()``                                 on          update
CALIBRATION    ``eval()``; only FakeQuantize put in train  off         update
VALIDATION     ``eval()``                                  on          frozen
FLOAT          any                                         off         off
=============  ==========================================  ==========  =========

Set the model mode first, then the state: ``model.eval(); set_fake_quantize(model, VALIDATION)``.
A prepared model wholly in VALIDATION runs the integer model ``convert_fx`` builds from it (bit
for bit what the converted model computes; see
:mod:`hq_lightning.quantization.fx.integer_validation`); a mixed state runs the per-module fake
quant.
The state applies to the module given and everything below it, so a backbone can validate while
the head trains.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import FakeQuantize
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), FakeQuantize())
    >>> _ = model.eval()
    >>> set_fake_quantize(model, FakeQuantState.CALIBRATION)
    >>> model[1].training, model[1].fake_quant_enabled, model[1].observer_enabled
    (True, False, True)
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

from torch import nn

from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx.integer_validation import invalidate_integer_models
from hq_lightning.quantization.nonfinite import check_nonfinite

__all__ = ["FakeQuantState", "preserved_states", "set_fake_quantize"]


class FakeQuantState(str, enum.Enum):
    """Fake-quant states of a prepared model."""

    QAT = "qat"
    CALIBRATION = "calibration"
    VALIDATION = "validation"
    FLOAT = "float"

    def __str__(self) -> str:
        return self.value


def _as_state(state: FakeQuantState | str) -> FakeQuantState:
    if isinstance(state, FakeQuantState):
        return state
    if isinstance(state, str):
        for member in FakeQuantState:
            if state.strip().lower() == member.value:
                return member
    valid = ", ".join(f"FakeQuantState.{m.name}" for m in FakeQuantState)
    raise ValueError(f"Expected `state` to be one of {valid} (or its string), but got {state!r}.")


def set_fake_quantize(model: nn.Module, state: FakeQuantState | str) -> None:
    """Switch every FakeQuantize in ``model`` (a whole model or one submodule) to ``state``.

    A state change is a point where the host waits anyway, so it first reports the non-finite
    batches counted since the last check (:func:`~hq_lightning.quantization.nonfinite.check_nonfinite`).

    Raises:
        RuntimeError: when the model is in the wrong mode for ``state`` (the message says which
            call comes first).
        ValueError: when observed inputs or learned scales were NaN or +-inf since the last check.
    """
    state = _as_state(state)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    check_nonfinite(model)
    if state is FakeQuantState.QAT and not model.training:
        raise RuntimeError(
            "Expected the model to be in train mode for FakeQuantState.QAT, but it is in eval mode: "
            "call model.train() before set_fake_quantize(model, FakeQuantState.QAT)."
        )
    if state in (FakeQuantState.CALIBRATION, FakeQuantState.VALIDATION) and model.training:
        raise RuntimeError(
            f"Expected the model to be in eval mode for FakeQuantState.{state.name}, but it is in "
            f"train mode: call model.eval() before set_fake_quantize(model, FakeQuantState.{state.name})."
        )
    # a cached VALIDATION integer model is stale after any switch (docs/integer-arithmetic.md)
    invalidate_integer_models(model)
    fake_quant_on = state in (FakeQuantState.QAT, FakeQuantState.VALIDATION)
    observer_on = state in (FakeQuantState.QAT, FakeQuantState.CALIBRATION)
    for module in model.modules():
        if not isinstance(module, FakeQuantize):
            continue
        module.fake_quant_enabled = fake_quant_on
        module.observer_enabled = observer_on
        if state is FakeQuantState.CALIBRATION:
            module.train()
        elif state is FakeQuantState.VALIDATION:
            module.eval()


@contextlib.contextmanager
def preserved_states(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that switches states and modes, then put back every module's ``training`` flag
    and every fake quant's ``fake_quant_enabled`` / ``observer_enabled`` as they were.

    Example:
        >>> import torch
        >>> from hq_lightning.quantization import FakeQuantize
        >>> fq = FakeQuantize()
        >>> with preserved_states(fq):
        ...     _ = fq.eval().disable_fake_quant()
        >>> fq.training, bool(fq.fake_quant_enabled)
        (True, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [
        (fq, fq.fake_quant_enabled, fq.observer_enabled)
        for fq in model.modules()
        if isinstance(fq, FakeQuantize)
    ]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for fake_quant, fake_quant_enabled, observer_enabled in flags:
            fake_quant.fake_quant_enabled = fake_quant_enabled
            fake_quant.observer_enabled = observer_enabled
