"""The FX tracer of hq_lightning: ``QuantizationTracer`` and ``symbolic_trace``.

What it adds to ``torch.fx.Tracer``:

- Leaves (recorded as one ``call_module``, never traced into): torch.nn modules except
  ``Sequential``, every module class of ``hq_lightning.nn`` (FloatFunctional, nn.intrinsic,
  nn.qat, nn.quantized), our and torch's ``QuantStub``/``DeQuantStub``, torch's
  ``FloatFunctional``, classes decorated with :func:`hq_lightning.utils.fx_helper.wrap`, module
  types named in the fusion table (``register_fusion_pattern``) and module types with an
  operator-registry entry (``hq_lightning.quantization.ops.register_op``).
- ``wrap``: functions (string or decorator form) and methods become one ``call_function``; a
  wrapped method's ``self`` is ``get_attr("_hq_root")`` for the root, or ``get_attr(<path>)``.
- FloatFunctional methods (ours, and torch's, recognised by class name) become
  ``call_method(<op>, (get_attr(<path>), *args), kwargs)``.
- ``node.meta["hq_module_path"]``: the path of the module whose ``forward`` produced the node
  (``""`` for the root). A module carrying ``_hq_owner_path`` (the modules the graph passes
  generate) reports that path instead, so it survives re-tracing a flat GraphModule.
- Untraceable code raises :class:`UntraceableError` naming the user's file, line and code, and
  showing how to ``wrap`` it.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(1, 1, 1)
    ...     def forward(self, x):
    ...         return self.conv(x) + x
    >>> gm = symbolic_trace(Net())
    >>> [(n.op, str(n.target)) for n in gm.graph.nodes]
    [('placeholder', 'x'), ('call_module', 'conv'), ('call_function', '<built-in function add>'), ('output', 'output')]
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from hq_lightning.quantization.fx.graph_module import (
    ROOT_ATTR,
    QuantGraphModule,
    build_graph_module,
)
from hq_lightning.quantization.stubs import is_dequant_stub, is_quant_stub
from hq_lightning.utils import fx_helper

__all__ = [
    "QuantizationTracer",
    "UntraceableError",
    "symbolic_trace",
    "is_float_functional",
    "TORCH_FLOAT_FUNCTIONAL_METHODS",
]

#: Methods of torch's FloatFunctional recorded as call_method while tracing.
TORCH_FLOAT_FUNCTIONAL_METHODS = (
    "add",
    "add_scalar",
    "mul",
    "mul_scalar",
    "cat",
    "add_relu",
    "matmul",
)
_TORCH_FF_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized")


def is_float_functional(module: object) -> bool:
    """True for hq_lightning's FloatFunctional (or subclasses) and torch's FloatFunctional."""
    from hq_lightning.nn.quantized.float_functional import FloatFunctional

    return isinstance(module, FloatFunctional) or _is_torch_float_functional(module)


def _in_fusion_table(module: nn.Module) -> bool:
    # A user's own conv/BN/activation type registered for fusion must stay one call_module.
    from hq_lightning.quantization.fx.patterns import FUSION_PATTERNS

    cls = type(module)
    return any(cls in key for key in FUSION_PATTERNS)


def _in_op_registry(module: nn.Module) -> bool:
    # A module type with an operator-registry entry is one op: prepare and convert replace it whole.
    from hq_lightning.quantization import ops

    return ops.lookup_module(module) is not None


def _is_torch_float_functional(module: object) -> bool:
    cls = type(module)
    return cls.__name__ == "FloatFunctional" and cls.__module__.startswith(_TORCH_FF_MODULES)


class UntraceableError(RuntimeError):
    """The model contains code symbolic tracing cannot follow (see the message for the line)."""


class _Patches:
    """Set attributes for the duration of a trace and put the originals back afterwards."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set_item(self, mapping: dict[str, Any], key: str, value: Any) -> None:
        old = mapping[key]
        mapping[key] = value
        self._undo.append(lambda: mapping.__setitem__(key, old))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old) if had else delattr(obj, name))

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


class QuantizationTracer(fx.Tracer):
    """``torch.fx.Tracer`` with hq_lightning's leaves, ``wrap`` and FloatFunctional recording."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._path_stack: list[str] = [""]

    # --- leaves and module paths ------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if fx_helper.is_wrapped_module_class(m) or is_quant_stub(m) or is_dequant_stub(m):
            return True
        if is_float_functional(m) or _in_fusion_table(m) or _in_op_registry(m):
            return True
        module_name = type(m).__module__
        if module_name.startswith("hq_lightning.nn"):
            return True
        if module_name.startswith(("torch.nn", "torch.ao.nn")):
            return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        return False

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            owner = getattr(m, "_hq_owner_path", None)
            self._path_stack.append(self._path_stack[-1] if owner is None else owner)
        else:
            self._path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path_stack.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # noqa: ANN001
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta.setdefault("hq_module_path", self._path_stack[-1])
        return node

    def _path_or_raise(self, module: nn.Module, what: str) -> str:
        try:
            return self.path_of_module(module)
        except NameError:
            raise UntraceableError(
                f"Expected the module whose {what} is called during tracing to be a submodule of "
                f"the traced model, but got a {type(module).__name__} that is not registered in "
                "it. Assign it as an attribute of the model (e.g. in __init__) before tracing."
            ) from None

    # --- records used by wrap / FloatFunctional ---------------------------------------------
    def record_method_call(
        self, module: nn.Module, method: str, args: tuple, kwargs: dict
    ) -> fx.Proxy:
        """Record ``module.method(*args, **kwargs)`` as ``call_method`` on ``get_attr``."""
        path = self._path_or_raise(module, f"method `{method}`")
        owner = getattr(module, "_hq_owner_path", None)
        self._path_stack.append(self._path_stack[-1] if owner is None else owner)
        try:
            receiver = self.create_proxy("get_attr", path, (), {})
            return self.create_proxy("call_method", method, (receiver, *args), kwargs)
        finally:
            self._path_stack.pop()

    def record_wrapped_call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> fx.Proxy:
        """Record a call of a ``wrap``-decorated function or method as one ``call_function``."""
        receiver = args[0] if args else None
        if isinstance(receiver, nn.Module) and getattr(type(receiver), fn.__name__, None) is fn:
            if receiver is self.root:
                target = ROOT_ATTR
            else:
                target = self._path_or_raise(receiver, f"wrapped method `{fn.__name__}`")
            receiver_proxy = self.create_proxy("get_attr", target, (), {})
            return self.create_proxy("call_function", fn, (receiver_proxy, *args[1:]), kwargs)
        return self.create_proxy("call_function", fn, args, kwargs)

    # --- trace -------------------------------------------------------------------------------
    def trace(self, root: nn.Module | Callable[..., Any], concrete_args: dict | None = None):
        patches = _Patches()
        try:
            if isinstance(root, nn.Module):
                self._patch_torch_float_functionals(root, patches)
                forward_globals = type(root).forward.__globals__
            else:
                forward_globals = getattr(root, "__globals__", {})
            self._patch_wrapped_globals(forward_globals, patches)
            with fx_helper.tracing_context(self):
                return super().trace(root, concrete_args)
        finally:
            patches.restore()

    def _patch_wrapped_globals(self, forward_globals: dict[str, Any], patches: _Patches) -> None:
        originals: dict[int, Any] = {}
        for frame_globals, name in fx_helper.wrapped_globals():
            fn = frame_globals.get(name)
            if fn is None or fn_is_patched(fn):
                continue
            originals[id(fn)] = fn
            patches.set_item(frame_globals, name, self._recording_function(fn))
        # Re-tracing a GraphModule: its code holds the original functions in its own globals.
        for key, value in list(forward_globals.items()):
            if id(value) in originals and originals[id(value)] is value:
                patches.set_item(forward_globals, key, self._recording_function(value))

    def _recording_function(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recording(*args: Any, **kwargs: Any) -> Any:
            if fx_helper.has_proxy(args, kwargs):
                return self.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)

        recording._hq_patched = True  # type: ignore[attr-defined]
        return recording

    def _patch_torch_float_functionals(self, root: nn.Module, patches: _Patches) -> None:
        classes = {type(m) for m in root.modules() if _is_torch_float_functional(m)}
        for cls in classes:
            for method in TORCH_FLOAT_FUNCTIONAL_METHODS:
                original = cls.__dict__.get(method)
                if original is not None:
                    patches.set_attr(cls, method, _recording_method(method, original))


def fn_is_patched(fn: Any) -> bool:
    return getattr(fn, "_hq_patched", False)


def _recording_method(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def recording(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        proxy = fx_helper.record_module_method_call(self, method, args, kwargs)
        if proxy is not None:
            return proxy
        return original(self, *args, **kwargs)

    return recording


# --- readable errors for untraceable code -----------------------------------------------------
def _library_dirs() -> tuple[str, ...]:
    import hq_lightning

    dirs = [os.path.dirname(torch.__file__), os.path.dirname(hq_lightning.__file__)]
    try:
        import numpy

        dirs.append(os.path.dirname(numpy.__file__))
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return tuple(os.path.join(d, "") for d in dirs)


def _is_user_frame(frame: traceback.FrameSummary, library_dirs: tuple[str, ...]) -> bool:
    filename = frame.filename
    if filename.startswith("<") or filename.startswith(library_dirs):
        return False
    stdlib = os.path.join(sysconfig.get_paths()["stdlib"], "")
    in_site = "site-packages" in filename or "dist-packages" in filename
    return in_site or not filename.startswith(stdlib)


def _untraceable_message(model: nn.Module, error: BaseException) -> str:
    library_dirs = _library_dirs()
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if _is_user_frame(f, library_dirs)
    ]
    where = "  (no line of your code was found in the traceback)"
    if frames:
        f = frames[-1]
        where = f"  {f.filename}:{f.lineno}, in {f.name}\n    {(f.line or '').strip()}"
    return (
        f"Cannot symbolically trace `{type(model).__name__}`: {type(error).__name__}: {error}\n"
        f"{where}\n"
        "torch.fx records tensor operations without running them, so Python control flow on "
        "tensor values, numpy calls and loops over tensors cannot be traced. Move that code into "
        "a function or method and keep it out of the trace with "
        "`hq_lightning.utils.fx_helper.wrap`:\n"
        "    from hq_lightning.utils.fx_helper import wrap\n\n"
        "    class MyModel(nn.Module):\n"
        "        @wrap()  # the call becomes one graph node; modules it calls are still quantized\n"
        "        def _post_process(self, x):\n"
        "            ...\n"
        '(or `@wrap()` on a function, `wrap("function_name")` at module top level, `@wrap()` on '
        "an nn.Module class to make its instances leaves)."
    )


def symbolic_trace(
    model: nn.Module, concrete_args: dict[str, Any] | None = None
) -> QuantGraphModule:
    """Trace ``model`` into a :class:`QuantGraphModule` that keeps every child module.

    Args:
        model: the float model (not modified).
        concrete_args: inputs to specialise on, as in ``torch.fx.symbolic_trace``.

    Raises:
        UntraceableError: the model has code FX cannot trace; the message names the line.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
    tracer = QuantizationTracer()
    try:
        graph = tracer.trace(model, concrete_args)
    except UntraceableError:
        raise
    except Exception as error:
        raise UntraceableError(_untraceable_message(model, error)) from error
    return build_graph_module(model, graph)
