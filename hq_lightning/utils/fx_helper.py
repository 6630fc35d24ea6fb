"""``wrap``: keep a function, a method or a module class out of the FX trace.

FX records a wrapped callable as ONE node instead of tracing through it. That is the way out for
code symbolic tracing cannot follow (data-dependent ``if``, numpy, loops over tensors) and for
pre/post-processing that should not be quantized. Modules called inside a wrapped method remain
submodules of the traced model, so ``prepare_qat_fx`` / ``convert_fx`` still swap them.

Four forms::

    wrap("my_function")          # at module top level, like torch.fx.wrap: the global
                                 # ``my_function`` of the calling module becomes one node

    @wrap()                      # (or bare @wrap) on a function
    def decode(boxes, scores): ...

    class Net(nn.Module):
        @wrap()                  # on a method: ``self._post_process(...)`` becomes one node
        def _post_process(self, data, feat): ...

    @wrap()                      # on an nn.Module subclass: its instances are leaves
    class Head(nn.Module): ...

Example:
    >>> import torch
    >>> from hq_lightning.quantization.fx.tracer import symbolic_trace
    >>> @wrap()
    ... def clip_positive(x):
    ...     return x if bool((x > 0).all()) else x.clamp(min=0)
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return clip_positive(x) * 2
    >>> [n.op for n in symbolic_trace(Net()).graph.nodes][:2]
    ['placeholder', 'call_function']

This module also holds the small piece of tracing state the wrapped callables and
``FloatFunctional`` consult (``current_tracer``), so they need not import the tracer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn
from torch.fx import Proxy
from torch.fx.node import map_aggregate

__all__ = [
    "wrap",
    "current_tracer",
    "has_proxy",
    "is_wrapped_callable",
    "is_wrapped_module_class",
    "record_module_method_call",
]

_T = TypeVar("_T")

# (id(globals dict), name) -> globals dict, registered by the string form.
_WRAPPED_GLOBALS: dict[tuple[int, str], dict[str, Any]] = {}
# Module classes whose instances are trace leaves.
_LEAF_CLASSES: list[type[nn.Module]] = []
# The tracers currently tracing (innermost last).
_TRACER_STACK: list[Any] = []


def current_tracer() -> Any | None:
    """The hq_lightning tracer currently tracing, or ``None`` outside tracing."""
    return _TRACER_STACK[-1] if _TRACER_STACK else None


@contextmanager
def tracing_context(tracer: Any) -> Iterator[None]:
    """Make ``tracer`` the one that wrapped callables and FloatFunctional record into."""
    _TRACER_STACK.append(tracer)
    try:
        yield
    finally:
        _TRACER_STACK.pop()


def has_proxy(args: Any, kwargs: Any = None) -> bool:
    """True when a ``torch.fx.Proxy`` appears anywhere in ``args`` / ``kwargs``."""
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        if isinstance(a, Proxy):
            found = True
        return a

    map_aggregate((args, kwargs or {}), visit)
    return found


def record_module_method_call(
    module: nn.Module, method: str, args: tuple, kwargs: dict | None = None
) -> Proxy | None:
    """Record ``module.<method>(*args, **kwargs)`` as one graph node while tracing.

    The node is ``call_method(method, (get_attr(<module path>), *args), kwargs)``: the shape the
    graph passes expect for ``FloatFunctional`` calls. Returns ``None`` when not tracing or when no
    argument is a ``Proxy`` (then the caller computes eagerly).
    """
    tracer = current_tracer()
    if tracer is None or not has_proxy(args, kwargs):
        return None
    return tracer.record_method_call(module, method, args, kwargs or {})


def _make_callable_wrapper(fn: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracer = current_tracer()
        if tracer is None or not has_proxy(args, kwargs):
            return fn(*args, **kwargs)
        return tracer.record_wrapped_call(wrapper, args, kwargs)

    wrapper._hq_wrapped = fn  # type: ignore[attr-defined]
    return wrapper


def is_wrapped_callable(obj: Any) -> bool:
    """True for a function (or method) decorated with :func:`wrap`."""
    return callable(obj) and hasattr(obj, "_hq_wrapped")


def is_wrapped_module_class(module: nn.Module) -> bool:
    """True when ``module`` is an instance of a class decorated with :func:`wrap`."""
    return isinstance(module, tuple(_LEAF_CLASSES))


def wrapped_globals() -> list[tuple[dict[str, Any], str]]:
    """The ``(globals, name)`` pairs registered with the string form of :func:`wrap`."""
    return [(g, name) for (_, name), g in _WRAPPED_GLOBALS.items()]


def wrap(fn_or_name: Any = None) -> Any:
    """Keep a function, method or module class out of the FX trace (recorded as one node).

    Args:
        fn_or_name: a global function's name (call ``wrap("name")`` at module top level), a
            function or method (``@wrap`` / ``@wrap()``), or an ``nn.Module`` subclass.

    Returns:
        The name (string form), the wrapping function, the class, or a decorator (``wrap()``).

    Raises:
        TypeError: for anything else.
        RuntimeError: when the string form is not called at a module's top level.
    """
    if fn_or_name is None:
        return wrap
    if isinstance(fn_or_name, str):
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None or caller.f_code.co_name != "<module>":
            raise RuntimeError(
                f"Expected `wrap({fn_or_name!r})` to be called at the top level of a module, "
                "but it was called inside a function. Call it right after the imports, or "
                "decorate the function with `@wrap()` instead."
            )
        _WRAPPED_GLOBALS[(id(caller.f_globals), fn_or_name)] = caller.f_globals
        return fn_or_name
    if isinstance(fn_or_name, type):
        if not issubclass(fn_or_name, nn.Module):
            raise TypeError(
                f"Expected `wrap` to get an nn.Module subclass, a function or a name, but got "
                f"the class {fn_or_name.__qualname__}."
            )
        if fn_or_name not in _LEAF_CLASSES:
            _LEAF_CLASSES.append(fn_or_name)
        return fn_or_name
    if callable(fn_or_name):
        if is_wrapped_callable(fn_or_name):
            return fn_or_name
        return _make_callable_wrapper(fn_or_name)
    raise TypeError(
        "Expected `wrap` to get a function, a method, an nn.Module subclass or a global "
        f"function's name, but got {type(fn_or_name).__name__}."
    )
