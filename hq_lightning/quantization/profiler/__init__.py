"""See inside a quantized model: per-layer similarity, a model check, plots and reports.

- :func:`layer_similarity`: float vs fake-quant vs converted, layer by layer (SQNR, cosine, max
  error in output steps, saturation, scale and range), worst first.
- :func:`check_model`: mistakes in a prepared model before training (never-observed observers,
  scales at the floor, float ops, shared fake quants, missing stubs, int16 on a march without).
- :func:`plot_sqnr`, :func:`plot_histograms`: PNG plots (matplotlib, optional, headless).
- :func:`write_report`: Markdown + JSON + plots into a directory.

Torch only; matplotlib is imported when a plot is drawn. See docs/profiling.md.
"""

import importlib

_EXPORTS = {
    "LayerSimilarity": "similarity",
    "LayerStats": "similarity",
    "SimilarityReport": "similarity",
    "float_layer_map": "similarity",
    "layer_similarity": "similarity",
    "Finding": "model_check",
    "ModelCheckReport": "model_check",
    "check_model": "model_check",
    "plot_histograms": "plots",
    "plot_sqnr": "plots",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
