"""The operator registry: one entry per operator (see :mod:`.registry`), and the built-in entries.

Importing this package registers the built-in operators, family by family: stubs, weighted
layers, pools, resizing, shape ops, activations, tensor arithmetic. ``docs/operators.md`` is
generated from the registry by :func:`render_operator_table`.

Example:
    >>> from hq_lightning.quantization.ops import all_ops
    >>> "conv2d" in [spec.name for spec in all_ops()]
    True
"""

import importlib

from hq_lightning.quantization.ops.docs import render_operator_table
from hq_lightning.quantization.ops.registry import (
    ALL_MARCHES,
    Builder,
    OpKind,
    OpSpec,
    Spelling,
    all_ops,
    lookup_function,
    lookup_functional,
    lookup_method,
    lookup_module,
    lookup_spelling,
    register_op,
    unregister_op,
)

#: The built-in families, imported (so registered) in this order: the order of docs/operators.md.
FAMILIES = (
    "stubs", "weighted", "pooling", "resize", "shape", "activation", "arithmetic",
    "elementwise", "normalization", "constants", "attention", "vision",
)  # fmt: skip
for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")

__all__ = [
    "ALL_MARCHES",
    "FAMILIES",
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
    "render_operator_table",
    "unregister_op",
]
