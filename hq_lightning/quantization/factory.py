"""Picklable, comparable factories: what ``FakeQuantize.with_args(...)`` returns.

A qconfig holds factories, not modules: each prepared module calls the factory to build its own
fake-quant module. Unlike ``functools.partial`` these compare equal by value (so two qconfigs
written the same way are equal), print as the call that made them, and pickle.

Example:
    >>> from hq_lightning.quantization import FakeQuantize
    >>> f = FakeQuantize.with_args(dtype="qint8", averaging_constant=0)
    >>> f == FakeQuantize.with_args(dtype="qint8", averaging_constant=0)
    True
    >>> fq = f()                 # builds a FakeQuantize
    >>> fq16 = f(dtype="qint16") # call-time keywords override the stored ones
"""

from __future__ import annotations

from typing import Any

__all__ = ["Factory", "WithArgsMixin"]


class Factory:
    """``cls`` with stored keyword arguments; calling it builds ``cls(**stored, **overrides)``.

    Args:
        cls: the class (or any callable) to build.
        **kwargs: stored keyword arguments.
    """

    def __init__(self, cls: Any, /, **kwargs: Any) -> None:
        if not callable(cls):
            raise TypeError(f"Expected `cls` to be a class or callable, but got {cls!r}.")
        self.cls = cls
        self.kwargs = dict(kwargs)

    # functools.partial-compatible names, for code written against torch's with_args
    @property
    def func(self) -> Any:
        return self.cls

    @property
    def keywords(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def __call__(self, **overrides: Any) -> Any:
        return self.cls(**{**self.kwargs, **overrides})

    def with_args(self, **kwargs: Any) -> Factory:
        """A new factory with ``kwargs`` added to (and overriding) the stored ones."""
        return Factory(self.cls, **{**self.kwargs, **kwargs})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Factory):
            return NotImplemented
        return self.cls is other.cls and self.kwargs == other.kwargs

    def __hash__(self) -> int:
        return hash((self.cls, tuple(sorted((k, repr(v)) for k, v in self.kwargs.items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())
        return f"{getattr(self.cls, '__qualname__', repr(self.cls))}.with_args({args})"


def _short(value: Any) -> str:
    if isinstance(value, type):
        return value.__qualname__
    if isinstance(value, str):  # str enums print as their value
        return repr(str(value))
    return repr(value)


class WithArgsMixin:
    """Adds the ``with_args`` classmethod to a module class."""

    @classmethod
    def with_args(cls, **kwargs: Any) -> Factory:
        """Return a :class:`Factory` building ``cls(**kwargs)`` (picklable, equal by value)."""
        return Factory(cls, **kwargs)
