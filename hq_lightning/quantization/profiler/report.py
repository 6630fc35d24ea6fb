"""Write a per-layer report into a directory: Markdown, JSON and PNG plots.

Files, for ``name="quantized"``: ``quantized.md`` (the table worst first, the model check and any
extra sections), ``quantized.json`` (the same numbers), ``quantized_sqnr.png`` and
``quantized_histograms.png`` (see :mod:`hq_lightning.quantization.profiler.plots`).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import (DeQuantStub, FakeQuantState, QuantStub,
    ...     prepare_qat_fx, set_fake_quantize)
    >>> from hq_lightning.quantization.profiler import layer_similarity
    >>> from hq_lightning.qconfig import default_calib_8bit_fake_quant_qconfig
    >>> float_model = nn.Sequential(QuantStub(), nn.Linear(4, 4), DeQuantStub()).eval()
    >>> batches = [torch.randn(8, 4)]
    >>> prepared = prepare_qat_fx(float_model, {"": default_calib_8bit_fake_quant_qconfig}).eval()
    >>> set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    >>> with torch.no_grad():
    ...     _ = prepared(batches[0])
    >>> report = layer_similarity(float_model, prepared, batches)
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     files = write_report(report, directory, name="calibration", plots=False)
    ...     sorted(files)
    ['json', 'markdown']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hq_lightning.quantization.profiler.similarity import SimilarityReport

__all__ = ["write_report"]


def write_report(
    report: SimilarityReport,
    directory: str | os.PathLike,
    *,
    name: str = "similarity",
    check: Any = None,
    sections: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    plots: bool | str = "auto",
    histogram_layers: int = 4,
) -> dict[str, str]:
    """Write ``report`` (and optionally a model check and extra sections) into ``directory``.

    Args:
        report: a :class:`SimilarityReport`.
        directory: created if missing.
        name: stem of the files.
        check: a :class:`~hq_lightning.quantization.profiler.model_check.ModelCheckReport`,
            appended to the Markdown and the JSON.
        sections: more Markdown, appended after the table (e.g. the auto-int16 decision).
        extra: more JSON fields.
        plots: ``True``: draw the PNGs (matplotlib required); ``False``: none; ``"auto"``: draw
            them when matplotlib is installed, else say so in the Markdown.
        histogram_layers: how many of the worst layers get a histogram.

    Returns:
        ``{"markdown" | "json" | "sqnr_plot" | "histogram_plot": path}``.

    Raises:
        ImportError: ``plots=True`` without matplotlib (the message says what to install).
    """
    if plots not in (True, False, "auto"):
        raise ValueError(f"Expected `plots` to be True, False or 'auto', but got {plots!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    notes: list[str] = []
    if plots:
        try:
            from hq_lightning.quantization.profiler.plots import plot_histograms, plot_sqnr

            sqnr_path = directory / f"{name}_sqnr.png"
            plot_sqnr(report, sqnr_path)
            files["sqnr_plot"] = str(sqnr_path)
            histogram_path = directory / f"{name}_histograms.png"
            plot_histograms(report, histogram_path, k=histogram_layers)
            files["histogram_plot"] = str(histogram_path)
        except ImportError as err:
            if plots is True:
                raise
            notes.append(f"_No plots: {err}_")

    lines = [report.to_markdown()]
    if report.rows:
        worst = report.rows[0]
        lines += ["", f"Worst layer: `{worst.path}` ({worst.module_type}, {worst.dtype})."]
    for key, label in (("sqnr_plot", "SQNR per layer"), ("histogram_plot", "Worst layers' float activations")):
        if key in files:
            lines += ["", f"![{label}]({Path(files[key]).name})"]
    lines += [f"\n{section}" for section in sections]
    if check is not None:
        lines += ["", check.to_markdown()]
    lines += ["", *notes] if notes else []
    markdown_path = directory / f"{name}.md"
    markdown_path.write_text("\n".join(lines).rstrip() + "\n")
    files["markdown"] = str(markdown_path)

    data = report.to_dict()
    if check is not None:
        data["check"] = check.to_dict()
    data.update(extra or {})
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    files["json"] = str(json_path)
    return files
