"""Checkpoint files: tell a truncated or corrupt one by name, and find the newest complete one.

``torch.load`` of a checkpoint cut short while being written (a crash, a full disk) fails with
``OSError: [Errno 22] Invalid argument`` and no file name. Checkpoints are zip archives (torch's
format since 1.6): a truncated one starts like a zip but has no central directory, which
``zipfile`` sees without reading the tensors.

Example:
    >>> import os, tempfile, torch
    >>> directory = tempfile.mkdtemp()
    >>> path = os.path.join(directory, "epoch=0-step=1.ckpt")
    >>> torch.save({"state_dict": {}}, path)
    >>> checkpoint_problem(path) is None
    True
    >>> with open(path, "rb") as f:
    ...     head = f.read(100)
    >>> with open(path, "wb") as f:
    ...     _ = f.write(head)
    >>> checkpoint_problem(path)
    'it is truncated or corrupt (100 bytes; its zip directory is missing)'
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "UnreadableCheckpointError",
    "check_checkpoint_file",
    "checkpoint_problem",
    "guard_checkpoint_loading",
    "newest_checkpoint",
]

_ZIP_MAGIC = b"PK\x03\x04"


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded; the message names it and what to use instead."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a loadable checkpoint, or ``None`` if it looks complete."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return "it does not exist"
    if not os.path.isfile(path):
        return "it is not a file"
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != _ZIP_MAGIC:
        return None  # not torch's zip format (a legacy pickle): torch.load decides
    if not zipfile.is_zipfile(path):
        return f"it is truncated or corrupt ({size} bytes; its zip directory is missing)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"it is truncated or corrupt ({size} bytes; {err})"
    if bad is not None:
        return f"it is corrupt ({size} bytes; its record {bad!r} fails its checksum)"
    return None


def newest_checkpoint(root: str | os.PathLike, skip: Callable[[str, str], Any] | None = None) -> str | None:
    """The most recently written complete ``*.ckpt`` under ``root`` (recursively), or ``None``.

    Args:
        root: a run directory, a checkpoint directory or any folder above them.
        skip: called as ``skip(path, problem)`` for each newer checkpoint passed over because it is
            truncated or corrupt.
    """
    candidates = sorted(
        (p for p in Path(root).rglob("*.ckpt") if p.is_file()),
        key=lambda p: (p.stat().st_mtime, str(p)),
        reverse=True,
    )
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        if skip is not None:
            skip(str(candidate), problem)
    return None


def _alternative(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    others = [p for p in Path(directory).glob("*.ckpt") if os.path.abspath(p) != os.path.abspath(path)]
    others = [str(p) for p in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)
              if checkpoint_problem(p) is None]
    if others:
        return f"Use an earlier complete checkpoint instead, e.g. the newest one there: {others[0]!r}."
    return "No other complete checkpoint is in that directory: start the run again."


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """Return ``path`` as a string, or raise naming the file and what is wrong with it.

    Raises:
        FileNotFoundError: no such file.
        UnreadableCheckpointError: empty, truncated or corrupt; the message suggests the newest
            complete checkpoint of the same directory.
    """
    path = os.fspath(path)
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    if problem == "it does not exist":
        raise FileNotFoundError(f"Expected `{what}` to be an existing checkpoint file, but got {path!r}.")
    raise UnreadableCheckpointError(
        f"Expected `{what}` {path!r} to be a complete torch checkpoint, but {problem}: it was cut "
        f"short while being written (a crash or a full disk). {_alternative(path)}"
    )


def guard_checkpoint_loading(checkpoint_io: Any) -> None:
    """Make ``checkpoint_io.load_checkpoint`` name the file when it cannot read it (idempotent)."""
    if getattr(checkpoint_io, "_hq_guarded", False):
        return
    original = checkpoint_io.load_checkpoint

    def load_checkpoint(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(path, *args, **kwargs)
        except Exception as err:
            if not isinstance(path, (str, os.PathLike)) or checkpoint_problem(path) is None:
                raise
            try:
                check_checkpoint_file(path, "ckpt_path")
            except (UnreadableCheckpointError, FileNotFoundError) as clear:
                raise clear from err
            raise

    checkpoint_io.load_checkpoint = load_checkpoint
    checkpoint_io._hq_guarded = True
