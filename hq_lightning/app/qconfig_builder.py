"""Build the calibration and QAT qconfig trees from the ``quant`` config node.

A qconfig tree is what ``prepare_qat_fx`` and ``QuantizationCallback`` take::

    {"": global_qconfig,
     "module_type": [(torch.nn.Linear, qconfig), ...],
     "module_name": [("backbone.conv1", qconfig), ...]}

The global qconfigs are YAML nodes with ``_target_`` (``QConfig``, ``FakeQuantize.with_args``,
observer classes by import path). Per-module qconfigs come from ``quant.overrides.<alias>``
entries, each naming a module or a module type, with a :data:`PRESETS` name and/or explicit nodes.

Example:
    >>> from omegaconf import OmegaConf
    >>> from hq_lightning.app.qconfig_builder import observer_class
    >>> observer_class("mse").__name__
    'MSEObserver'
    >>> observer_class("hq_lightning.quantization.PercentileObserver").__name__
    'PercentileObserver'
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hq_lightning.app.schema import QConfigConf, QConfigOverrideConf, QuantConf, QuantMode

__all__ = [
    "OBSERVER_ALIASES",
    "PRESETS",
    "QConfigTrees",
    "build_qconfig_trees",
    "check_march_supports",
    "import_by_path",
    "instantiate_qconfig",
    "observer_class",
]

#: Short names accepted wherever an observer class is referenced by import path.
OBSERVER_ALIASES = {
    "minmax": "MinMaxObserver",
    "moving_average": "MovingAveragePerTensorMinMaxObserver",
    "per_tensor": "MovingAveragePerTensorMinMaxObserver",
    "per_channel": "MovingAveragePerChannelMinMaxObserver",
    "clip": "ClipObserver",
    "fixed_scale": "FixedScaleObserver",
    "percentile": "PercentileObserver",
    "mse": "MSEObserver",
    "kl": "KLObserver",
    "mix": "MixObserver",
}

#: ``quant.overrides.<alias>.preset`` -> (calibration qconfig, QAT qconfig), as names in
#: ``hq_lightning.quantization.qconfig``; ``None`` leaves the module unquantized (float).
PRESETS: dict[str, tuple[str | None, str | None]] = {
    "float": (None, None),
    "int8": ("default_calib_8bit_fake_quant_qconfig", "default_qat_8bit_fake_quant_qconfig"),
    "fixed_act": (
        "default_calib_8bit_fake_quant_qconfig",
        "default_qat_8bit_fixed_act_fake_quant_qconfig",
    ),
    "int16_act": ("default_calib_16bit_fake_quant_qconfig", "default_qat_16bit_fake_quant_qconfig"),
    "int32_out": (
        "default_calib_8bit_weight_32bit_out_fake_quant_qconfig",
        "default_qat_8bit_weight_32bit_out_fake_quant_qconfig",
    ),
}

QConfigTrees = tuple[dict[str, Any], "dict[str, Any] | None"]


def import_by_path(path: str, what: str) -> Any:
    """Import ``package.module.Name`` (also ``package.module.Class.attr``) and return the object."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(
            f"Expected `{what}` to be an import path such as 'torch.nn.Linear', but got {path!r}."
        )
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ValueError(f"Expected `{what}` to be an importable path, but got {path!r}.")


def observer_class(path: str) -> type:
    """The observer class named by ``path``: an import path or a short name of
    :data:`OBSERVER_ALIASES` (``mse``, ``percentile``, ...).

    It is the ``_target_`` of the ``observer`` node of a fake-quant config, so instantiating the
    node yields the class that ``FakeQuantize.with_args(observer=...)`` expects.
    """
    if path in OBSERVER_ALIASES:
        quantization = importlib.import_module("hq_lightning.quantization")
        return getattr(quantization, OBSERVER_ALIASES[path])
    if isinstance(path, str) and "." not in path:
        valid = ", ".join(OBSERVER_ALIASES)
        raise ValueError(
            f"Expected `observer.path` to be an import path or one of {valid}, but got {path!r}."
        )
    cls = import_by_path(path, "observer.path")
    if not isinstance(cls, type):
        raise ValueError(f"Expected `observer.path` to name an observer class, but got {path!r}.")
    return cls


def _without_unset(node: Any) -> Any:
    """Drop ``None`` values of fake-quant nodes (unset observer arguments), recursively."""
    if isinstance(node, dict):
        return {
            k: _without_unset(v)
            for k, v in node.items()
            if v is not None or k in ("activation", "weight")
        }
    if isinstance(node, list):
        return [_without_unset(v) for v in node]
    return node


def instantiate_qconfig(node: DictConfig | dict | None, where: str = "qconfig") -> Any:
    """Instantiate one ``QConfigConf`` node (validated against the schema) into a ``QConfig``.

    A plain dict is checked against :class:`QConfigConf` first, so a misspelled key fails with
    OmegaConf's ``Key '...' not in 'FakeQuantizeConf'`` message.
    """
    if node is None:
        return None
    schema = OmegaConf.structured(QConfigConf)
    try:
        checked = OmegaConf.merge(schema, node)
    except Exception as err:
        raise ValueError(
            f"Expected `{where}` to be a QConfig node (keys of QConfigConf / FakeQuantizeConf), "
            f"but: {str(err).splitlines()[0]}"
        ) from err
    container = OmegaConf.to_container(checked, resolve=True)
    return instantiate(_without_unset(container), _convert_="all")


def _named_qconfig(name: str | None) -> Any:
    if name is None:
        return None
    qconfig_module = importlib.import_module("hq_lightning.quantization.qconfig")
    return getattr(qconfig_module, name)


def _checked_override(entry: Any, where: str) -> DictConfig:
    """``entry`` merged onto the :class:`QConfigOverrideConf` schema (a typo fails here)."""
    if not isinstance(entry, (dict, DictConfig)):
        raise ValueError(
            f"Expected `{where}` to be a mapping such as {{module: classifier, preset: int32_out}}, "
            f"but got {entry!r}."
        )
    try:
        return OmegaConf.merge(OmegaConf.structured(QConfigOverrideConf), entry)
    except Exception as err:
        fields = ", ".join(f.name for f in dataclasses.fields(QConfigOverrideConf))
        raise ValueError(
            f"Expected `{where}` to have only the keys {fields}, but: {str(err).splitlines()[0]}"
        ) from err


def _override_qconfigs(
    alias: str, entry: Any, quant: DictConfig, mode: QuantMode
) -> tuple[Any, Any]:
    """The (calibration, QAT) qconfigs of one override entry.

    Per phase: an explicit node is merged onto the global node of that phase (so
    ``qat: {activation: {averaging_constant: 0}}`` changes only that value); otherwise the preset's
    qconfig; otherwise the global qconfig unchanged.
    """
    where = f"quant.overrides.{alias}"
    preset = entry.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(
            f"Expected `{where}.preset` to be one of {', '.join(PRESETS)}, but got {preset!r}."
        )
    if preset is None and entry.get("calibration") is None and entry.get("qat") is None:
        raise ValueError(
            f"Expected `{where}` to set at least one of `preset` (one of {', '.join(PRESETS)}), "
            f"`calibration` or `qat`, but got none. Example: +{where}.preset=int32_out"
        )
    result = []
    for index, phase in enumerate(("calibration", "qat")):
        if phase == "qat" and mode is not QuantMode.qat:
            result.append(None)
        elif entry.get(phase) is not None:
            merged = OmegaConf.merge(quant[phase], entry[phase])
            result.append(instantiate_qconfig(merged, f"{where}.{phase}"))
        elif preset is not None:
            result.append(_named_qconfig(PRESETS[preset][index]))
        else:
            result.append(instantiate_qconfig(quant[phase], f"quant.{phase}"))
    return result[0], result[1]


def build_qconfig_trees(quant: DictConfig | QuantConf) -> QConfigTrees:
    """Return ``(calibration_tree, qat_tree)``; ``qat_tree`` is ``None`` in ``calib`` mode.

    Args:
        quant: the composed ``quant`` node (``cfg.quant``).
    """
    mode = QuantMode(quant.mode.value if isinstance(quant.mode, QuantMode) else quant.mode)
    calibration = {
        "": instantiate_qconfig(quant.calibration, "quant.calibration"),
        "module_type": [],
        "module_name": [],
    }
    qat = None
    if mode is QuantMode.qat:
        if quant.qat is None:
            raise ValueError(
                "Expected `quant.qat` to be a QConfig node when `quant.mode` is 'qat', but got null. "
                "Use +quant=calib for calibration only."
            )
        qat = {
            "": instantiate_qconfig(quant.qat, "quant.qat"),
            "module_type": [],
            "module_name": [],
        }
    for alias, entry in quant.overrides.items():
        where = f"quant.overrides.{alias}"
        checked = _checked_override(entry, where)
        if (checked.module is None) == (checked.type is None):
            raise ValueError(
                f"Expected `{where}` to set exactly one of `module` (a module name) or `type` "
                f"(a class import path), but got module={checked.module!r}, type={checked.type!r}."
            )
        # the raw entry, not the checked one: schema defaults must not overwrite global values
        calib_qc, qat_qc = _override_qconfigs(alias, entry, quant, mode)
        if checked.module is not None:
            key, target = "module_name", checked.module
        else:
            key, target = "module_type", import_by_path(checked.type, f"{where}.type")
        calibration[key].append((target, calib_qc))
        if qat is not None:
            qat[key].append((target, qat_qc))
    return calibration, qat


def _factories(tree: dict[str, Any] | None) -> Iterable[Any]:
    if tree is None:
        return
    qconfigs = [tree.get("")]
    for key in ("module_type", "module_name"):
        qconfigs.extend(qc for _, qc in tree.get(key, []))
    for qc in qconfigs:
        if qc is not None:
            yield getattr(qc, "activation", None)
            yield getattr(qc, "weight", None)


def check_march_supports(trees: QConfigTrees, march: str) -> None:
    """Fail before any training when a qconfig asks for int16 on a march without it."""
    from hq_lightning.dtype import QuantDType, as_dtype
    from hq_lightning.march import March, as_march, supports_int16

    march = as_march(march)
    if supports_int16(march):
        return
    for tree in trees:
        for factory in _factories(tree):
            dtype = (getattr(factory, "keywords", None) or {}).get("dtype")
            if dtype is not None and as_dtype(dtype) is QuantDType.qint16:
                valid = ", ".join(m.value for m in March if supports_int16(m))
                raise ValueError(
                    f"Expected `march` to be one of {valid} for 16-bit activations "
                    f"(int16 does not exist on {march.value}), but got march={march.value}. "
                    f"Pick e.g. march=bayes, or use an 8-bit quant config such as +quant=qat."
                )
