"""``prepare_qat_fx``: turn a float model into a fake-quant (QAT or calibration) model.

Steps, never in place:

1. resolve the qconfig tree on the float model (:mod:`.qconfig_tree`) and record each module's
   qconfig on a copy of it, so a module keeps its qconfig through fusion (a fused
   ``ConvBNReLU2d`` takes the qconfig of the conv it absorbed);
2. ``fuse_fx`` (``fold_bn = qat_mode == "fuse_bn"``), which traces the copy into a GraphModule;
3. replace every submodule that has a qconfig and a QAT counterpart (:mod:`.qat_mapping`) by
   walking all submodules, so modules called only inside wrapped methods are prepared too;
   generated ``_generated_<op>_<i>`` modules inherit the qconfig of the module whose ``forward``
   called the op;
4. check the graph: every operation on a quantized activation (from a QuantStub up to a
   DeQuantStub) must be quantizable, else ONE error lists them all;
5. link each weighted QAT module to the ``FakeQuantize`` producing its input
   (:mod:`.input_fake_quant`) and set its ``bias_fake_quant`` option, so its bias can be
   fake-quantized on the int32 accumulator grid ``s_in * s_w`` like the converted layer's.

The march is read here: each FakeQuantize captures ``get_march()`` when it is built.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.conv = torch.nn.Conv2d(3, 4, 3)
    ...         self.bn = torch.nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return self.dequant(torch.relu(self.bn(self.conv(self.quant(x)))))
    >>> qat_net = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    >>> qat_net(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 4, 6, 6])
"""

from __future__ import annotations

import builtins
import copy
import warnings
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from hq_lightning.nn import qat
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.input_fake_quant import link_input_fake_quants
from hq_lightning.quantization.fx.qconfig_tree import (
    check_module_names,
    parse_qconfig_dict,
    resolve_qconfigs,
)
from hq_lightning.quantization.qconfig import QConfig
from hq_lightning.quantization.stubs import is_quant_stub
from hq_lightning.utils import fx_helper

__all__ = ["QAT_MODES", "UnsupportedOperationError", "prepare_qat_fx"]

#: ``"fuse_bn"``: BN folded into the conv at fuse time; ``"with_bn"``: BN kept and trained.
QAT_MODES = ("fuse_bn", "with_bn")

_QCONFIG_ATTR = "qconfig"
_MISSING = object()


class UnsupportedOperationError(RuntimeError):
    """Operations that cannot run on quantized activations sit between QuantStub and DeQuantStub."""


def prepare_qat_fx(
    model: nn.Module,
    qconfig_dict: Mapping[str, Any] | QConfig | None = None,
    example_inputs: Any = None,
    *,
    qat_mode: str = "fuse_bn",
    bias_fake_quant: bool | None = None,
) -> fx.GraphModule:
    """Fuse ``model`` and replace its modules by fake-quant ``hq_lightning.nn.qat`` modules.

    Args:
        model: the float model (left untouched; do not modify it afterwards).
        qconfig_dict: ``{"": qc, "module_type": ..., "module_name": ...}`` (see
            :mod:`hq_lightning.quantization.fx.qconfig_tree`), a bare QConfig for the whole model,
            or ``None`` to use the ``qconfig`` attributes set on the model's modules.
        example_inputs: accepted for torch.ao signature compatibility; tracing is symbolic and
            does not need them.
        qat_mode: ``"fuse_bn"`` (default) folds BN into the conv at fuse time; ``"with_bn"``
            keeps BN trainable (see :mod:`hq_lightning.nn.qat.fused_weighted`).
        bias_fake_quant: put the Conv/Linear bias on the int32 accumulator grid
            ``s_in * s_w[c]`` of the converted layer (straight-through gradient). ``None``
            (default): on BERNOULLI in QAT and VALIDATION, on the other marches in VALIDATION
            (``eval()``) only, so validation predicts the deployed model while QAT trains with
            the float bias; ``True``: also during QAT on every march; ``False``: never (the float
            bias everywhere). Each weighted module's ``bias_fake_quant`` attribute can be changed
            later.

    Returns:
        the prepared GraphModule, in the same train/eval mode as ``model``.

    Raises:
        ValueError: bad ``qat_mode``, a ``module_name`` naming no module, mixed calibration and
            QAT qconfigs.
        UnsupportedOperationError: operations on quantized activations that cannot be quantized.
    """
    del example_inputs  # symbolic tracing needs no inputs
    if qat_mode not in QAT_MODES:
        raise ValueError(f"Expected `qat_mode` to be one of {QAT_MODES}, but got {qat_mode!r}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    if bias_fake_quant is not None and not isinstance(bias_fake_quant, bool):
        raise TypeError(
            f"Expected `bias_fake_quant` to be None (march default), True or False, but got {bias_fake_quant!r}."
        )
    from hq_lightning.quantization.fx.fuse import fuse_fx

    tree = parse_qconfig_dict(qconfig_dict)
    # module names are checked after fusion, which adds names (``_generated_add_0``) one may use
    qconfigs = resolve_qconfigs(model, qconfig_dict, extra_names=tree.by_name)

    # the recorded attribute survives fuse_fx's own deep copy and moves with each module
    annotated = copy.deepcopy(model)
    for path, module in annotated.named_modules(remove_duplicate=False):
        module.__dict__[_QCONFIG_ATTR] = qconfigs[path]
    fused = fuse_fx(annotated, fold_bn=qat_mode == "fuse_bn")
    check_module_names(tree, list(qconfigs) + [p for p, _ in fused.named_modules()])
    owners = _owner_paths(fused)

    def qconfig_of(path: str, module: nn.Module) -> QConfig | None:
        if qat_mapping.is_fused_module(module):
            # the fused module takes the qconfig of the weighted module it absorbed
            if path in tree.by_name and path not in qconfigs:
                return tree.by_name[path]
            return module.conv.__dict__.get(_QCONFIG_ATTR, qconfigs.get(path))
        if _QCONFIG_ATTR in module.__dict__:  # a module of the float model (maybe moved by fusion)
            return module.__dict__[_QCONFIG_ATTR]
        # a module generated by fusion: inherits from the module whose forward called it
        owner = getattr(module, "_hq_owner_path", None) or owners.get(path, "")
        qconfig = qconfigs.get(owner, tree.global_qconfig)
        qconfig = tree.by_type.get(type(module), qconfig)
        return tree.by_name.get(path, qconfig)

    resolved_final: dict[str, QConfig | None] = {"": qconfigs[""]}
    _swap_modules(fused, "", qconfig_of, resolved_final, {})
    for module in fused.modules():
        # float modules that stay float do not keep the recorded qconfig (no override on re-prepare)
        if not _is_qat_module(module):
            module.__dict__.pop(_QCONFIG_ATTR, None)
    _check_supported(fused, resolved_final)
    for module in fused.modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.bias_fake_quant = bias_fake_quant
    link_input_fake_quants(fused)
    return fused


def _owner_paths(graph_module: fx.GraphModule) -> dict[str, str]:
    """Path of each module used by a node -> ``hq_module_path`` of that node (its caller)."""
    owners: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        owner = node.meta.get("hq_module_path")
        if owner is None:
            continue
        if node.op == "call_module":
            owners.setdefault(str(node.target), owner)
        elif node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            owners.setdefault(str(node.args[0].target), owner)
    return owners


def _is_qat_module(module: nn.Module) -> bool:
    from hq_lightning.quantization.fx.convert_mapping import is_qat_module

    return type(module).__module__.startswith("hq_lightning.nn.qat") or is_qat_module(module)


def _swap_modules(module: nn.Module, prefix: str, qconfig_of: Any, resolved: dict[str, Any], memo: dict[int, nn.Module]) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if id(child) in memo:  # a shared module stays shared
            setattr(module, name, memo[id(child)])
            continue
        qconfig = qconfig_of(path, child)
        resolved[path] = qconfig
        qat_class = qat_mapping.qat_class_for(child)
        if qat_class is not None and qconfig is not None:
            new = qat_class.from_float(child, qconfig)
            memo[id(child)] = new
            setattr(module, name, new)
        elif qat_mapping.is_fused_module(child) or _is_qat_module(child):
            continue
        else:
            _swap_modules(child, path, qconfig_of, resolved, memo)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    path = node.meta.get("hq_module_path", "")
    where = f"in module {path!r}" if path else "in the root's forward"
    target = node.target
    if node.op == "call_module":
        target = f"{target}: {type(modules[str(target)]).__name__}"
    if node.op == "call_function":
        target = getattr(target, "__qualname__", getattr(target, "__name__", repr(target)))
        module = getattr(node.target, "__module__", None)
        if module and module not in ("_operator", "builtins"):
            target = f"{module}.{target}"
    return f"{node.name} ({node.op} {target}) {where}"


def _check_supported(graph_module: fx.GraphModule, qconfigs: dict[str, Any]) -> None:
    modules = dict(graph_module.named_modules())
    if not any(isinstance(m, qat.QuantStub) for m in modules.values()):
        if not any(is_quant_stub(m) for m in modules.values()):
            warnings.warn(
                "Expected the model to contain a QuantStub marking where quantization starts, but "
                "found none: no activation is quantized, so convert_fx cannot build an integer model. "
                "Add hq_lightning.quantization.QuantStub() at the inputs (and DeQuantStub() at the outputs).",
                UserWarning,
                stacklevel=3,
            )
        return
    quantized: set[fx.Node] = set()
    problems: list[str] = []
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), qat.QuantStub):
            quantized.add(node)
            continue
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if not any(arg in quantized for arg in node.all_input_nodes):
            continue
        verdict = _classify(node, modules, qconfigs)
        if verdict == "quantized":
            quantized.add(node)
        elif verdict == "unsupported":
            problems.append(_describe(node, modules))
            quantized.add(node)  # keep propagating so that every problem is listed at once
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UnsupportedOperationError(
            f"Expected only quantizable operations between QuantStub and DeQuantStub, but got "
            f"{len(problems)} unsupported operation(s) on quantized activations:\n{listed}\n"
            "For each: put a DeQuantStub before it so it runs in float, keep it out of the graph "
            "with hq_lightning.utils.fx_helper.wrap, or give the module that calls it qconfig None."
        )


def _classify(node: fx.Node, modules: dict[str, nn.Module], qconfigs: dict[str, Any]) -> str:
    """'quantized' (output stays quantized), 'float' (accepted, output float) or 'unsupported'."""
    owner = node.meta.get("hq_module_path", "")
    if node.op == "call_module":
        module = modules[str(node.target)]
        if qat_mapping.is_dequant(module):
            return "float"
        if _is_qat_module(module) or qat_mapping.is_scale_preserving(module):
            return "quantized"
        if fx_helper.is_wrapped_module_class(module) or qconfigs.get(str(node.target), _MISSING) is None:
            return "float"  # opaque by the user's choice, or deliberately kept float
        return "unsupported"
    if qconfigs.get(owner, _MISSING) is None:
        return "float"  # functions inherit their caller's qconfig: None keeps them float
    if node.op == "call_method":
        target = str(node.target)
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.op == "get_attr":
            module = modules.get(str(first.target))
            if isinstance(module, qat.FloatFunctional):
                return "quantized"
            if module is not None and qconfigs.get(str(first.target), _MISSING) is None:
                return "float"
        if target in qat_mapping.NON_TENSOR_METHODS:
            return "float"
        if qat_mapping.is_scale_preserving_method(target):
            return "quantized"
        return "unsupported"
    if node.op == "call_function":
        target = node.target
        if fx_helper.is_wrapped_callable(target):
            return "float"  # the user took it out of the graph: its insides are theirs
        if target is builtins.getattr:
            return "float" if len(node.args) > 1 and node.args[1] in qat_mapping.NON_TENSOR_METHODS else "quantized"
        if qat_mapping.is_scale_preserving_function(target):
            return "quantized"
        return "unsupported"
    return "quantized"
