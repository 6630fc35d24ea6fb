"""Per-layer quantization sensitivity and a mixed-precision fallback suggestion.

``layer_sensitivity`` measures, for every quantized layer of a prepared (calibrated or QAT)
model, how far the model output moves from the float output when **only that layer** is
fake-quantized and every other layer runs in float (``mode="only"``), or when every layer but
that one is fake-quantized (``mode="all_but"``). A layer is a module that owns
``FakeQuantize`` children (its output ``activation_post_process`` and/or its
``weight_fake_quant``), reported under its module path.

States are switched with :func:`~hq_lightning.quantization.set_fake_quantize` in eval mode
(VALIDATION for the measured fake quants, FLOAT for the rest), so no observer runs, no scale and
no BatchNorm statistic moves; the model's fake-quant flags and train/eval modes are restored at
the end, even after an error.

The report sorts layers most sensitive first, prints as a Markdown table and suggests a
``module_name`` qconfig fragment that moves the worst layers to int16 activations (BAYES and
newer) or, where the march has no int16 (BERNOULLI, BERNOULLI2), keeps them float.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import (DeQuantStub, FakeQuantState, QuantStub,
    ...     prepare_qat_fx, set_fake_quantize)
    >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> _ = torch.manual_seed(0)
    >>> float_model = nn.Sequential(QuantStub(), nn.Linear(4, 8), nn.Linear(8, 2), DeQuantStub())
    >>> float_model[1].bias.data[0] = 100.0   # one outlier channel: int8 crushes the others
    >>> qat = prepare_qat_fx(float_model, {"": default_qat_8bit_fake_quant_qconfig}).eval()
    >>> set_fake_quantize(qat, FakeQuantState.CALIBRATION)
    >>> batches = [torch.randn(8, 4) for _ in range(2)]
    >>> with torch.no_grad():
    ...     _ = [qat(x) for x in batches]
    >>> report = layer_sensitivity(qat, batches, metric="sqnr")
    >>> report.rows[0].path
    '1'
    >>> report.fallback_qconfig_dict(top_k=1, float_model=float_model)["module_name"].keys()
    dict_keys(['1'])
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.dtype import QuantDType, as_dtype
from hq_lightning.march import March, march_context, supports_int16
from hq_lightning.quantization.fake_quantize import CalibFakeQuantize, FakeQuantize
from hq_lightning.quantization.qconfig import (
    QConfig,
    default_calib_16bit_fake_quant_qconfig,
    default_qat_16bit_fake_quant_qconfig,
)
from hq_lightning.quantization.state import FakeQuantState, preserved_states, set_fake_quantize

__all__ = [
    "Int16Decision",
    "LayerSensitivity",
    "SensitivityReport",
    "auto_int16",
    "layer_sensitivity",
    "promote_to_int16",
]

#: Named metrics; for each, whether a larger value means a larger degradation.
METRICS = {"sqnr": False, "mse": True, "cosine": False}
MODES = ("only", "all_but")

_INT16_FALLBACK = "int16"  # default of ``fallback_qconfig_dict``: int16 where the march has it
_SOURCE_ATTR = "_hq_sensitivity_source_path"


@dataclass(frozen=True)
class LayerSensitivity:
    """One row of a :class:`SensitivityReport`.

    Attributes:
        path: module path in the prepared model (``model.get_submodule(path)``).
        module_type: printed class name of the prepared module (e.g. ``ConvReLU2d``).
        activation_dtype: dtype of its output fake quant, ``None`` without one (high-precision
            output of a Conv/Linear).
        weight_dtype: dtype of its weight fake quant, ``None`` without weights.
        value: the metric of the model output (float vs this measurement).
        weighted: whether the module has a weight fake quant.
    """

    path: str
    module_type: str
    activation_dtype: QuantDType | None
    weight_dtype: QuantDType | None
    value: float
    weighted: bool = False

    @property
    def dtype(self) -> str:
        """``"qint8"`` when output and weight agree, else e.g. ``"a:qint16 w:qint8"``."""
        parts = {d.value for d in (self.activation_dtype, self.weight_dtype) if d is not None}
        if len(parts) == 1:
            return parts.pop()
        labelled = [f"{tag}:{d.value}" for tag, d in (("a", self.activation_dtype), ("w", self.weight_dtype)) if d is not None]
        return " ".join(labelled) or "-"


class SensitivityReport:
    """What :func:`layer_sensitivity` measured: rows sorted most sensitive first.

    Attributes:
        rows: tuple of :class:`LayerSensitivity`, most sensitive first.
        metric: the metric's name (a callable's ``__name__``).
        larger_is_worse: whether a larger ``value`` means a larger degradation of the output.
        mode: ``"only"`` (one layer quantized) or ``"all_but"`` (all layers but one).
        quantized_value: the metric with every layer fake-quantized (the whole prepared model).
        march: the march the fake quants were built for.
        kind: ``"qat"`` or ``"calibration"`` (whether the model holds ``CalibFakeQuantize``).
        num_batches: batches measured.
    """

    def __init__(
        self,
        rows: Iterable[LayerSensitivity],
        *,
        metric: str,
        larger_is_worse: bool,
        mode: str,
        quantized_value: float,
        march: March,
        kind: str,
        num_batches: int,
        fusion_renamed: bool = False,
    ) -> None:
        self.metric = metric
        self.larger_is_worse = larger_is_worse
        self.mode = mode
        self.quantized_value = quantized_value
        self.march = march
        self.kind = kind
        self.num_batches = num_batches
        # a weighted layer's prepared path may differ from the float conv deciding its qconfig
        self._fusion_renamed = fusion_renamed
        self.rows = tuple(sorted(rows, key=self._sort_key))

    def _sort_key(self, row: LayerSensitivity) -> float:
        # "all_but": removing the most sensitive layer improves the output the most
        worse_is_larger = self.larger_is_worse != (self.mode == "all_but")
        if math.isnan(row.value):
            return -math.inf  # NaN output: as bad as it gets
        return -row.value if worse_is_larger else row.value

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerSensitivity]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> LayerSensitivity:
        return self.rows[index]

    def most_sensitive(self, k: int = 1) -> list[str]:
        """Paths of the ``k`` most sensitive layers."""
        return [row.path for row in self.rows[:k]]

    def to_markdown(self) -> str:
        """The report as a Markdown table, most sensitive first."""
        what = "only this layer quantized" if self.mode == "only" else "all layers but this one quantized"
        direction = "larger is worse" if self.larger_is_worse else "smaller is worse"
        lines = [
            f"Layer sensitivity: {self.metric} of the model output vs float ({direction}), {what}; "
            f"{self.num_batches} batch(es), march {self.march.value}, {self.kind} model.",
            f"Whole model fake-quantized: {self.metric} = {_format(self.quantized_value)}.",
            "",
            f"| rank | layer | type | dtype | {self.metric} |",
            "|---:|---|---|---|---:|",
        ]
        for rank, row in enumerate(self.rows, 1):
            lines.append(f"| {rank} | `{row.path}` | {row.module_type} | {row.dtype} | {_format(row.value)} |")
        lines.append("")
        if supports_int16(self.march):
            lines.append("Fallback: `fallback_qconfig_dict(top_k)` moves the worst layers to int16 outputs.")
        else:
            lines.append(
                f"Fallback: int16 is unavailable on march {self.march.value}; "
                "`fallback_qconfig_dict(top_k)` keeps the worst layers float (qconfig None), which "
                "needs a DeQuantStub before and a QuantStub after each of them."
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        worst = self.rows[0].path if self.rows else None
        return f"SensitivityReport(metric={self.metric!r}, mode={self.mode!r}, layers={len(self.rows)}, most_sensitive={worst!r})"

    def fallback_qconfig_dict(
        self,
        top_k: int = 1,
        qconfig: QConfig | None | str = _INT16_FALLBACK,
        *,
        float_model: nn.Module | None = None,
    ) -> dict[str, dict[str, QConfig | None]]:
        """A ``{"module_name": {path: qconfig}}`` fragment for the ``top_k`` most sensitive layers.

        Merge it into the qconfig dict of the next ``prepare_qat_fx`` of the float model::

            fragment = report.fallback_qconfig_dict(3, float_model=float_model)
            qconfig_dict = {**base, "module_name": {**base.get("module_name", {}), **fragment["module_name"]}}

        Args:
            top_k: how many layers (the most sensitive that the fallback changes; fewer when the
                report has fewer). With an int16 fallback, layers without an output fake quant
                (high-precision outputs) or already int16 are skipped: int16 cannot help them.
            qconfig: the fallback. Default ``"int16"``: ``default_qat_16bit_fake_quant_qconfig``
                (``default_calib_16bit_fake_quant_qconfig`` for a calibration model) on marches
                with int16 (BAYES, BAYES_E, NASH); on BERNOULLI/BERNOULLI2 ``None`` (the layers
                stay float, outside the BPU) with a warning. Or any QConfig of the model's kind,
                or ``None``.
            float_model: the float model the report's model was prepared from. Needed when a
                selected layer is a fused conv that fusion named after its BatchNorm/ReLU: its
                qconfig is the one of the float conv it absorbed, so that conv's path is the key.

        Raises:
            ValueError: bad ``top_k``; an int16 qconfig on a march without int16; a qconfig of the
                other kind (calibration vs QAT); a fused layer selected without ``float_model``.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"Expected `top_k` to be an int >= 0, but got {top_k!r}.")
        qconfig = self._resolve_fallback(qconfig)
        target = _activation_dtype(qconfig)
        selected = []
        for row in self.rows:
            if len(selected) == top_k:
                break
            if target is not None and (row.activation_dtype is None or row.activation_dtype is target):
                continue  # int16 cannot help a high-precision output; already at the target
            selected.append(row)
        if float_model is None:
            ambiguous = [row.path for row in selected if row.weighted and self._fusion_renamed]
            if ambiguous:
                raise ValueError(
                    f"Expected `float_model` (the float model this report's model was prepared from) "
                    f"to map the fused layers {ambiguous} to their float paths, but got None: fusion "
                    "names a conv+bn(+relu) after its last module, while prepare_qat_fx takes the "
                    "qconfig of the float conv it absorbed. Call "
                    "fallback_qconfig_dict(top_k, float_model=float_model)."
                )
            keys = [row.path for row in selected]
        else:
            sources = _float_source_paths(float_model)
            keys = []
            for row in selected:
                if row.path not in sources:
                    raise ValueError(
                        f"Expected `float_model` to be the float model the report's model was prepared "
                        f"from, but fusing it gives no module {row.path!r}."
                    )
                keys.append(sources[row.path])
        return {"module_name": {key: qconfig for key in dict.fromkeys(keys)}}

    def _resolve_fallback(self, qconfig: QConfig | None | str) -> QConfig | None:
        if isinstance(qconfig, str):
            if qconfig != _INT16_FALLBACK:
                raise ValueError(
                    f"Expected `qconfig` to be a QConfig, None (float) or 'int16', but got {qconfig!r}."
                )
            if not supports_int16(self.march):
                warnings.warn(
                    f"int16 is unavailable on march {self.march.value!r}: the fallback keeps the most "
                    "sensitive layers float (qconfig None). They then run outside the BPU: insert a "
                    "DeQuantStub before and a QuantStub after each of them (convert_fx refuses a float "
                    "layer between the stubs), or use march BAYES or newer for int16.",
                    UserWarning,
                    stacklevel=3,
                )
                return None
            if self.kind == "calibration":
                return default_calib_16bit_fake_quant_qconfig
            return default_qat_16bit_fake_quant_qconfig
        if qconfig is None:
            return None
        if not isinstance(qconfig, QConfig):
            raise TypeError(
                f"Expected `qconfig` to be a QConfig, None (float) or 'int16', but got {type(qconfig).__name__}."
            )
        if qconfig.kind != self.kind:
            raise ValueError(
                f"Expected `qconfig` to be a {self.kind} qconfig like the model the report was made on, "
                f"but got a {qconfig.kind} qconfig: calibration and QAT qconfigs never meet in one prepare."
            )
        if _activation_dtype(qconfig) is QuantDType.qint16 and not supports_int16(self.march):
            raise ValueError(
                f"Expected `qconfig` to have no int16 activation on march {self.march.value!r}, which "
                "has no int16, but got an int16 one: pass qconfig=None to keep the layers float."
            )
        return qconfig


def _format(value: float) -> str:
    return f"{value:.4g}"


def _activation_dtype(qconfig: QConfig | None) -> QuantDType | None:
    factory = None if qconfig is None else qconfig.activation
    if factory is None:
        return None
    stored = getattr(factory, "kwargs", None)
    if isinstance(stored, Mapping) and "dtype" in stored:
        return as_dtype(stored["dtype"])
    with march_context(March.NASH):  # a march with every dtype: building never refuses
        return as_dtype(getattr(factory(), "dtype", QuantDType.qint8))


def _float_source_paths(float_model: nn.Module) -> dict[str, str]:
    """Prepared path -> the float path whose qconfig prepare_qat_fx gives that module."""
    from hq_lightning.quantization.fx import qat_mapping
    from hq_lightning.quantization.fx.fuse import fuse_fx

    if not isinstance(float_model, nn.Module):
        raise TypeError(f"Expected `float_model` to be an nn.Module, but got {type(float_model).__name__}.")
    marked = copy.deepcopy(float_model)
    for path, module in marked.named_modules(remove_duplicate=False):
        module.__dict__.setdefault(_SOURCE_ATTR, path)  # survives fuse_fx's deep copy, moves with it
    sources = {}
    for path, module in fuse_fx(marked).named_modules():
        if qat_mapping.is_fused_module(module):
            # a fused module takes the qconfig of the conv it absorbed; a name only fusion
            # made up (``_generated_add_0``) has no float path and keeps its own
            sources[path] = module.conv.__dict__.get(_SOURCE_ATTR, path)
        else:
            sources[path] = module.__dict__.get(_SOURCE_ATTR, path)
    return sources


@dataclass
class _Layer:
    path: str
    module: nn.Module
    fake_quants: list[FakeQuantize]


def _find_layers(model: nn.Module) -> list[_Layer]:
    layers = []
    for path, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            continue
        owned = [child for child in module.children() if isinstance(child, FakeQuantize)]
        if owned:
            layers.append(_Layer(path, module, owned))
    return layers


def _fusion_renamed(model: nn.Module) -> bool:
    """Whether the graph holds ``nn.Identity`` modules it never calls (absorbed by fusion)."""
    called = set()
    for prefix, module in model.named_modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_module":
                    called.add(f"{prefix}.{node.target}" if prefix else str(node.target))
    return any(isinstance(m, nn.Identity) and path not in called for path, m in model.named_modules())


def flatten_float_output(output: Any) -> torch.Tensor | None:
    """Every floating tensor of a model output (a tensor, or nested tuples/lists/dicts of them),
    flattened and concatenated as float32 in traversal order; ``None`` when there is none."""
    tensors: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                tensors.append(value.detach().reshape(-1).float())
        elif isinstance(value, Mapping):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect(output)
    return torch.cat(tensors) if tensors else None


def _default_output_fn(output: Any) -> torch.Tensor:
    flat = flatten_float_output(output)
    if flat is None:
        raise TypeError(
            "Expected the model output to be a floating tensor or a (nested) tuple/list/dict of "
            f"them, but got {type(output).__name__} with none: pass `output_fn` to pick the tensor to compare."
        )
    return flat


class _MetricAccumulator:
    """Sums over all batches in float64: the metric of the whole concatenated output."""

    def __init__(self, metric: str | Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        self.metric = metric
        self.sums = torch.zeros(4, dtype=torch.float64)  # ref^2, err^2, out^2, ref*out
        self.count = 0
        self.values: list[float] = []

    def add(self, reference: torch.Tensor, output: torch.Tensor) -> None:
        if reference.shape != output.shape:
            raise ValueError(
                f"Expected the quantized output to have the float output's shape {tuple(reference.shape)}, "
                f"but got {tuple(output.shape)}: check `output_fn`."
            )
        if callable(self.metric):
            value = self.metric(reference, output)
            self.values.append(float(value.item() if isinstance(value, torch.Tensor) else value))
            return
        ref, out = reference.double().reshape(-1), output.double().reshape(-1)
        err = out - ref
        self.sums += torch.stack([ref.dot(ref), err.dot(err), out.dot(out), ref.dot(out)]).cpu()
        self.count += ref.numel()

    def value(self) -> float:
        if callable(self.metric):
            return sum(self.values) / len(self.values)
        ref2, err2, out2, dot = (float(v) for v in self.sums)
        if self.metric == "mse":
            return err2 / max(self.count, 1)
        if self.metric == "sqnr":
            if err2 == 0.0:
                return math.inf
            return 10.0 * math.log10(ref2 / err2) if ref2 > 0.0 else -math.inf
        norm = math.sqrt(ref2 * out2)  # cosine
        if norm == 0.0:
            return 1.0 if ref2 == out2 else 0.0
        return dot / norm


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def layer_sensitivity(
    prepared_model: nn.Module,
    batches: Iterable[Any],
    *,
    metric: str | Callable[[torch.Tensor, torch.Tensor], Any] = "sqnr",
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    mode: str = "only",
) -> SensitivityReport:
    """Measure how much each quantized layer alone degrades the model output.

    Runs every batch ``len(layers) + 2`` times (float reference, whole model quantized, one pass
    per layer) under ``torch.no_grad()``; float outputs are kept for all batches, so pass a few
    small batches. Observers never run and no scale, weight or BN statistic changes.

    Args:
        prepared_model: a model from ``prepare_qat_fx``, calibrated or trained (its scales set).
        batches: model inputs; a tensor is called as ``model(x)``, a tuple/list as
            ``model(*batch)``, a dict as ``model(**batch)``. Iterated once.
        metric: ``"sqnr"`` (dB, ``10 log10(sum ref^2 / sum (out - ref)^2)`` over all batches;
            smaller is worse), ``"mse"`` (larger is worse), ``"cosine"`` (cosine similarity of the
            whole flattened output; smaller is worse), or a callable
            ``metric(float_output, quantized_output) -> float`` giving an error (larger is worse),
            averaged over batches.
        output_fn: maps the model output to the tensor compared; default: every floating tensor
            of the output (nested tuples/lists/dicts too), flattened and concatenated.
        mode: ``"only"`` (this layer quantized, the others float) or ``"all_but"`` (all layers
            quantized but this one; the most sensitive layer is the one whose removal helps most).

    Returns:
        a :class:`SensitivityReport`, most sensitive layer first.

    Raises:
        ValueError: no fake quant in the model, no batch, unknown metric or mode, or a per-channel
            fake quant that has no scale yet (calibrate first).
    """
    if not isinstance(prepared_model, nn.Module):
        raise TypeError(f"Expected `prepared_model` to be an nn.Module, but got {type(prepared_model).__name__}.")
    if not callable(metric) and metric not in METRICS:
        raise ValueError(f"Expected `metric` to be one of {sorted(METRICS)} or a callable, but got {metric!r}.")
    if mode not in MODES:
        raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"Expected `output_fn` to be a callable or None, but got {type(output_fn).__name__}.")
    output_fn = output_fn or _default_output_fn
    layers = _find_layers(prepared_model)
    if not layers:
        raise ValueError(
            "Expected `prepared_model` to be a model prepared by prepare_qat_fx (with FakeQuantize "
            "modules), but it has none: call prepare_qat_fx(float_model, qconfig_dict) first."
        )
    for layer in layers:
        for fake_quant in layer.fake_quants:
            if fake_quant.scale.numel() == 0:
                raise ValueError(
                    f"Expected every fake quant to have a scale, but the per-channel fake quant of "
                    f"{layer.path!r} has observed no data: calibrate (eval() + FakeQuantState.CALIBRATION "
                    "and a few batches) or load a state_dict first."
                )
    batches = list(batches)
    if not batches:
        raise ValueError("Expected `batches` to hold at least one model input, but got none.")

    fake_quants = [m for m in prepared_model.modules() if isinstance(m, FakeQuantize)]
    with preserved_states(prepared_model):
        prepared_model.eval()
        with torch.no_grad():
            set_fake_quantize(prepared_model, FakeQuantState.FLOAT)
            references = [output_fn(_run(prepared_model, batch)) for batch in batches]

            def measure() -> float:
                accumulator = _MetricAccumulator(metric)
                for batch, reference in zip(batches, references):
                    accumulator.add(reference, output_fn(_run(prepared_model, batch)))
                return accumulator.value()

            set_fake_quantize(prepared_model, FakeQuantState.VALIDATION)
            quantized_value = measure()
            rows = []
            for layer in layers:
                if mode == "only":
                    set_fake_quantize(prepared_model, FakeQuantState.FLOAT)
                    chosen = FakeQuantState.VALIDATION
                else:
                    set_fake_quantize(prepared_model, FakeQuantState.VALIDATION)
                    chosen = FakeQuantState.FLOAT
                for fake_quant in layer.fake_quants:
                    set_fake_quantize(fake_quant, chosen)
                activation = getattr(layer.module, "activation_post_process", None)
                weight = getattr(layer.module, "weight_fake_quant", None)
                rows.append(
                    LayerSensitivity(
                        path=layer.path,
                        module_type=layer.module._get_name(),
                        activation_dtype=activation.dtype if isinstance(activation, FakeQuantize) else None,
                        weight_dtype=weight.dtype if isinstance(weight, FakeQuantize) else None,
                        value=measure(),
                        weighted=isinstance(weight, FakeQuantize),
                    )
                )

    return SensitivityReport(
        rows,
        metric=metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__),
        larger_is_worse=METRICS.get(metric, True) if isinstance(metric, str) else True,
        mode=mode,
        quantized_value=quantized_value,
        march=fake_quants[0].march,
        kind="calibration" if any(isinstance(fq, CalibFakeQuantize) for fq in fake_quants) else "qat",
        num_batches=len(batches),
        fusion_renamed=_fusion_renamed(prepared_model),
    )


# --------------------------------------------------------------------------- sensitivity-driven int16


@dataclass(frozen=True)
class Int16Decision:
    """What :func:`auto_int16` measured and promoted.

    Attributes:
        promoted: prepared paths of the layers whose output fake quant became int16, in order.
        ranking: the sensitivity report the choice was made from (``mode="only"``, SQNR).
        sqnr_before: SQNR (dB) of the whole fake-quantized model output vs float, before.
        sqnr_after: the same after the promotions.
        steps: ``(path, model SQNR after promoting it)`` for each promotion.
        sqnr_floor: the target (``None``: promote ``max_layers``).
        max_layers: the most layers it could promote.
        reason: why it stopped.
    """

    promoted: tuple[str, ...]
    ranking: SensitivityReport
    sqnr_before: float
    sqnr_after: float
    steps: tuple[tuple[str, float], ...]
    sqnr_floor: float | None
    max_layers: int
    reason: str

    def to_markdown(self) -> str:
        """The decision as Markdown (for the report)."""
        target = "none" if self.sqnr_floor is None else f"{self.sqnr_floor:g} dB"
        lines = [
            "## Auto int16",
            "",
            f"Target: model-output SQNR floor {target}, at most {self.max_layers} layer(s). "
            f"Stopped: {self.reason}.",
            "",
            f"Model-output SQNR (fake quant vs float): before {_format(self.sqnr_before)} dB, "
            f"after {_format(self.sqnr_after)} dB.",
            "",
            "| step | layer promoted to int16 | SQNR with only this layer int8-quantized | model SQNR after |",
            "|---:|---|---:|---:|",
        ]
        only = {row.path: row.value for row in self.ranking}
        for step, (path, value) in enumerate(self.steps, 1):
            lines.append(f"| {step} | `{path}` | {_format(only.get(path, math.nan))} | {_format(value)} |")
        if not self.steps:
            lines.append("| - | (none) | - | - |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def number(v: float) -> float | str | None:
            return None if math.isnan(v) else (str(v) if math.isinf(v) else v)

        return {
            "promoted": list(self.promoted),
            "sqnr_before": number(self.sqnr_before),
            "sqnr_after": number(self.sqnr_after),
            "steps": [[p, number(v)] for p, v in self.steps],
            "sqnr_floor": self.sqnr_floor,
            "max_layers": self.max_layers,
            "reason": self.reason,
        }


def promote_to_int16(model: nn.Module, paths: Iterable[str], *, recompute_scale: bool = True) -> list[str]:
    """Make the output fake quant of each layer in ``paths`` int16, in place.

    Only dtypes change: no module, parameter or buffer is added or removed, so an optimizer, DDP
    and a strict ``load_state_dict`` keep working. The observer keeps its statistics and the
    scale is recomputed from them for int16 (``recompute_scale=False`` keeps the current scale,
    e.g. one just loaded from an int16 checkpoint).

    Args:
        model: a prepared model.
        paths: layer paths (modules owning an ``activation_post_process`` FakeQuantize).
        recompute_scale: recompute each scale from its observer.

    Returns:
        the paths promoted (already int16 ones included).

    Raises:
        ValueError: a path without an output fake quant, or a fake quant built for a march
            without int16 (BERNOULLI, BERNOULLI2).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hq_lightning.quantization import QuantStub, prepare_qat_fx
        >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
        >>> qat = prepare_qat_fx(nn.Sequential(QuantStub(), nn.Linear(2, 2)),
        ...                      {"": default_qat_8bit_fake_quant_qconfig})
        >>> _ = qat(torch.ones(1, 2))
        >>> fake_quant = qat.get_submodule("1").activation_post_process
        >>> int8_scale = fake_quant.scale.item()
        >>> promote_to_int16(qat, ["1"])
        ['1']
        >>> fake_quant.dtype.value, round(int8_scale / fake_quant.scale.item())  # 32767.5 / 127.5
        ('qint16', 257)
    """
    promoted = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        fake_quant = getattr(module, "activation_post_process", None)
        if not isinstance(fake_quant, FakeQuantize):
            raise ValueError(
                f"Expected `{path}` to be a layer with an output fake quant (activation_post_process), "
                f"but got {type(module).__name__ if module is not None else 'no such module'}."
            )
        if not supports_int16(fake_quant.march):
            raise ValueError(
                f"Expected the fake quant of `{path}` to be built for a march with int16 (BAYES, "
                f"BAYES_E, NASH), but it was built for {fake_quant.march.value!r}: keep the layer "
                "int8, or keep it float (qconfig None) between a DeQuantStub and a QuantStub."
            )
        observer = fake_quant.activation_post_process
        fake_quant.dtype = QuantDType.qint16
        if hasattr(observer, "dtype"):
            observer.dtype = QuantDType.qint16
        with torch.no_grad():
            if recompute_scale and getattr(observer, "initialized", False):
                fake_quant._update_scale()
            else:
                fake_quant.zero_point.zero_()  # same value, new version: caches keyed on buffers see the change
        promoted.append(path)
    return promoted


def _model_sqnr(model: nn.Module, batches: list[Any], output_fn: Callable[[Any], torch.Tensor]) -> float:
    """SQNR of the whole fake-quantized output vs the FLOAT output; flags and modes restored."""
    with preserved_states(model):
        model.eval()
        with torch.no_grad():
            set_fake_quantize(model, FakeQuantState.FLOAT)
            references = [output_fn(_run(model, batch)) for batch in batches]
            set_fake_quantize(model, FakeQuantState.VALIDATION)
            accumulator = _MetricAccumulator("sqnr")
            for batch, reference in zip(batches, references):
                accumulator.add(reference, output_fn(_run(model, batch)))
            return accumulator.value()


def auto_int16(
    prepared_model: nn.Module,
    batches: Iterable[Any],
    *,
    max_layers: int = 3,
    sqnr_floor: float | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> Int16Decision:
    """Promote the most sensitive layers of a calibrated model to int16 outputs, in place.

    Ranks the layers with :func:`layer_sensitivity` (SQNR of the model output with only that
    layer quantized), then promotes them most sensitive first (:func:`promote_to_int16`; layers
    with a high-precision output, already int16, or a fixed-scale observer are skipped) until the
    whole fake-quantized model's output SQNR reaches ``sqnr_floor`` or ``max_layers`` are int16.
    Without a floor it promotes ``max_layers`` layers. The model's flags and modes are restored.

    Args:
        prepared_model: a calibrated prepared model (scales set), built on a march with int16.
        batches: a few model inputs (as :func:`layer_sensitivity`).
        max_layers: the most layers to promote (>= 0).
        sqnr_floor: stop as soon as the model-output SQNR (dB) is at least this; ``None``: no floor.
        output_fn: as :func:`layer_sensitivity`.

    Returns:
        an :class:`Int16Decision`.

    Raises:
        ValueError: a march without int16, bad ``max_layers``/``sqnr_floor``, and whatever
            :func:`layer_sensitivity` refuses.
    """
    from hq_lightning.quantization.observer import FixedScaleObserver

    if not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 0:
        raise ValueError(f"Expected `max_layers` to be an int >= 0, but got {max_layers!r}.")
    if sqnr_floor is not None and not isinstance(sqnr_floor, (int, float)):
        raise ValueError(f"Expected `sqnr_floor` to be a number of dB or None, but got {sqnr_floor!r}.")
    fake_quants = [m for m in prepared_model.modules() if isinstance(m, FakeQuantize)]
    if fake_quants and not supports_int16(fake_quants[0].march):
        raise ValueError(
            f"Expected a model prepared for a march with int16 (BAYES, BAYES_E, NASH) for auto "
            f"int16, but it was prepared for {fake_quants[0].march.value!r}: use march bayes or "
            "newer, or layer_sensitivity(...).fallback_qconfig_dict() to keep layers float."
        )
    batches = list(batches)
    output_fn = output_fn or _default_output_fn
    ranking = layer_sensitivity(prepared_model, batches, metric="sqnr", output_fn=output_fn)
    before = _model_sqnr(prepared_model, batches, output_fn)
    current, steps, promoted = before, [], []
    reason = f"{max_layers} layer(s) promoted (the most allowed)"
    for row in ranking:
        if sqnr_floor is not None and current >= sqnr_floor:
            reason = f"model SQNR {_format(current)} dB >= floor {sqnr_floor:g} dB"
            break
        if len(promoted) >= max_layers:
            break
        fake_quant = getattr(prepared_model.get_submodule(row.path), "activation_post_process", None)
        if (
            not isinstance(fake_quant, FakeQuantize)
            or fake_quant.dtype is QuantDType.qint16
            or isinstance(fake_quant.activation_post_process, FixedScaleObserver)
        ):
            continue
        promote_to_int16(prepared_model, [row.path])
        promoted.append(row.path)
        current = _model_sqnr(prepared_model, batches, output_fn)
        steps.append((row.path, current))
    else:
        if sqnr_floor is not None and current >= sqnr_floor:
            reason = f"model SQNR {_format(current)} dB >= floor {sqnr_floor:g} dB"
        elif len(promoted) < max_layers:
            reason = "no more layer can be promoted"
    return Int16Decision(
        promoted=tuple(promoted),
        ranking=ranking,
        sqnr_before=before,
        sqnr_after=current,
        steps=tuple(steps),
        sqnr_floor=None if sqnr_floor is None else float(sqnr_floor),
        max_layers=max_layers,
        reason=reason,
    )
