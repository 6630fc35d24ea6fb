"""The operator registry: one entry per operator (see :mod:`.registry`), and the built-in entries.

Importing this package registers the built-in operators, family by family: stubs, weighted
layers, pools, resizing, shape ops, activations, tensor arithmetic. ``docs/operators.md`` is
generated from the registry by :func:`render_operator_table`.

Example:
    >>> from hq_lightning.quantization.ops import all_ops
    >>> "conv2d" in [spec.name for spec in all_ops()]
    True
"""

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
)

# the built-in families register themselves on import, in this order
from hq_lightning.quantization.ops import stubs as _stubs  # noqa: E402,F401,I001
from hq_lightning.quantization.ops import weighted as _weighted  # noqa: E402,F401
from hq_lightning.quantization.ops import pooling as _pooling  # noqa: E402,F401
from hq_lightning.quantization.ops import resize as _resize  # noqa: E402,F401
from hq_lightning.quantization.ops import shape as _shape  # noqa: E402,F401
from hq_lightning.quantization.ops import activation as _activation  # noqa: E402,F401
from hq_lightning.quantization.ops import arithmetic as _arithmetic  # noqa: E402,F401
from hq_lightning.quantization.ops import elementwise as _elementwise  # noqa: E402,F401
from hq_lightning.quantization.ops import normalization as _normalization  # noqa: E402,F401
from hq_lightning.quantization.ops import constants as _constants  # noqa: E402,F401
from hq_lightning.quantization.ops import attention as _attention  # noqa: E402,F401
from hq_lightning.quantization.ops.docs import render_operator_table  # noqa: E402

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
    "render_operator_table",
]
