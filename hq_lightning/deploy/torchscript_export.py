"""TorchScript export of a converted model (whole, or one stage of :func:`split_stages`).

``torch.jit.trace`` records the integer kernels as ordinary tensor ops, so the traced module
computes exactly what the GraphModule computes; :func:`export_torchscript` checks that on the
example inputs before it writes the file.

Example:
    >>> import torch
    >>> from torch import fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> scripted = export_torchscript(gm, (torch.randn(2, 3),))
    >>> isinstance(scripted, torch.jit.ScriptModule)
    True
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch
from torch import nn

from hq_lightning.deploy.atomic_write import write_bytes_atomically

__all__ = ["export_torchscript", "outputs_equal", "as_example_tuple"]


def as_example_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """``example_inputs`` as the positional-argument tuple the exporters take."""
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flatten(item)]
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _flatten(value[key])]
    return [value]


def outputs_equal(a: Any, b: Any) -> bool:
    """Whether two (nested) outputs are identical: same structure, dtypes and values."""
    left, right = _flatten(a), _flatten(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def export_torchscript(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    check: bool = True,
) -> torch.jit.ScriptModule:
    """Trace ``model`` with ``torch.jit.trace`` and optionally save it.

    Args:
        model: a converted GraphModule or a stage of one (float inputs).
        example_inputs: one tensor or a tuple of positional inputs.
        path: where to ``torch.jit.save`` the traced module (``None``: don't save); written
            atomically (the whole file or none of it, see :mod:`hq_lightning.deploy.atomic_write`).
        check: run both on ``example_inputs`` and require bit-identical outputs.

    Returns:
        The traced module (eval mode).

    Raises:
        RuntimeError: tracing failed (the message names the failing op) or the traced module
            differs from ``model`` on the example inputs.
        ArtefactWriteError: the file could not be written (full disk...); nothing was replaced.
    """
    args = as_example_tuple(example_inputs)
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # converted models read static scales into Python numbers: constants of the trace by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript is the deployment format asked for here; torch's notice that it is
        # deprecated in favour of torch.export says nothing about this model
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        try:
            traced = torch.jit.trace(model, args, check_trace=False, strict=False)
        except Exception as error:  # the tracer raises many types; name the op in one message
            raise RuntimeError(
                f"Expected `model` to be traceable by torch.jit.trace, but tracing failed: {error}"
            ) from error
        if check:
            expected, got = model(*args), traced(*args)
            if not outputs_equal(expected, got):
                raise RuntimeError(
                    "Expected the traced module to reproduce the model bit for bit on "
                    "`example_inputs`, but the outputs differ (data-dependent Python control flow "
                    "is frozen by tracing; wrap it out of the deployed stage)."
                )
    if path is not None:
        # serialised in memory, then written atomically: torch.jit.save aborts the whole process
        # when it meets a full disk, and a half-written file must never look like a model
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
            torch.jit.save(traced, buffer)
        write_bytes_atomically(path, buffer.getvalue())
    return traced
