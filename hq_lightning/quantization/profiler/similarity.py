"""Per-layer similarity of one set of inputs through the float, fake-quant and converted models.

``layer_similarity`` runs the same batches through a float reference, a prepared model (calibrated
or QAT; fake quants in VALIDATION for the measurement, every flag restored afterwards) and/or its
converted integer model, records the output of every quantized layer in each, and compares them
layer by layer with the float one:

- **SQNR** (dB): ``10 log10(sum ref^2 / sum (out - ref)^2)`` over all batches (smaller is worse);
- **cosine** similarity of the whole flattened layer output;
- **max error in output steps**: ``max |out - ref| / scale`` (the layer's output scale; per
  channel for an int32 high-precision output);
- **saturation**: the fraction of output codes at ``qmin`` or ``qmax`` (clipped values);
- the layer's **scale** and clip range ``[qmin * scale, qmax * scale]`` next to the observed float
  range.

A *layer* is a module of the prepared graph that owns fake quants (a ``QuantStub``, a QAT
Conv/Linear, a fused ``ConvBNReLU2d``, a generated ``FloatFunctional`` such as
``_generated_add_0``); a module called twice gives two rows (``path`` and ``path#2``). Rows are
matched across the models by module path: fusion names a fused chain after its last module (or
its add), which is also where the float chain's output is, so a fused conv+bn+relu row compares
with the output of the float ReLU; ``float_layers`` lists the float modules the row stands for.
The converted model keeps the prepared graph's node names, its integer outputs are dequantized
with the scales ``convert_fx`` propagated.

Core layer: torch only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import (DeQuantStub, FakeQuantState, QuantStub, convert_fx,
    ...     prepare_qat_fx, set_fake_quantize)
    >>> from hq_lightning.qconfig import default_calib_8bit_fake_quant_qconfig
    >>> _ = torch.manual_seed(0)
    >>> float_model = nn.Sequential(QuantStub(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                             DeQuantStub()).eval()
    >>> batches = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    >>> prepared = prepare_qat_fx(float_model, {"": default_calib_8bit_fake_quant_qconfig}).eval()
    >>> set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    >>> with torch.no_grad():
    ...     _ = [prepared(x) for x in batches]
    >>> report = layer_similarity(float_model, prepared, batches, converted=convert_fx(prepared))
    >>> [row.path for row in report.layers]
    ['0', '3']
    >>> report.layers[1].float_layers
    ('1', '2', '3')
    >>> report.layers[1].stats["converted"].sqnr > 20
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.dtype import QuantDType, as_dtype, qinfo
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.state import FakeQuantState, preserved_states, set_fake_quantize

__all__ = [
    "LayerSimilarity",
    "LayerStats",
    "SimilarityReport",
    "float_layer_map",
    "layer_similarity",
]

#: names of the compared models, in table order
MODELS = ("fake_quant", "converted")
_SOURCE_ATTR = "_hq_similarity_source_path"
_HISTOGRAM_SAMPLES = 4096  # float values kept per layer and batch for the histograms


@dataclass(frozen=True)
class LayerStats:
    """How one model's output of a layer compares with the float output.

    Attributes:
        sqnr: dB, ``inf`` when identical (smaller is worse).
        cosine: cosine similarity of the flattened outputs (1 is identical).
        max_error_steps: ``max |out - ref| / scale``; ``nan`` without a scale.
        saturation: fraction of output codes at ``qmin`` or ``qmax``; ``nan`` without a scale.
    """

    sqnr: float
    cosine: float
    max_error_steps: float
    saturation: float


@dataclass
class LayerSimilarity:
    """One row of a :class:`SimilarityReport`.

    Attributes:
        path: module path in the prepared model (``path#2`` for its second call).
        module_type: class name of the prepared module (``ConvReLU62d``, ``QuantStub``...).
        float_layers: float modules the row stands for (a fused chain: conv, bn, relu; a generated
            op: ``<owner>.<op>``); empty when the float model has no such layer.
        dtype: output dtype (``qint8``, ``qint16``; ``qint32`` for a high-precision output).
        scale: output scale (the largest one for a per-channel int32 output).
        clip_range: ``(qmin * scale, qmax * scale)`` (per tensor; ``None`` per channel).
        float_range: ``(min, max)`` of the float layer output over all batches.
        stats: ``{"fake_quant" | "converted": LayerStats}``.
        order: position in the graph (execution order).
    """

    path: str
    module_type: str
    float_layers: tuple[str, ...]
    dtype: str
    scale: float
    clip_range: tuple[float, float] | None
    float_range: tuple[float, float]
    stats: dict[str, LayerStats] = field(default_factory=dict)
    order: int = 0

    def worst_sqnr(self) -> float:
        """The smallest SQNR over the compared models (``nan`` counts as the worst)."""
        values = [s.sqnr for s in self.stats.values()]
        if any(math.isnan(v) for v in values):
            return -math.inf
        return min(values) if values else math.inf


class SimilarityReport:
    """What :func:`layer_similarity` measured.

    Attributes:
        layers: rows in graph (execution) order.
        rows: the same rows, worst first (smallest SQNR over the compared models).
        models: the compared models, a subset of ``("fake_quant", "converted")``.
        output: ``{model: LayerStats}`` of the whole model output.
        num_batches: batches measured.
        samples: ``{path: 1-D float tensor}``, a sample of each layer's float output (histograms).
        title: a heading for the Markdown and the plots.
    """

    def __init__(
        self,
        layers: Sequence[LayerSimilarity],
        *,
        models: Sequence[str],
        output: Mapping[str, LayerStats],
        num_batches: int,
        samples: Mapping[str, torch.Tensor] | None = None,
        title: str = "Per-layer similarity",
    ) -> None:
        self.layers = tuple(sorted(layers, key=lambda row: row.order))
        self.rows = tuple(sorted(self.layers, key=lambda row: (row.worst_sqnr(), row.order)))
        self.models = tuple(models)
        self.output = dict(output)
        self.num_batches = num_batches
        self.samples = dict(samples or {})
        self.title = title

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> LayerSimilarity:
        if isinstance(key, str):
            for row in self.rows:
                if row.path == key:
                    return row
            raise KeyError(f"Expected a layer path of this report, but got {key!r}.")
        return self.rows[key]

    def worst(self, k: int = 5) -> list[LayerSimilarity]:
        """The ``k`` worst rows."""
        return list(self.rows[:k])

    def to_markdown(self, top: int | None = None) -> str:
        """A Markdown table, worst layer first (``top``: only the first rows)."""
        names = {"fake_quant": "fq", "converted": "int"}
        lines = [
            f"## {self.title}",
            "",
            f"Each layer's output vs the float model's output of the same layer, same "
            f"{self.num_batches} batch(es); worst first. SQNR in dB (smaller is worse); max error "
            "in output steps (units of the layer's scale); saturation: fraction of output codes "
            "at qmin/qmax.",
            "",
        ]
        if self.output:
            summary = ", ".join(
                f"{names[m]} SQNR {_fmt(s.sqnr)} dB, cosine {_fmt(s.cosine, 5)}"
                for m, s in self.output.items()
            )
            lines += [f"Model output: {summary}.", ""]
        header = ["rank", "layer", "float layers", "type", "dtype", "scale", "clip range", "float range"]
        for model in self.models:
            tag = names[model]
            header += [f"SQNR {tag}", f"cos {tag}", f"max err {tag}", f"sat {tag}"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---:" if h == "rank" or h.startswith(("SQNR", "cos", "max", "sat")) else "---" for h in header) + "|")
        rows = self.rows if top is None else self.rows[:top]
        for rank, row in enumerate(rows, 1):
            cells = [
                str(rank),
                f"`{row.path}`",
                ", ".join(f"`{p}`" for p in row.float_layers) or "-",
                row.module_type,
                row.dtype,
                _fmt(row.scale),
                "-" if row.clip_range is None else f"[{_fmt(row.clip_range[0])}, {_fmt(row.clip_range[1])}]",
                f"[{_fmt(row.float_range[0])}, {_fmt(row.float_range[1])}]",
            ]
            for model in self.models:
                stats = row.stats.get(model)
                if stats is None:
                    cells += ["-"] * 4
                else:
                    cells += [
                        _fmt(stats.sqnr),
                        _fmt(stats.cosine, 5),
                        _fmt(stats.max_error_steps),
                        _percent(stats.saturation),
                    ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (rows worst first)."""

        def stats(s: LayerStats) -> dict[str, float | None]:
            return {k: _json_number(getattr(s, k)) for k in ("sqnr", "cosine", "max_error_steps", "saturation")}

        return {
            "title": self.title,
            "num_batches": self.num_batches,
            "models": list(self.models),
            "output": {m: stats(s) for m, s in self.output.items()},
            "layers": [
                {
                    "rank": rank,
                    "path": row.path,
                    "module_type": row.module_type,
                    "float_layers": list(row.float_layers),
                    "dtype": row.dtype,
                    "scale": _json_number(row.scale),
                    "clip_range": None if row.clip_range is None else [_json_number(v) for v in row.clip_range],
                    "float_range": [_json_number(v) for v in row.float_range],
                    "stats": {m: stats(s) for m, s in row.stats.items()},
                }
                for rank, row in enumerate(self.rows, 1)
            ],
        }

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        worst = self.rows[0].path if self.rows else None
        return f"SimilarityReport(layers={len(self.rows)}, models={self.models}, worst={worst!r})"


# --------------------------------------------------------------------------- matching


def _layer_nodes(model: fx.GraphModule) -> list[tuple[fx.Node, str, nn.Module]]:
    """``(node, path, module)`` of every node produced by a module that owns fake quants."""
    modules = dict(model.named_modules())
    found = []
    for node in model.graph.nodes:
        path = _node_path(node)
        if path is None:
            continue
        module = modules.get(path)
        if module is not None and any(isinstance(c, FakeQuantize) for c in module.children()):
            found.append((node, path, module))
    return found


def _node_path(node: fx.Node) -> str | None:
    """The module path a node calls: a call_module's target, a FloatFunctional call's receiver."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method" and node.args:
        owner = node.args[0]
        if isinstance(owner, fx.Node) and owner.op == "get_attr":
            return str(owner.target)
    return None


def _keyed(entries: Iterable[tuple[fx.Node, str]]) -> dict[str, str]:
    """node name -> ``path`` (first call) or ``path#k`` (k-th call)."""
    counts: dict[str, int] = {}
    keys = {}
    for node, path in entries:
        k = counts.get(path, 0) + 1
        counts[path] = k
        keys[node.name] = path if k == 1 else f"{path}#{k}"
    return keys


def float_layer_map(float_model: nn.Module, *, fold_bn: bool = False) -> dict[str, tuple[str, ...]]:
    """Prepared module path -> the float modules it stands for, through fusion.

    A fused conv(+bn)(+add)(+relu) maps to its float conv, bn and relu paths (the add as
    ``<owner>.<op>``, the module whose ``forward`` did it); an unfused module to itself.

    Args:
        float_model: the float model that is (or will be) prepared; not modified.
        fold_bn: as ``fuse_fx`` (``prepare_qat_fx(qat_mode="fuse_bn")`` folds); names do not
            depend on it.

    Example:
        >>> from torch import nn
        >>> float_layer_map(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU()))["2"]
        ('0', '1', '2')
    """
    fused = _marked_fused(float_model, fold_bn)
    return {path: sources for path, sources in _sources(fused).items()}


def _marked_fused(float_model: nn.Module, fold_bn: bool) -> fx.GraphModule:
    from hq_lightning.quantization.fx.fuse import fuse_fx

    if not isinstance(float_model, nn.Module):
        raise TypeError(f"Expected `float_model` to be an nn.Module, but got {type(float_model).__name__}.")
    marked = copy.deepcopy(float_model)
    for path, module in marked.named_modules(remove_duplicate=False):
        module.__dict__.setdefault(_SOURCE_ATTR, path)  # survives fuse_fx's deep copy
    return fuse_fx(marked, fold_bn=fold_bn)


def _sources(fused: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    modules = dict(fused.named_modules())
    result: dict[str, tuple[str, ...]] = {}
    for node in fused.graph.nodes:
        path = _node_path(node)
        if path is None or path in result:
            continue
        module = modules.get(path)
        if module is None:
            continue
        own = module.__dict__.get(_SOURCE_ATTR)
        if own is not None:
            result[path] = (own,)
            continue
        parts = []
        for child_name in ("conv", "bn", "relu"):
            child = getattr(module, child_name, None)
            if isinstance(child, nn.Module) and _SOURCE_ATTR in child.__dict__:
                parts.append(child.__dict__[_SOURCE_ATTR])
            if child_name == "bn" and getattr(module, "has_add", False):
                owner = node.meta.get("hq_module_path", "")
                parts.append(f"{owner}.add" if owner else "add")
        if not parts:  # a generated op alone: named after the module whose forward did it
            owner = node.meta.get("hq_module_path", "")
            op = node.target if node.op == "call_method" else type(module).__name__
            parts.append(f"{owner}.{op}" if owner else str(op))
        result[path] = tuple(parts)
    return result


# --------------------------------------------------------------------------- recording


class _Recorder(fx.Interpreter):
    """Runs a GraphModule node by node and keeps the outputs of the chosen nodes."""

    def __init__(self, module: fx.GraphModule, keys: Mapping[str, str]) -> None:
        super().__init__(module)
        self.keys = keys
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        key = self.keys.get(n.name)
        if key is not None and isinstance(result, torch.Tensor):
            self.outputs[key] = result.detach()
        return result


def _run(module: fx.GraphModule, keys: Mapping[str, str], batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    recorder = _Recorder(module, keys)
    if isinstance(batch, Mapping):
        raise TypeError(
            "Expected a batch to be a tensor or a tuple/list of positional inputs, but got a dict: "
            "the per-layer recorder feeds graph placeholders positionally."
        )
    args = tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
    output = recorder.run(*args)
    return output, recorder.outputs


# --------------------------------------------------------------------------- statistics


@dataclass
class _QInfo:
    dtype: QuantDType | None
    scale: torch.Tensor | None  # [1] or [C]
    ch_axis: int | None


class _Accumulator:
    def __init__(self, qinfo_: _QInfo) -> None:
        self.q = qinfo_
        self.sums = torch.zeros(4, dtype=torch.float64)  # ref^2, err^2, out^2, ref*out
        self.max_steps = 0.0
        self.saturated = 0
        self.count = 0

    def _scale_like(self, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.q.scale
        if scale is None:
            return None
        scale = scale.to(device=x.device, dtype=torch.float64)
        if scale.numel() == 1 or self.q.ch_axis is None:
            return scale.reshape(())
        shape = [1] * x.dim()
        shape[self.q.ch_axis % x.dim()] = scale.numel()
        return scale.view(shape)

    def add(self, ref: torch.Tensor, out: torch.Tensor, codes: torch.Tensor | None) -> None:
        ref64, out64 = ref.double(), out.double()
        err = out64 - ref64
        self.sums += torch.stack(
            [ref64.pow(2).sum(), err.pow(2).sum(), out64.pow(2).sum(), (ref64 * out64).sum()]
        ).cpu()
        self.count += ref.numel()
        scale = self._scale_like(out64)
        if scale is None:
            return
        if err.numel():
            self.max_steps = max(self.max_steps, float((err.abs() / scale).max()))
        if codes is None:
            codes = torch.round(out64 / scale)
        info = qinfo(self.q.dtype)
        self.saturated += int(((codes <= info.min) | (codes >= info.max)).sum())

    def result(self) -> LayerStats:
        ref2, err2, out2, dot = (float(v) for v in self.sums)
        if err2 == 0.0:
            sqnr = math.inf
        else:
            sqnr = 10.0 * math.log10(ref2 / err2) if ref2 > 0.0 else -math.inf
        norm = math.sqrt(ref2 * out2)
        cosine = (1.0 if ref2 == out2 else 0.0) if norm == 0.0 else dot / norm
        has_scale = self.q.scale is not None
        return LayerStats(
            sqnr=sqnr,
            cosine=cosine,
            max_error_steps=self.max_steps if has_scale else math.nan,
            saturation=(self.saturated / max(self.count, 1)) if has_scale else math.nan,
        )


def _qinfos(prepared: fx.GraphModule, layers: list[tuple[fx.Node, str, nn.Module]]) -> dict[str, _QInfo]:
    """node name -> output qparams, from convert's static scale propagation when it succeeds."""
    from hq_lightning.quantization.fx.convert import QParams, propagate_qparams

    try:
        env = {node.name: q for node, q in propagate_qparams(prepared).items()}
    except Exception:  # a model convert_fx refuses: fall back to each layer's own fake quant
        env = {}
    result = {}
    for node, _path, module in layers:
        q = env.get(node.name)
        if isinstance(q, QParams):
            result[node.name] = _QInfo(q.dtype, q.scale.detach().cpu(), q.ch_axis)
            continue
        fake_quant = getattr(module, "activation_post_process", None)
        if isinstance(fake_quant, FakeQuantize) and fake_quant.scale.numel() == 1:
            result[node.name] = _QInfo(as_dtype(fake_quant.dtype), fake_quant.scale.detach().cpu().reshape(1), None)
        else:
            result[node.name] = _QInfo(None, None, None)
    return result


def _dequantize(out: torch.Tensor, q: _QInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(float value, integer codes or None) of a converted model's layer output."""
    if out.is_floating_point() or q.scale is None:
        return out.float(), None
    codes = out.double()
    scale = q.scale.to(device=out.device, dtype=torch.float64)
    if scale.numel() > 1 and q.ch_axis is not None:
        shape = [1] * out.dim()
        shape[q.ch_axis % out.dim()] = scale.numel()
        scale = scale.view(shape)
    else:
        scale = scale.reshape(())
    return (codes * scale).float(), codes


def _flatten_output(output: Any) -> torch.Tensor | None:
    from hq_lightning.quantization.sensitivity import flatten_float_output

    return flatten_float_output(output)


# --------------------------------------------------------------------------- entry point


def layer_similarity(
    float_model: nn.Module,
    prepared: fx.GraphModule,
    batches: Iterable[Any],
    *,
    converted: fx.GraphModule | None = None,
    compare_fake_quant: bool = True,
    float_layers: Mapping[str, Sequence[str]] | None = None,
    title: str = "Per-layer similarity",
    histogram_samples: int = _HISTOGRAM_SAMPLES,
) -> SimilarityReport:
    """Compare every quantized layer of ``prepared`` and/or ``converted`` with ``float_model``.

    Args:
        float_model: the float reference: the float model (traced and fused here, so its layers
            carry the prepared model's names) or a prepared model, which is run on a copy in
            ``FakeQuantState.FLOAT`` (its current weights, no fake quant).
        prepared: a prepared model (``prepare_qat_fx``), calibrated or trained, in any state: it
            is measured in VALIDATION (eval, no observer runs) and its modes and flags are
            restored afterwards. It names the layers and its scales dequantize ``converted``.
        batches: model inputs: a tensor or a tuple/list of positional inputs each. Iterated once;
            the layer outputs of one batch are held at a time (three models' worth).
        converted: ``convert_fx(prepared)``, compared too when given.
        compare_fake_quant: whether ``prepared`` itself is compared (``False``: only ``converted``).
        float_layers: prepared path -> float paths (:func:`float_layer_map`), for the
            "float layers" column when ``float_model`` is a prepared model.
        title: heading of the Markdown and the plots.
        histogram_samples: float values kept per layer and batch for the histograms.

    Returns:
        a :class:`SimilarityReport`.

    Raises:
        ValueError: nothing to compare; no batch; a prepared model without fake quants; a
            ``converted`` that is not ``convert_fx(prepared)``.
        TypeError: a model that is not a GraphModule; a dict batch.
    """
    if not compare_fake_quant and converted is None:
        raise ValueError(
            "Expected `converted` when `compare_fake_quant=False`, but got None: there is nothing "
            "to compare with the float model."
        )
    for name, model in (("prepared", prepared), ("converted", converted)):
        if model is not None and not isinstance(model, fx.GraphModule):
            raise TypeError(
                f"Expected `{name}` to be a GraphModule from prepare_qat_fx/convert_fx, but got "
                f"{type(model).__name__}."
            )
    fake_quant = prepared
    layers = _layer_nodes(fake_quant)
    keys = _keyed((node, path) for node, path, _ in layers)
    if not keys:
        raise ValueError(
            "Expected `fake_quant` to be a model prepared by prepare_qat_fx (with FakeQuantize "
            "modules), but it has none: call prepare_qat_fx(float_model, qconfig_dict) first."
        )
    qinfos_by_name = _qinfos(fake_quant, layers)
    qinfo_by_key = {keys[node.name]: qinfos_by_name[node.name] for node, _, _ in layers}
    module_by_key = {keys[node.name]: module for node, _, module in layers}
    order = {keys[node.name]: i for i, (node, _, _) in enumerate(layers)}

    # the float reference, with the same keys
    if _has_fake_quant(float_model):
        if not isinstance(float_model, fx.GraphModule):
            raise TypeError("Expected a prepared `float_model` to be a GraphModule from prepare_qat_fx.")
        float_gm = copy.deepcopy(float_model).eval()
        set_fake_quantize(float_gm, FakeQuantState.FLOAT)
        float_keys = {name: key for name, key in _keyed(
            (node, path) for node, path, _ in _layer_nodes(float_gm)).items() if key in order}
        sources = {k: tuple(v) for k, v in (float_layers or {}).items()}
    else:
        float_gm = _marked_fused(float_model, fold_bn=False).eval()
        wanted = {key.split("#")[0] for key in order}
        calls = [(node, _node_path(node)) for node in float_gm.graph.nodes]
        float_keys = {
            name: key
            for name, key in _keyed((node, path) for node, path in calls if path in wanted).items()
            if key in order
        }
        sources = dict(_sources(float_gm))
        if float_layers:
            sources.update({k: tuple(v) for k, v in float_layers.items()})

    runs: list[tuple[str, fx.GraphModule, dict[str, str]]] = []
    if compare_fake_quant:
        runs.append(("fake_quant", fake_quant, keys))
    if converted is not None:
        converted_names = {node.name for node in converted.graph.nodes}
        missing = [name for name in keys if name not in converted_names]
        if missing:
            raise ValueError(
                f"Expected `converted` to be convert_fx(fake_quant) (same graph node names), but "
                f"it has no node {missing[:5]}: pass the prepared model it was converted from."
            )
        runs.append(("converted", converted, keys))

    accumulators = {(m, key): _Accumulator(qinfo_by_key[key]) for m, _, _ in runs for key in order}
    output_acc = {m: _Accumulator(_QInfo(None, None, None)) for m, _, _ in runs}
    ranges: dict[str, list[float]] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    num_batches = 0
    with preserved_states(fake_quant):
        fake_quant.eval()
        set_fake_quantize(fake_quant, FakeQuantState.VALIDATION)
        if converted is not None:
            converted.eval()
        with torch.no_grad():
            for batch in batches:
                num_batches += 1
                ref_out, ref = _run(float_gm, float_keys, batch)
                ref_flat = _flatten_output(ref_out)
                for key, value in ref.items():
                    flat = value.float().reshape(-1)
                    if flat.numel() == 0:
                        continue
                    lo, hi = float(flat.min()), float(flat.max())
                    seen = ranges.setdefault(key, [lo, hi])
                    seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)
                    if histogram_samples > 0:
                        if flat.numel() > histogram_samples:
                            index = torch.randperm(flat.numel(), generator=generator)[:histogram_samples]
                            flat = flat[index.to(flat.device)]
                        samples.setdefault(key, []).append(flat.cpu())
                for model_name, model, model_keys in runs:
                    out, outs = _run(model, model_keys, batch)
                    for key, value in outs.items():
                        if key not in ref:
                            continue
                        q = qinfo_by_key[key]
                        if model_name == "converted":
                            value, codes = _dequantize(value, q)
                        else:
                            codes = None
                        if value.shape != ref[key].shape:
                            continue
                        accumulators[(model_name, key)].add(ref[key], value.float(), codes)
                    out_flat = _flatten_output(out)
                    if ref_flat is not None and out_flat is not None and out_flat.shape == ref_flat.shape:
                        output_acc[model_name].add(ref_flat, out_flat, None)
    if num_batches == 0:
        raise ValueError("Expected `batches` to hold at least one model input, but got none.")

    rows = []
    for key, position in order.items():
        q = qinfo_by_key[key]
        path = key.split("#")[0]
        scale = math.nan if q.scale is None else float(q.scale.max())
        clip = None
        if q.scale is not None and q.scale.numel() == 1 and q.dtype is not None:
            info = qinfo(q.dtype)
            clip = (info.min * scale, info.max * scale)
        stats = {
            m: accumulators[(m, key)].result()
            for m, _, _ in runs
            if accumulators[(m, key)].count > 0
        }
        rows.append(
            LayerSimilarity(
                path=key,
                module_type=module_by_key[key]._get_name(),
                float_layers=tuple(sources.get(path, ())) if key in ranges else (),
                dtype=q.dtype.value if q.dtype is not None else "float",
                scale=scale,
                clip_range=clip,
                float_range=tuple(ranges.get(key, (math.nan, math.nan))),
                stats=stats,
                order=position,
            )
        )
    return SimilarityReport(
        rows,
        models=[m for m, _, _ in runs],
        output={m: acc.result() for m, acc in output_acc.items() if acc.count > 0},
        num_batches=num_batches,
        samples={k: torch.cat(v) for k, v in samples.items()},
        title=title,
    )


def _has_fake_quant(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantize) for m in model.modules())


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _percent(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{100.0 * value:.2f}%"


def _json_number(value: float) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)

