"""The march and dtype a fake quant was built for, recorded with its scale in the ``state_dict``.

A scale means something only for the march and dtype it was computed for: a BAYES scale loaded
into a BERNOULLI model converts to a scale that is not a power of two, an int16 scale loaded into
an int8 model makes every code saturate. So every
:class:`~hq_lightning.quantization.FakeQuantize` saves ``<path>._extra_state``, the record, and a
``load_state_dict`` (strict or not) refuses a record that names another march or dtype, before
any of that module's state is copied.

The record is a ``uint8`` tensor holding the ASCII text ``march=<march>;dtype=<dtype>``: a tensor,
so code that treats every ``state_dict`` entry as one (``clone``, ``torch.equal``, ``.float()``,
``torch.load(weights_only=True)``) keeps working, and text, so it stays readable
(:func:`decode_march_record`) and does not depend on the order of an enum.

A state saved before the record existed (no ``_extra_state`` entry next to a ``scale``) still
loads, strictly too: there is nothing to compare, its scales are taken as this model's, and one
``UserWarning`` says so.

Example:
    >>> record = encode_march_record("bayes", "qint8")
    >>> record.dtype, decode_march_record(record)
    (torch.uint8, {'march': 'bayes', 'dtype': 'qint8'})
    >>> check_march_record(record, "bayes", "qint8")  # the same: nothing happens
    >>> try:
    ...     check_march_record(record, "bernoulli", "qint8", where="conv.weight_fake_quant")
    ... except ValueError as error:
    ...     print(str(error)[:80])
    Expected the checkpoint's march to be bernoulli (this model's), but got bayes at
"""

from __future__ import annotations

import warnings

import torch

from hq_lightning.dtype import QuantDType, as_dtype
from hq_lightning.march import March, as_march

__all__ = [
    "EXTRA_STATE_SUFFIX",
    "check_march_record",
    "decode_march_record",
    "encode_march_record",
    "warn_unrecorded",
]

#: The ``state_dict`` key suffix torch gives a module's ``get_extra_state()``.
EXTRA_STATE_SUFFIX = "_extra_state"


def encode_march_record(march: March | str, dtype: QuantDType | str) -> torch.Tensor:
    """The record of ``march`` and ``dtype``: ``uint8`` codes of ``march=...;dtype=...``."""
    text = f"march={as_march(march).value};dtype={as_dtype(dtype).value}"
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def decode_march_record(record: object) -> dict[str, str]:
    """``{"march": ..., "dtype": ...}`` from a record, or a ``ValueError`` naming what it got."""
    fields: dict[str, str] = {}
    if isinstance(record, torch.Tensor) and record.dtype == torch.uint8 and record.dim() == 1:
        try:
            text = bytes(record.tolist()).decode("ascii")
            fields = dict(item.split("=", 1) for item in text.split(";"))
        except (UnicodeDecodeError, ValueError):
            fields = {}
    if "march" not in fields or "dtype" not in fields:
        got = f"{record.dtype} tensor of shape {tuple(record.shape)}" if isinstance(record, torch.Tensor) else type(record).__name__
        raise ValueError(
            "Expected a fake quant's `_extra_state` to be the uint8 record `march=...;dtype=...` "
            f"written by FakeQuantize.get_extra_state, but got a {got} that does not decode to one: "
            "the state_dict was edited or comes from another library; load it with the model it was "
            "saved from."
        )
    return fields


def check_march_record(
    record: object,
    march: March | str,
    dtype: QuantDType | str,
    where: str | None = None,
    source: str = "the checkpoint's",
) -> None:
    """Raise a ``ValueError`` unless ``record`` names ``march`` and ``dtype``.

    Args:
        record: a record (:func:`encode_march_record`), e.g. from a loaded ``state_dict``.
        march / dtype: the receiving fake quant's.
        where: its path in the model, named in the message.
        source: whose record it is, for the message (``"the checkpoint's"``).
    """
    fields = decode_march_record(record)
    march, dtype = as_march(march), as_dtype(dtype)
    at = f" at `{where}`" if where else ""
    if fields["march"] != march.value:
        raise ValueError(
            f"Expected {source} march to be {march.value} (this model's), but got {fields['march']}"
            f"{at}: its scales were computed for {fields['march']} (BERNOULLI snaps them to powers "
            f"of two, and the marches differ in the ops and dtypes they support). Load it into a model "
            f"prepared after set_march({fields['march']!r}); or, to move the model to {march.value}, "
            "copy its weights without the scales (copy_float_state(model_with_that_state, this_model)) "
            "and calibrate again."
        )
    if fields["dtype"] != dtype.value:
        raise ValueError(
            f"Expected {source} dtype to be {dtype.value} (this model's), but got {fields['dtype']}"
            f"{at}: its scale divides the range into {fields['dtype']} codes. Prepare this model "
            f"with the qconfigs {source} state was made with (the same int8/int16 choice per "
            "module), or calibrate it again."
        )


def warn_unrecorded() -> None:
    """A ``UserWarning`` for a fake-quant state saved before the record existed. Every module
    warns from the same place in ``load_state_dict`` with the same text, so Python's default
    filter shows it once."""
    warnings.warn(
        "Loaded fake-quant scales without a march/dtype record (a state saved before hq_lightning "
        "recorded them): they are taken as computed for this model's march and dtype, unchecked. "
        "Save the model again to record them.",
        UserWarning,
        stacklevel=4,
    )
