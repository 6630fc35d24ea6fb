"""``QuantGraphModule``: the GraphModule every hq_lightning graph pass returns.

Unlike a plain ``torch.fx.GraphModule`` it keeps EVERY child module of the root (also those the
graph never calls, e.g. modules used only inside a wrapped method), the root's parameters and
buffers, and the plain attributes a wrapped method may read. It prints like the plugin: the module
tree under the root's class name, then the generated code.

Wrapped methods of the root (``@wrap()`` on ``RetinaNet._post_process``) are recorded as
``call_function(<wrapped function>, (get_attr("_hq_root"), *args))``: ``_hq_root`` is a property
returning the module itself. For such graphs the module's class also derives from the root's class
(a dynamic ``(QuantGraphModule, RootClass)`` subclass), so helper methods and properties of the
root resolve inside the wrapped method. ``deepcopy`` works in both cases.

To keep a prepared or converted model, save its ``state_dict()`` and load it with
``torch.load(path, weights_only=True)`` into the same structure, rebuilt by running the same
passes on the float model (``prepare_qat_fx``, then ``convert_fx``): a state dict holds only
tensors and plain values, which the weights-only loader reads with no allow-list to extend. Do not
unpickle whole modules: unpickling a GraphModule re-executes its generated code, so a crafted file
runs code of its author's choosing. To deploy, export with :mod:`hq_lightning.deploy`.

Build one with :func:`build_graph_module` (passes that make a new graph from an old module use
it too, so the class and the kept children carry over).

Example:
    >>> import torch
    >>> from hq_lightning.quantization.fx.tracer import symbolic_trace
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.used = torch.nn.ReLU()
    ...         self.unused = torch.nn.Tanh()
    ...     def forward(self, x):
    ...         return self.used(x)
    >>> gm = symbolic_trace(Net())
    >>> [name for name, _ in gm.named_children()]
    ['used', 'unused']
"""

from __future__ import annotations

import functools
import importlib
import types
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import _get_qualified_name

__all__ = ["QuantGraphModule", "add_generated_module", "build_graph_module", "free_child_name", "ROOT_ATTR"]

#: The get_attr target a wrapped root method receives as ``self``.
ROOT_ATTR = "_hq_root"

# Attributes of a plain nn.Module; never copied as "plain attributes" of the root.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward"}
# Attributes that describe the graph, rebuilt rather than copied when re-creating a module,
# and derived state (the VALIDATION integer model) that a new module derives again.
_GRAPH_KEYS = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", "_hq_integer_model"})


class _ModuleInitShim(nn.Module):
    """Sits between GraphModule and the root's class in the MRO of a dynamic graph module.

    ``GraphModule.__init__`` calls ``super().__init__()``; without the shim that would be the
    root class's ``__init__`` (which wants its own arguments). The shim goes to nn.Module's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)


class _BodyModule(nn.Module):
    """An nn.Module whose ``__dict__`` is a saved module body (used to rebuild a graph module)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__ = body


class QuantGraphModule(fx.GraphModule):
    """A GraphModule that keeps every child, parameter, buffer and plain attribute of ``root``.

    Args:
        root: the module the graph was traced from (or a saved module body).
        graph: the graph.
        class_name: name shown when printing; default: the root's class name.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, class_name: str | None = None) -> None:
        if class_name is None:
            class_name = root.__dict__.get("_hq_class_name") or type(root).__name__
        super().__init__({}, fx.Graph(), class_name)
        own_keys = set(self.__dict__)
        self.training = root.training
        for name, child in root._modules.items():
            self._modules[name] = child
        for name, param in root._parameters.items():
            self._parameters[name] = param
        for name, buf in root._buffers.items():
            self._buffers[name] = buf
        self._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
        for key, value in root.__dict__.items():
            if key in _MODULE_INTERNALS or key in _GRAPH_KEYS or key in own_keys:
                continue
            self.__dict__[key] = value
        if "meta" in root.__dict__ and isinstance(root.__dict__["meta"], dict):
            self.meta = root.__dict__["meta"]
        self._hq_class_name = class_name
        _check_targets(self, graph)
        self.graph = graph
        tracer_cls = graph._tracer_cls
        if tracer_cls is not None and "<locals>" not in tracer_cls.__qualname__:
            self._tracer_cls = tracer_cls

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, ROOT_ATTR]

    @property
    def _hq_root(self) -> QuantGraphModule:
        """The module itself: the ``self`` a wrapped root method is called with."""
        return self

    @_hq_root.setter
    def _hq_root(self, value: Any) -> None:
        # torch's _copy_attr may assign it when a plain GraphModule is built from this one.
        pass

    def recompile(self):
        # The generated forward is wrapped so that a prepared model wholly in VALIDATION runs its
        # integer model (quantization/fx/integer_validation.py); any other model, state or a
        # tracer gets the generated code. Hooks of the module still run around it.
        code = super().recompile()
        cls = type(self)
        generated = cls.__dict__.get("forward")
        if generated is not None and not hasattr(generated, "_hq_generated"):
            from hq_lightning.quantization.fake_quantize import FakeQuantize

            has_fake_quant = any(isinstance(m, FakeQuantize) for m in self.modules())
            cls.forward = _validating_forward(generated, has_fake_quant)
        return code

    def __str__(self) -> str:
        # Like the plugin: the module tree, then the generated code (no debug reminder line).
        return f"{nn.Module.__repr__(self)}\n{self._code}"

    def _deepcopy_init(self):
        # torch's __deepcopy__ rebuilds through this hook; ours keeps every child and attribute.
        return QuantGraphModule.__init__

    def __copy__(self) -> QuantGraphModule:
        # Shallow copy (shares submodules and the graph), keeping our class and every child.
        res = build_graph_module(self, self.graph)
        res.meta = getattr(self, "meta", {})
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        body = {k: v for k, v in self.__dict__.items() if k not in _GRAPH_KEYS}
        return (
            _rebuild_graph_module,
            (self.__dict__.get("_hq_root_class"), body, _graph_to_state(self.graph)),
        )


def _validation_forward(model, generated, args, kwargs):
    from hq_lightning.quantization.fx.integer_validation import validation_forward

    return validation_forward(model, generated, args, kwargs)


def _compiled_validation(model, args, kwargs):
    from hq_lightning.quantization.fx.integer_validation import compiled_validation_output

    return compiled_validation_output(model, args, kwargs)


def _dynamo_compiling() -> bool:
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


# Globals of the template (names resolved in the generated code's namespace, see below):
# _hq_generated_forward, _hq_validation_forward, _hq_compiled_validation, _hq_dynamo_compiling,
# _hq_has_fake_quant (the module had FakeQuantize children when its code was generated).
def _forward_template(self, *args, **kwargs):
    if self.training:  # QAT and training-mode calibration: the generated code, no overhead
        return _hq_generated_forward(self, *args, **kwargs)  # noqa: F821 - a global of the code
    if _hq_has_fake_quant and _hq_dynamo_compiling():  # noqa: F821
        # torch.compile: the VALIDATION check and the integer model run eagerly (a graph break);
        # any other state continues in the compiled generated code
        out = _hq_compiled_validation(self, args, kwargs)  # noqa: F821
        if out is not None:
            return out
        return _hq_generated_forward(self, *args, **kwargs)  # noqa: F821
    return _hq_validation_forward(self, _hq_generated_forward, args, kwargs)  # noqa: F821


def _validating_forward(generated, has_fake_quant: bool):
    # The wrapper runs in the generated code's own globals (a private copy per compiled forward),
    # so a tracer that patches `wrap`ped functions in the forward's globals still reaches them.
    namespace = generated.__globals__
    namespace["_hq_generated_forward"] = generated
    namespace["_hq_validation_forward"] = _validation_forward
    namespace["_hq_compiled_validation"] = _compiled_validation
    namespace["_hq_dynamo_compiling"] = _dynamo_compiling
    namespace["_hq_has_fake_quant"] = has_fake_quant
    forward = types.FunctionType(_forward_template.__code__, namespace, "forward")
    functools.update_wrapper(forward, generated)
    forward._hq_generated = generated
    return forward


_DYNAMIC_CLASSES: dict[type, type] = {}


def _graph_module_class(root_class: type | None) -> type[QuantGraphModule]:
    if root_class is None:
        return QuantGraphModule
    cls = _DYNAMIC_CLASSES.get(root_class)
    if cls is None:
        cls = type(
            f"{root_class.__name__}GraphModule",
            (QuantGraphModule, _ModuleInitShim, root_class),
            {"__module__": __name__},
        )
        _DYNAMIC_CLASSES[root_class] = cls
    return cls


def graph_calls_root_method(graph: fx.Graph) -> bool:
    """True when ``graph`` calls a wrapped method of the root (``get_attr("_hq_root")``)."""
    return any(n.op == "get_attr" and n.target == ROOT_ATTR for n in graph.nodes)


def free_child_name(module: nn.Module, prefix: str, start: int = 0) -> tuple[str, int]:
    """The first ``f"{prefix}_{i}"`` with ``i >= start`` that ``module`` has no attribute of, and ``i``."""
    i = start
    while hasattr(module, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}", i


def add_generated_module(
    graph_module: nn.Module, prefix: str, child: nn.Module, owner_path: str, start: int = 0
) -> tuple[str, int]:
    """Add ``child`` under the first free ``<prefix>_<i>`` (``i >= start``) and record the path of
    the module whose forward it stands in (``_hq_owner_path``, which decides its qconfig and survives
    re-tracing). Returns the name and ``i``.

    Example:
        >>> gm = torch.nn.Module()
        >>> add_generated_module(gm, "_generated_add", torch.nn.Identity(), "block")
        ('_generated_add_0', 0)
        >>> add_generated_module(gm, "_generated_add", torch.nn.Identity(), "block")[0], gm._generated_add_0._hq_owner_path
        ('_generated_add_1', 'block')
    """
    name, i = free_child_name(graph_module, prefix, start)
    child._hq_owner_path = owner_path
    graph_module.add_module(name, child)
    return name, i


def build_graph_module(
    root: nn.Module, graph: fx.Graph, class_name: str | None = None
) -> QuantGraphModule:
    """Make a :class:`QuantGraphModule` of ``graph`` keeping everything of ``root``.

    When the graph calls a wrapped method of the root, the result's class also derives from the
    root's original class (also when ``root`` is itself such a graph module).
    """
    root_class = root.__dict__.get("_hq_root_class")
    if root_class is None and not isinstance(root, fx.GraphModule):
        root_class = type(root)
    needs_class = graph_calls_root_method(graph)
    cls = _graph_module_class(root_class if needs_class else None)
    gm = cls(root, graph, class_name)
    if needs_class:
        gm._hq_root_class = root_class
    else:
        gm.__dict__.pop("_hq_root_class", None)
    return gm


def _check_targets(module: nn.Module, graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target == ROOT_ATTR:
            continue
        obj: Any = module
        for atom in str(node.target).split("."):
            if not hasattr(obj, atom):
                raise RuntimeError(
                    f"Expected the graph's {node.op} target `{node.target}` to exist in the "
                    f"module, but `{atom}` is missing. Add it to the module before building."
                )
            obj = getattr(obj, atom)


class _NodeRef:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self):
        return (_NodeRef, (self.name,))


def _encode(arg: Any) -> Any:
    if isinstance(arg, fx.Node):
        return _NodeRef(arg.name)
    if isinstance(arg, tuple):
        return tuple(_encode(a) for a in arg)
    if isinstance(arg, list):
        return [_encode(a) for a in arg]
    if isinstance(arg, dict):
        return {k: _encode(v) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_encode(arg.start), _encode(arg.stop), _encode(arg.step))
    return arg


def _decode(arg: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(arg, _NodeRef):
        return env[arg.name]
    if isinstance(arg, tuple):
        return tuple(_decode(a, env) for a in arg)
    if isinstance(arg, list):
        return [_decode(a, env) for a in arg]
    if isinstance(arg, dict):
        return {k: _decode(v, env) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_decode(arg.start, env), _decode(arg.stop, env), _decode(arg.step, env))
    return arg


class _GlobalRef:
    """A callable pickled by its dotted path (F.max_pool2d has a local qualname; torch.ops
    overloads cannot be pickled at all)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_GlobalRef, (self.path,))

    def resolve(self) -> Any:
        parts = self.path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for atom in parts[i:]:
                obj = getattr(obj, atom)
            return obj
        raise ImportError(f"Expected `{self.path}` to be importable, but it is not.")


def _encode_target(target: Any) -> Any:
    if isinstance(target, str):
        return target
    try:
        ref = _GlobalRef(_get_qualified_name(target))
        if ref.resolve() is target:
            return ref
    except Exception:  # noqa: BLE001 - anything unresolvable is pickled as the object itself
        pass
    return target


_PLAIN_META = (str, int, float, bool, type(None))


def _graph_to_state(graph: fx.Graph) -> dict[str, Any]:
    """A picklable description of ``graph``: nodes with targets by reference, args by name."""
    nodes = []
    for node in graph.nodes:
        meta = {k: v for k, v in node.meta.items() if isinstance(v, _PLAIN_META)}
        nodes.append(
            (
                node.op,
                node.name,
                _encode_target(node.target),
                _encode(node.args),
                _encode(node.kwargs),
                meta,
            )
        )
    return {"nodes": nodes, "tracer_cls": graph._tracer_cls}


def _graph_from_state(state: dict[str, Any]) -> fx.Graph:
    graph = fx.Graph(tracer_cls=state.get("tracer_cls"))
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, meta in state["nodes"]:
        if isinstance(target, _GlobalRef):
            target = target.resolve()
        node = graph.create_node(op, target, _decode(args, env), _decode(kwargs, env), name=name)
        node.meta.update(meta)
        env[name] = node
    return graph


def _rebuild_graph_module(
    root_class: type | None, body: dict[str, Any], graph_state: dict[str, Any]
) -> QuantGraphModule:
    graph = _graph_from_state(graph_state)
    cls = _graph_module_class(root_class if graph_calls_root_method(graph) else None)
    return cls(_BodyModule(body), graph)
