"""Graph pass: a parameter or buffer read by a tensor op on activations becomes a constant operand.

ViT adds its positional embedding (``x + self.pos_embedding``) and concatenates its class token
(``torch.cat([self.class_token.expand(n, -1, -1), x], 1)``); ConvNeXt multiplies by
``self.layer_scale``. After :func:`~.functional_ops.generate_functional_modules` those are
``FloatFunctional`` calls with a ``get_attr`` operand (possibly through scale-preserving ops such
as ``expand``). This pass inserts a generated
:class:`~hq_lightning.nn.quantized.constant.ConstantOperand` (``_generated_constant_<i>``) right
after the ``get_attr``, so prepare gives the constant a weight-like fake quant and convert turns
it into integer codes. Only ops inside the quantized region (reachable from a ``QuantStub``
without crossing a ``DeQuantStub``) are touched: constants of the float part stay float.

A constant multiplied (``mul``) with an activation whose shape has exactly one axis longer than 1
(``layer_scale`` ``[C, 1, 1]``) is quantized per channel along that axis; every other constant
per tensor. The parameter keeps its ``state_dict`` key: the graph still reads it.

Example:
    >>> import torch
    >>> from hq_lightning.quantization import QuantStub
    >>> from hq_lightning.quantization.fx.tracer import symbolic_trace
    >>> from hq_lightning.quantization.fx.functional_ops import generate_functional_modules
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant = QuantStub()
    ...         self.scale = torch.nn.Parameter(torch.ones(4, 1, 1))
    ...     def forward(self, x):
    ...         return self.scale * self.quant(x)
    >>> gm = generate_functional_modules(symbolic_trace(Net()))
    >>> gm._generated_constant_0
    ConstantOperand(ch_axis=-3)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from hq_lightning.nn.quantized.constant import ConstantOperand
from hq_lightning.quantization import ops
from hq_lightning.quantization.fx.graph_module import add_generated_module
from hq_lightning.quantization.ops import OpKind
from hq_lightning.quantization.stubs import is_dequant_stub, is_quant_stub

__all__ = ["CONSTANT_OPERAND_METHODS", "insert_constant_operands"]

#: ``FloatFunctional`` methods whose tensor operands may be constants.
CONSTANT_OPERAND_METHODS = frozenset({"add", "sub", "mul", "add_relu", "cat", "stack", "matmul"})


def _value(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj


def _quantized_region(gm: fx.GraphModule) -> set[fx.Node]:
    modules = dict(gm.named_modules())
    region: set[fx.Node] = set()
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if module is not None and is_quant_stub(module):
            region.add(node)
        elif module is not None and is_dequant_stub(module):
            continue
        elif any(n in region for n in node.all_input_nodes):
            region.add(node)
    return region


def _is_preserving(node: fx.Node) -> bool:
    if node.op == "call_method":
        spec = ops.lookup_method(node.target)
    elif node.op == "call_function":
        spec = ops.lookup_function(node.target)
    else:
        return False
    return spec is not None and spec.kind is OpKind.PRESERVE


def _constant_root(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, fx.Node | None] | None:
    """``(get_attr node, first op after it on the path or None)`` when ``node`` is a constant."""
    child = None
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return (node, child) if isinstance(_value(gm, str(node.target)), torch.Tensor) else None
        if not _is_preserving(node) or not node.args:
            return None
        # the other arguments of a data-movement op are sizes / dims, never the constant's data
        child, node = node, node.args[0]
    return None


def _per_channel_axis(value: torch.Tensor) -> int | None:
    long_axes = [i for i, size in enumerate(value.shape) if size > 1]
    return long_axes[0] - value.dim() if len(long_axes) == 1 else None


def insert_constant_operands(gm: fx.GraphModule) -> fx.GraphModule:
    """Run the pass on ``gm`` in place and return it (see the module docstring)."""
    from hq_lightning.quantization.fx.functional_ops import _getattr_path

    region = _quantized_region(gm)
    inserted: dict[fx.Node, fx.Node] = {}
    counter = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or node not in region or node.target not in CONSTANT_OPERAND_METHODS:
            continue
        receiver = node.args[0] if node.args else None
        if not isinstance(receiver, fx.Node) or receiver.op != "get_attr":
            continue
        if type(_getattr_path(gm, str(receiver.target))).__name__ != "FloatFunctional":
            continue
        operands = node.args[1] if node.target in ("cat", "stack") else node.args[1:]
        roots = [_constant_root(gm, a) for a in operands]
        if all(r is not None for r in roots) or not any(r is not None for r in roots):
            continue  # all constants (float arithmetic on parameters) or none
        for found in roots:
            if found is None:
                continue
            root, child = found
            const = inserted.get(root)
            if const is None:
                value = _value(gm, str(root.target))
                axis = _per_channel_axis(value) if node.target == "mul" and child is None else None
                path = node.meta.get("hq_module_path", "")
                name, i = add_generated_module(gm, "_generated_constant", ConstantOperand(axis), path, counter)
                counter = i + 1
                with gm.graph.inserting_after(root):
                    const = gm.graph.call_module(name, (root,))
                const.meta["hq_module_path"] = path
                inserted[root] = const
            (child or node).replace_input_with(root, const)
    gm.graph.lint()
    gm.recompile()
    return gm
