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
4. find the float islands (:mod:`.islands`): every operation on a quantized activation that
   cannot run on integers (no integer form on the march, an argument computed at run time that
   cannot be kept, a leaf nobody can see into) or that the user keeps in float (``None``
   qconfig, ``wrap``, a DeQuantStub...QuantStub pair) runs in float between an inserted
   dequantize and a re-entry QuantStub; a :class:`~.islands.FloatIslandWarning` lists them, and
   ``allow_float_islands=False`` refuses them instead with ONE error listing every op, why, and
   what to do;
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

import copy
import warnings
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from hq_lightning.nn import qat
from hq_lightning.quantization.fx import islands as islands_pass
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.input_fake_quant import link_input_fake_quants
from hq_lightning.quantization.fx.precision import OP_PRECISIONS, apply_input_precision
from hq_lightning.quantization.fx.qconfig_tree import (
    check_module_names,
    parse_qconfig_dict,
    resolve_qconfigs,
)
from hq_lightning.quantization.qconfig import QConfig
from hq_lightning.quantization.stubs import is_quant_stub

__all__ = ["QAT_MODES", "UnsupportedOperationError", "prepare_qat_fx"]

#: ``"fuse_bn"``: BN folded into the conv at fuse time; ``"with_bn"``: BN kept and trained.
QAT_MODES = ("fuse_bn", "with_bn")

_QCONFIG_ATTR = "qconfig"


class UnsupportedOperationError(RuntimeError):
    """Operations that cannot run on integers sit between QuantStub and DeQuantStub (strict mode)."""


def prepare_qat_fx(
    model: nn.Module,
    qconfig_dict: Mapping[str, Any] | QConfig | None = None,
    example_inputs: Any = None,
    *,
    qat_mode: str = "fuse_bn",
    bias_fake_quant: bool | None = None,
    allow_float_islands: bool = True,
    op_precision: str = "auto",
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
        allow_float_islands: ``True`` (default): ops on quantized activations that cannot run
            on integers, or that the qconfig / ``wrap`` / a DeQuantStub...QuantStub pair keep in
            float, run in float inside the prepared and the converted model (dequantize in,
            quantize out; :func:`~hq_lightning.quantization.float_islands` lists them and a
            ``FloatIslandWarning`` reports them). ``False``: the whole quantized region must run
            on integers; any island raises :class:`UnsupportedOperationError`.
        op_precision: ``"auto"`` (default): an op whose registry entry asks for a wider input
            (softmax: ``qint16``) gets it from the fake quant that produces that input, on
            marches with int16 (:mod:`~hq_lightning.quantization.fx.precision`);
            ``"qconfig"``: exactly the qconfigs' dtypes.

    Returns:
        the prepared GraphModule, in the same train/eval mode as ``model``.

    Raises:
        ValueError: bad ``qat_mode``, a ``module_name`` naming no module, mixed calibration and
            QAT qconfigs.
        UnsupportedOperationError: ``allow_float_islands=False`` and some ops would run in float
            (each listed with why and the remedy).
    """
    del example_inputs  # symbolic tracing needs no inputs
    if qat_mode not in QAT_MODES:
        raise ValueError(f"Expected `qat_mode` to be one of {QAT_MODES}, but got {qat_mode!r}.")
    if op_precision not in OP_PRECISIONS:
        raise ValueError(
            f"Expected `op_precision` to be one of {OP_PRECISIONS}, but got {op_precision!r}."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    if not isinstance(allow_float_islands, bool):
        raise TypeError(
            f"Expected `allow_float_islands` to be True or False, but got {allow_float_islands!r}."
        )
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
    originals: dict[str, nn.Module] = {}
    _swap_modules(fused, "", qconfig_of, resolved_final, {}, originals)
    for module in fused.modules():
        # float modules that stay float do not keep the recorded qconfig (no override on re-prepare)
        if not _is_qat_module(module):
            module.__dict__.pop(_QCONFIG_ATTR, None)
    _check_islands(fused, resolved_final, tree.global_qconfig, originals, allow_float_islands)
    for module in fused.modules():
        if isinstance(module, qat.FusedWeightedMixin):
            module.bias_fake_quant = bias_fake_quant
    if op_precision == "auto":
        apply_input_precision(fused)  # e.g. softmax's input int16 where the march has it
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


def _swap_modules(
    module: nn.Module,
    prefix: str,
    qconfig_of: Any,
    resolved: dict[str, Any],
    memo: dict[int, nn.Module],
    originals: dict[str, nn.Module],
) -> None:
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
            originals[path] = child
            setattr(module, name, new)
        elif qat_mapping.is_fused_module(child) or _is_qat_module(child):
            continue
        else:
            _swap_modules(child, path, qconfig_of, resolved, memo, originals)


def _check_islands(
    graph_module: fx.GraphModule,
    qconfigs: dict[str, Any],
    global_qconfig: Any,
    originals: dict[str, nn.Module],
    allow_float_islands: bool,
) -> None:
    modules = dict(graph_module.named_modules())
    graph_module.__dict__[islands_pass.ISLANDS_ATTR] = ()
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
    islands = islands_pass.insert_float_islands(graph_module, qconfigs, global_qconfig, originals)
    if not islands:
        return
    if not allow_float_islands:
        raise UnsupportedOperationError(islands_pass.strict_error_message(islands))
    warnings.warn(
        islands_pass.island_summary(
            islands,
            f"{len(islands)} float island(s) run in float between integer parts of the model "
            "(dequantize in, quantize out; hq_lightning.quantization.float_islands(model) lists "
            "them, allow_float_islands=False refuses them):",
        ),
        islands_pass.FloatIslandWarning,
        stacklevel=3,
    )
