"""PNG plots of a :class:`~hq_lightning.quantization.profiler.similarity.SimilarityReport`.

matplotlib is optional (``pip install matplotlib``, or the ``report`` extra); it is imported only
when a plot is drawn, always with the headless Agg backend, so plots work without a display
(CI, servers, a training job). Each function returns the matplotlib ``Figure`` and writes a PNG
when given a path.

Example:
    >>> import math
    >>> from hq_lightning.quantization.profiler.similarity import (LayerSimilarity, LayerStats,
    ...     SimilarityReport)
    >>> row = LayerSimilarity("conv", "Conv2d", ("conv",), "qint8", 0.01, (-1.28, 1.27), (-2.0, 1.0),
    ...                       {"fake_quant": LayerStats(30.0, 0.999, 2.0, 0.01)})
    >>> report = SimilarityReport([row], models=["fake_quant"], output={}, num_batches=1)
    >>> figure = plot_sqnr(report)
    >>> figure.axes[0].get_title()
    'Per-layer similarity: SQNR vs float (worst: conv)'
"""

from __future__ import annotations

import math
import os
from typing import Any

from hq_lightning.quantization.profiler.similarity import SimilarityReport

__all__ = ["plot_histograms", "plot_sqnr", "require_matplotlib"]

_LABELS = {"fake_quant": "fake quant", "converted": "converted (integer)"}
_COLORS = {"fake_quant": "#4C72B0", "converted": "#DD8452"}


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Expected matplotlib to be installed to draw the per-layer plots, but it is not: "
            "`pip install matplotlib` (or `pip install hq_lightning[report]`). The Markdown and "
            "JSON reports need no plotting library."
        ) from err
    matplotlib.use("Agg", force=True)  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_sqnr(report: SimilarityReport, path: str | os.PathLike | None = None, *, dpi: int = 110) -> Any:
    """Per-layer SQNR bars (one bar per compared model), layers in execution order.

    The worst layer's label is red and named in the title; the floor of the y axis is the
    smallest finite SQNR minus a margin, infinite SQNR (identical outputs) is drawn at the top.

    Args:
        report: what :func:`layer_similarity` returned.
        path: where to write the PNG (``None``: not written).
        dpi: resolution of the PNG.

    Returns:
        the matplotlib Figure (closed; write or inspect it).
    """
    plt = require_matplotlib()
    layers = list(report.layers)
    models = list(report.models)
    finite = [s.sqnr for row in layers for s in row.stats.values() if math.isfinite(s.sqnr)]
    top = (max(finite) if finite else 1.0) + 5.0
    width = max(6.0, 0.32 * len(layers) * max(len(models), 1) + 2.0)
    figure, axes = plt.subplots(figsize=(min(width, 40.0), 4.8))
    bar = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        values = []
        for row in layers:
            stats = row.stats.get(model)
            value = math.nan if stats is None else stats.sqnr
            values.append(top if value == math.inf else value)
        positions = [i + (k - (len(models) - 1) / 2) * bar for i in range(len(layers))]
        axes.bar(positions, values, bar, label=_LABELS.get(model, model), color=_COLORS.get(model))
    worst = report.rows[0].path if report.rows else None
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels([row.path for row in layers], rotation=70, ha="right", fontsize=7)
    for label, row in zip(axes.get_xticklabels(), layers):
        if row.path == worst:
            label.set_color("red")
            label.set_fontweight("bold")
    axes.set_ylabel("SQNR vs float (dB, higher is better)")
    axes.set_title(f"{report.title}: SQNR vs float (worst: {worst})")
    if finite:
        axes.set_ylim(min(0.0, min(finite) - 3.0), top)
    axes.grid(axis="y", alpha=0.3)
    if models:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(os.fspath(path), dpi=dpi)
    plt.close(figure)
    return figure


def plot_histograms(
    report: SimilarityReport,
    path: str | os.PathLike | None = None,
    *,
    k: int = 4,
    bins: int = 100,
    dpi: int = 110,
) -> Any:
    """Histograms of the float activations of the ``k`` worst layers, the clip range marked.

    Values beyond the dashed lines (``qmin * scale``, ``qmax * scale``) are clipped by the
    quantized model; a range much wider than the bulk of the values means coarse steps.

    Args:
        report: what :func:`layer_similarity` returned (with its float samples).
        path: where to write the PNG (``None``: not written).
        k: how many of the worst layers.
        bins: histogram bins.
        dpi: resolution of the PNG.

    Returns:
        the matplotlib Figure (closed).
    """
    plt = require_matplotlib()
    rows = [row for row in report.rows if row.path in report.samples][:k]
    columns = min(2, max(len(rows), 1))
    lines = max(1, math.ceil(len(rows) / columns))
    figure, grid = plt.subplots(lines, columns, figsize=(6.0 * columns, 3.4 * lines), squeeze=False)
    for axes in grid.flat[len(rows):]:
        axes.axis("off")
    if not rows:
        grid.flat[0].text(0.5, 0.5, "no float samples", ha="center", va="center")
    for axes, row in zip(grid.flat, rows):
        values = report.samples[row.path].float().numpy()
        lo, hi = float(values.min()), float(values.max())
        if row.clip_range is not None:
            lo, hi = min(lo, row.clip_range[0]), max(hi, row.clip_range[1])
        if hi <= lo:
            hi = lo + 1.0
        axes.hist(values, bins=bins, range=(lo, hi), color="#4C72B0", log=True)
        if row.clip_range is not None:
            for edge in row.clip_range:
                axes.axvline(edge, color="red", linestyle="--", linewidth=1.2)
        sqnr = min((s.sqnr for s in row.stats.values()), default=math.nan)
        saturation = max((s.saturation for s in row.stats.values() if not math.isnan(s.saturation)), default=math.nan)
        detail = f"SQNR {sqnr:.1f} dB" + ("" if math.isnan(saturation) else f", clipped {100 * saturation:.2f}%")
        axes.set_title(f"{row.path} ({row.dtype}): {detail}", fontsize=9)
        axes.set_xlabel("float activation (clip range dashed)", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(f"{report.title}: float activations of the worst layers", fontsize=10)
    figure.tight_layout()
    if path is not None:
        figure.savefig(os.fspath(path), dpi=dpi)
    plt.close(figure)
    return figure
