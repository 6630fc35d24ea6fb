"""The quantization plan: what a prepare applied, module by module, and why.

For every module of a prepared model that quantizes something (a QuantStub, a weighted layer, a
requantizing op) the plan gives the module as the user wrote it (a fused conv + BN + ReLU is
named by its float members, not by the fused class), where its qconfig came from (``global``,
``type <Class>``, ``name <path>``, ``attribute``; ``inherited`` when a parent's qconfig
propagated to it; a caller may relabel sources, e.g. as the override that produced them), and the
dtype and observer of its output and of its weight. Printed and saved before training, it is the
record of what was applied.

Example:
    >>> import warnings, torch
    >>> from torch import nn
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx
    >>> from hq_lightning.qconfig import (default_qat_8bit_fake_quant_qconfig as qat8,
    ...     default_qat_16bit_fake_quant_qconfig as qat16)
    >>> net = nn.Sequential(QuantStub(), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Flatten(), nn.Linear(144, 10), DeQuantStub())
    >>> tree = {"": qat8, "module_name": [("5", qat16)]}
    >>> prepared = prepare_qat_fx(net, tree)
    >>> for row in quantization_plan(net, prepared, tree):
    ...     print(row.module, row.float_type, row.source, row.output_dtype, row.weight_dtype)
    0 QuantStub global qint8 -
    1+2+3 Conv2d+BatchNorm2d+ReLU global qint8 qint8
    5 Linear name 5 qint16 qint8
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import fx, nn

from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.fx.qconfig_tree import parse_qconfig_dict
from hq_lightning.quantization.qconfig import QConfig

__all__ = ["PlanEntry", "format_plan", "plan_to_json", "quantization_plan"]


@dataclass(frozen=True)
class PlanEntry:
    """One quantized module of the plan."""

    module: str  # path(s) in the float model, fused members joined by "+"
    float_type: str  # their classes, joined by "+"
    prepared_as: str  # path and class in the prepared model
    source: str  # where the qconfig came from
    output_dtype: str  # dtype of the output fake quant; "int32" for a high-precision output
    output_observer: str
    weight_dtype: str  # "-" without a weight
    weight_observer: str


def _sources(model: nn.Module, qconfig_dict: Any) -> dict[str, tuple[QConfig | None, str]]:
    """``{path: (qconfig, source)}`` for every module of the float model, as prepare resolves it."""
    tree = parse_qconfig_dict(qconfig_dict)
    resolved: dict[str, tuple[QConfig | None, str]] = {}

    def visit(module: nn.Module, path: str, inherited: tuple[QConfig | None, str]) -> None:
        qconfig, source = inherited
        if path and not source.endswith("(inherited)") and source != "global":
            source = f"{source} (inherited)"
        if type(module) in tree.by_type:
            qconfig, source = tree.by_type[type(module)], f"type {type(module).__name__}"
        if path in tree.by_name:
            qconfig, source = tree.by_name[path], f"name {path}"
        if "qconfig" in module.__dict__:
            qconfig, source = module.__dict__["qconfig"], "attribute"
        resolved[path] = (qconfig, source)
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, (qconfig, source))

    visit(model, "", (tree.global_qconfig, "global"))
    return resolved


def _float_call_order(model: nn.Module) -> list[str]:
    from hq_lightning.quantization.fx.tracer import symbolic_trace

    try:
        graph_module: fx.GraphModule = symbolic_trace(model)
    except Exception:
        return [name for name, _ in model.named_modules() if name]
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"]


def _member_map(float_model: nn.Module, prepared: nn.Module) -> dict[str, tuple[list[str], str]]:
    """``{prepared path: (float members, owner)}``: the float modules each called module of the
    prepared model stands for (a fusion absorbs the modules called just before its last one; they
    are ``Identity`` in the prepared model), and for a generated op the module whose forward
    holds it."""
    float_modules = dict(float_model.named_modules())
    prepared_modules = dict(prepared.named_modules())
    order = _float_call_order(float_model)
    absorbed = [
        name for name in order
        if isinstance(prepared_modules.get(name), nn.Identity)
        and not isinstance(float_modules.get(name), nn.Identity)
    ]
    claimed: set[str] = set()
    members: dict[str, tuple[list[str], str]] = {}
    calls = [n for n in getattr(prepared, "graph", fx.Graph()).nodes if n.op == "call_module"]
    for node in calls:  # generated ops first: they claim the tail of their owner's absorbed run
        path = str(node.target)
        if path in float_modules:
            continue
        owner = node.meta.get("hq_module_path", "")
        run: list[str] = []
        if getattr(prepared_modules.get(path), "has_add", False):
            inside = [n for n in order if not owner or n.startswith(owner + ".")]
            for name in reversed(inside):
                if name not in absorbed or name in claimed:
                    break
                run.insert(0, name)
        claimed.update(run)
        members[path] = (run, owner)
    for path in order:
        if path in absorbed:
            continue
        run = [path]
        index = order.index(path) - 1
        while index >= 0 and order[index] in absorbed and order[index] not in claimed:
            run.insert(0, order[index])
            claimed.add(order[index])
            index -= 1
        members[path] = (run, "")
    return members


def _describe(fake_quant: Any) -> tuple[str, str]:
    if not isinstance(fake_quant, FakeQuantize):
        return "-", "-"
    dtype = getattr(fake_quant.dtype, "value", str(fake_quant.dtype))
    observer = type(fake_quant.activation_post_process).__name__
    return dtype, observer


def quantization_plan(
    float_model: nn.Module,
    prepared: nn.Module,
    qconfig_dict: Any,
    labels: Mapping[str, str] | None = None,
) -> list[PlanEntry]:
    """The plan of ``prepared = prepare_qat_fx(float_model, qconfig_dict)``.

    Args:
        float_model: the model as the user wrote it (names and classes in the plan are its own).
        prepared: the prepared model.
        qconfig_dict: the qconfig tree given to the prepare (or a bare QConfig).
        labels: renames sources, e.g. ``{"name classifier": "override out"}`` (a caller that built
            the tree from named overrides); the original source stays in brackets.

    Returns:
        One entry per quantizing module, in the order of the prepared model's modules.
    """
    sources = _sources(float_model, qconfig_dict)
    float_modules = dict(float_model.named_modules())
    member_map = _member_map(float_model, prepared)
    entries = []
    for path, module in prepared.named_modules():
        output = getattr(module, "activation_post_process", "absent")
        weight = getattr(module, "weight_fake_quant", None)
        if isinstance(module, FakeQuantize) or (output in ("absent", None) and weight is None):
            continue
        members, owner = member_map.get(path, ([path], ""))
        if path in float_modules:
            name = "+".join(members)
            float_type = "+".join(type(float_modules[m]).__name__ for m in members)
            _, source = sources.get(members[0], (None, "global"))
        else:  # generated by a pass: an op of `owner`'s forward (with the modules it absorbed)
            match = re.fullmatch(r"_generated_(\w+?)_\d+", path)
            op_name = match.group(1) if match else module._get_name()
            op = f"{op_name} in `{owner or 'the root'}`"
            name = "+".join([*members, op]) if members else f"{path} ({op})"
            float_type = "+".join([*(type(float_modules[m]).__name__ for m in members), op_name])
            _, source = sources.get(members[0] if members else owner, (None, "global"))
        base = source.replace(" (inherited)", "")
        if labels and base in labels:
            source = f"{labels[base]} ({source})"
        out_dtype, out_observer = _describe(output)
        if output is None:
            out_dtype, out_observer = "int32", "-"
        w_dtype, w_observer = _describe(weight)
        entries.append(PlanEntry(
            module=name,
            float_type=float_type,
            prepared_as=f"{path} ({module._get_name()})",
            source=source,
            output_dtype=out_dtype,
            output_observer=out_observer,
            weight_dtype=w_dtype,
            weight_observer=w_observer,
        ))
    return entries


_HEADER = ("module", "float type", "qconfig source", "output", "output observer", "weight",
           "weight observer")


def format_plan(entries: list[PlanEntry], title: str = "Quantization plan") -> str:
    """The plan as a Markdown table (one line per module).

    Example:
        >>> print(format_plan([PlanEntry("fc", "Linear", "fc (Linear)", "global", "qint8",
        ...                              "MinMaxObserver", "qint8", "MinMaxObserver")]))
        Quantization plan (1 quantized modules)
        <BLANKLINE>
        | module | float type | qconfig source | output | output observer | weight | weight observer |
        |---|---|---|---|---|---|---|
        | fc | Linear | global | qint8 | MinMaxObserver | qint8 | MinMaxObserver |
    """
    lines = [f"{title} ({len(entries)} quantized modules)", "", "| " + " | ".join(_HEADER) + " |",
             "|" + "---|" * len(_HEADER)]
    for e in entries:
        cells = (e.module, e.float_type, e.source, e.output_dtype, e.output_observer,
                 e.weight_dtype, e.weight_observer)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_to_json(entries: list[PlanEntry]) -> str:
    """The plan as JSON: a list of objects with the fields of :class:`PlanEntry`."""
    return json.dumps([asdict(e) for e in entries], indent=2) + "\n"
