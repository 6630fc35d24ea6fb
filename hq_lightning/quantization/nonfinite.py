"""Non-finite statistics: recorded on the device during a step, reported where the host waits anyway.

A training step must not wait for the device, so observers never read a tensor on the host to
decide whether a batch is finite. Instead a batch whose statistics contain NaN or +-inf is
**skipped** (the range keeps its last finite value; a first batch leaves it at 0) and counted in
a non-persistent buffer ``nonfinite`` of the module: ``[batches with NaN or +-inf, batches with
NaN]``. A :class:`~hq_lightning.quantization.LearnableFakeQuantize` counts the same way the steps
that left its learned scale NaN or +-inf (its projection restores the last finite scale).

:func:`check_nonfinite` reads those counters - one host read per module, so call it where the
host synchronises anyway - and raises (or warns) with the message naming each module, then resets
them. ``convert_fx``, ``set_fake_quantize`` and the ``QuantizationCallback`` (phase changes and
epoch ends) call it; call it yourself in a hand-written loop, e.g. once per epoch.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import MinMaxObserver
    >>> obs = MinMaxObserver(averaging_constant=1.0)
    >>> _ = obs(torch.tensor([-1.0, 2.0]))
    >>> _ = obs(torch.tensor([float("nan"), 5.0]))   # skipped, counted; no host read here
    >>> obs.max_val
    tensor([2.])
    >>> try:
    ...     check_nonfinite(obs)
    ... except ValueError as error:
    ...     print(str(error)[:78])
    Expected the input of MinMaxObserver (the module given) to be finite, but 1 ba
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = [
    "NONFINITE_BUFFER",
    "check_nonfinite",
    "nonfinite_counts",
    "nonfinite_flags",
    "record_nonfinite",
    "register_nonfinite",
]

#: Name of the counter buffer: float32 ``[batches with NaN or +-inf, batches with NaN]``.
NONFINITE_BUFFER = "nonfinite"

_FIX = (
    "Quantization ranges cannot be computed from non-finite values (those batches were skipped "
    "and the range kept its last finite value): fix the model or data producing them (e.g. check "
    "the loss scale, a division by zero or a log of 0). To carry on regardless, call "
    "check_nonfinite(model, action='warn') first."
)
_FIX_SCALE = (
    "The scale was restored to its last finite value after each such step: lower the learning "
    "rate of the scales, clip gradients, or check the loss scale. To carry on regardless, call "
    "check_nonfinite(model, action='warn') first."
)


def register_nonfinite(module: nn.Module) -> None:
    """Give ``module`` its (non-persistent, so checkpoints are unchanged) counter buffer."""
    module.register_buffer(NONFINITE_BUFFER, torch.zeros(2), persistent=False)


def nonfinite_flags(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bad, nan)``: 0-d bool tensors saying whether any element of ``tensors`` (same shapes) is
    NaN or +-inf, and whether any is NaN, computed on the device (no host read).

    ``t - t`` is 0 for a finite element and NaN for NaN and +-inf, and a sum is NaN as soon as one
    term is, so ``isnan(sum(t - t))`` is the test in three kernels where ``isfinite(t).all()``
    takes five: on a GPU every small kernel of an observer's step is a launch.

    Example:
        >>> import torch
        >>> nonfinite_flags(torch.tensor([1.0, float("inf")]))
        (tensor(True), tensor(False))
        >>> nonfinite_flags(torch.tensor([-1.0]), torch.tensor([float("nan")]))
        (tensor(True), tensor(True))
    """
    values = tensors[0] if len(tensors) == 1 else torch.stack(tensors)
    return torch.isnan(torch.sub(values, values).sum()), torch.isnan(values).any()


def record_nonfinite(module: nn.Module, bad: torch.Tensor, nan: torch.Tensor) -> None:
    """Count one batch on the device: ``bad`` (any NaN or +-inf) and ``nan`` (any NaN) are 0-d bool
    tensors, as :func:`nonfinite_flags` gives them (no host read)."""
    module._buffers[NONFINITE_BUFFER].add_(torch.stack((bad, nan)))  # bool adds as 0 / 1


def nonfinite_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (non-finite batches, NaN batches)}`` of every module that counted one.

    One host read of all counters together (a single synchronisation)."""
    named = [
        (name, module._buffers[NONFINITE_BUFFER])
        for name, module in model.named_modules()
        if module._buffers.get(NONFINITE_BUFFER) is not None
    ]
    if not named:
        return {}
    values = torch.stack([counter.detach().to("cpu", non_blocking=False) for _, counter in named]).tolist()
    counts = {name: (int(bad), int(nan)) for (name, _), (bad, nan) in zip(named, values)}
    return {name: count for name, count in counts.items() if count[0] > 0}  # whole batches only


def check_nonfinite(model: nn.Module, action: str = "raise") -> dict[str, tuple[int, int]]:
    """Report the non-finite batches counted in ``model`` since the last check, and reset the counts.

    Args:
        model: any module (a prepared model, a submodule, one observer).
        action: ``"raise"`` (``ValueError``), ``"warn"`` (``UserWarning``) or ``"ignore"``.

    Returns:
        ``{module path: (non-finite batches, NaN batches)}``, empty when all were finite.

    Raises:
        ValueError: with ``action="raise"`` when any batch was non-finite.
    """
    if action not in ("raise", "warn", "ignore"):
        raise ValueError(f"Expected `action` to be 'raise', 'warn' or 'ignore', but got {action!r}.")
    counts = nonfinite_counts(model)
    if not counts:
        return counts
    for name, module in model.named_modules():
        if name in counts:
            module._buffers[NONFINITE_BUFFER].zero_()
    if action != "ignore":
        message = _message(model, counts)
        if action == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return counts


def _message(model: nn.Module, counts: dict[str, tuple[int, int]]) -> str:
    lines = []
    learned = observed = False
    notes = []
    for name, (bad, nan) in counts.items():
        module = model.get_submodule(name) if name else model
        what = "NaN" if nan == bad else ("+-inf" if nan == 0 else f"NaN ({nan}) or +-inf")
        where = f"`{name}`" if name else "the module given"
        if getattr(module, "learns_scale", False):
            learned = True
            lines.append(
                f"Expected the learned scale of {type(module).__name__} ({where}) to stay finite, but "
                f"{bad} step(s) left it {what}."
            )
        else:
            note = getattr(module, "nonfinite_note", None)
            if note is None:
                observed = True
            elif note not in notes:
                notes.append(note)
            lines.append(
                f"Expected the input of {type(module).__name__} ({where}) to be finite, but {bad} "
                f"batch(es) contained {what}."
            )
    shown = lines[:5] + ([f"... and {len(lines) - 5} more modules."] if len(lines) > 5 else [])
    fixes = ([_FIX] if observed else []) + ([_FIX_SCALE] if learned else []) + notes
    return " ".join(shown + fixes)
