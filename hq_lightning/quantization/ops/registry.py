"""The operator registry: one entry per operator, declaring everything the passes need to know.

An :class:`OpSpec` says, in one place, for one operator:

- which float spellings it matches: module types (``nn.SiLU``), functions (``F.silu``,
  ``torch.sigmoid``), Tensor methods (``"sigmoid"``, ``"sigmoid_"``) and ``FloatFunctional``
  methods (``"add"``);
- how a function or method spelling becomes the op's module at fuse time
  (:class:`Spelling`: argument binding, then a constructor), so every spelling reaches the same
  module and therefore the same QAT and integer behaviour;
- its **kind**, which decides its QAT behaviour: ``preserve`` (keeps its input's scale, no fake
  quant), ``requantize`` (the float op, then an output fake quant), ``weighted`` (Conv/Linear with
  weight fake quant and fusion), ``functional`` (a ``FloatFunctional`` method with an output fake
  quant), ``stub``;
- its QAT class (``from_float(module, qconfig)``) and its integer **builder**
  (``builder(ctx) -> nn.Module``, ``ctx`` a :class:`~hq_lightning.quantization.fx.convert.ConvertContext`),
  or ``None`` where the float module runs on integer tensors as it is (ReLU, reshape...);
- the marches and dtypes it supports, how the integer model computes it, its error bound against
  the fake-quant (VALIDATION) model, and the slow reference it is tested against.

``prepare_qat_fx``, ``convert_fx`` and the fuse-time rewrite read only this registry;
``docs/operators.md`` is generated from it (:func:`render_operator_table`) and a test fails when the
page and the registry disagree. A new operator is one :func:`register_op` call plus its tests.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_module, lookup_method
    >>> lookup_module(torch.nn.Conv2d(1, 1, 1)).name
    'conv2d'
    >>> lookup_method("reshape").kind.value
    'preserve'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from hq_lightning.march import March

if TYPE_CHECKING:  # pragma: no cover
    from hq_lightning.quantization.fx.convert import ConvertContext

__all__ = [
    "ALL_MARCHES",
    "Builder",
    "OpKind",
    "OpSpec",
    "Spelling",
    "all_ops",
    "lookup_function",
    "lookup_functional",
    "lookup_method",
    "lookup_module",
    "lookup_spelling",
    "register_op",
    "unregister_op",
]

Builder = Callable[["ConvertContext"], nn.Module]

ALL_MARCHES: frozenset[March] = frozenset(March)


class OpKind(str, Enum):
    """How an operator behaves in the QAT model (and so what convert expects of it)."""

    STUB = "stub"
    WEIGHTED = "weighted"
    REQUANTIZE = "requantize"
    PRESERVE = "preserve"
    FUNCTIONAL = "functional"


_MISSING = object()


@dataclass(frozen=True)
class Spelling:
    """A function or Tensor-method call rewritten into the op's module at fuse time.

    ``target(input, *args, **kwargs)`` is bound against ``params`` (positional order after the
    input) and ``defaults``; the call is rewritten only when every value in ``fixed`` holds and no
    bound value is computed at run time (an ``fx.Node``), unless its name is in ``dynamic``:
    those are passed to the module's forward as extra inputs instead. Then
    ``build(**bound)`` (without the ``fixed`` and ``ignored`` names) constructs the float module.

    Attributes:
        target: the ``call_function`` target or the Tensor method name.
        params: positional parameter names after the input, in order.
        defaults: default values of optional parameters.
        build: ``build(**bound) -> nn.Module``; defaults to the op's first module type.
        fixed: values that must hold for the rewrite (``{"antialias": False}``).
        ignored: bound names the module does not take (``inplace``: a generated module is never
            in place).
        input_name: keyword name of the input (``input``; ``self`` for some methods).
        dynamic: names whose value may be computed at run time (``size`` of an interpolation
            taken from another tensor's shape): such a value is not a constructor argument but
            a keyword argument of the module's forward (:meth:`bind_dynamic`).
        tensors: the ``dynamic`` names that must be activations (the divisor of ``x / y``);
            the other ``dynamic`` names must not hold one (a size, not a tensor's values).
    """

    target: Any
    params: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    build: Callable[..., nn.Module] | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ("inplace",)
    input_name: str = "input"
    dynamic: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()

    def bind(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]] | None:
        """``(input, constructor kwargs)`` for a call ``target(*args, **kwargs)``, or ``None``."""
        bound = self.bind_dynamic(args, kwargs)
        if bound is None or bound[2]:
            return None
        return bound[0], bound[1]

    def bind_dynamic(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
        """``(input, constructor kwargs, run-time kwargs)``, or ``None`` when the call does not bind.

        Run-time kwargs are the ``dynamic`` names whose value is (or holds) an ``fx.Node``.
        """
        found = self._bind(args, kwargs)
        if found is None:
            return None
        x, ctor = found
        runtime = {k: ctor.pop(k) for k in list(ctor) if k in self.dynamic and _holds_node(ctor[k])}
        if any(_holds_node(v) for v in ctor.values()):
            return None  # an argument computed at run time cannot become a module attribute
        return x, ctor, runtime

    def why_not(self, args: tuple, kwargs: dict) -> str | None:
        """Why a call does not become the op's module (for error messages), ``None`` if it does."""
        found = self._bind(args, kwargs)
        if found is None:
            loose = Spelling(self.target, self.params, self.defaults, input_name=self.input_name)._bind(args, kwargs)
            if loose is not None:
                for key, value in self.fixed.items():
                    if loose[1].get(key, _MISSING) != value:
                        return f"`{key}={loose[1].get(key)!r}` has no integer form (only {key}={value!r})"
            return f"a call of {self.name()} with arguments it is not known to take"
        names = [k for k, v in found[1].items() if _holds_node(v) and k not in self.dynamic]
        if names:
            return f"argument `{names[0]}` is computed at run time and cannot be kept"
        return None

    def _bind(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]] | None:
        kwargs = dict(kwargs)
        if args:
            x, rest = args[0], tuple(args[1:])
        elif self.input_name in kwargs:
            x, rest = kwargs.pop(self.input_name), ()
        else:
            return None
        if len(rest) > len(self.params):
            return None
        bound = dict(self.defaults)
        bound.update(zip(self.params, rest))
        for key, value in kwargs.items():
            if key not in self.params:
                return None
            bound[key] = value
        for key, value in self.fixed.items():
            if bound.get(key, _MISSING) != value:
                return None
        if any(p not in bound for p in self.params):
            return None  # a required argument is missing: not a call we understand
        ctor = {k: v for k, v in bound.items() if k not in self.fixed and k not in self.ignored}
        return x, ctor

    def generated_name(self) -> str:
        """The ``<op>`` of the generated module's name ``_generated_<op>_<i>`` (the call's name)."""
        if isinstance(self.target, str):
            return self.target.strip("_")
        return getattr(self.target, "__name__", "op").strip("_")

    def name(self) -> str:
        if isinstance(self.target, str):
            return f"Tensor.{self.target}"
        return _callable_name(self.target)


@dataclass(frozen=True)
class OpSpec:
    """Everything about one operator (see the module docstring).

    Attributes:
        name: short unique name (``"conv2d"``, ``"silu"``, ``"add"``).
        kind: :class:`OpKind`.
        summary: how the integer model computes it (one line, for ``docs/operators.md``).
        modules: float module types it matches (subclasses match too, nearest registered type first).
        functions: ``call_function`` targets accepted as they are (scale-preserving functions).
        methods: Tensor method names accepted as they are.
        spellings: function / method calls rewritten into ``modules[0]`` at fuse time.
        functional: ``FloatFunctional`` method names this op provides.
        form: for ``functional`` ops, how operands are passed: ``binary``, ``scalar``, ``list``,
            ``reduce``.
        qat: the QAT class replacing a matched float module (``from_float``); ``None`` for
            ``preserve`` ops.
        integer: builder of the integer module replacing a matched module; ``None``: the module
            runs on integer tensors as it is.
        integer_function: builder of the integer module replacing a call of one of ``functions``
            (its constant arguments go into the module); ``None``: the call runs as it is.
        preserve_when: for a ``requantize`` op, the module instances that keep their input's scale
            instead (nearest ``Upsample``).
        elementwise: a per-channel scale passes through it (elementwise or per-channel ops).
        marches: marches that have it.
        dtypes: activation dtypes it takes.
        error: error bound of the integer op: ``bit-exact`` (against its reference, and so
            against VALIDATION), or a bound in output steps against the float function.
        reference: the slow reference the integer op is tested against.
        input_dtype: the dtype its input defaults to on marches with int16 (``"qint16"`` where
            int8 is too coarse, e.g. softmax's input): ``prepare_qat_fx`` makes the producing
            fake quant that dtype unless called with ``op_precision="qconfig"``.
        check: ``check(node, module) -> reason | None``: why one call (``module``: the called
            module, ``None`` for a function or method) cannot run on integers (``F.pad`` with a
            value other than 0, ``Upsample`` in ``bicubic`` mode), so it runs as a float island;
            ``None``: every call can.
    """

    name: str
    kind: OpKind
    summary: str
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()
    spellings: tuple[Spelling, ...] = ()
    functional: tuple[str, ...] = ()
    form: str | None = None
    qat: type[nn.Module] | None = None
    integer: Builder | None = None
    integer_function: Builder | None = None
    preserve_when: Callable[[nn.Module], bool] | None = None
    elementwise: bool = False
    marches: frozenset[March] = ALL_MARCHES
    dtypes: tuple[str, ...] = ("qint8", "qint16")
    error: str = "bit-exact"
    reference: str = ""
    input_dtype: str | None = None
    check: Callable[[fx.Node, nn.Module | None], str | None] | None = None

    def preserves_scale(self, module: nn.Module | None = None) -> bool:
        """Whether this op (or this instance of it) keeps its input's scale (no fake quant)."""
        if self.kind is OpKind.PRESERVE:
            return True
        return module is not None and self.preserve_when is not None and self.preserve_when(module)

    def build_module(self, spelling: Spelling, ctor: dict[str, Any]) -> nn.Module:
        """The float module a call of ``spelling`` becomes."""
        build = spelling.build or self.modules[0]
        return build(**ctor)

    def spellings_text(self) -> list[str]:
        """Every spelling, as a user writes it (for docs and error messages)."""
        names = [f"nn.{m.__name__}" if m.__module__.startswith("torch.nn") else m.__name__ for m in self.modules]
        names += [_callable_name(f) for f in self.functions]
        names += [s.name() for s in self.spellings]
        names += [f"Tensor.{m}" for m in self.methods]
        names += [f"FloatFunctional.{m}" for m in self.functional]
        seen: list[str] = []
        for n in names:
            if n not in seen:
                seen.append(n)
        return seen


def _holds_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_node(v) for v in value)
    return False


def _callable_name(target: Any) -> str:
    import torch
    import torch.nn.functional as F

    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None) or ""
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if getattr(F, name, None) is target:
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    if module == "builtins":
        return name
    qualname = getattr(target, "__qualname__", name)
    return f"{module}.{qualname}" if module else qualname


class _Registry:
    def __init__(self) -> None:
        self.ops: dict[str, OpSpec] = {}
        self.by_module: dict[type, OpSpec] = {}
        self.by_function: dict[Any, OpSpec] = {}
        self.by_method: dict[str, OpSpec] = {}
        self.by_functional: dict[str, OpSpec] = {}
        self.by_spelling: dict[Any, list[tuple[OpSpec, Spelling]]] = {}

    def add(self, spec: OpSpec, replace: bool) -> None:
        if spec.name in self.ops and not replace:
            raise ValueError(
                f"Expected a new operator name, but `{spec.name}` is registered already; pass "
                "replace=True to override it."
            )
        if spec.spellings and not spec.modules:
            raise ValueError(f"Expected op `{spec.name}` with spellings to name its module type.")
        if spec.kind in (OpKind.REQUANTIZE, OpKind.WEIGHTED) and spec.modules and spec.qat is None:
            raise ValueError(f"Expected {spec.kind.value} op `{spec.name}` to have a QAT class.")
        self.ops[spec.name] = spec
        for module_type in spec.modules:
            self.by_module[module_type] = spec
        for function in spec.functions:
            self.by_function[function] = spec
        for method in spec.methods:
            self.by_method[method] = spec
        for method in spec.functional:
            self.by_functional[method] = spec
        for spelling in spec.spellings:
            rules = self.by_spelling.setdefault(spelling.target, [])
            rules[:] = [(s, sp) for s, sp in rules if s.name != spec.name]
            rules.append((spec, spelling))


_REGISTRY = _Registry()


def register_op(spec: OpSpec, *, replace: bool = False) -> OpSpec:
    """Add ``spec`` to the registry (``replace=True`` to override an op of the same name).

    Example:
        >>> import torch
        >>> from hq_lightning.quantization.ops import OpKind, OpSpec, register_op, lookup_module
        >>> class Swap(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x.flip(-1)
        >>> _ = register_op(OpSpec("my_swap", OpKind.PRESERVE, "reorders elements", modules=(Swap,)))
        >>> lookup_module(Swap()).name
        'my_swap'
        >>> unregister_op("my_swap")  # this example's op is gone again
    """
    _REGISTRY.add(spec, replace)
    return spec


def unregister_op(name: str) -> None:
    """Remove the op registered as ``name`` and every spelling it declared.

    Raises:
        KeyError: no op of that name.
    """
    if name not in _REGISTRY.ops:
        raise KeyError(f"Expected a registered op name, but got {name!r}; known: {sorted(_REGISTRY.ops)}.")
    specs = [spec for spec in _REGISTRY.ops.values() if spec.name != name]
    fresh = _Registry()
    for spec in specs:
        fresh.add(spec, replace=False)
    _REGISTRY.__dict__.update(fresh.__dict__)


def all_ops() -> list[OpSpec]:
    """Every registered operator, in registration order."""
    return list(_REGISTRY.ops.values())


def lookup_module(module: nn.Module | type) -> OpSpec | None:
    """The op matching a module (or module type): the nearest registered class in its MRO."""
    cls = module if isinstance(module, type) else type(module)
    for base in inspect.getmro(cls):
        spec = _REGISTRY.by_module.get(base)
        if spec is not None:
            return spec
        if base is nn.Module:
            break
    return None


def lookup_function(target: Any) -> OpSpec | None:
    """The op a ``call_function`` target is accepted as, as it is (no rewrite)."""
    try:
        return _REGISTRY.by_function.get(target)
    except TypeError:  # unhashable target
        return None


def lookup_method(name: str) -> OpSpec | None:
    """The op a Tensor method is accepted as, as it is (no rewrite)."""
    return _REGISTRY.by_method.get(name) if isinstance(name, str) else None


def lookup_functional(method: str) -> OpSpec | None:
    """The op providing a ``FloatFunctional`` method."""
    return _REGISTRY.by_functional.get(method)


def lookup_spelling(target: Any) -> list[tuple[OpSpec, Spelling]]:
    """Rewrite rules (op, spelling) for a function target or Tensor method name, in order."""
    try:
        return list(_REGISTRY.by_spelling.get(target, ()))
    except TypeError:
        return []


def spellings_of(kind: OpKind | Iterable[OpKind]) -> list[OpSpec]:
    """Registered ops of the given kind(s)."""
    kinds = {kind} if isinstance(kind, OpKind) else set(kind)
    return [spec for spec in all_ops() if spec.kind in kinds]
