"""The metrics table of a run (phase -> metrics) on the terminal and in ``metrics.json``.

Example:
    >>> from hq_lightning.app.report import table_rows
    >>> table_rows({"float": {"val/acc": 0.9}, "converted": {"val/acc": 0.88}})
    (['phase', 'val/acc'], [['float', '0.9000'], ['converted', '0.8800']])
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hq_lightning.deploy.atomic_write import write_bytes_atomically

__all__ = [
    "METRICS_FILE",
    "print_table",
    "read_metrics",
    "table_rows",
    "to_number",
    "write_metrics",
]

#: Written into every run directory; the sweep summary reads it back.
METRICS_FILE = "metrics.json"


def to_number(value: Any) -> float | None:
    """A plain float from a Python number or a one-element tensor; ``None`` otherwise."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def format_value(value: Any) -> str:
    """A metric as printed in tables: four decimals, ``-`` for a missing one."""
    number = to_number(value)
    if number is None:
        return "-" if value is None else str(value)
    return "nan" if math.isnan(number) else f"{number:.4f}"


def table_rows(
    table: Mapping[str, Mapping[str, Any]],
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``table`` (phases in their order; metrics in first-seen order)."""
    metrics: list[str] = []
    for values in table.values():
        metrics.extend(name for name in values if name not in metrics)
    rows = [
        [phase] + [format_value(values.get(name)) for name in metrics]
        for phase, values in table.items()
    ]
    return ["phase", *metrics], rows


def print_table(
    table: Mapping[str, Mapping[str, Any]], title: str = "hq_lightning", note: str = ""
) -> str:
    """Print ``table`` with rich (plain text when rich cannot render), then ``note`` (e.g. how many
    images the figures are over) on its own line; return the plain text of the table."""
    header, rows = table_rows(table)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    plain = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but the table must never be lost
        print(f"{title}\n{plain}" + (f"\n{note}" if note else ""))
        return plain
    rich_table = Table(title=title)
    for name in header:
        rich_table.add_column(name, justify="left" if name == "phase" else "right")
    for row in rows:
        rich_table.add_row(*row)
    console = Console()
    console.print(rich_table)
    if note:
        console.print(note, highlight=False)
    return plain


def write_metrics(path: str | Path, table: Mapping[str, Mapping[str, Any]], **extra: Any) -> Path:
    """Write ``{"metrics": table, **extra}`` as JSON (numbers as floats) and return the path."""
    path = Path(path)
    metrics = {
        phase: {
            name: to_number(value) if to_number(value) is not None else value
            for name, value in values.items()
        }
        for phase, values in table.items()
    }
    text = json.dumps({"metrics": metrics, **extra}, indent=2, default=str) + "\n"
    write_bytes_atomically(path, text.encode())  # the whole file or none of it
    return path


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_metrics`."""
    return json.loads(Path(path).read_text())
