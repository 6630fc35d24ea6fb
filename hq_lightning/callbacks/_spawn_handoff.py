"""Carry a callback's quantized state from a spawned rank 0 back to the main process.

With ``strategy="ddp_spawn"`` (or ``"ddp_fork"``/``"ddp_notebook"``) Lightning's
``_MultiProcessingLauncher`` runs ``fit`` in worker processes. When they finish it loads rank 0's
weights into the main process's LightningModule, which never ran ``setup`` and so still has the
float structure: the fused QAT modules' weights do not fit it. Lightning calls no hook in the main
process before that load; what reaches the main process first is the ``_WorkerOutput`` rank 0 puts
on the launcher's queue, including the ``extra`` results the launcher's ``get_extra_results``
collects.

So on rank 0 the callback adds a :class:`MainProcessHandoff` to those extra results. Unpickling it
in the main process (``return_queue.get()``, before the weights are loaded) finds the main process's
Trainer on the call stack (``Trainer.fit`` is always there), picks the callback with the same
token out of ``trainer.callbacks`` and gives it the payload, so it rebuilds the prepared structure
the launcher then loads the trained weights and scales into.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["MainProcessHandoff", "install_handoff", "new_token"]

_EXTRA_KEY = "hq_lightning.quantization"


def new_token() -> str:
    """A unique id that survives pickling the callback into the workers."""
    return uuid.uuid4().hex


def _save_payload(payload: dict[str, Any]) -> str:
    # a file, as the launcher does with the weights: the main process reads its queue only after
    # the workers exit, so a message larger than the pipe's buffer would block rank 0 forever
    path = os.path.join(tempfile.mkdtemp(prefix="hq_quantization_"), "handoff.pt")
    torch.save(payload, path)
    return path


def _find_trainer_holding(token: str) -> tuple[pl.Trainer, Any] | None:
    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, pl.Trainer):
                for callback in value.callbacks:
                    if getattr(callback, "_handoff_token", None) == token:
                        return value, callback
        frame = frame.f_back
    return None


def _receive_in_main_process(token: str, path: str) -> str:
    try:
        found = _find_trainer_holding(token)
        if found is None:
            rank_zero_warn(
                "QuantizationCallback: received the state of a spawned rank 0 outside of a Trainer "
                "call; the main process keeps its float module."
            )
            return token
        trainer, callback = found
        # our own rank 0 wrote this file a moment ago; it holds the converted GraphModule
        state = torch.load(path, map_location="cpu", weights_only=False)
        callback._restore_from_worker(trainer, state)
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return token


class MainProcessHandoff:
    """Pickles to a call that hands ``payload`` to the main process's callback with ``token``."""

    def __init__(self, token: str, payload: dict[str, Any]) -> None:
        self.token = token
        self.path = _save_payload(payload)

    def __reduce__(self) -> tuple[Callable, tuple[str, str]]:
        return _receive_in_main_process, (self.token, self.path)


def install_handoff(trainer: pl.Trainer, key: str, token: str, payload: Callable[[], dict[str, Any]]) -> bool:
    """Makes a multiprocessing launcher's rank 0 send ``payload()`` to the main process.

    Returns:
        whether ``trainer`` runs under a multiprocessing (spawn/fork) launcher.
    """
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        return False
    installed = launcher.__dict__.setdefault("_hq_handoffs", {})
    if not installed:
        original = launcher.get_extra_results

        def get_extra_results(trainer: pl.Trainer) -> dict[str, Any]:
            extra = original(trainer)
            for name, (handoff_token, make_payload) in installed.items():
                extra[f"{_EXTRA_KEY}/{name}"] = MainProcessHandoff(handoff_token, make_payload())
            return extra

        launcher.get_extra_results = get_extra_results
    installed[key] = (token, payload)
    return True
