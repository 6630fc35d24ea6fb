"""Render the per-phase metrics as a rich table (a string, for ``rank_zero_info``)."""

import io

from rich.console import Console
from rich.table import Table


def images_note(images: dict[str, int], split: str = "validation") -> str:
    """How many images the figures are over, and what one image is worth in accuracy.

    Example:
        >>> images_note({"float": 270, "quantized": 270})
        'Each figure is over 270 validation images (one image = 0.37 accuracy points).'
        >>> images_note({"float": 270, "quantized": 64})
        'Figures are over these numbers of validation images: float 270, quantized 64.'
    """
    counts = {phase: n for phase, n in images.items() if n}
    if not counts:
        return ""
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        return f"Each figure is over {n} {split} images (one image = {100 / n:.2f} accuracy points)."
    listed = ", ".join(f"{phase} {n}" for phase, n in counts.items())
    return f"Figures are over these numbers of {split} images: {listed}."


def arithmetic_note(phases: list[str]) -> str:
    """Says which columns are the same integer arithmetic as the converted model's.

    A prepared model in VALIDATION runs the integer model ``convert_fx`` builds from it, so the
    calibration and QAT columns were computed by the arithmetic the ``quantized`` column deploys.

    Example:
        >>> arithmetic_note(["float", "calibration", "qat", "quantized"])
        'calibration, qat and quantized are the same integer arithmetic (VALIDATION runs the converted model).'
        >>> arithmetic_note(["float", "quantized"])
        ''
    """
    validated = [p for p in phases if p in ("calibration", "qat")]
    if "quantized" not in phases or not validated:
        return ""
    return (
        f"{', '.join(validated)} and quantized are the same integer arithmetic "
        "(VALIDATION runs the converted model)."
    )


def render_metrics_table(
    metrics_table: dict[str, dict[str, float]], images: dict[str, int] | None = None, split: str = "validation"
) -> str:
    """Returns a text table with one row per metric and one column per phase.

    Args:
        metrics_table: ``{phase: {metric: value}}``.
        images: ``{phase: number of validation images}`` behind each column, printed under it.
        split: the split the images come from (``"test"`` under ``trainer.test``).

    Example:
        >>> print(render_metrics_table({"float": {"val/acc": 0.9}, "quantized": {"val/acc": 0.89}},
        ...                            {"float": 270, "quantized": 270}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Quantization phases
        ┏━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━┓
        ┃ metric  ┃  float ┃ quantized ┃
        ┡━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━┩
        │ val/acc │ 0.9000 │    0.8900 │
        └─────────┴────────┴───────────┘
        Each figure is over 270 validation images (one image = 0.37 accuracy points).
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
    note = images_note({p: n for p, n in (images or {}).items() if p in metrics_table}, split)
    notes = [n for n in (note, arithmetic_note(phases)) if n]
    return buffer.getvalue().rstrip("\n") + "".join(f"\n{n}" for n in notes)


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
