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
import difflib
import importlib
from collections.abc import Iterable
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hq_lightning.app.schema import QConfigConf, QConfigOverrideConf, QuantConf, QuantMode
from hq_lightning.callbacks._qconfig_checks import check_factories_build

__all__ = [
    "OBSERVER_ALIASES",
    "PRESETS",
    "QConfigTrees",
    "allowed_qconfig_targets",
    "build_qconfig_trees",
    "check_march_supports",
    "check_qconfig_targets",
    "import_by_path",
    "instantiate_qconfig",
    "observer_class",
    "register_qconfig_class",
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


# ------------------------------------------------------------------ allowed qconfig targets
# A qconfig node builds only observers, fake quants and QConfigs: a `_target_` (or an observer
# `path`) naming anything else (`os.mkdir`...) is refused before anything is imported or called.
_REGISTERED: dict[str, type] = {}  # import path -> observer or fake-quant class of a user
_QCONFIG_PATHS = ("hq_lightning.quantization.QConfig", "hq_lightning.quantization.qconfig.QConfig")
_OBSERVER_CLASS_TARGET = "hq_lightning.app.qconfig_builder.observer_class"


def _public_classes() -> tuple[dict[str, type], dict[str, type]]:
    """Our observer and fake-quant classes, by every import path they are reachable under."""
    from hq_lightning.quantization import fake_quantize, learnable_fake_quantize, observer

    observers: dict[str, type] = {}
    fake_quants: dict[str, type] = {}
    for module in (observer, fake_quantize, learnable_fake_quantize):
        for name, obj in vars(module).items():
            if name.startswith("_") or not isinstance(obj, type) or obj.__module__ != module.__name__:
                continue
            if issubclass(obj, observer.ObserverBase) and obj is not observer.ObserverBase:
                target = observers
            elif issubclass(obj, fake_quantize.FakeQuantize):
                target = fake_quants
            else:
                continue
            target[f"hq_lightning.quantization.{name}"] = obj
            target[f"{module.__name__}.{name}"] = obj
    return observers, fake_quants


def _classes() -> tuple[dict[str, type], dict[str, type]]:
    from hq_lightning.quantization.fake_quantize import FakeQuantize

    observers, fake_quants = _public_classes()
    for path, cls in _REGISTERED.items():
        (fake_quants if issubclass(cls, FakeQuantize) else observers)[path] = cls
    return observers, fake_quants


def register_qconfig_class(cls: type) -> type:
    """Allow a user's observer or fake-quant class in qconfig nodes (usable as a decorator).

    Qconfig nodes may only name our observer / fake-quant classes and ``QConfig``; register your
    own before the app composes its config (e.g. in your own entry script, then call
    ``hq_lightning.cli.main()``). It is then accepted by its import path,
    ``<module>.<ClassName>`` (as an observer ``path``, or ``<module>.<ClassName>.with_args``
    as a fake-quant ``_target_``).

    Example:
        >>> from hq_lightning.quantization import MinMaxObserver
        >>> class MyObserver(MinMaxObserver):
        ...     pass
        >>> register_qconfig_class(MyObserver) is MyObserver
        True
        >>> observer_class(f"{__name__}.MyObserver") is MyObserver
        True
    """
    from hq_lightning.quantization.fake_quantize import FakeQuantize
    from hq_lightning.quantization.observer import ObserverBase

    if not isinstance(cls, type) or not issubclass(cls, (ObserverBase, FakeQuantize)):
        raise TypeError(
            "Expected `cls` to be a subclass of hq_lightning.quantization.ObserverBase or "
            f"FakeQuantize, but got {cls!r}."
        )
    _REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def allowed_qconfig_targets() -> dict[str, list[str]]:
    """What qconfig nodes may name: ``{"_target_": [...], "observer.path": [...]}``."""
    observers, fake_quants = _classes()
    targets = [*_QCONFIG_PATHS, _OBSERVER_CLASS_TARGET, *(f"{p}.with_args" for p in fake_quants)]
    return {"_target_": targets, "observer.path": [*OBSERVER_ALIASES, *observers]}


def _short_list(paths: list[str]) -> str:
    public = [p for p in paths if p.startswith("hq_lightning.quantization.") and p.count(".") <= 3]
    public = [p for p in public if p.count(".") == 2 or p.endswith(".with_args")] or paths
    others = [p for p in paths if not p.startswith("hq_lightning.")]
    return ", ".join(dict.fromkeys([*public, *others]))


def _refuse(where: str, key: str, got: Any) -> ValueError:
    allowed = allowed_qconfig_targets()
    close = difflib.get_close_matches(str(got), allowed[key], n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    targets = _short_list(allowed["_target_"])
    observers = _short_list([p for p in allowed["observer.path"] if "." in p])
    return ValueError(
        f"Expected `{where}` to name an observer, fake-quant or QConfig class, but got {got!r}.{hint} "
        f"Allowed `_target_`s: {targets}. Allowed observer paths: {', '.join(OBSERVER_ALIASES)} or "
        f"{observers}. A class of your own: register it first with "
        "hq_lightning.app.qconfig_builder.register_qconfig_class(MyObserver)."
    )


def check_qconfig_targets(node: Any, where: str = "qconfig") -> None:
    """Refuse any ``_target_`` or observer ``path`` of a qconfig node outside the allowed classes.

    Nothing is imported or called: the names are compared with :func:`allowed_qconfig_targets`.
    """
    if isinstance(node, list):
        for index, value in enumerate(node):
            check_qconfig_targets(value, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    allowed = allowed_qconfig_targets()
    target = node.get("_target_")
    if target is not None and target not in allowed["_target_"]:
        raise _refuse(f"{where}._target_", "_target_", target)
    if target == _OBSERVER_CLASS_TARGET:
        path = node.get("path")
        if path not in allowed["observer.path"]:
            raise _refuse(f"{where}.path", "observer.path", path)
    for key, value in node.items():
        if key != "_target_":
            check_qconfig_targets(value, f"{where}.{key}")


def observer_class(path: str) -> type:
    """The observer class named by ``path``: a short name of :data:`OBSERVER_ALIASES` (``mse``,
    ``percentile``, ...) or the import path of one of our observers or of one registered with
    :func:`register_qconfig_class`; anything else is refused without being imported.

    It is the ``_target_`` of the ``observer`` node of a fake-quant config, so instantiating the
    node yields the class that ``FakeQuantize.with_args(observer=...)`` expects.
    """
    if path in OBSERVER_ALIASES:
        quantization = importlib.import_module("hq_lightning.quantization")
        return getattr(quantization, OBSERVER_ALIASES[path])
    observers, _ = _classes()
    if path not in observers:
        raise _refuse("observer.path", "observer.path", path)
    return observers[path]


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
    container = _without_unset(OmegaConf.to_container(checked, resolve=True))
    check_qconfig_targets(container, where)  # before anything named in it is imported or called
    qconfig = instantiate(container, _convert_="all")
    # the arguments alone, on a march that has every dtype: whether the march fits the dtypes is
    # check_march_supports' question, answered with the marches to pick
    from hq_lightning.march import March, march_context

    with march_context(March.BAYES):
        check_factories_build(qconfig, where, config_keys=True)
    return qconfig


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
