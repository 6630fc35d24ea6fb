"""Command-line overrides checked before Hydra sees them: our schema's did-you-mean, quoted paths.

Hydra answers a misspelled key (``quant.qat.activation.averagin_constant=0.1``) with "Could not
override ... To append to your config use +quant.qat...", which is the wrong fix: the key
should be spelled right. :func:`check_override_keys` walks each override's key down the
structured schema (:mod:`hq_lightning.app.schema`) and names the closest key instead. Groups whose
keys belong to third-party classes (``model``, ``data``, ``trainer``, ``callbacks``, ``logger``,
``quant.overrides``) are free-form and not checked here.

Checkpoint paths hold ``=`` (``epoch=6-step=70.ckpt``), which Hydra's grammar rejects unless the
value is quoted; :func:`quote_path_overrides` quotes the values of ``resume_from`` and
``init_from``.

Example:
    >>> quote_path_overrides(["+quant=qat", "resume_from=outputs/a/epoch=6-step=70.ckpt"])
    ['+quant=qat', "resume_from='outputs/a/epoch=6-step=70.ckpt'"]
    >>> try:
    ...     check_override_keys(["+quant=qat", "quant.qat.activation.averagin_constant=0.1"])
    ... except ValueError as err:
    ...     print(str(err).split(". ")[0])
    Expected `quant.qat.activation.averagin_constant` to be a key of the config, but `averagin_constant` is not a key of FakeQuantizeConf (quant.qat.activation)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from typing import Any

from hq_lightning.app.schema import AppConfig

__all__ = ["PATH_KEYS", "check_override_keys", "quote_path_overrides"]

#: Keys whose values are file paths (quoted by :func:`quote_path_overrides`).
PATH_KEYS = ("resume_from", "init_from")


def quote_path_overrides(args: Sequence[str]) -> list[str]:
    """``key=value`` of :data:`PATH_KEYS` with ``=`` in an unquoted value, quoted for Hydra."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if sep and bare in PATH_KEYS and "=" in value and value[:1] not in ("'", '"'):
            quote = "'" if "'" not in value else '"'
            arg = f"{key}={quote}{value}{quote}"
        quoted.append(arg)
    return quoted


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass an annotation stands for (``Optional[X]`` -> ``X``), else ``None``."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _check_key(key: str) -> None:
    cls: type | None = AppConfig
    walked: list[str] = []
    for part in key.split("."):
        fields = _field_types(cls)
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            hint = f"Did you mean `{'.'.join([*walked, close[0]])}`? " if close else ""
            where = f" ({'.'.join(walked)})" if walked else ""
            raise ValueError(
                f"Expected `{key}` to be a key of the config, but `{part}` is not a key of "
                f"{cls.__name__}{where}. {hint}Its keys: {', '.join(fields)} (schema: "
                "hq_lightning/app/schema.py, docs/app.md)."
            )
        walked.append(part)
        cls = _dataclass_of(fields[part])
        if cls is None:
            return  # a leaf, or a free-form node (model, trainer, quant.overrides...)


def check_override_keys(args: Sequence[str]) -> None:
    """Raise for an override whose key is not in the structured schema, naming the closest key.

    Only overrides that parse are checked (Hydra reports grammar errors itself); ``hydra.*``
    keys, deletions (``~key``) and package overrides (``group@pkg=...``) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a Hydra flag (-m, --cfg job...), not an override
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:
            continue
        key = override.key_or_group
        if override.is_delete() or override.package is not None or key.startswith("hydra"):
            continue
        top_level = list(_field_types(AppConfig))
        # a group of the user's own config directory (`+experiment=x`) or a misspelled top-level
        # key: only a near miss of one of ours is ours to report
        if "." not in key and key not in top_level and not difflib.get_close_matches(
            key, top_level, n=1, cutoff=0.8
        ):
            continue
        _check_key(key)
