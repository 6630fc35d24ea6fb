"""Checks that a qconfig (tree) holds only calibration or only QAT qconfigs."""

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
