"""``FloatFunctional``: tensor operators as a module, so they can carry a qconfig and a scale.

In the float model every method computes the plain torch result and passes it through
``activation_post_process`` (an ``nn.Identity`` here; prepare swaps the whole module for its QAT
counterpart with a fake quant). While hq_lightning's tracer runs, a method called with ``Proxy``
arguments records one node ``call_method(<op>, (get_attr(<this module's path>), *args), kwargs)``
instead of tracing into torch ops. ``fuse_fx`` creates these modules for operators written in
``forward`` (``x + y`` becomes ``self._generated_add_0.add(x, y)``).

Example:
    >>> import torch
    >>> ff = FloatFunctional()
    >>> ff.add(torch.ones(2), torch.ones(2))
    tensor([2., 2.])
    >>> ff.cat([torch.zeros(1), torch.ones(1)], dim=0)
    tensor([0., 1.])
    >>> ff.mul_scalar(torch.ones(2), 0.5)
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hq_lightning.utils.fx_helper import record_module_method_call

__all__ = ["FloatFunctional", "FLOAT_FUNCTIONAL_METHODS"]

#: Every operator method of FloatFunctional (``concatenate`` is recorded as ``cat``).
FLOAT_FUNCTIONAL_METHODS = (
    "add",
    "sub",
    "mul",
    "add_scalar",
    "mul_scalar",
    "cat",
    "stack",
    "matmul",
    "mean",
    "sum",
    "maximum",
    "minimum",
)


class FloatFunctional(nn.Module):
    """Float tensor operators with an output ``activation_post_process`` (Identity in float)."""

    def __init__(self) -> None:
        super().__init__()
        self.activation_post_process: nn.Module = nn.Identity()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "FloatFunctional is not called directly; call one of its operator methods, e.g. "
            "`self.ff.add(x, y)` or `self.ff.cat([x, y], dim=1)`."
        )

    def _run(self, op: str, args: tuple, kwargs: dict, compute: Any) -> Any:
        traced = record_module_method_call(self, op, args, kwargs)
        if traced is not None:
            return traced
        return self.activation_post_process(compute())

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """``x + y``."""
        return self._run("add", (x, y), {}, lambda: torch.add(x, y))

    def sub(self, x: Tensor, y: Tensor) -> Tensor:
        """``x - y``."""
        return self._run("sub", (x, y), {}, lambda: torch.sub(x, y))

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        """``x * y``."""
        return self._run("mul", (x, y), {}, lambda: torch.mul(x, y))

    def add_scalar(self, x: Tensor, y: float) -> Tensor:
        """``x + y`` for a Python number ``y``."""
        return self._run("add_scalar", (x, y), {}, lambda: torch.add(x, y))

    def mul_scalar(self, x: Tensor, y: float) -> Tensor:
        """``x * y`` for a Python number ``y``."""
        return self._run("mul_scalar", (x, y), {}, lambda: torch.mul(x, y))

    def cat(self, x: Sequence[Tensor], dim: int = 0) -> Tensor:
        """``torch.cat(x, dim)``."""
        return self._run("cat", (x,), {"dim": dim}, lambda: torch.cat(list(x), dim=dim))

    def concatenate(self, x: Sequence[Tensor], dim: int = 0) -> Tensor:
        """Alias of :meth:`cat` (recorded as ``cat``)."""
        return self.cat(x, dim=dim)

    def stack(self, x: Sequence[Tensor], dim: int = 0) -> Tensor:
        """``torch.stack(x, dim)``."""
        return self._run("stack", (x,), {"dim": dim}, lambda: torch.stack(list(x), dim=dim))

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        """``x @ y``."""
        return self._run("matmul", (x, y), {}, lambda: torch.matmul(x, y))

    def mean(self, x: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
        """``x.mean(dim, keepdim)`` (all elements when ``dim`` is None)."""
        kwargs = {"dim": dim, "keepdim": keepdim}
        return self._run(
            "mean", (x,), kwargs, lambda: x.mean() if dim is None else x.mean(dim, keepdim)
        )

    def sum(self, x: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
        """``x.sum(dim, keepdim)`` (all elements when ``dim`` is None)."""
        kwargs = {"dim": dim, "keepdim": keepdim}
        return self._run(
            "sum", (x,), kwargs, lambda: x.sum() if dim is None else x.sum(dim, keepdim)
        )

    def maximum(self, x: Tensor, y: Tensor) -> Tensor:
        """``torch.maximum(x, y)``."""
        return self._run("maximum", (x, y), {}, lambda: torch.maximum(x, y))

    def minimum(self, x: Tensor, y: Tensor) -> Tensor:
        """``torch.minimum(x, y)``."""
        return self._run("minimum", (x, y), {}, lambda: torch.minimum(x, y))
