"""Target processor architectures ("marches") and the global march setting.

The march decides what the hardware can represent: power-of-two scales on ``BERNOULLI``, whether
int16 activations exist, and which deploy-only ops are available. It is read by fake-quant modules
when they are built (at prepare), so set it before ``prepare_qat_fx``.

Example:
    >>> from hq_lightning.march import March, get_march, set_march, march_context
    >>> set_march("bayes")
    >>> get_march() is March.BAYES
    True
    >>> with march_context(March.BERNOULLI):
    ...     get_march().value
    'bernoulli'
    >>> get_march().value
    'bayes'
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

__all__ = [
    "March",
    "as_march",
    "get_march",
    "set_march",
    "march_context",
    "uses_power_of_two_scales",
    "supports_int16",
]


class March(str, enum.Enum):
    """Processor architectures, as the plugin names them."""

    BERNOULLI = "bernoulli"
    BERNOULLI2 = "bernoulli2"  # RDK X3
    BAYES = "bayes"  # RDK Ultra / J5
    BAYES_E = "bayes_e"
    NASH = "nash"

    def __str__(self) -> str:
        return self.value


_DEFAULT_MARCH = March.BAYES
_current_march: March = _DEFAULT_MARCH


def as_march(march: March | str) -> March:
    """Validate ``march`` (a :class:`March` or a case-insensitive string) and return the member.

    Raises:
        ValueError: if ``march`` names no known march.
    """
    if isinstance(march, March):
        return march
    if isinstance(march, str):
        key = march.strip().lower()
        for member in March:
            if key in (member.value, member.name.lower()):
                return member
    valid = ", ".join(repr(m.value) for m in March)
    raise ValueError(
        f"Expected `march` to be a March member or one of the strings {valid} (any case), "
        f"but got {march!r}."
    )


def set_march(march: March | str) -> None:
    """Set the global march used by everything prepared afterwards."""
    global _current_march
    _current_march = as_march(march)


def get_march() -> March:
    """Return the global march (``March.BAYES`` unless :func:`set_march` changed it)."""
    return _current_march


@contextlib.contextmanager
def march_context(march: March | str) -> Iterator[March]:
    """Temporarily set the global march; the previous one is restored on exit (tests, scripts)."""
    previous = _current_march
    set_march(march)
    try:
        yield _current_march
    finally:
        set_march(previous)


def uses_power_of_two_scales(march: March | str) -> bool:
    """Whether scales must be powers of two on ``march`` (only BERNOULLI)."""
    return as_march(march) is March.BERNOULLI


def supports_int16(march: March | str) -> bool:
    """Whether int16 activations exist on ``march`` (BAYES and newer; not the BERNOULLI family)."""
    return as_march(march) not in (March.BERNOULLI, March.BERNOULLI2)
