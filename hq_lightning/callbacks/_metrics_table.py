"""Render the per-phase metrics as a rich table (a string, for ``rank_zero_info``)."""

import io

from rich.console import Console
from rich.table import Table


def render_metrics_table(metrics_table: dict[str, dict[str, float]]) -> str:
    """Returns a text table with one row per metric and one column per phase.

    Example:
        >>> print(render_metrics_table({"float": {"val/acc": 0.9}, "quantized": {"val/acc": 0.89}}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Quantization phases
        ┏━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━┓
        ┃ metric  ┃  float ┃ quantized ┃
        ┡━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━┩
        │ val/acc │ 0.9000 │    0.8900 │
        └─────────┴────────┴───────────┘
    """
    phases = list(metrics_table)
    names = sorted({name for metrics in metrics_table.values() for name in metrics})
    table = Table(title="Quantization phases")
    table.add_column("metric")
    for phase in phases:
        table.add_column(phase, justify="right")
    for name in names:
        row = [name]
        for phase in phases:
            value = metrics_table[phase].get(name)
            row.append("-" if value is None else f"{value:.4f}")
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n")


def render_worst_layers(header: list[str], rows: list[list[str]]) -> str:
    """The worst layers of the per-layer report as a text table (printed under the phases).

    Example:
        >>> print(render_worst_layers(["layer", "SQNR int (dB)"], [["head.2", "18.20"]]))
        ... # doctest: +NORMALIZE_WHITESPACE
                Worst layers (vs float)
        ┏━━━━━━━━┳━━━━━━━━━━━━━━━┓
        ┃ layer  ┃ SQNR int (dB) ┃
        ┡━━━━━━━━╇━━━━━━━━━━━━━━━┩
        │ head.2 │         18.20 │
        └────────┴───────────────┘
    """
    table = Table(title="Worst layers (vs float)")
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 or name in ("type", "dtype") else "right")
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip("\n")
