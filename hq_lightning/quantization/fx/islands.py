"""Float islands: ops on quantized activations that run in float inside the integer model.

An op between QuantStub and DeQuantStub that has no integer form on the march (``nn.LSTM``, an
activation not in the registry yet), an op whose argument is computed at run time in a way that
cannot be kept, a leaf nobody can see into (a function ``torch.fx.wrap`` keeps whole), or an op
the user keeps in float on purpose (a ``None`` qconfig for its module, its type or the module
whose ``forward`` calls it; a function or module class kept whole with
:func:`hq_lightning.utils.fx_helper.wrap`; a hand-placed ``DeQuantStub`` ... ``QuantStub``
pair) runs in float, in the prepared model **and** in the converted one:

- on each quantized -> float edge a ``DeQuantStub`` (``_float_island_dequant_<i>``, one per
  producer however many island ops read it) is inserted; convert turns it into ``DeQuantize``;
- on each float -> quantized edge (an island's value read by an op that needs quantized input:
  a QAT module, a ``FloatFunctional`` op) a re-entry ``QuantStub`` (``_float_island_quant_<i>``,
  one per producer, right after it: at the island's exit) is inserted, with the qconfig of the
  module that owns the producing op, else the global qconfig, else the consumer's. It observes
  in calibration and trains in QAT like any QuantStub; convert turns it into ``Quantize``.

So the converted model stays one runnable GraphModule: ``int -> DeQuantize -> float op ->
Quantize -> int``. A QAT module or ``FloatFunctional`` that ends up in an island is put back in
its float form (no fake quant of its own: the re-entry stub quantizes its output).

:func:`float_islands` lists the islands of a prepared or converted model; each island's nodes
carry ``node.meta["hq_float_island"]`` (the island's name), which
:func:`hq_lightning.deploy.segment.float_island_split_points` reads to cut stages there.

Example:
    >>> import torch, warnings
    >>> from hq_lightning.quantization import QuantStub, DeQuantStub, prepare_qat_fx
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.quant, self.dequant = QuantStub(), DeQuantStub()
    ...         self.conv, self.fc = torch.nn.Conv1d(4, 8, 1), torch.nn.Linear(8, 2)
    ...         self.rnn = torch.nn.GRU(8, 8, batch_first=True)
    ...     def forward(self, x):
    ...         y, _ = self.rnn(self.conv(self.quant(x)).transpose(1, 2))
    ...         return self.dequant(self.fc(y[:, -1]))
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     prepared = prepare_qat_fx(Net(), {"": qc})
    >>> [(i.name, [op.node for op in i.ops], i.entries, i.exits) for i in float_islands(prepared)]
    [('island_0', ['rnn'], ('_float_island_dequant_0',), ('_float_island_quant_0',))]
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from hq_lightning.march import get_march
from hq_lightning.nn import qat
from hq_lightning.quantization import ops
from hq_lightning.quantization.fx import qat_mapping
from hq_lightning.quantization.fx.graph_module import add_generated_module
from hq_lightning.quantization.ops import OpKind
from hq_lightning.utils import fx_helper

__all__ = [
    "ISLANDS_ATTR",
    "META_KEY",
    "REASONS",
    "FloatIsland",
    "FloatIslandWarning",
    "IslandOp",
    "REMEDIES",
    "float_islands",
    "insert_float_islands",
]

#: The prepared (and converted) GraphModule's attribute holding its islands.
ISLANDS_ATTR = "_hq_float_islands"
#: ``node.meta`` key naming the island a node belongs to.
META_KEY = "hq_float_island"

#: Why an op runs in float, by kind.
REASONS = {
    "no_integer_form": "no integer form on this march",
    "runtime_argument": "argument computed at run time that cannot be kept",
    "opaque_leaf": "leaf that cannot be seen into",
    "user_float": "kept in float on purpose",
    "user_stubs": "between the model's own DeQuantStub and QuantStub",
}

_MISSING = object()


class FloatIslandWarning(UserWarning):
    """``prepare_qat_fx`` found float islands (the message lists them with their reasons)."""


@dataclass(frozen=True)
class IslandOp:
    """One op of an island and why it runs in float.

    Attributes:
        node: its node name in the prepared graph.
        what: ``"nn.LSTM"``, ``"F.interpolate"``, ``"Tensor.sort"``...
        module_path: the module whose ``forward`` calls it (``""`` for the root).
        kind: a key of :data:`REASONS`.
        detail: the specific reason (``"no integer form on this march (bayes)"``...).
    """

    node: str
    what: str
    module_path: str
    kind: str
    detail: str

    def __str__(self) -> str:
        where = f"in {self.module_path!r}" if self.module_path else "in the root's forward"
        return f"{self.node} ({self.what}) {where}: {self.detail}"


@dataclass(frozen=True)
class FloatIsland:
    """A connected part of the graph that runs in float between integer parts.

    Attributes:
        name: ``island_<k>`` in graph order.
        ops: the ops that made it (:class:`IslandOp`), in graph order.
        nodes: every node of the island (ops, ops on their float values, entry dequantizes).
        entries: paths of the dequantize modules on its quantized -> float edges (inserted
            ``_float_island_dequant_<i>`` or the model's own ``DeQuantStub``).
        exits: paths of the quantize modules on its float -> quantized edges (inserted
            ``_float_island_quant_<i>`` or the model's own ``QuantStub``); empty when its
            values only leave the model.
    """

    name: str
    ops: tuple[IslandOp, ...]
    nodes: tuple[str, ...]
    entries: tuple[str, ...]
    exits: tuple[str, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        """The distinct reason kinds of its ops."""
        return tuple(dict.fromkeys(op.kind for op in self.ops))

    def __str__(self) -> str:
        ops_text = "; ".join(str(op) for op in self.ops)
        return f"{self.name}: {ops_text}"


def float_islands(model: nn.Module) -> list[FloatIsland]:
    """The float islands of a model prepared by ``prepare_qat_fx`` (or converted from one).

    Returns:
        The islands in graph order (empty when the whole quantized region runs on integers).

    Raises:
        TypeError: ``model`` was not prepared by ``prepare_qat_fx``.
    """
    islands = getattr(model, ISLANDS_ATTR, None) if isinstance(model, fx.GraphModule) else None
    if islands is None:
        raise TypeError(
            "Expected `model` to be prepared by prepare_qat_fx (or converted from such a model), "
            f"but got {type(model).__name__} without a float-island record."
        )
    return list(islands)


# --------------------------------------------------------------------------- classification


def describe_target(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """How a user writes the op of ``node`` (``nn.LSTM``, ``F.interpolate``, ``Tensor.sort``)."""
    if node.op == "call_module":
        cls = type(modules[str(node.target)])
        prefix = "nn." if cls.__module__.startswith("torch.nn") else f"{cls.__module__}."
        return f"{prefix}{cls.__name__}"
    if node.op == "call_method":
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.op == "get_attr":
            return f"{type(modules.get(str(first.target))).__name__}.{node.target}"
        return f"Tensor.{node.target}"
    from hq_lightning.quantization.ops.registry import _callable_name

    target = getattr(node.target, "_hq_wrapped", node.target)
    return _callable_name(target)


def _is_torch_callable(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math") or target in vars(builtins).values()


def _spelling_reason(node: fx.Node) -> tuple[str, str] | None:
    for _, spelling in ops.lookup_spelling(node.target):
        why = spelling.why_not(tuple(node.args), dict(node.kwargs))
        if why is not None:
            kind = "runtime_argument" if "computed at run time" in why else "no_integer_form"
            return kind, why
    return None


def _march_reason(spec: ops.OpSpec | None) -> str | None:
    march = get_march()
    if spec is not None and march not in spec.marches:
        return f"no integer form on this march ({march.value}; it has one on {', '.join(sorted(m.value for m in spec.marches))})"
    return None


def _no_form(detail: str = "") -> tuple[str, str]:
    text = f"no integer form on this march ({get_march().value})"
    return "no_integer_form", f"{text}: {detail}" if detail else text


class _Classifier:
    """Decides, for an op fed by a quantized value, whether it runs on integers and why not."""

    def __init__(self, modules: Mapping[str, nn.Module], qconfigs: Mapping[str, Any]) -> None:
        self.modules = modules
        self.qconfigs = qconfigs

    def needs_quantized(self, node: fx.Node) -> bool:
        """Whether ``node`` must get quantized tensor inputs (it requantizes: QAT module, FF op)."""
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if qat_mapping.is_dequant(module) or qat_mapping.is_quant(module):
                return False
            return _is_qat(module)
        if node.op == "call_method":
            module = self._functional_receiver(node)
            return isinstance(module, qat.FloatFunctional)
        return False

    def _functional_receiver(self, node: fx.Node) -> nn.Module | None:
        first = node.args[0] if node.args else None
        if isinstance(first, fx.Node) and first.op == "get_attr":
            return self.modules.get(str(first.target))
        return None

    def classify(self, node: fx.Node) -> tuple[str, str] | str:
        """``"quantized"``, ``"float"`` (a non-tensor or the model's own DeQuantStub) or ``(kind, detail)``."""
        owner = node.meta.get("hq_module_path", "")
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        if node.op == "call_method":
            return self._method(node, owner)
        if node.op == "call_function":
            return self._function(node, owner)
        return "quantized"

    def _module(self, node: fx.Node, module: nn.Module) -> tuple[str, str] | str:
        path = str(node.target)
        if qat_mapping.is_dequant(module):
            return "float"
        if qat_mapping.is_quant(module):
            return "quantized"
        if fx_helper.is_wrapped_module_class(module):
            return "user_float", f"{type(module).__name__} is a module class kept whole with fx_helper.wrap"
        spec = ops.lookup_module(module)
        if _is_qat(module) or qat_mapping.is_scale_preserving(module):
            return self._checked(spec, node, module)
        if self.qconfigs.get(path, _MISSING) is None:
            return "user_float", "its qconfig is None"
        if spec is not None and spec.qat is not None:
            return "user_float", "it has no qconfig"
        if type(module).__module__.startswith(("torch.nn", "torch.ao.nn")):
            return _no_form()
        return "opaque_leaf", f"leaf module {type(module).__name__} that cannot be seen into"

    def _method(self, node: fx.Node, owner: str) -> tuple[str, str] | str:
        target = str(node.target)
        receiver = self._functional_receiver(node)
        if receiver is not None:
            if isinstance(receiver, qat.FloatFunctional):
                spec = ops.lookup_functional(target)
                if spec is None or spec.integer is None:
                    return _no_form(f"FloatFunctional.{target} has no integer form yet")
                reason = _march_reason(spec)
                return ("no_integer_form", reason) if reason else "quantized"
            path = str(node.args[0].target)
            if self.qconfigs.get(path, _MISSING) is None or self.qconfigs.get(owner, _MISSING) is None:
                return "user_float", "its qconfig is None"
            return "user_float", f"{type(receiver).__name__} is not prepared"
        if target in qat_mapping.NON_TENSOR_METHODS:
            return "float"
        spec = ops.lookup_method(target)
        if spec is not None and spec.kind is OpKind.PRESERVE:
            return self._checked(spec, node, None)
        found = _spelling_reason(node)
        if found is not None:
            return found
        return _no_form()

    def _function(self, node: fx.Node, owner: str) -> tuple[str, str] | str:
        target = node.target
        if fx_helper.is_wrapped_callable(target):
            return "user_float", "a function kept whole with fx_helper.wrap"
        if target is builtins.getattr:
            return "float" if len(node.args) > 1 and node.args[1] in qat_mapping.NON_TENSOR_METHODS else "quantized"
        spec = ops.lookup_function(target)
        if spec is not None and spec.kind is OpKind.PRESERVE:
            return self._checked(spec, node, None)
        found = _spelling_reason(node)
        if found is not None:
            return found
        if target in (builtins.len, builtins.isinstance, operator.is_, operator.is_not):
            return "float"
        if not _is_torch_callable(target):
            return "opaque_leaf", "a function kept whole by torch.fx.wrap that cannot be seen into"
        if self.qconfigs.get(owner, _MISSING) is None:
            return "user_float", "the qconfig of its module is None"
        return _no_form()

    def _checked(self, spec: ops.OpSpec | None, node: fx.Node, module: nn.Module | None) -> tuple[str, str] | str:
        reason = _march_reason(spec)
        if reason is not None:
            return "no_integer_form", reason
        if spec is not None and spec.check is not None:
            why = spec.check(node, module)
            if why is not None:
                return _no_form(why)
        return "quantized"


def _is_qat(module: nn.Module) -> bool:
    from hq_lightning.quantization.fx.convert_mapping import is_qat_module

    return type(module).__module__.startswith("hq_lightning.nn.qat") or is_qat_module(module)


# --------------------------------------------------------------------------- the pass


class _Union:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


_Q, _I, _D = "quantized", "island", "dequantized"


class _Pass:
    def __init__(
        self,
        gm: fx.GraphModule,
        qconfigs: Mapping[str, Any],
        global_qconfig: Any,
        originals: Mapping[str, nn.Module],
    ) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.qconfigs = qconfigs
        self.global_qconfig = global_qconfig
        self.originals = originals
        self.classifier = _Classifier(self.modules, qconfigs)
        self.state: dict[fx.Node, str] = {}
        self.union = _Union()
        self.dequant_of: dict[fx.Node, fx.Node] = {}
        self.quant_of: dict[fx.Node, fx.Node] = {}
        self.island_ops: dict[fx.Node, IslandOp] = {}
        self.entries: list[fx.Node] = []
        self.exits: list[tuple[fx.Node, fx.Node]] = []  # (producer, quant node)
        self.user_entries: list[fx.Node] = []
        self.counter = {"dequant": 0, "quant": 0}

    # --- insertion helpers -------------------------------------------------------------
    def _add_module(self, kind: str, module: nn.Module, owner: str) -> str:
        name, i = add_generated_module(self.gm, f"_float_island_{kind}", module, owner, self.counter[kind])
        self.counter[kind] = i + 1
        self.modules[name] = module
        return name

    def _dequant(self, producer: fx.Node, before: fx.Node) -> fx.Node:
        found = self.dequant_of.get(producer)
        if found is not None:
            return found
        owner = producer.meta.get("hq_module_path", "")
        stub = qat.DeQuantStub(self._qconfig_for(owner, None))
        stub.train(self.gm.training)
        name = self._add_module("dequant", stub, owner)
        with self.graph.inserting_before(before):
            node = self.graph.call_module(name, (producer,))
        node.meta["hq_module_path"] = owner
        self.dequant_of[producer] = node
        self.state[node] = _I
        self.entries.append(node)
        return node

    def _qconfig_for(self, owner: str, consumer: nn.Module | None) -> Any:
        for qconfig in (self.qconfigs.get(owner), self.global_qconfig, getattr(consumer, "qconfig", None)):
            if qconfig is not None and getattr(qconfig, "activation", None) is not None:
                return qconfig
        return None

    def _quant(self, producer: fx.Node, consumer: fx.Node) -> fx.Node:
        found = self.quant_of.get(producer)
        if found is not None:
            return found
        owner = producer.meta.get("hq_module_path", "")
        consumer_module = None
        if consumer.op == "call_module":
            consumer_module = self.modules[str(consumer.target)]
        elif consumer.op == "call_method":
            consumer_module = self.classifier._functional_receiver(consumer)
        qconfig = self._qconfig_for(owner, consumer_module)
        if qconfig is None:
            raise RuntimeError(
                f"Expected a qconfig with an activation fake quant for the quantize after the float "
                f"value `{producer.name}` (read by `{consumer.name}`), but the module owning it, the "
                "global qconfig and the reader all have none. Give the model a global qconfig."
            )
        stub = qat.QuantStub(qconfig=qconfig)
        stub.train(self.gm.training)
        name = self._add_module("quant", stub, owner)
        with self.graph.inserting_after(producer):
            node = self.graph.call_module(name, (producer,))
        node.meta["hq_module_path"] = owner
        self.quant_of[producer] = node
        self.state[node] = _Q
        self.exits.append((producer, node))
        return node

    # --- the walk ----------------------------------------------------------------------
    def run(self) -> list[FloatIsland]:
        for node in list(self.graph.nodes):
            if node in self.state or node.op in ("placeholder", "get_attr", "output"):
                continue
            self._visit(node)
        self._float_region_ops_to_float()
        return self._islands()

    def _after_user_dequant(self, node: fx.Node, floating: list[fx.Node]) -> bool:
        """An op without weights reading only the model's own dequantized values: float model."""
        if node.op != "call_module" or not all(self.state[a] == _D for a in floating):
            return False
        spec = ops.lookup_module(self.modules[str(node.target)])
        return spec is not None and spec.kind is OpKind.REQUANTIZE

    def _float_region_ops_to_float(self) -> None:
        """A prepared op without weights outside the quantized region (``torch.tanh`` before the
        QuantStub, ``sigmoid`` after the DeQuantStub) is part of the float model: back to float.
        One feeding a quantized op (a constant operand, maybe through shape ops) belongs to the
        quantized region."""
        for node in self.graph.nodes:
            if node.op != "call_module" or self.state.get(node) not in (None, _D):
                continue
            spec = ops.lookup_module(self.modules.get(str(node.target)))
            if spec is None or spec.kind is not OpKind.REQUANTIZE:
                continue
            if not self._feeds_quantized_op(node):
                self._to_float(node)

    def _feeds_quantized_op(self, node: fx.Node) -> bool:
        """Whether ``node``'s value reaches an op of the quantized region (not a QuantStub) through
        ops outside any region."""
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            state = self.state.get(user)
            if state == _Q:
                if not (user.op == "call_module" and qat_mapping.is_quant(self.modules[str(user.target)])):
                    return True
            elif state is None:
                stack.extend(user.users)
        return False

    def _visit(self, node: fx.Node) -> None:
        inputs = node.all_input_nodes
        quantized = [a for a in inputs if self.state.get(a) == _Q]
        floating = [a for a in inputs if self.state.get(a) in (_I, _D)]
        if node.op == "call_module" and isinstance(self.modules[str(node.target)], qat.QuantStub):
            self.state[node] = _Q
            for a in floating:
                self.union.union(node, a)
                self.exits.append((a, node))
            return
        if not quantized and not floating:
            return
        if not quantized:  # float values of an island only
            if self.classifier.needs_quantized(node) and not self._after_user_dequant(node, floating):
                self._reenter(node, floating)
                self.state[node] = _Q
            elif self._tensor_op(node):
                self._join(node, floating, _D if all(self.state[a] == _D for a in floating) else _I)
                verdict = self.classifier.classify(node) if self.state[node] == _I else None
                if isinstance(verdict, tuple):
                    self._record(node, *verdict)
            return
        verdict = self.classifier.classify(node)
        if verdict == "quantized":
            if floating:
                self._reenter(node, floating)
            self.state[node] = _Q
            return
        if verdict == "float":
            if node.op == "call_module":  # the model's own DeQuantStub
                self.state[node] = _D
                self.union.find(node)
                self.user_entries.append(node)
            return
        kind, detail = verdict
        for producer in quantized:
            dequant = self._dequant(producer, node)
            node.replace_input_with(producer, dequant)
            self.union.union(node, dequant)
        for a in floating:
            self.union.union(node, a)
        self.state[node] = _I
        self._record(node, kind, detail)

    def _record(self, node: fx.Node, kind: str, detail: str) -> None:
        self.island_ops[node] = IslandOp(
            node.name, describe_target(node, self.modules), node.meta.get("hq_module_path", ""), kind, detail
        )
        self._to_float(node)

    def _tensor_op(self, node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in qat_mapping.NON_TENSOR_METHODS:
            return False
        if node.op == "call_function" and node.target is builtins.getattr:
            return len(node.args) < 2 or node.args[1] not in qat_mapping.NON_TENSOR_METHODS
        return True

    def _join(self, node: fx.Node, floating: list[fx.Node], state: str) -> None:
        self.state[node] = state
        for a in floating:
            self.union.union(node, a)

    def _reenter(self, node: fx.Node, floating: list[fx.Node]) -> None:
        for producer in floating:
            quant = self._quant(producer, node)
            node.replace_input_with(producer, quant)
            self.union.union(quant, producer)

    def _to_float(self, node: fx.Node) -> None:
        """An island op that was prepared goes back to its float form (no fake quant of its own)."""
        if node.op == "call_module":
            path = str(node.target)
        elif node.op == "call_method" and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            path = str(node.args[0].target)
        else:
            return
        original = self.originals.get(path)
        module = self.modules.get(path)
        if original is None or module is None or original is module:
            return
        parent, _, name = path.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, original)
        self.modules[path] = original

    # --- grouping ----------------------------------------------------------------------
    def _islands(self) -> list[FloatIsland]:
        members: dict[fx.Node, list[fx.Node]] = {}
        for node in self.graph.nodes:
            if node in self.union.parent:
                members.setdefault(self.union.find(node), []).append(node)
        exits_by_root: dict[fx.Node, list[fx.Node]] = {}
        for producer, quant in self.exits:
            exits_by_root.setdefault(self.union.find(producer), []).append(quant)
        islands: list[FloatIsland] = []
        for root, nodes in members.items():
            exits = list(dict.fromkeys(exits_by_root.get(root, [])))
            float_nodes = [n for n in nodes if n not in exits]
            island_ops = [self.island_ops[n] for n in float_nodes if n in self.island_ops]
            entries = [n for n in float_nodes if n in self.entries or n in self.user_entries]
            if not island_ops:
                # the model's own DeQuantStub: an island only when float ops sit before a QuantStub
                computing = [n for n in float_nodes if n not in self.user_entries]
                if not exits or not computing:
                    continue
                island_ops = [
                    IslandOp(n.name, describe_target(n, self.modules), n.meta.get("hq_module_path", ""),
                             "user_stubs", REASONS["user_stubs"])
                    for n in computing if n.op in ("call_module", "call_function", "call_method")
                ]  # fmt: skip
                if not island_ops:
                    continue
            name = f"island_{len(islands)}"
            for n in float_nodes:
                n.meta[META_KEY] = name
            islands.append(
                FloatIsland(
                    name,
                    tuple(island_ops),
                    tuple(n.name for n in float_nodes),
                    tuple(str(n.target) for n in entries),
                    tuple(str(n.target) for n in exits),
                )
            )
        return islands


def insert_float_islands(
    gm: fx.GraphModule,
    qconfigs: Mapping[str, Any],
    global_qconfig: Any = None,
    originals: Mapping[str, nn.Module] | None = None,
) -> list[FloatIsland]:
    """Find the float islands of a prepared graph, insert their dequantize / quantize stubs.

    Args:
        gm: the prepared GraphModule (modified in place; recompiled).
        qconfigs: resolved qconfig per module path (``None``: kept float).
        global_qconfig: the qconfig of ``""`` in the qconfig dict (for the re-entry stubs).
        originals: float module per path of every module prepare swapped (island ops go back
            to them).

    Returns:
        The islands, also stored on ``gm`` (:data:`ISLANDS_ATTR`).
    """
    islands = _Pass(gm, qconfigs, global_qconfig, originals or {}).run()
    gm.__dict__[ISLANDS_ATTR] = tuple(islands)
    gm.graph.lint()
    gm.recompile()
    return islands


def island_summary(islands: list[FloatIsland], header: str) -> str:
    """A readable list of islands (for warnings)."""
    lines = [header]
    for island in islands:
        lines.append(f"  - {island.name}:")
        lines += [f"      {op}" for op in island.ops]
    return "\n".join(lines)


#: What makes each kind of island go away (or run), as the strict mode's error offers it.
REMEDIES = {
    "no_integer_form": (
        "let it run as a float island (prepare_qat_fx(..., allow_float_islands=True), the "
        "default); or move it out of the quantized region (before the QuantStub, or after a "
        "DeQuantStub that ends the integer part); or give it an integer form "
        "(hq_lightning.quantization.ops.register_op, see docs/operators.md)"
    ),
    "runtime_argument": (
        "pass that argument as a constant (e.g. F.adaptive_avg_pool2d(x, 1) instead of a kernel "
        "size taken from x.shape; a `size` taken from a tensor's shape is kept), or let it run "
        "as a float island (allow_float_islands=True)"
    ),
    "opaque_leaf": (
        "let it run as a float island (allow_float_islands=True); or move it out of the "
        "quantized region; or, for a module, register its type with an integer form "
        "(hq_lightning.quantization.ops.register_op)"
    ),
    "user_float": (
        "quantize it (drop the None qconfig / the fx_helper.wrap) if it has an integer form, or "
        "let it run as a float island (allow_float_islands=True)"
    ),
    "user_stubs": (
        "drop that DeQuantStub / QuantStub pair so the ops between run on integers, or let them "
        "run as a float island (allow_float_islands=True)"
    ),
}


def strict_error_message(islands: list[FloatIsland]) -> str:
    """The message of the error ``allow_float_islands=False`` raises: what, why, and what to do."""
    island_ops = [op for island in islands for op in island.ops]
    names = ", ".join(f"{op.what} ({op.node})" for op in island_ops)
    lines = [
        "Expected every operation between QuantStub and DeQuantStub to run on integers "
        f"(allow_float_islands=False), but {len(island_ops)} cannot: {names}"
    ]
    for op in island_ops:
        lines.append(f"  - {op}")
        lines.append(f"    why: {REASONS[op.kind]}. Remedy: {REMEDIES[op.kind]}.")
    return "\n".join(lines)
