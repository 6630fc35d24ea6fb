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
from torch import nn

from hq_lightning.quantization.ops.registry import OpKind, OpSpec, register_op

__all__: list[str] = []

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
    "split", OpKind.PRESERVE, "selects parts of integer codes; scale unchanged",
    functions=(torch.chunk, torch.split, operator.getitem), methods=("chunk", "split", "__getitem__"),
    reference="data movement on integers",
))  # fmt: skip
register_op(OpSpec(
    "repeat", OpKind.PRESERVE, "repeats integer codes; scale unchanged",
    methods=("expand", "expand_as", "repeat"), reference="data movement on integers",
))  # fmt: skip
register_op(OpSpec(
    "pixel_shuffle", OpKind.PRESERVE, "rearranges integer codes; scale unchanged",
    modules=(nn.PixelShuffle, nn.PixelUnshuffle), functions=(F.pixel_shuffle, F.pixel_unshuffle),
    reference="data movement on integers",
))  # fmt: skip
register_op(OpSpec(
    "zero_pad2d", OpKind.PRESERVE, "pads with the integer 0 (= 0.0 at any scale)",
    modules=(nn.ZeroPad2d,), reference="data movement on integers",
))  # fmt: skip
