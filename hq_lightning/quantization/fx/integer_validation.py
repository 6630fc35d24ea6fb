"""VALIDATION runs the integer model: a prepared model in VALIDATION computes what ``convert_fx`` deploys.

When a whole prepared GraphModule is in ``FakeQuantState.VALIDATION`` (every module in eval
mode, every ``FakeQuantize`` fake-quantizing), its forward delegates to the integer model that
:func:`~hq_lightning.quantization.fx.convert.convert_fx` builds from it, so
``convert_fx(model)(x)`` equals ``model(x)`` bit for bit, for every op that has an integer
builder, and validation metrics are those of the deployed arithmetic. Everything else keeps the
per-module fake-quant path: QAT (train mode) with its gradients, CALIBRATION, FLOAT, mixed states
(a backbone in VALIDATION and the head in QAT or FLOAT, as the sensitivity report sets per layer),
a model whose observers have not all seen data yet (e.g. Lightning's sanity check before
calibration: there is no integer model yet), and tracing (``torch.fx``, ``torch.jit.trace``,
``torch.compile``/``torch.export``).

The integer model is cached beside the prepared model, outside its ``state_dict`` (never saved,
pickled or deep-copied), and rebuilt on the next VALIDATION forward after any parameter or buffer
changed (its identity, storage or in-place version) or after any ``set_fake_quantize`` call.

- Gradients: with autograd recording (grad mode on and a parameter or input requiring grad) the
  fake-quant path also runs; the output has the integer model's values and the fake-quant path's
  gradients (straight through). Evaluate under ``torch.no_grad()`` to pay for one model only.
- Autocast: the integer model runs with autocast disabled (its exact float32 convolutions must
  not be lowered to bf16/fp16); floating outputs are then cast to the autocast dtype, as the
  fake-quant path's last autocast op returns them.
- ``torch.compile`` (``Module.compile``, the callback's ``compile=``): a compiled prepared model in
  eval mode checks and runs the integer model eagerly at a graph break; other states continue in
  the compiled code (QAT in train mode never reaches the check). With autograd recording a
  compiled model validates with the fake-quant path.
- If ``convert_fx`` rejects the model (an op on integer tensors with no integer builder), a
  warning names the problem once and VALIDATION keeps the fake-quant path.

:func:`fake_quant_path` forces the per-module fake-quant path (for comparisons of the two).

Example:
    >>> import torch
    >>> from hq_lightning.quantization import (DeQuantStub, FakeQuantState, QuantStub, convert_fx,
    ...     prepare_qat_fx, set_fake_quantize)
    >>> from hq_lightning.quantization.qconfig import default_calib_8bit_fake_quant_qconfig
    >>> net = torch.nn.Sequential(QuantStub(), torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), DeQuantStub())
    >>> model = prepare_qat_fx(net, {"": default_calib_8bit_fake_quant_qconfig}).eval()
    >>> set_fake_quantize(model, FakeQuantState.CALIBRATION)
    >>> _ = model(torch.randn(4, 3, 8, 8))
    >>> set_fake_quantize(model, FakeQuantState.VALIDATION)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.equal(model(x), convert_fx(model)(x))
    True
    >>> runs_integer_model(model)
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from hq_lightning.quantization.fake_quantize import FakeQuantize

__all__ = [
    "CACHE_ATTR",
    "IntegerModelCache",
    "compiled_validation_output",
    "fake_quant_path",
    "integer_model",
    "invalidate_integer_models",
    "runs_integer_model",
    "validation_forward",
]

#: The ``__dict__`` key of a prepared GraphModule's :class:`IntegerModelCache`.
CACHE_ATTR = "_hq_integer_model"

#: Returned by :func:`validation_forward` when the model runs its own (fake-quant) forward.
NOT_DELEGATED = object()

# True while the fake-quant path is forced (fake_quant_path) or an integer model is running.
_PER_MODULE = contextvars.ContextVar("hq_per_module_forward", default=False)
# Bumped by every set_fake_quantize call: a state switch may follow an untracked `.data` edit.
_GENERATION = itertools.count()
_generation = next(_GENERATION)


class IntegerModelCache:
    """The integer model derived from a prepared model, and what it was derived from.

    Derived state only: a deep copy, a pickle or a copied module gets an empty cache.
    """

    __slots__ = ("model", "key", "tensors", "failed", "plain")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the integer model (the next VALIDATION forward rebuilds it)."""
        self.model: nn.Module | None = None
        self.key: list | None = None
        self.tensors: list[torch.Tensor] = []  # held, so a freed tensor's id cannot be reused
        self.failed = False
        # (generated code, top-level children) of a model found without any FakeQuantize (a
        # traced or converted model): its forwards skip the walk while these stay the same
        self.plain: tuple | None = None

    def __deepcopy__(self, memo: dict) -> IntegerModelCache:
        return IntegerModelCache()

    def __copy__(self) -> IntegerModelCache:
        return IntegerModelCache()

    def __reduce__(self) -> tuple:
        return (IntegerModelCache, ())

    def __repr__(self) -> str:
        return f"IntegerModelCache(built={self.model is not None})"


@contextlib.contextmanager
def fake_quant_path() -> Iterator[None]:
    """Within the block, prepared models in VALIDATION run their per-module fake-quant forward.

    For comparisons of the fake-quant arithmetic with the integer model (tests, error studies).
    """
    token = _PER_MODULE.set(True)
    try:
        yield
    finally:
        _PER_MODULE.reset(token)


def invalidate_integer_models(model: nn.Module | None = None) -> None:
    """Mark every cached integer model stale, and free those found in ``model``.

    Called by :func:`~hq_lightning.quantization.set_fake_quantize`: a state switch may follow
    changes that in-place versions do not show (``tensor.data.copy_``).
    """
    global _generation
    _generation = next(_GENERATION)
    if model is None:
        return
    for module in model.modules():
        cache = module.__dict__.get(CACHE_ATTR)
        if isinstance(cache, IntegerModelCache):
            cache.clear()


def _tracing() -> bool:
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or is_fx_symbolic_tracing()
    )


def _validation_key(model: nn.Module) -> tuple[list, list[torch.Tensor]] | object | None:
    """The fingerprint of ``model`` if it is wholly in VALIDATION, else ``None`` (or
    ``_NO_FAKE_QUANT`` when it has no fake quant at all).

    Wholly in VALIDATION: no module in train mode, at least one FakeQuantize and all of them
    fake-quantizing. The fingerprint holds, per parameter and buffer (of a FakeQuantize: its
    scale), its identity, storage address and in-place version, plus the generated code and the
    state generation. It runs before every VALIDATION forward, so it walks the module dicts
    directly and skips observers (about 0.1-0.3 ms for MobileNetV2 on one thread).
    """
    key: list[int] = [_generation, id(model.__dict__.get("_code"))]
    tensors: list[torch.Tensor] = []
    add_key, add_tensor = key.append, tensors.append
    fake_quants = 0
    stack = [model]
    pop, push = stack.pop, stack.extend
    while stack:
        module = pop()
        if module is None:
            continue
        if module.training:
            return None
        attributes = module.__dict__
        if isinstance(module, FakeQuantize):
            if not module.fake_quant_enabled:
                return None
            fake_quants += 1
            if attributes.get("_scale_stale"):
                module.scale  # noqa: B018 - reading it settles a lazily computed scale first
            # convert reads only the scale (a buffer, or a learnable Parameter); its observer
            # moves only in CALIBRATION/QAT, which a state switch (a new generation) ends
            scale = attributes["_parameters"].get("scale")
            if scale is None:
                scale = attributes["_buffers"].get("scale")
            if scale is not None:
                add_tensor(scale)
                add_key((id(scale), scale._version, scale.data_ptr()))
            continue
        for store in (attributes["_parameters"], attributes["_buffers"]):
            for tensor in store.values():
                if tensor is not None:
                    add_tensor(tensor)
                    add_key((id(tensor), tensor._version, tensor.data_ptr()))
        push(attributes["_modules"].values())
    if not fake_quants:
        return _NO_FAKE_QUANT
    return key, tensors


_NO_FAKE_QUANT = object()


def _plain_signature(model: nn.Module) -> tuple:
    return (model.__dict__.get("_code"), tuple(model._modules.values()))


def _calibrated(model: nn.Module) -> bool:
    return all(
        getattr(m.activation_post_process, "initialized", True) and m.scale.numel() > 0
        for m in model.modules()
        if isinstance(m, FakeQuantize)
    )


def _build(model: fx.GraphModule, cache: IntegerModelCache) -> None:
    from hq_lightning.quantization.fx.convert import convert_fx

    cache.model = None
    if not _calibrated(model):
        cache.failed = True  # no integer model before calibration: the fake-quant path runs
        return
    try:
        # plain tensors (not inference tensors) even when the first validation forward runs
        # under torch.inference_mode, so the cache also serves later grad-mode calls
        with torch.inference_mode(False), torch.no_grad():
            cache.model = convert_fx(model)
        cache.failed = False
    except (RuntimeError, ValueError, TypeError) as error:
        cache.failed = True
        warnings.warn(
            "Expected the prepared model to convert (FakeQuantState.VALIDATION runs the integer "
            f"model convert_fx builds), but convert_fx failed: {error} VALIDATION uses the "
            "per-module fake-quant path until the model changes; give every op on integer "
            "tensors an integer builder.",
            stacklevel=4,
        )


def _cache(model: nn.Module) -> IntegerModelCache:
    cache = model.__dict__.get(CACHE_ATTR)
    if not isinstance(cache, IntegerModelCache):
        cache = IntegerModelCache()
        model.__dict__[CACHE_ATTR] = cache
    return cache


def integer_model(model: fx.GraphModule) -> nn.Module | None:
    """The (cached) integer model VALIDATION runs for ``model``, or ``None`` when it runs fake quant."""
    if model.training or _PER_MODULE.get() or _tracing():
        return None
    cache = model.__dict__.get(CACHE_ATTR)
    if cache is not None and cache.plain is not None and cache.plain == _plain_signature(model):
        return None  # no fake quant anywhere (a converted or traced float model)
    state = _validation_key(model)
    if state is _NO_FAKE_QUANT:
        _cache(model).plain = _plain_signature(model)
        return None
    if state is None:
        return None
    key, tensors = state
    cache = _cache(model)
    if cache.key != key:
        _build(model, cache)
        cache.key, cache.tensors = key, tensors
    return cache.model


def runs_integer_model(model: nn.Module) -> bool:
    """Whether ``model``'s next forward runs the integer model (see the module docstring)."""
    return isinstance(model, fx.GraphModule) and integer_model(model) is not None


class _IntegerValues(torch.autograd.Function):
    """The integer model's values with the fake-quant output's gradient (straight through)."""

    @staticmethod
    def forward(ctx, fake_quant_output: torch.Tensor, integer_output: torch.Tensor) -> torch.Tensor:
        return integer_output.to(fake_quant_output.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _records_autograd(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    leaves, _ = tree_flatten((args, kwargs))
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in leaves):
        return True
    return any(p.requires_grad for p in model.parameters())


def _autocast_devices() -> list[str]:
    return [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]


def _run_integer(integer: nn.Module, args: tuple, kwargs: dict, recast: bool = True) -> Any:
    devices = _autocast_devices()
    token = _PER_MODULE.set(True)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            out = integer(*args, **kwargs)
    finally:
        _PER_MODULE.reset(token)
    if devices and recast:
        def recast_leaf(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(torch.get_autocast_dtype(value.device.type))
            return value

        out = tree_map(recast_leaf, out)
    return out


@torch.compiler.disable
def compiled_validation_output(model: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """Under ``torch.compile``: the integer model's output, or ``None`` to run the compiled code.

    Runs eagerly (a graph break in the compiled forward), so the VALIDATION check, the cache and
    the integer model behave as without compile. With autograd recording it returns ``None``: a
    compiled model validated with gradients runs the fake-quant path.
    """
    integer = integer_model(model)
    if integer is None or _records_autograd(model, args, kwargs):
        return None
    return _run_integer(integer, args, kwargs)


def _merge(reference: Any, exact: Any) -> Any:
    floating = (
        isinstance(reference, torch.Tensor)
        and isinstance(exact, torch.Tensor)
        and reference.is_floating_point()
        and exact.is_floating_point()
    )
    if not floating:
        return exact
    if reference.requires_grad:
        return _IntegerValues.apply(reference, exact)
    return exact.to(reference.dtype)


def validation_forward(model: fx.GraphModule, generated_forward, args: tuple, kwargs: dict) -> Any:
    """``model``'s forward: the integer model in VALIDATION, else ``generated_forward``."""
    integer = integer_model(model)
    if integer is None:
        return generated_forward(model, *args, **kwargs)
    if not _records_autograd(model, args, kwargs):
        return _run_integer(integer, args, kwargs)
    with fake_quant_path():
        reference = generated_forward(model, *args, **kwargs)
    exact = _run_integer(integer, args, kwargs, recast=False)  # cast like `reference` below
    ref_leaves, spec = tree_flatten(reference)
    exact_leaves, exact_spec = tree_flatten(exact)
    if spec != exact_spec:  # pragma: no cover - both come from the same graph
        raise RuntimeError("Expected the integer model to return the structure of the fake-quant model.")
    merged = [_merge(r, e) for r, e in zip(ref_leaves, exact_leaves)]
    return tree_unflatten(merged, spec)
