"""The qconfig tree: which qconfig each module of a model gets.

``prepare_qat_fx`` takes a dict like torch.ao's::

    {
        "": global_qconfig,
        "module_type": [(nn.Conv2d, qc), ...]   # or {nn.Conv2d: qc}
        "module_name": {"backbone.conv1": qc}   # or [("backbone.conv1", qc), ...]
    }

and a module may carry its own ``qconfig`` attribute. Priority, lowest first: global <
module_type < module_name < attribute. A module's qconfig propagates to its children unless one
of those overrides it; ``None`` keeps a module (and, by propagation, its children) float.

Calibration and QAT qconfigs (``QConfig.kind``) never meet in one tree: they are two prepares of
the float model.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import (default_qat_8bit_fake_quant_qconfig as qat8,
    ...     default_qat_16bit_fake_quant_qconfig as qat16)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Sequential(torch.nn.ReLU()))
    >>> tree = resolve_qconfigs(net, {"": qat8, "module_name": {"1": qat16}})
    >>> tree["0"] is qat8, tree["1.0"] is qat16
    (True, True)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from hq_lightning.quantization.qconfig import QConfig

__all__ = ["QConfigTree", "check_module_names", "check_single_kind", "parse_qconfig_dict", "resolve_qconfigs"]

_KEYS = ("", "module_type", "module_name")


class QConfigTree:
    """A parsed qconfig dict: ``global_qconfig``, ``by_type`` and ``by_name``."""

    def __init__(self, global_qconfig: QConfig | None, by_type: dict[type, QConfig | None], by_name: dict[str, QConfig | None]):
        self.global_qconfig = global_qconfig
        self.by_type = by_type
        self.by_name = by_name

    def __repr__(self) -> str:
        return f"QConfigTree(global={self.global_qconfig!r}, by_type={self.by_type!r}, by_name={self.by_name!r})"


def _check_qconfig(value: Any, where: str) -> QConfig | None:
    if value is None or isinstance(value, QConfig):
        return value
    raise TypeError(
        f"Expected the qconfig of {where} to be a hq_lightning QConfig or None, but got "
        f"{type(value).__name__}: {value!r}."
    )


def _pairs(value: Any, key: str) -> Iterable[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        pairs = []
        for item in value:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError(
                    f"Expected `{key}` to be a dict or a list of (key, qconfig) pairs, but got the item {item!r}."
                )
            pairs.append((item[0], item[1]))
        return pairs
    raise TypeError(f"Expected `{key}` to be a dict or a list of (key, qconfig) pairs, but got {type(value).__name__}.")


def parse_qconfig_dict(qconfig_dict: Mapping[str, Any] | None) -> QConfigTree:
    """Validate ``qconfig_dict`` and return its parsed :class:`QConfigTree`."""
    if qconfig_dict is None:
        return QConfigTree(None, {}, {})
    if isinstance(qconfig_dict, QConfig):
        return QConfigTree(qconfig_dict, {}, {})
    if not isinstance(qconfig_dict, Mapping):
        raise TypeError(
            "Expected `qconfig_dict` to be a dict like {'': qconfig, 'module_type': ..., 'module_name': ...} "
            f"or None, but got {type(qconfig_dict).__name__}."
        )
    unknown = [k for k in qconfig_dict if k not in _KEYS]
    if unknown:
        raise ValueError(f"Expected the keys of `qconfig_dict` to be among {list(_KEYS)}, but got {unknown}.")
    global_qconfig = _check_qconfig(qconfig_dict.get(""), "'' (global)")
    by_type: dict[type, QConfig | None] = {}
    for module_type, qconfig in _pairs(qconfig_dict.get("module_type", {}), "module_type"):
        if not isinstance(module_type, type):
            raise TypeError(f"Expected the keys of `module_type` to be module classes, but got {module_type!r}.")
        by_type[module_type] = _check_qconfig(qconfig, f"module_type {module_type.__name__}")
    by_name: dict[str, QConfig | None] = {}
    for name, qconfig in _pairs(qconfig_dict.get("module_name", {}), "module_name"):
        if not isinstance(name, str):
            raise TypeError(f"Expected the keys of `module_name` to be module paths (str), but got {name!r}.")
        by_name[name] = _check_qconfig(qconfig, f"module_name {name!r}")
    return QConfigTree(global_qconfig, by_type, by_name)


def check_module_names(tree: QConfigTree, names: Iterable[str]) -> None:
    """Raise when ``module_name`` names a module that does not exist, listing close candidates."""
    known = set(names)
    for name in tree.by_name:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
        hint = f" Close names: {close}." if close else ""
        raise ValueError(
            f"Expected the `module_name` entry {name!r} of qconfig_dict to name a module of the model, "
            f"but the model has no module {name!r}.{hint} Paths are those of model.named_modules()."
        )


def check_single_kind(qconfigs: Iterable[tuple[str, QConfig | None]]) -> str | None:
    """Raise when calibration and QAT qconfigs are mixed; return the kind (or None if no qconfig)."""
    by_kind: dict[str, list[str]] = {}
    for where, qconfig in qconfigs:
        if qconfig is not None:
            by_kind.setdefault(qconfig.kind, []).append(where)
    if len(by_kind) > 1:
        calib, qat = by_kind.get("calibration", []), by_kind.get("qat", [])
        raise ValueError(
            "Expected the qconfigs of one prepare to be all calibration or all QAT qconfigs, but got "
            f"calibration qconfigs at {calib[:5]} and QAT qconfigs at {qat[:5]}. Calibration and QAT "
            "are two prepares of the float model: prepare it with calibration qconfigs and calibrate "
            "(eval() + FakeQuantState.CALIBRATION); then prepare the float model again with QAT "
            "qconfigs and load the calibrated state into it "
            "(qat_model.load_state_dict(calib_model.state_dict(), strict=False): the scales load; "
            "observer statistics of a different observer type do not) before training."
        )
    return next(iter(by_kind), None)


def resolve_qconfigs(
    model: nn.Module, qconfig_dict: Mapping[str, Any] | None = None, extra_names: Iterable[str] = ()
) -> dict[str, QConfig | None]:
    """The qconfig of every module path of ``model`` (``""`` is the root).

    Args:
        model: the float model (its ``qconfig`` attributes count).
        qconfig_dict: the dict described in the module docstring, a bare QConfig (global) or None.
        extra_names: module paths that exist only after fusion (``_generated_add_0``...) and may be
            named in ``module_name``.

    Raises:
        ValueError: a ``module_name`` that names no module, or calibration and QAT qconfigs mixed.
    """
    tree = parse_qconfig_dict(qconfig_dict)
    modules = dict(model.named_modules(remove_duplicate=False))
    check_module_names(tree, list(modules) + list(extra_names))
    resolved: dict[str, QConfig | None] = {}
    attributes: list[tuple[str, QConfig | None]] = []

    def visit(module: nn.Module, path: str, inherited: QConfig | None) -> None:
        qconfig = tree.by_type.get(type(module), inherited)
        qconfig = tree.by_name.get(path, qconfig)
        if "qconfig" in module.__dict__:
            qconfig = _check_qconfig(module.__dict__["qconfig"], f"module {path or '<root>'!r} (its `qconfig` attribute)")
            attributes.append((f"{path or '<root>'} (attribute)", qconfig))
        resolved[path] = qconfig
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name, qconfig)

    visit(model, "", tree.global_qconfig)
    check_single_kind(
        [("'' (global)", tree.global_qconfig)]
        + [(f"module_type {t.__name__}", q) for t, q in tree.by_type.items()]
        + [(f"module_name {n!r}", q) for n, q in tree.by_name.items()]
        + attributes
    )
    return resolved
