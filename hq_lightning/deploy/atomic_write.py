"""Write artefacts atomically: all of the file or none of it, and a clear error when the disk is full.

Every file the deployment layer, the callbacks and the app leave behind (exported models, state
dicts, plans, metrics) goes through :func:`write_bytes_atomically`: the bytes are serialised in
memory first (so a serialiser never meets a full disk: ``torch.jit.save`` aborts the process when
it does), the free space of the target directory is checked, the bytes go to a temporary file in
the same directory, are flushed to disk, and only then ``os.replace`` puts the file in place. A
failure at any step removes the temporary file, leaves an older file of the same name untouched,
and raises :class:`ArtefactWriteError` naming the file, its size, the free space and the fix.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "weights.pt")
    >>> save_atomically({"w": torch.ones(2)}, path) == path
    True
    >>> torch.load(path, weights_only=True)["w"].tolist()
    [1.0, 1.0]
    >>> sorted(os.listdir(os.path.dirname(path)))  # no temporary file is left behind
    ['weights.pt']
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from typing import Any

import torch

__all__ = ["ArtefactWriteError", "save_atomically", "serialize", "write_bytes_atomically"]

# room left for the file system's own bookkeeping beyond the file's bytes
_MARGIN_BYTES = 1 << 20


class ArtefactWriteError(OSError):
    """Writing an artefact failed; nothing was replaced. ``errno`` is the underlying one."""


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _write_file(handle: Any, data: bytes, path: str) -> None:
    """The one place bytes reach the disk, for the file that becomes ``path`` (tests simulate a
    full disk by replacing it)."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _error(path: str, size: int, reason: str, code: int | None) -> ArtefactWriteError:
    free = _free_bytes(os.path.dirname(path) or ".")
    free_text = "unknown" if free is None else _megabytes(free)
    full = code in (errno.ENOSPC, errno.EDQUOT)
    fix = (
        "Free disk space there (or write to another directory), then write it again."
        if full
        else "Check that the directory exists and is writable, then write it again."
    )
    return ArtefactWriteError(
        code or errno.EIO,
        f"Expected to write `{path}` ({_megabytes(size)}), but {reason} (free there: {free_text}). "
        f"Nothing was written: an older file of that name is unchanged. {fix}",
    )


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Args:
        path: the file to create or replace; its directory is created if missing.
        data: the complete contents.

    Returns:
        ``path`` as a string.

    Raises:
        ArtefactWriteError: not enough free space (checked first), or the write, flush or rename
            failed; the message names the file, its size, the free space and the fix.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    size = len(data)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise _error(path, size, f"its directory cannot be created ({err.strerror})", err.errno) from err
    free = _free_bytes(directory)
    if free is not None and free < size + _MARGIN_BYTES:
        raise _error(path, size, "the disk is full (No space left on device)", errno.ENOSPC)
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
        with os.fdopen(descriptor, "wb") as handle:
            _write_file(handle, data, path)
        os.replace(temporary, path)
        temporary = None
    except OSError as err:
        reason = (
            "the disk is full (No space left on device)"
            if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else f"writing failed ({err.strerror or err})"
        )
        raise _error(path, size, reason, err.errno) from err
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)
    return path


def serialize(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory (the disk is never touched)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomically(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save(obj, path)``, atomically (see :func:`write_bytes_atomically`)."""
    return write_bytes_atomically(path, serialize(obj))
