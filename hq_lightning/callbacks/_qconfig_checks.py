"""Checks of the qconfig trees given to the callback: one kind each (calibration or QAT), no
``qconfig`` attributes on the modules, and factories that build."""

import re
from typing import Any

from torch import nn

from hq_lightning.quantization.qconfig import QConfig


def _collect(tree: Any, where: str, found: list[tuple[str, QConfig]]) -> None:
    if tree is None:
        return
    if isinstance(tree, QConfig):
        found.append((where, tree))
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _collect(value, f"{where}[{key!r}]", found)
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            _collect(value, f"{where}[{index}]", found)


def qconfigs_in(tree: Any, name: str) -> list[tuple[str, QConfig]]:
    """All ``(location, QConfig)`` of a QConfig or qconfig tree dict, e.g. ``qat_qconfig['']``."""
    if tree is not None and not isinstance(tree, (QConfig, dict)):
        raise TypeError(
            f"Expected `{name}` to be a QConfig, a qconfig tree dict (as prepare_qat_fx accepts) or "
            f"None, but got {type(tree).__name__}."
        )
    found: list[tuple[str, QConfig]] = []
    _collect(tree, name, found)
    return found


def check_qconfig_kind(tree: Any, name: str, expected: str) -> None:
    """Raises unless every QConfig in ``tree`` has ``kind == expected``."""
    found = qconfigs_in(tree, name)
    if tree is not None and not found:
        raise ValueError(f"Expected `{name}` to contain at least one QConfig, but got {tree!r}.")
    wrong = [where for where, qconfig in found if qconfig.kind != expected]
    if wrong:
        other = "default_qat_8bit_fake_quant_qconfig" if expected == "qat" else (
            "default_calib_8bit_fake_quant_qconfig")
        raise ValueError(
            f"Expected every QConfig in `{name}` to be a {expected} qconfig (QConfig.kind == "
            f"{expected!r}), but got other kinds at {', '.join(wrong)}. Calibration and QAT qconfigs "
            f"are never mixed in one prepared model: use e.g. hq_lightning.qconfig.{other} there."
        )


def check_no_qconfig_attributes(module: nn.Module, path: str) -> None:
    """Raises if a module carries a ``qconfig`` attribute, which would apply to both prepares."""
    carriers = [name for name, sub in module.named_modules() if isinstance(getattr(sub, "qconfig", None), QConfig)]
    if carriers:
        shown = ", ".join(f"`{path}.{n}`" if n else f"`{path}`" for n in carriers[:5])
        raise ValueError(
            f"Expected no `qconfig` attributes on the modules of `{path}` because QuantizationCallback "
            f"prepares the submodule twice (calibration and QAT qconfigs), but got them on {shown}. "
            "Move them into the qconfig trees, e.g. qat_qconfig={'': ..., 'module_name': {name: qc}}."
        )


_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def check_factories_build(tree: Any, name: str, config_keys: bool = False) -> None:
    """Builds every fake-quant factory of ``tree`` once, so a bad argument (an observer that does not
    take ``averaging_constant``, a dtype that does not exist) fails when the callback is made,
    naming the qconfig, instead of deep inside ``prepare_qat_fx`` at ``setup``.

    Args:
        tree: a QConfig or qconfig tree.
        name: how the tree is called in messages (``qat_qconfig``, or a config key).
        config_keys: ``name`` is a config key (``quant.qat``): the fix names the key to set.
    """
    for where, qconfig in qconfigs_in(tree, name):
        for role in ("activation", "weight"):
            factory = getattr(qconfig, role)
            if factory is None:
                continue
            try:
                factory()
            except TypeError as err:
                match = _UNEXPECTED.search(str(err))
                if match is None:
                    raise
                cls, argument = match.groups()
                fix = (
                    f"set {where}.{role}.{argument}=null" if config_keys
                    else f"leave `{argument}` out of that factory's with_args(...)"
                )
                raise ValueError(
                    f"Expected the arguments of `{where}.{role}` to be accepted by {cls}, but it does "
                    f"not take `{argument}`. Fix: {fix}, or pick an observer that takes it."
                ) from err
            except ValueError as err:
                raise ValueError(f"Expected `{where}.{role}` to build a fake quant, but: {err}") from err
