"""One table for a sweep: every job's ``metrics.json`` collected after ``python train.py -m ...``.

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks.sweep_summary`` in
``conf/config.yaml``). When the multirun ends it reads the run directory of each job, labels each
row with the overrides that differ between jobs, prints the table and writes ``summary.md`` and
``summary.csv`` into the sweep directory. :func:`summarize_sweep` does the same for any sweep
directory, e.g. one whose jobs ran on a cluster launcher.

Example:
    >>> import json, tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for i, c in enumerate(["0.01", "0.1"]):
    ...     (root / str(i)).mkdir()
    ...     _ = (root / str(i) / "metrics.json").write_text(json.dumps({
    ...         "overrides": ["+quant=qat", f"quant.qat.activation.averaging_constant={c}"],
    ...         "metrics": {"converted": {"val/acc": 0.9}}}))
    >>> header, rows = summarize_sweep(root)
    >>> header
    ['job', 'quant.qat.activation.averaging_constant', 'converted/val/acc']
    >>> rows
    [['0', '0.01', '0.9000'], ['1', '0.1', '0.9000']]
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hq_lightning.app.report import METRICS_FILE, format_value, read_metrics

__all__ = ["SweepSummary", "summarize_sweep", "write_summary"]

log = logging.getLogger(__name__)


def _job_sort_key(path: Path) -> tuple[int, str]:
    name = path.parent.relative_to(path.parent.parent).as_posix()
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def summarize_sweep(sweep_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a sweep: one row per job directory holding a ``metrics.json``.

    Columns: the job's directory name, each override whose value differs between jobs, then
    ``<phase>/<metric>`` for every phase and metric found.
    """
    sweep_dir = Path(sweep_dir)
    files = sorted(sweep_dir.glob(f"*/{METRICS_FILE}"), key=_job_sort_key)
    jobs = [(path.parent.name, read_metrics(path)) for path in files]
    if not jobs:
        return ["job"], []
    parsed = [dict(_split(o) for o in record.get("overrides", [])) for _, record in jobs]
    keys: list[str] = []
    for overrides in parsed:
        keys.extend(k for k in overrides if k not in keys)
    varying = [k for k in keys if len({overrides.get(k) for overrides in parsed}) > 1]
    metric_columns: list[str] = []
    cells: list[dict[str, str]] = []
    for _, record in jobs:
        row_cells = {}
        for phase, values in record.get("metrics", {}).items():
            for name, value in values.items():
                column = f"{phase}/{name}"
                row_cells[column] = format_value(value)
                if column not in metric_columns:
                    metric_columns.append(column)
        cells.append(row_cells)
    header = ["job", *varying, *metric_columns]
    rows = [
        [name, *[overrides.get(k, "-") for k in varying], *[c.get(m, "-") for m in metric_columns]]
        for (name, _), overrides, c in zip(jobs, parsed, cells)
    ]
    return header, rows


def write_summary(sweep_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    """Write ``summary.md`` and ``summary.csv`` into ``sweep_dir`` and return the table."""
    sweep_dir = Path(sweep_dir)
    header, rows = summarize_sweep(sweep_dir)
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return header, rows


def _terminal_columns(
    header: list[str], rows: list[list[str]]
) -> tuple[list[str], list[list[str]]]:
    """A narrower view for the terminal: overrides by their last two key parts, and per phase
    only the accuracy-like metric when there is one (summary.md / .csv keep every column)."""
    keep = []
    for index, name in enumerate(header):
        parts = name.split("/")
        is_metric = len(parts) > 1
        if not is_metric or "acc" in parts[-1] or not any("acc" in h for h in header):
            keep.append(index)
    labels = []
    for index in keep:
        name = header[index]
        labels.append(name if "/" in name else ".".join(name.lstrip("+~").split(".")[-2:]))
    return labels, [[row[i] for i in keep] for row in rows]


def _print(header: list[str], rows: list[list[str]], title: str) -> None:
    header, rows = _terminal_columns(header, rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title, *(" | ".join(r) for r in [header, *rows]), sep="\n")
        return
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name == "job" else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


class SweepSummary(Callback):
    """Hydra callback: after a multirun, collect every job's metrics into one table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            log.warning("sweep summary: %s does not exist", sweep_dir)
            return
        header, rows = write_summary(sweep_dir)
        _print(header, rows, f"sweep summary ({len(rows)} jobs): {sweep_dir / 'summary.md'}")
