"""``fuse_fx``: trace, turn operators into generated modules, fuse the table's patterns.

A matched chain ``conv [-> bn] [-> add] [-> relu/relu6]`` (see
:mod:`hq_lightning.quantization.fx.patterns`) becomes ONE ``call_module`` of a fused
``nn.intrinsic`` module, called with ``(conv_input,)`` or ``(conv_input, other_add_operand)``.

- Name: the add's FloatFunctional (``_generated_add_0``) when the chain has an add, otherwise the
  last module of the chain (the ReLU module, else the BN, else the conv itself when the activation
  is functional or its module is also called elsewhere). The other modules of the chain become ``nn.Identity`` in place (a ReLU module
  still called elsewhere is left as it is and a copy goes into the fused module).
- ``fold_bn=True``: the BN's running statistics are folded into the conv's weight and bias
  (eval semantics) and the fused module has no ``bn``; conv+bn alone becomes the folded conv
  itself (a plain ``nn.Conv2d``/``nn.Linear``... under the BN's name). ``fold_bn=False`` keeps
  ``bn`` in the fused module (``ConvBN2d``, ``ConvBNAddReLU2d``...) for QAT with BN.
- Not fused: a conv or BN called more than once, a BN that is frozen (``bn.training`` False while
  the model trains) or has no running statistics, a link whose output has other users.
- Never in place: the input model is deep-copied first.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(2, 2, 3, padding=1)
    ...         self.bn = nn.BatchNorm2d(2)
    ...         self.relu = nn.ReLU()
    ...     def forward(self, x):
    ...         return self.relu(self.bn(self.conv(x)) + x)
    >>> fused = fuse_fx(Block().eval())
    >>> type(fused._generated_add_0).__name__, fused.conv, fused.bn, fused.relu
    ('ConvAddReLU2d', Identity(), Identity(), Identity())
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hq_lightning.nn.intrinsic.fused import FUSABLE_BASES
from hq_lightning.quantization.fx.functional_ops import generate_functional_modules
from hq_lightning.quantization.fx.graph_module import QuantGraphModule, free_child_name
from hq_lightning.quantization.fx.patterns import (
    ACT_OPS,
    ADD_FUNCTIONS,
    FUSION_PATTERNS,
    is_frozen_bn,
)
from hq_lightning.quantization.fx.tracer import is_float_functional, symbolic_trace

__all__ = ["fuse_fx", "fuse_graph_module", "fold_bn_into"]


@dataclass
class _Match:
    conv: fx.Node
    bn: fx.Node | None = None
    add: fx.Node | None = None
    add_position: str | None = None
    other: fx.Node | None = None
    act: fx.Node | None = None
    act_type: type[nn.Module] | None = None

    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.add, self.act) if n is not None]


def _call_sites(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
        elif node.op == "call_method" and node.args and _is_get_attr(node.args[0]):
            counts[node.args[0].target] = counts.get(node.args[0].target, 0) + 1
    return counts


def _is_get_attr(arg: object) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _bn_fusible(bn: nn.Module, model_training: bool) -> bool:
    if is_frozen_bn(bn):
        return True  # fixed statistics: folding is exact in every mode
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False
    return not (model_training and not bn.training)  # frozen BN stays as it is


def _match_add(gm: QuantGraphModule, end: fx.Node, user: fx.Node, sites: dict[str, int]):
    """(other operand, position) when ``user`` adds ``end`` to something else, else None."""
    if user.op == "call_method" and user.target == "add" and len(user.args) == 3:
        receiver, a, b = user.args
        if not _is_get_attr(receiver) or user.kwargs or sites.get(receiver.target) != 1:
            return None
        if not is_float_functional(gm.get_submodule(receiver.target)):
            return None
    elif user.op == "call_function" and user.target in ADD_FUNCTIONS and len(user.args) == 2:
        if user.kwargs:
            return None
        a, b = user.args
    else:
        return None
    if a is end and b is not end and isinstance(b, fx.Node):
        return b, "add"
    if b is end and a is not end and isinstance(a, fx.Node):
        return a, "added"
    return None


#: In-place spellings of the fusable activations (``x.relu_()``, ``torch.relu_(x)``).
_INPLACE_ACTS: dict[Any, type[nn.Module]] = {"relu_": nn.ReLU, torch.relu_: nn.ReLU, F.relu_: nn.ReLU}


def _match_act(gm: QuantGraphModule, end: fx.Node, user: fx.Node) -> type[nn.Module] | None:
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        return ACT_OPS.get(type(module)) if len(user.args) == 1 else None
    if user.op not in ("call_function", "call_method") or not user.args or user.args[0] is not end:
        return None
    # `F.relu(x, True)`: inplace passed positionally (a bool; a generated module is never in place)
    rest = user.args[1:]
    if len(rest) > 1 or (rest and not isinstance(rest[0], bool)) or not set(user.kwargs) <= {"inplace"}:
        return None
    found = ACT_OPS.get(user.target) if _hashable(user.target) else None
    if found is None and _hashable(user.target) and not rest:
        found = _INPLACE_ACTS.get(user.target)
    return found


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _find_match(gm: QuantGraphModule, conv: fx.Node, sites: dict[str, int]) -> _Match | None:
    module = gm.get_submodule(conv.target)
    conv_type = type(module)
    keys = [k for k in FUSION_PATTERNS if k[0] is conv_type]
    if not keys or sites.get(conv.target) != 1 or len(conv.args) != 1 or conv.kwargs:
        return None
    match = _Match(conv)
    end = conv
    user = _sole_user(end)
    if user is not None and user.op == "call_module":
        bn = gm.get_submodule(user.target)
        bn_types = {k[1] for k in keys}
        if type(bn) in bn_types and sites.get(user.target) == 1 and _bn_fusible(bn, gm.training):
            match.bn, end = user, user
            user = _sole_user(end)
    if user is not None:
        found = _match_add(gm, end, user, sites)
        if found is not None:
            match.other, match.add_position = found
            match.add, end = user, user
            user = _sole_user(end)
    if user is not None:
        act_type = _match_act(gm, end, user)
        if act_type is not None:
            match.act, match.act_type = user, act_type
    # The table decides: drop links from the end until the chain is a registered pattern.
    while True:
        key = (conv_type, _module_type(gm, match.bn), match.add_position, match.act_type)
        if key in FUSION_PATTERNS and len(match.nodes()) > 1:
            return match
        if match.act is not None:
            match.act = match.act_type = None
        elif match.add is not None:
            match.add = match.add_position = match.other = None
        elif match.bn is not None:
            match.bn = None
        else:
            return None


def _module_type(gm: QuantGraphModule, node: fx.Node | None) -> type[nn.Module] | None:
    return None if node is None else type(gm.get_submodule(node.target))


def fold_bn_into(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold ``bn``'s running statistics into ``conv``'s weight and bias (in place; returns conv).

    ``w' = w * g / sqrt(v + eps)`` on the output-channel axis (axis 1 per group for
    ConvTranspose), ``b' = (b - m) * g / sqrt(v + eps) + beta``; computed in float64.
    """
    weight = conv.weight.detach().double()
    out_channels = bn.running_mean.numel()
    affine = getattr(bn, "affine", True)  # FrozenBatchNorm2d: weight and bias always (buffers)
    gamma = (
        bn.weight.detach().double() if affine else torch.ones(out_channels, dtype=torch.float64)
    )
    beta = (
        bn.bias.detach().double() if affine else torch.zeros(out_channels, dtype=torch.float64)
    )
    factor = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        groups = conv.groups
        shape = (groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        scale = factor.reshape(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        new_weight = (weight.reshape(shape) * scale).reshape(weight.shape)
    else:
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(factor)
    new_bias = (bias - bn.running_mean.double()) * factor + beta
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype), requires_grad=requires_grad)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=requires_grad)
    return conv


def _set_module(gm: QuantGraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, module)


def _apply(gm: QuantGraphModule, match: _Match, sites: dict[str, int], fold_bn: bool) -> None:
    graph = gm.graph
    conv = gm.get_submodule(match.conv.target)
    bn = gm.get_submodule(match.bn.target) if match.bn is not None else None
    pattern = FUSION_PATTERNS[
        (type(conv), type(bn) if bn is not None else None, match.add_position, match.act_type)
    ]
    act_module = None
    if match.act is not None:
        if match.act.op == "call_module":
            act_module = gm.get_submodule(match.act.target)
            if sites.get(match.act.target, 0) > 1:
                act_module = copy.deepcopy(act_module)
        else:
            act_module = match.act_type()
    kept_bn = bn
    fold = fold_bn or is_frozen_bn(bn)  # a frozen BN has nothing to train: always folded
    if bn is not None and fold and any(isinstance(conv, b) for b in FUSABLE_BASES):
        conv = fold_bn_into(conv, bn)
        kept_bn = None
    if kept_bn is None and match.add is None and act_module is None:
        fused: nn.Module = conv  # conv+bn folded: the conv itself
    else:
        fused = pattern.fused_type(keeps_bn=kept_bn is not None)(conv, kept_bn, act_module)

    # Name: the add's module, else the last module of the chain.
    receiver = None
    if match.add is not None:
        if match.add.op == "call_method":
            receiver = match.add.args[0]
            name = receiver.target
        else:
            name, _ = free_child_name(gm, "_generated_add")
    elif (
        match.act is not None and match.act.op == "call_module" and sites.get(match.act.target) == 1
    ):
        name = match.act.target
    elif match.bn is not None:
        name = match.bn.target
    else:
        name = match.conv.target

    last = match.nodes()[-1]
    args = (match.conv.args[0],) if match.add is None else (match.conv.args[0], match.other)
    with graph.inserting_before(last):
        new = graph.call_module(name, args)
    new.meta.update(last.meta)
    new.meta["hq_module_path"] = last.meta.get("hq_module_path", "")
    last.replace_all_uses_with(new)
    for node in reversed(match.nodes()):
        graph.erase_node(node)
    if receiver is not None and not receiver.users:
        graph.erase_node(receiver)

    # Absorbed modules become Identity (a shared ReLU module stays, it is still called).
    absorbed = [match.conv.target]
    if match.bn is not None:
        absorbed.append(match.bn.target)
    if match.act is not None and match.act.op == "call_module" and sites.get(match.act.target) == 1:
        absorbed.append(match.act.target)
    for path in absorbed:
        if path != name:
            _set_module(gm, path, nn.Identity())
    owner = getattr(_get_or_none(gm, name), "_hq_owner_path", None)
    if owner is not None:
        fused._hq_owner_path = owner
    _set_module(gm, name, fused)


def _get_or_none(gm: QuantGraphModule, path: str) -> nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def fuse_graph_module(gm: QuantGraphModule, *, fold_bn: bool = True) -> QuantGraphModule:
    """Fuse the table's patterns in ``gm`` in place (after the functional-ops pass); returns it."""
    while True:
        sites = _call_sites(gm.graph)
        match = None
        for node in gm.graph.nodes:
            if node.op == "call_module":
                match = _find_match(gm, node, sites)
                if match is not None:
                    break
        if match is None:
            break
        _apply(gm, match, sites, fold_bn)
    gm.graph.lint()
    gm.recompile()
    return gm


def fuse_fx(model: nn.Module, *, fold_bn: bool = True) -> QuantGraphModule:
    """Trace ``model``, turn tensor operators into generated modules and fuse the patterns.

    Args:
        model: a float ``nn.Module`` (or a graph module from an earlier pass); never modified.
        fold_bn: fold BatchNorms into the preceding conv/linear (eval semantics); ``False``
            keeps them inside the fused modules (for QAT that trains BN).

    Returns:
        A :class:`~hq_lightning.quantization.fx.graph_module.QuantGraphModule` that keeps every
        child of ``model`` (absorbed ones as ``nn.Identity``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    gm = symbolic_trace(copy.deepcopy(model))
    generate_functional_modules(gm)
    return fuse_graph_module(gm, fold_bn=fold_bn)
