"""The fusion table, as data, and ``register_fusion_pattern`` for users' own patterns.

A pattern is a weighted module (``conv``), optionally followed by a BatchNorm (``bn``), an add
(``add``: ``"add"`` when the chain's output is the add's first operand, ``"added"`` when it is the
second) and an activation (``act``: ``nn.ReLU`` / ``nn.ReLU6``). The default table is every
combination of

- conv: ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``, ``nn.ConvTranspose2d``, ``nn.Linear``
- bn: none, the BatchNorm of matching dimension (``BatchNorm1d`` for Conv1d and Linear), or
  ``nn.SyncBatchNorm``
- add: none, ``"add"``, ``"added"``; matched on ``FloatFunctional.add`` (ours or torch's),
  ``torch.add``, ``operator.add`` (``+``) and ``operator.iadd`` (``+=``)
- act: none, ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``), ReLU6 (``nn.ReLU6``,
  ``F.relu6``)

except the conv alone. The fused module of a pattern is the ``hq_lightning.nn.intrinsic`` class
named after it (see :mod:`hq_lightning.nn.intrinsic.fused`), or the class given at registration.

Example:
    >>> import torch
    >>> from torch import nn
    >>> key = (nn.Conv2d, nn.BatchNorm2d, "add", nn.ReLU)
    >>> key in FUSION_PATTERNS
    True
    >>> parse_pattern((nn.ReLU, (operator.add, MatchAllNode, (nn.BatchNorm2d, nn.Conv2d))))
    (<class 'torch.nn.modules.conv.Conv2d'>, <class 'torch.nn.modules.batchnorm.BatchNorm2d'>, 'added', <class 'torch.nn.modules.activation.ReLU'>)
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.nn.intrinsic.fused import FUSABLE_BASES, fused_class
from hq_lightning.nn.quantized.float_functional import FloatFunctional

__all__ = [
    "ACT_OPS",
    "ADD_FUNCTIONS",
    "BN_TYPES",
    "FROZEN_BN_TYPES",
    "FUSION_PATTERNS",
    "FusionPattern",
    "MatchAllNode",
    "is_add_op",
    "is_frozen_bn",
    "parse_pattern",
    "register_fusion_pattern",
]


class MatchAllNode:
    """Placeholder for "any node" in a pattern tuple (the add operand that is not the chain)."""


try:  # torchvision's detection backbones default to FrozenBatchNorm2d (fixed statistics)
    from torchvision.ops.misc import FrozenBatchNorm2d as _FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is installed in the project's environment
    _FrozenBatchNorm2d = None

#: BatchNorms whose statistics never change (no training mode): always folded into the conv.
FROZEN_BN_TYPES: tuple[type[nn.Module], ...] = tuple(t for t in (_FrozenBatchNorm2d,) if t is not None)


def is_frozen_bn(module: nn.Module | None) -> bool:
    """A BatchNorm with fixed statistics (torchvision's ``FrozenBatchNorm2d``)."""
    return module is not None and isinstance(module, FROZEN_BN_TYPES)


#: BatchNorm types a weighted module can absorb, by weighted type.
BN_TYPES: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Conv1d: (nn.BatchNorm1d, nn.SyncBatchNorm),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm, *FROZEN_BN_TYPES),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
    nn.ConvTranspose2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Linear: (nn.BatchNorm1d, nn.SyncBatchNorm),
}
#: Activation spellings -> the activation module type used in the fused module.
ACT_OPS: dict[Any, type[nn.Module]] = {
    nn.ReLU: nn.ReLU,
    nn.ReLU6: nn.ReLU6,
    F.relu: nn.ReLU,
    torch.relu: nn.ReLU,
    "relu": nn.ReLU,  # Tensor.relu
    F.relu6: nn.ReLU6,
}
#: Function spellings of the add (FloatFunctional.add is matched as a method call).
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_POSITIONS = ("add", "added")


def is_add_op(op: Any) -> bool:
    """True for ``operator.add``, ``torch.add``, ours or torch's ``FloatFunctional.add``."""
    if op in ADD_FUNCTIONS or op is FloatFunctional.add:
        return True
    return getattr(op, "__qualname__", None) == "FloatFunctional.add"


@dataclass(frozen=True)
class FusionPattern:
    """One row of the table; ``fused`` overrides the default ``nn.intrinsic`` class.

    A custom ``fused`` class is built as ``fused(conv, bn, relu)`` (``bn`` is ``None`` when folded)
    and called with ``(x,)`` or, with an add, ``(x, other_operand)``.
    """

    conv: type[nn.Module]
    bn: type[nn.Module] | None = None
    add: str | None = None
    act: type[nn.Module] | None = None
    fused: type[nn.Module] | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.conv, self.bn, self.add, self.act)

    def fused_type(self, *, keeps_bn: bool) -> type[nn.Module]:
        """The class to build, given whether the BN is kept (``fold_bn=False``)."""
        if self.fused is not None:
            return self.fused
        base = next((b for b in FUSABLE_BASES if issubclass(self.conv, b)), None)
        if base is None:
            raise KeyError(
                f"Expected a fused module class for the pattern {self.key}, but got none: "
                "register it with `register_fusion_pattern(pattern)(YourFusedClass)`."
            )
        return fused_class(base, bn=keeps_bn, add=self.add is not None, act=self.act)


#: (conv, bn or None, add position or None, act or None) -> pattern.
FUSION_PATTERNS: dict[tuple[Any, ...], FusionPattern] = {}

for _conv, _bns in BN_TYPES.items():
    for _bn, _add, _act in itertools.product(
        (None, *_bns), (None, *ADD_POSITIONS), (None, nn.ReLU, nn.ReLU6)
    ):
        if _bn is None and _add is None and _act is None:
            continue
        _pattern = FusionPattern(_conv, _bn, _add, _act)
        FUSION_PATTERNS[_pattern.key] = _pattern
del _conv, _bns, _bn, _add, _act, _pattern


def _is_bn_type(op: Any) -> bool:
    return isinstance(op, type) and issubclass(op, nn.modules.batchnorm._BatchNorm)


def parse_pattern(pattern: Any) -> tuple[Any, ...]:
    """Turn a chapter-style nested pattern (last op first) into ``(conv, bn, add, act)``.

    ``(nn.ReLU, (operator.add, (nn.BatchNorm2d, nn.Conv2d), MatchAllNode))`` is
    ``(nn.Conv2d, nn.BatchNorm2d, "add", nn.ReLU)``; ``MatchAllNode`` marks the other operand.
    """
    if not isinstance(pattern, tuple):
        if isinstance(pattern, type) and issubclass(pattern, nn.Module):
            return (pattern, None, None, None)
        raise TypeError(
            f"Expected the innermost element of a fusion pattern to be an nn.Module type (the "
            f"weighted module), but got {pattern!r}."
        )
    head, *rest = pattern
    if is_add_op(head):
        if len(rest) != 2 or (rest[0] is MatchAllNode) == (rest[1] is MatchAllNode):
            raise ValueError(
                "Expected an add pattern to be (add, inner, MatchAllNode) or "
                f"(add, MatchAllNode, inner), but got {pattern!r}."
            )
        position, inner = ("add", rest[0]) if rest[1] is MatchAllNode else ("added", rest[1])
        conv, bn, add, act = parse_pattern(inner)
        if add is not None or act is not None:
            raise ValueError(f"Expected nothing but conv/bn inside the add of {pattern!r}.")
        return (conv, bn, position, None)
    if len(rest) != 1:
        raise ValueError(f"Expected a pattern (op, inner), but got {pattern!r}.")
    conv, bn, add, act = parse_pattern(rest[0])
    if _is_bn_type(head):
        if bn is not None or add is not None or act is not None:
            raise ValueError(
                f"Expected a BatchNorm right after the weighted module in {pattern!r}."
            )
        return (conv, head, None, None)
    if act is not None:
        raise ValueError(f"Expected one activation at most in {pattern!r}.")
    if head in ACT_OPS:
        return (conv, bn, add, ACT_OPS[head])
    if isinstance(head, type) and issubclass(head, nn.Module):
        return (conv, bn, add, head)
    raise ValueError(
        f"Expected {head!r} in {pattern!r} to be a BatchNorm type, an add op, an activation module "
        f"type or one of the functional activations {[getattr(k, '__name__', k) for k in ACT_OPS]}."
    )


def register_fusion_pattern(pattern: Any, fused: type[nn.Module] | None = None):
    """Add a pattern to the fusion table (also usable as a class decorator).

    Args:
        pattern: a nested tuple in the chapter's notation, last op first, e.g.
            ``(nn.ReLU, (nn.BatchNorm2d, MyConv))`` or
            ``(operator.add, MatchAllNode, MyConv)``.
        fused: the fused module class built as ``fused(conv, bn, relu)``; by default the
            ``nn.intrinsic`` class named after the pattern (only for the built-in weighted types).

    Returns:
        A decorator: ``@register_fusion_pattern(pattern)`` on a class registers that class as the
        pattern's fused module.

    Example:
        >>> from torch import nn
        >>> class MyConv(nn.Conv2d):
        ...     pass
        >>> _ = register_fusion_pattern((nn.ReLU, MyConv))
        >>> FUSION_PATTERNS[(MyConv, None, None, nn.ReLU)].fused_type(keeps_bn=False).__name__
        'ConvReLU2d'
    """
    key = parse_pattern(pattern)
    FUSION_PATTERNS[key] = FusionPattern(*key, fused=fused)

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        FUSION_PATTERNS[key] = FusionPattern(*key, fused=cls)
        return cls

    return decorator
