"""``resume_from`` and ``init_from``: a checkpoint file, a run directory, or ``last``.

``resume_from=last`` resumes from the newest complete checkpoint of the earlier runs: those under
the current run directory (a fixed ``hydra.run.dir`` reused) and under ``outputs/`` (Hydra's
default place for runs, relative to the working directory). A directory stands for the newest
complete checkpoint below it. Truncated or corrupt checkpoints are named and passed over by
``last`` and refused when named directly.

Example:
    >>> import os, tempfile, torch
    >>> run = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(run, "logs", "checkpoints"))
    >>> path = os.path.join(run, "logs", "checkpoints", "epoch=6-step=70.ckpt")
    >>> torch.save({"state_dict": {}}, path)
    >>> resolve_checkpoint(run, "resume_from", output_dir=tempfile.mkdtemp()) == path
    True
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hq_lightning.callbacks._checkpoint_file import check_checkpoint_file, newest_checkpoint

__all__ = ["LAST", "RUNS_DIR", "resolve_checkpoint"]

log = logging.getLogger(__name__)

#: The value of ``resume_from`` that picks the newest checkpoint of the earlier runs.
LAST = "last"
#: Hydra's default folder of runs (``hydra.run.dir`` is ``outputs/<date>/<time>``).
RUNS_DIR = "outputs"


def _warn_skipped(path: str, problem: str) -> None:
    log.warning("skipping checkpoint %s: %s", path, problem)


def _newest(roots: list[Path]) -> str | None:
    found = [newest_checkpoint(root, skip=_warn_skipped) for root in roots if root.is_dir()]
    found = [os.path.abspath(path) for path in found if path is not None]
    return max(found, key=lambda p: os.stat(p).st_mtime) if found else None


def resolve_checkpoint(value: str | None, key: str, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint file that ``key=value`` (``resume_from`` or ``init_from``) stands for.

    Args:
        value: a ``.ckpt``/state-dict file, a directory (its newest complete checkpoint), ``last``
            (``resume_from`` only) or ``None``.
        key: the config key, for messages.
        output_dir: the current run directory.

    Raises:
        FileNotFoundError: no such file or directory, or no checkpoint where one was looked for.
        UnreadableCheckpointError: the named file is truncated or corrupt (it names the file and
            the newest complete checkpoint beside it).
    """
    if value is None:
        return None
    value = str(value)
    if value == LAST:
        if key != "resume_from":
            raise ValueError(f"Expected `{key}` to be a checkpoint file, but got {LAST!r}, which only "
                             "`resume_from` accepts.")
        roots = [Path(output_dir), Path(RUNS_DIR)]
        path = _newest(roots)
        if path is None:
            raise FileNotFoundError(
                f"Expected `resume_from=last` to find a complete checkpoint (*.ckpt) under "
                f"{str(output_dir)!r} or {RUNS_DIR + '/'!r}, but there is none. Give the file or the "
                f"run directory instead, e.g. \"resume_from='outputs/<date>/<time>'\"."
            )
        log.info("resume_from=last: %s", path)
        return path
    if os.path.isdir(value):
        path = _newest([Path(value)])
        if path is None:
            raise FileNotFoundError(
                f"Expected `{key}` directory {value!r} to hold a complete checkpoint (*.ckpt), but "
                "it holds none."
            )
        log.info("%s=%s: %s", key, value, path)
        return path
    return check_checkpoint_file(value, key)
