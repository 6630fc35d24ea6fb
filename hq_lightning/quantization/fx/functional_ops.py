"""Graph pass: operators on activations become generated modules that can carry a qconfig.

- Tensor operators (``x + y``, ``torch.cat``, ``x * 0.5``, ``x.mean(1)``, ``x @ w`` ...) become
  ``call_method(<op>, (get_attr("_generated_<op>_<i>"), *args), kwargs)`` on a new
  :class:`~hq_lightning.nn.quantized.FloatFunctional` submodule (counters per op, in graph order).
  A Python-number operand maps to ``add_scalar`` / ``mul_scalar`` (``x - c`` to ``add_scalar(x, -c)``).
- Function and Tensor-method spellings of registered module ops become a generated module
  called with ``(x,)``, as the op's registry entry says (:class:`~hq_lightning.quantization.ops.Spelling`):
  ``F.avg_pool2d`` -> ``nn.AvgPool2d`` (``_generated_avg_pool2d_<i>``), ``F.adaptive_avg_pool2d``
  -> ``nn.AdaptiveAvgPool2d``, ``F.interpolate`` / ``F.upsample`` -> ``Interpolate`` (an
  ``nn.Upsample``; a ``size`` computed from another tensor's shape is passed to its forward:
  ``_generated_interpolate_0(x, size=getitem)``)...
- Scale-preserving calls (``F.relu``, ``F.relu6``, ``torch.flatten``, ``reshape``/``view``/``permute``
  /``transpose``/``contiguous``/``squeeze``/``unsqueeze``, indexing, ``max_pool2d``) stay as they are.
- Operations on non-tensors (shapes, sizes, Python ints) are left alone: a node is a tensor when
  it comes from a placeholder, a module, a tensor attribute, or a tensor op on tensors, and not
  from ``size()`` / ``.shape`` / ``.dtype`` ... (see :func:`tensor_nodes`).
- torch's own ``FloatFunctional`` modules become ours (same methods, same graph shape).

Every generated module gets ``_hq_owner_path``: the path of the module whose forward contained the
operator (also stored on the node as ``meta["hq_module_path"]``), which decides its qconfig.
Which spelling becomes what is read from the operator registry (:mod:`hq_lightning.quantization.ops`):
register an op there to support another spelling.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.fx.tracer import symbolic_trace
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, y):
    ...         return torch.cat([x + y, x * 0.5], dim=1)
    >>> gm = generate_functional_modules(symbolic_trace(Net()))
    >>> print(gm.code.strip())
    def forward(self, x, y):
        _generated_add_0 = self._generated_add_0
        add_1 = _generated_add_0.add(x, y);  _generated_add_0 = y = None
        _generated_mul_scalar_0 = self._generated_mul_scalar_0
        mul_scalar = _generated_mul_scalar_0.mul_scalar(x, 0.5);  _generated_mul_scalar_0 = x = None
        _generated_cat_0 = self._generated_cat_0
        cat_1 = _generated_cat_0.cat([add_1, mul_scalar], dim = 1);  _generated_cat_0 = add_1 = mul_scalar = None
        return cat_1
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.nn.quantized.float_functional import FLOAT_FUNCTIONAL_METHODS, FloatFunctional
from hq_lightning.quantization import ops
from hq_lightning.quantization.fx.graph_module import QuantGraphModule, add_generated_module
from hq_lightning.quantization.ops import OpKind

__all__ = ["SCALAR_OPS", "generate_functional_modules", "tensor_nodes"]

# --- the tables ------------------------------------------------------------------------------
# Which spellings become which FloatFunctional method or generated module is read from the
# operator registry (hq_lightning.quantization.ops); only the shape of the scalar forms is here.
#: Binary methods with a Python-number operand: method -> (scalar method, sign of the scalar,
#: whether the scalar may come first).
SCALAR_OPS: dict[str, tuple[str, float, bool]] = {
    "add": ("add_scalar", 1.0, True),
    "mul": ("mul_scalar", 1.0, True),
    "sub": ("add_scalar", -1.0, False),
}


#: Tensor methods / attributes whose result is not a tensor.
NON_TENSOR_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "element_size", "stride", "tolist",
     "item", "get_device", "is_contiguous", "is_floating_point"}
)  # fmt: skip
NON_TENSOR_ATTRIBUTES = frozenset(
    {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"}
)  # fmt: skip
NON_TENSOR_FUNCTIONS = frozenset({builtins.len, builtins.isinstance, torch.numel})


def tensor_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of ``gm.graph`` whose value is a tensor (or a container of tensors)."""
    tensors: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_module"):
            tensors.add(node)
        elif node.op == "get_attr":
            if isinstance(_getattr_path(gm, node.target), torch.Tensor):
                tensors.add(node)
        elif node.op == "call_method":
            receiver = node.args[0] if node.args else None
            if node.target in NON_TENSOR_METHODS:
                continue
            if (
                isinstance(receiver, fx.Node)
                and receiver.op == "get_attr"
                and receiver not in tensors
            ):
                tensors.add(node)  # a module method (FloatFunctional, wrapped helper): tensor out
            elif receiver in tensors:
                tensors.add(node)
        elif node.op == "call_function":
            if node.target in NON_TENSOR_FUNCTIONS:
                continue
            if node.target is builtins.getattr:
                if node.args[1] in NON_TENSOR_ATTRIBUTES:
                    continue
                if node.args[0] in tensors:
                    tensors.add(node)
                continue
            if node.target is operator.getitem:
                if node.args[0] in tensors:
                    tensors.add(node)
                continue
            inputs = node.all_input_nodes
            if any(n in tensors for n in inputs):
                tensors.add(node)
    return tensors


def _getattr_path(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom, None)
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Generator:
    def __init__(self, gm: QuantGraphModule, tensors: set[fx.Node]) -> None:
        self.gm = gm
        self.tensors = tensors
        self.counters: dict[str, int] = {}

    def new_module(self, op: str, module: nn.Module, owner_path: str) -> str:
        name, i = add_generated_module(self.gm, f"_generated_{op}", module, owner_path, self.counters.get(op, 0))
        self.counters[op] = i + 1
        return name

    def float_functional_call(self, node: fx.Node, method: str, args: tuple, kwargs: dict) -> None:
        path = node.meta.get("hq_module_path", "")
        name = self.new_module(method, FloatFunctional(), path)
        graph = self.gm.graph
        with graph.inserting_before(node):
            receiver = graph.get_attr(name)
            new = graph.call_method(method, (receiver, *args), kwargs)
        for n in (receiver, new):
            n.meta["hq_module_path"] = path
        self.tensors.add(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    def module_call(
        self, node: fx.Node, op_name: str, module: nn.Module, x: fx.Node, runtime: dict | None = None
    ) -> None:
        path = node.meta.get("hq_module_path", "")
        name = self.new_module(op_name, module, path)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (x,), dict(runtime or {}))
        new.meta["hq_module_path"] = path
        self.tensors.add(new)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)


def _op_key(node: fx.Node) -> Any:
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    return None


def _functional_spec(node: fx.Node) -> ops.OpSpec | None:
    key = _op_key(node)
    spec = ops.lookup_function(key) if node.op == "call_function" else ops.lookup_method(key)
    return spec if spec is not None and spec.kind is OpKind.FUNCTIONAL else None


def _rewrite(gen: _Generator, node: fx.Node, tensors: set[fx.Node]) -> None:
    key = _op_key(node)
    if node.op == "call_method" and (not node.args or node.args[0] not in tensors):
        return  # a method of a module (e.g. FloatFunctional.add) or of a non-tensor
    spec = _functional_spec(node)
    if spec is not None:
        _rewrite_functional(gen, node, tensors, spec)
        return
    for op, spelling in ops.lookup_spelling(key):
        bound = spelling.bind_dynamic(tuple(node.args), dict(node.kwargs))
        if bound is None or bound[0] not in tensors:
            continue
        x, ctor, runtime = bound
        if any(_holds_tensor(v, tensors) != (k in spelling.tensors) for k, v in runtime.items()):
            continue  # a size computed from a tensor's values, or a size where a tensor is due
        gen.module_call(node, spelling.generated_name(), op.build_module(spelling, ctor), x, runtime)
        return


def _holds_tensor(value: Any, tensors: set[fx.Node]) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v, tensors) for v in value)
    return value in tensors if isinstance(value, fx.Node) else False


def _rewrite_functional(gen: _Generator, node: fx.Node, tensors: set[fx.Node], spec: ops.OpSpec) -> None:
    method = spec.functional[0]
    if spec.form == "binary" and not node.kwargs and len(node.args) == 2:
        a, b = node.args
        a_t, b_t = a in tensors, b in tensors
        if a_t and b_t:
            gen.float_functional_call(node, method, (a, b), {})
        elif method in SCALAR_OPS and (a_t and _is_number(b) or b_t and _is_number(a)):
            scalar_method, sign, commutes = SCALAR_OPS[method]
            if a_t:
                gen.float_functional_call(node, scalar_method, (a, b if sign == 1.0 else -b), {})
            elif commutes:
                gen.float_functional_call(node, scalar_method, (b, a), {})
        return
    if spec.form == "list" and node.op == "call_function":
        tensors_arg = node.args[0] if node.args else node.kwargs.get("tensors")
        extra = {k: v for k, v in node.kwargs.items() if k != "tensors"}
        dim = node.args[1] if len(node.args) > 1 else extra.pop("dim", 0)
        if extra or not isinstance(tensors_arg, (list, tuple)) or isinstance(dim, fx.Node):
            return
        if not tensors_arg or not all(t in tensors for t in tensors_arg):
            return
        gen.float_functional_call(node, method, (list(tensors_arg),), {"dim": dim})
        return
    if spec.form == "reduce" and node.args and node.args[0] in tensors:
        names = ("dim", "keepdim")
        values = dict(zip(names, node.args[1:]))
        if len(node.args) > 3 or any(k not in names for k in node.kwargs):
            return  # dtype= / out= : leave alone
        values.update(node.kwargs)
        if any(isinstance(v, fx.Node) for v in values.values()):
            return
        kwargs = {"dim": values.get("dim"), "keepdim": values.get("keepdim", False)}
        gen.float_functional_call(node, method, (node.args[0],), kwargs)


def _swap_torch_float_functionals(gm: QuantGraphModule) -> None:
    from hq_lightning.quantization.fx.tracer import _is_torch_float_functional

    for name, module in list(gm.named_modules()):
        if not _is_torch_float_functional(module):
            continue
        used = {
            n.target
            for n in gm.graph.nodes
            if n.op == "call_method"
            and n.args
            and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "get_attr"
            and n.args[0].target == name
        }
        if used <= set(FLOAT_FUNCTIONAL_METHODS):
            parent_name, _, child = name.rpartition(".")
            setattr(gm.get_submodule(parent_name), child, FloatFunctional())


def generate_functional_modules(gm: QuantGraphModule) -> QuantGraphModule:
    """Run the pass on ``gm`` in place (callers pass a fresh copy) and return it."""
    _swap_torch_float_functionals(gm)
    tensors = tensor_nodes(gm)
    gen = _Generator(gm, tensors)
    for node in list(gm.graph.nodes):
        if node.op in ("call_function", "call_method"):
            _rewrite(gen, node, tensors)
    gm.graph.lint()
    gm.recompile()
    from hq_lightning.quantization.fx.constant_operands import insert_constant_operands

    return insert_constant_operands(gm)  # parameters read by ops on activations
