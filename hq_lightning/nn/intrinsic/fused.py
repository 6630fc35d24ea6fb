"""Fused float modules: a Conv/ConvTranspose/Linear with an optional BN, add and ReLU/ReLU6.

``fuse_fx`` replaces a matched chain by one of these, so that prepare can quantize the chain as a
unit (one output fake quant, full precision between the conv and the add). Every class holds:

- ``conv``: the ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose2d`` or ``nn.Linear`` (BN already folded
  into it when fused with ``fold_bn=True``),
- ``bn``: the kept BatchNorm (``fold_bn=False``) or ``None``,
- ``relu``: ``nn.ReLU`` / ``nn.ReLU6`` or ``None``,
- ``has_add`` (class attribute): when True, ``forward(x, addend)`` computes
  ``relu(bn(conv(x)) + addend)``; otherwise ``forward(x)`` computes ``relu(bn(conv(x)))``.

Class names: ``{Base}{BN}{Add}{Act}{Dim}`` with Base in ``Conv``, ``ConvTranspose``, ``Linear``;
BN ``"BN"`` when the module keeps a BN; Add ``"Add"`` (the conv output may be either operand of the
add: the module always takes ``(conv_input, other_operand)``); Act ``"ReLU"`` or ``"ReLU6"``;
Dim ``1d``/``2d``/``3d`` for convolutions and nothing for Linear. All of them:

- Conv1d: ConvBN1d, ConvReLU1d, ConvReLU61d, ConvAdd1d, ConvAddReLU1d, ConvAddReLU61d,
  ConvBNReLU1d, ConvBNReLU61d, ConvBNAdd1d, ConvBNAddReLU1d, ConvBNAddReLU61d
- Conv2d / Conv3d: the same with ``2d`` / ``3d`` (e.g. ConvAddReLU2d, ConvBNReLU3d)
- ConvTranspose2d: ConvTransposeBN2d, ConvTransposeReLU2d, ..., ConvTransposeBNAddReLU62d
- Linear: LinearBN, LinearReLU, LinearReLU6, LinearAdd, LinearAddReLU, LinearAddReLU6,
  LinearBNReLU, LinearBNReLU6, LinearBNAdd, LinearBNAddReLU, LinearBNAddReLU6

``fused_class(base, bn=..., add=..., act=...)`` looks one up.

Example:
    >>> import torch
    >>> m = ConvAddReLU2d(torch.nn.Conv2d(1, 1, 1), relu=torch.nn.ReLU())
    >>> m
    ConvAddReLU2d(
      (conv): Conv2d(1, 1, kernel_size=(1, 1), stride=(1, 1))
      (relu): ReLU()
    )
    >>> m(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2)).shape
    torch.Size([1, 1, 2, 2])
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn

__all__ = ["FusedModule", "FUSED_CLASSES", "fused_class"]

#: Float weighted types and the (name stem, dimension suffix) of their fused classes.
FUSABLE_BASES: dict[type[nn.Module], tuple[str, str]] = {
    nn.Conv1d: ("Conv", "1d"),
    nn.Conv2d: ("Conv", "2d"),
    nn.Conv3d: ("Conv", "3d"),
    nn.ConvTranspose2d: ("ConvTranspose", "2d"),
    nn.Linear: ("Linear", ""),
}
_ACT_NAMES: dict[type[nn.Module] | None, str] = {None: "", nn.ReLU: "ReLU", nn.ReLU6: "ReLU6"}


class FusedModule(nn.Module):
    """Base of the fused classes; see the module docstring for the attributes."""

    has_add = False
    base_type: type[nn.Module] = nn.Module
    bn_kept = False
    act_type: type[nn.Module] | None = None

    def __init__(
        self, conv: nn.Module, bn: nn.Module | None = None, relu: nn.Module | None = None
    ) -> None:
        super().__init__()
        if not isinstance(conv, self.base_type):
            raise TypeError(
                f"Expected `conv` of {type(self).__name__} to be {self.base_type.__name__}, "
                f"but got {type(conv).__name__}."
            )
        if (bn is not None) != self.bn_kept:
            want = "a BatchNorm" if self.bn_kept else "None"
            raise TypeError(f"Expected `bn` of {type(self).__name__} to be {want}, but got {bn!r}.")
        if (None if relu is None else type(relu)) is not self.act_type:
            want = "None" if self.act_type is None else self.act_type.__name__
            raise TypeError(
                f"Expected `relu` of {type(self).__name__} to be {want}, but got {relu!r}."
            )
        self.conv = conv
        self.bn = bn
        self.relu = relu

    def forward(self, x: Tensor, addend: Tensor | None = None) -> Tensor:
        out = self.conv(x)
        if self.bn is not None:
            out = self.bn(out)
        if self.has_add:
            if addend is None:
                raise TypeError(
                    f"Expected {type(self).__name__} to be called as (x, addend), but got no addend."
                )
            out = out + addend
        if self.relu is not None:
            out = self.relu(out)
        return out


def _class_name(base: type[nn.Module], bn: bool, add: bool, act: type[nn.Module] | None) -> str:
    stem, dim = FUSABLE_BASES[base]
    return f"{stem}{'BN' if bn else ''}{'Add' if add else ''}{_ACT_NAMES[act]}{dim}"


#: (base type, keeps BN, has add, activation type or None) -> fused class.
FUSED_CLASSES: dict[
    tuple[type[nn.Module], bool, bool, type[nn.Module] | None], type[FusedModule]
] = {}

for _base, _bn, _add, _act in itertools.product(
    FUSABLE_BASES, (False, True), (False, True), _ACT_NAMES
):
    if not (_bn or _add or _act):
        continue
    _name = _class_name(_base, _bn, _add, _act)
    _cls = type(
        _name,
        (FusedModule,),
        {
            "__module__": __name__,
            "__qualname__": _name,
            "__doc__": f"Fused {_name}: see :mod:`hq_lightning.nn.intrinsic.fused`.",
            "has_add": _add,
            "base_type": _base,
            "bn_kept": _bn,
            "act_type": _act,
        },
    )
    globals()[_name] = _cls
    FUSED_CLASSES[(_base, _bn, _add, _act)] = _cls
    __all__.append(_name)
del _base, _bn, _add, _act, _name, _cls


def fused_class(
    base: type[nn.Module], *, bn: bool, add: bool, act: type[nn.Module] | None
) -> type[FusedModule]:
    """The fused class for a weighted ``base`` type with/without BN, add and activation."""
    key = (base, bool(bn), bool(add), act)
    if key not in FUSED_CLASSES:
        raise KeyError(
            f"Expected a fusable combination, but got base={base.__name__}, bn={bn}, add={add}, "
            f"act={getattr(act, '__name__', act)}. Known bases: "
            f"{[b.__name__ for b in FUSABLE_BASES]}; acts: ReLU, ReLU6 or None."
        )
    return FUSED_CLASSES[key]
