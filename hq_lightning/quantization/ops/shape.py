"""Registry entries: ops that move or select values without computing new ones (scale unchanged).

They run on integer tensors as they are; their output has their (first) input's scale.
``elementwise`` ops also pass a per-channel (int32 high-precision) scale on; ops that move axes
do not.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.ops import lookup_function, lookup_method
    >>> lookup_function(torch.flatten).name, lookup_method("contiguous").elementwise
    ('reshape', True)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

__all__ = ["check_pad"]

_MOVES = "data movement on integers (tests/test_graph_coverage.py::test_shape_ops_run_on_integers)"


def check_pad(node: fx.Node, module: nn.Module | None) -> str | None:
    """Why a pad has no integer form: a constant other than 0 is not on the input's grid."""
    if module is not None:
        value = getattr(module, "value", 0.0)
        return None if value == 0 else f"constant padding with value={value} (only 0 is exact on integers)"
    kwargs = dict(node.kwargs)
    mode = node.args[2] if len(node.args) > 2 else kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else kwargs.get("value")
    if isinstance(mode, fx.Node) or isinstance(value, fx.Node):
        return "a padding mode or value computed at run time"
    if mode == "constant" and value not in (None, 0, 0.0):
        return f"constant padding with value={value} (only 0 is exact on integers)"
    return None


_SAME = "values and scale pass through unchanged"
register_op(OpSpec(
    "identity", OpKind.PRESERVE, _SAME,
    modules=(nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
    functions=(F.dropout,), methods=("contiguous", "clone", "detach"), elementwise=True,
    reference="identity on integers",
))  # fmt: skip
register_op(OpSpec(
    "reshape", OpKind.PRESERVE, "reshapes / permutes integer codes; scale unchanged",
    modules=(nn.Flatten, nn.Unflatten),
    functions=(torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze),
    methods=("view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "squeeze", "unsqueeze"),
    reference="data movement on integers",
))  # fmt: skip
register_op(OpSpec(
    "split", OpKind.PRESERVE, "selects parts of integer codes (slicing, getitem, chunk, split, unbind); scale unchanged",
    functions=(torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.narrow, torch.select, operator.getitem),
    methods=("chunk", "split", "tensor_split", "unbind", "narrow", "select", "__getitem__"),
    reference=_MOVES,
))  # fmt: skip
register_op(OpSpec(
    "repeat", OpKind.PRESERVE, "repeats integer codes; scale unchanged",
    functions=(torch.tile, torch.repeat_interleave, torch.broadcast_to),
    methods=("expand", "expand_as", "repeat", "tile", "repeat_interleave", "broadcast_to"),
    reference=_MOVES,
))  # fmt: skip
register_op(OpSpec(
    "flip", OpKind.PRESERVE, "reverses / rotates integer codes along dims; scale unchanged",
    functions=(torch.flip, torch.fliplr, torch.flipud, torch.roll),
    methods=("flip", "fliplr", "flipud", "roll"), reference=_MOVES,
))  # fmt: skip
register_op(OpSpec(
    "pad", OpKind.PRESERVE,
    "constant 0 pads with the integer 0 (= 0.0 at any scale); reflect / replicate / circular "
    "copy integer codes; a constant other than 0 is off the input's grid: float island",
    modules=(
        nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
        nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
        nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
    ),
    functions=(F.pad,), check=check_pad, reference=_MOVES,
))  # fmt: skip
register_op(OpSpec(
    "pixel_shuffle", OpKind.PRESERVE, "rearranges integer codes; scale unchanged",
    modules=(nn.PixelShuffle, nn.PixelUnshuffle), functions=(F.pixel_shuffle, F.pixel_unshuffle),
    reference="data movement on integers",
))  # fmt: skip
register_op(OpSpec(
    "zero_pad", OpKind.PRESERVE, "pads with the integer 0 (= 0.0 at any scale)",
    modules=(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d), reference=_MOVES,
))  # fmt: skip
