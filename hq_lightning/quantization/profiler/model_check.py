"""Check a prepared model for the mistakes that cost hours of training before they show.

``check_model`` walks a model from ``prepare_qat_fx`` (graph and modules; optionally one
calibration-like pass over example inputs, on a copy) and lists:

- ``never_observed``: fake quants whose observer never saw data (a branch the inputs never reach,
  or a model not calibrated yet); ``convert_fx`` refuses them.
- ``scale_at_floor``: a scale at the float32 floor (``eps``): the observed range was 0, so the
  tensor quantizes to 0 (activations: a warning; per-channel weights: dead channels, info).
- ``float_op``: an op that stays float: on a quantized tensor ``convert_fx`` refuses it (error);
  a weighted module or ``FloatFunctional`` left unprepared runs outside the BPU (warning).
- ``shared_fake_quant``: a module with a fake quant called more than once: every call shares one
  scale, calibrated on the mixture of their ranges.
- ``missing_quant_stub``: a quantized layer fed by a graph input without a ``QuantStub`` on the
  way.
- ``int16_unsupported``: an int16 fake quant where the march (given, or the one it was built
  for) has no int16 (BERNOULLI, BERNOULLI2).

Core layer: torch only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import DeQuantStub, QuantStub, prepare_qat_fx
    >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.dequant(self.fc(self.fc(self.quant(x))))   # fc called twice
    >>> prepared = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> report = check_model(prepared, torch.randn(2, 4))
    >>> [(f.kind, f.path) for f in report.findings]
    [('shared_fake_quant', 'fc')]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.dtype import QuantDType
from hq_lightning.march import March, as_march, supports_int16
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.qparams import SCALE_EPS
from hq_lightning.quantization.state import FakeQuantState, set_fake_quantize

__all__ = ["Finding", "ModelCheckReport", "check_model"]

KINDS = (
    "never_observed",
    "scale_at_floor",
    "float_op",
    "shared_fake_quant",
    "missing_quant_stub",
    "int16_unsupported",
)
SEVERITIES = ("error", "warning", "info")

_Q, _F, _N = "quantized", "float", "non-tensor"


@dataclass(frozen=True)
class Finding:
    """One problem found by :func:`check_model`.

    Attributes:
        kind: one of :data:`KINDS`.
        severity: ``"error"`` (convert_fx fails or the numbers are wrong), ``"warning"`` (likely
            costs accuracy), ``"info"``.
        path: module path (or graph node name) concerned.
        message: what is wrong and how to fix it.
    """

    kind: str
    severity: str
    path: str
    message: str


class ModelCheckReport:
    """The findings of :func:`check_model`, errors first.

    Attributes:
        findings: tuple of :class:`Finding`.
        march: the march int16 support was checked against (``None``: each fake quant's own).
    """

    def __init__(self, findings: Iterable[Finding], march: March | None = None) -> None:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        self.findings = tuple(sorted(findings, key=lambda f: (order[f.severity], KINDS.index(f.kind), f.path)))
        self.march = march

    @property
    def ok(self) -> bool:
        """No error (warnings and infos allowed)."""
        return not any(f.severity == "error" for f in self.findings)

    def of_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]

    def to_markdown(self) -> str:
        lines = ["## Model check", ""]
        if not self.findings:
            return "\n".join([*lines, "No problem found."])
        lines += ["| severity | kind | where | what to do |", "|---|---|---|---|"]
        for f in self.findings:
            lines.append(f"| {f.severity} | {f.kind} | `{f.path}` | {f.message} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [
                {"kind": f.kind, "severity": f.severity, "path": f.path, "message": f.message}
                for f in self.findings
            ],
        }

    def __len__(self) -> int:
        return len(self.findings)

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"ModelCheckReport(errors={sum(f.severity == 'error' for f in self.findings)}, findings={len(self.findings)})"


def check_model(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    march: March | str | None = None,
) -> ModelCheckReport:
    """List the likely mistakes in a prepared model (see the module docstring for the kinds).

    Args:
        model: a GraphModule from ``prepare_qat_fx`` (calibration or QAT qconfigs); not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a list of such batches: run
            once each on a copy in CALIBRATION state, so that ``never_observed`` names the fake
            quants these inputs do not reach. ``None``: the model's observers are checked as they
            are (a model not calibrated yet gets one finding, not one per fake quant).
        march: check int16 against this march (e.g. the one you will deploy on); ``None``: the
            march each fake quant was built for.

    Returns:
        a :class:`ModelCheckReport`.
    """
    if not isinstance(model, fx.GraphModule) or not any(isinstance(m, FakeQuantize) for m in model.modules()):
        raise TypeError(
            "Expected `model` to be a model prepared by prepare_qat_fx (a GraphModule with "
            f"FakeQuantize modules), but got {type(model).__name__} without any: call "
            "prepare_qat_fx(float_model, qconfig_dict) first."
        )
    target_march = None if march is None else as_march(march)
    findings: list[Finding] = []
    observed = model if example_inputs is None else _observe(model, example_inputs)
    findings += _observer_findings(observed, fresh=example_inputs is None)
    findings += _int16_findings(model, target_march)
    findings += _graph_findings(model)
    return ModelCheckReport(findings, target_march)


# --------------------------------------------------------------------------- observers


def _observe(model: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
    batches = example_inputs if isinstance(example_inputs, list) else [example_inputs]
    observed = copy.deepcopy(model).eval()
    set_fake_quantize(observed, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            observed(*batch) if isinstance(batch, tuple) else observed(batch)
    return observed


def _owner(path: str) -> str:
    """``conv.activation_post_process`` -> ``conv`` (the layer), for messages."""
    for suffix in (".activation_post_process", ".weight_fake_quant"):
        if path.endswith(suffix):
            return path[: -len(suffix)] or path
    return path


def _observer_findings(model: nn.Module, fresh: bool) -> list[Finding]:
    fake_quants = [(p, m) for p, m in model.named_modules() if isinstance(m, FakeQuantize)]
    unseen = [p for p, m in fake_quants if not getattr(m.activation_post_process, "initialized", True)]
    findings = []
    if fresh and unseen and len(unseen) == len(fake_quants):
        return [
            Finding(
                "never_observed", "error", "<all>",
                f"None of the {len(fake_quants)} fake quants has seen data: calibrate (eval() + "
                "FakeQuantState.CALIBRATION and a few batches), or pass `example_inputs=` to check "
                "which layers the inputs reach.",
            )
        ]
    for path in unseen:
        findings.append(
            Finding(
                "never_observed", "error", path,
                f"The observer of `{path}` never saw data: the inputs never reach layer "
                f"`{_owner(path)}` (an unused branch or module?). Remove it from the model, give it "
                "qconfig None, or calibrate with inputs that reach it; convert_fx refuses it.",
            )
        )
    seen = set(unseen)
    for path, fq in fake_quants:
        if path in seen or fq.scale.numel() == 0:
            continue
        at_floor = fq.scale.detach().float() <= SCALE_EPS * 1.0001
        if not bool(at_floor.any()):
            continue
        if fq.ch_axis is None:
            findings.append(
                Finding(
                    "scale_at_floor", "warning", path,
                    f"The scale of `{path}` is at the float32 floor ({SCALE_EPS:.3g}): everything it "
                    f"saw was 0, so layer `{_owner(path)}` outputs 0 after quantization. Check that "
                    "its input is not dead (e.g. a ReLU after an all-negative layer) and that the "
                    "calibration data is real.",
                )
            )
        else:
            count = int(at_floor.sum())
            findings.append(
                Finding(
                    "scale_at_floor", "info", path,
                    f"{count} of {fq.scale.numel()} channels of `{path}` have a scale at the float32 "
                    "floor: their weights are all 0 (dead channels; prune them if intended).",
                )
            )
    return findings


def _int16_findings(model: nn.Module, march: March | None) -> list[Finding]:
    findings = []
    for path, fq in model.named_modules():
        if not isinstance(fq, FakeQuantize) or fq.dtype is not QuantDType.qint16:
            continue
        where = march if march is not None else getattr(fq, "march", None)
        if where is not None and not supports_int16(where):
            findings.append(
                Finding(
                    "int16_unsupported", "error", path,
                    f"`{path}` is int16 but march {where.value!r} has no int16 (only BAYES, BAYES_E, "
                    "NASH do): use an int8 qconfig for it, or keep the layer float (qconfig None) "
                    "between a DeQuantStub and a QuantStub.",
                )
            )
    return findings


# --------------------------------------------------------------------------- graph


def _node_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
        return str(node.args[0].target)
    return None


def _has_fake_quant(module: nn.Module | None) -> bool:
    return module is not None and any(isinstance(c, FakeQuantize) for c in module.children())


def _float_sources(node: fx.Node, state: dict[fx.Node, str]) -> list[str]:
    """Graph inputs reaching ``node`` through float values only."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        for arg in current.all_input_nodes:
            if arg in seen or state.get(arg) != _F:
                continue
            seen.add(arg)
            if arg.op == "placeholder":
                found.append(str(arg.target))
            else:
                stack.append(arg)
    return sorted(found)


def _graph_findings(model: fx.GraphModule) -> list[Finding]:
    from hq_lightning.quantization.fx.tracer import is_float_functional

    modules = dict(model.named_modules())
    findings: list[Finding] = []
    state: dict[fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node in model.graph.nodes:
        inputs = [state.get(arg, _N) for arg in node.all_input_nodes]
        path = _node_path(node)
        module = modules.get(path) if path is not None else None
        if path is not None and module is not None:
            calls[path] = calls.get(path, 0) + 1
        quantized_in = _Q in inputs
        if node.op in ("placeholder",):
            state[node] = _F
        elif node.op in ("get_attr", "output"):
            state[node] = _N
        elif node.op == "call_module":
            state[node] = _module_state(node, module, inputs, state, findings)
        elif node.op == "call_method" and module is not None and is_float_functional(module):
            tensors = [s for s in inputs[1:] if s != _N]
            if _has_fake_quant(module):
                if _F in tensors:
                    _missing_stub(node, path, state, findings)
                state[node] = _Q
            else:
                _float_op(node, path, _Q in tensors, findings, "an unprepared FloatFunctional")
                state[node] = _F
        else:
            state[node] = _op_state(node, inputs, quantized_in, findings)
    for path, count in calls.items():
        module = modules.get(path)
        fake_quant = getattr(module, "activation_post_process", None)
        if count > 1 and isinstance(fake_quant, FakeQuantize):
            findings.append(
                Finding(
                    "shared_fake_quant", "warning", path,
                    f"`{path}` is called {count} times but has one output fake quant: all calls "
                    "share one scale, calibrated on the mixture of their ranges. Give each call its "
                    "own module (e.g. copy.deepcopy) unless the ranges are the same.",
                )
            )
    return findings


def _module_state(node: fx.Node, module: nn.Module, inputs: list[str], state: dict, findings: list) -> str:
    path = str(node.target)
    quantized_in = _Q in inputs
    if qat_mapping.is_dequant(module):
        return _F
    if qat_mapping.is_quant(module):
        return _Q if _has_fake_quant(module) else (_Q if quantized_in else _F)
    if _has_fake_quant(module) or hasattr(module, "weight_fake_quant"):
        if _F in inputs:
            _missing_stub(node, path, state, findings)
        return _Q
    if qat_mapping.is_scale_preserving(module):
        return _Q if quantized_in else (_F if _F in inputs else _N)
    weighted = any(True for _ in module.parameters(recurse=False)) or qat_mapping.is_fused_module(module)
    if quantized_in or weighted:
        _float_op(node, path, quantized_in, findings, f"module {type(module).__name__}")
    return _F if (inputs and set(inputs) != {_N}) or not inputs else _N


def _op_state(node: fx.Node, inputs: list[str], quantized_in: bool, findings: list) -> str:
    target = node.target
    if node.op == "call_function" and target is getattr:
        return _N
    if node.op == "call_method" and target in qat_mapping.NON_TENSOR_METHODS:
        return _N
    tensors = [s for s in inputs if s != _N]
    if not tensors:
        return _N
    if not quantized_in:
        return _F
    preserving = (
        qat_mapping.is_scale_preserving_function(target)
        if node.op == "call_function"
        else qat_mapping.is_scale_preserving_method(target)
    )
    if preserving or (node.op == "call_function" and target.__name__ == "getitem"):
        return _Q
    name = getattr(target, "__name__", str(target))
    _float_op(node, node.name, True, findings, f"{'function' if node.op == 'call_function' else 'method'} {name!r}")
    return _F


def _float_op(node: fx.Node, path: str, on_quantized: bool, findings: list, what: str) -> None:
    if on_quantized:
        findings.append(
            Finding(
                "float_op", "error", path,
                f"{what} (`{path}`) stays float but is fed by a quantized tensor: convert_fx "
                "refuses it. Give it a qconfig (prepare it), wrap it between a DeQuantStub and a "
                "QuantStub, or move it outside the quantized region.",
            )
        )
    else:
        findings.append(
            Finding(
                "float_op", "warning", path,
                f"{what} (`{path}`) stays float: it runs outside the BPU. If it should be "
                "quantized, put a QuantStub before it and give it a qconfig.",
            )
        )


def _missing_stub(node: fx.Node, path: str, state: dict, findings: list) -> None:
    sources = _float_sources(node, state)
    where = ", ".join(f"`{s}`" for s in sources) or "a float value"
    findings.append(
        Finding(
            "missing_quant_stub", "error", path,
            f"Quantized layer `{path}` is fed by graph input {where} without a QuantStub on the "
            "way: its input is never quantized, so the integer model cannot run it. Put a "
            "QuantStub on that input path.",
        )
    )
