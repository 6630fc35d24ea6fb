"""Structured-config schema of the Hydra app, registered in Hydra's ConfigStore.

The YAML tree in ``conf/`` is merged onto these dataclasses, so a misspelled key anywhere under
``march`` or ``quant`` (a qconfig, an override, a callback knob) fails at composition with
Hydra's usual ``Key 'averagin_constant' not in 'FakeQuantizeConf'`` message instead of being
silently ignored. Groups whose keys belong to third-party classes (``model``, ``data``,
``trainer``, ``callbacks``, ``logger``) stay free-form: their classes check their own arguments.

Example:
    >>> from omegaconf import OmegaConf
    >>> from hq_lightning.app.schema import FakeQuantizeConf
    >>> node = OmegaConf.structured(FakeQuantizeConf)
    >>> node.dtype
    'qint8'
    >>> try:
    ...     node.averagin_constant = 0.1
    ... except Exception as err:
    ...     print(type(err).__name__)
    ConfigAttributeError
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = [
    "AppConfig",
    "DeployConf",
    "FakeQuantizeConf",
    "MarchConf",
    "ObserverRefConf",
    "QConfigConf",
    "QConfigOverrideConf",
    "QuantConf",
    "QuantMode",
    "check_config",
    "register_configs",
]

# Optional[...] rather than `X | None`: OmegaConf reads these annotations at run time and does
# not understand PEP 604 unions on Python 3.10.
# ruff: noqa: UP007, UP045


@dataclass
class MarchConf:
    """``conf/march/<name>.yaml``: the processor the model is trained for."""

    name: str = MISSING
    description: str = ""


@dataclass
class ObserverRefConf:
    """An observer class by import path (``hq_lightning.quantization.MSEObserver``) or short name
    (``mse``); instantiating the node returns the class itself, not an instance."""

    _target_: str = "hq_lightning.app.qconfig_builder.observer_class"
    path: str = MISSING


@dataclass
class FakeQuantizeConf:
    """One fake-quant factory: ``FakeQuantize.with_args(observer=..., dtype=..., ...)``.

    Optional fields left ``null`` are not passed, so the observer's own default applies.
    """

    _target_: str = "hq_lightning.quantization.FakeQuantize.with_args"
    observer: ObserverRefConf = MISSING
    dtype: str = "qint8"
    ch_axis: Optional[int] = None
    averaging_constant: Optional[float] = None
    # observer keyword arguments (only the observers that define them accept them)
    percentile: Optional[float] = None  # PercentileObserver
    percentiles: Optional[list[float]] = None  # MixObserver
    bins: Optional[int] = None  # histogram observers
    stride: Optional[int] = None  # MSEObserver, KLObserver
    xmin: Optional[float] = None  # ClipObserver
    xmax: Optional[float] = None
    scale: Optional[float] = None  # FixedScaleObserver
    sync: Optional[str] = None  # how statistics are reduced over DDP ranks


@dataclass
class QConfigConf:
    """``QConfig(activation=..., weight=...)``; ``activation: null`` means a high-precision
    (int32) output of a Conv/Linear."""

    _target_: str = "hq_lightning.quantization.QConfig"
    activation: Optional[FakeQuantizeConf] = None
    weight: Optional[FakeQuantizeConf] = None


@dataclass
class QConfigOverrideConf:
    """``quant.overrides.<alias>``: a qconfig for one module name or one module type.

    The alias is any identifier; it exists because Hydra's override grammar reads dots as nesting,
    so a dotted module name (``backbone.conv1``) cannot be a key on the command line.

    Exactly one of ``module`` (a module name as in ``named_modules()``) or ``type`` (a class by
    import path, ``torch.nn.Linear``) is set. The qconfigs come from ``preset`` (a name in
    :data:`hq_lightning.app.qconfig_builder.PRESETS`, e.g. ``int32_out`` or ``float``) and/or the
    explicit ``calibration`` / ``qat`` nodes, which win over the preset for their phase.
    """

    module: Optional[str] = None
    type: Optional[str] = None
    preset: Optional[str] = None
    calibration: Optional[QConfigConf] = None
    qat: Optional[QConfigConf] = None


class QuantMode(enum.Enum):
    """``qat``: float -> calibration -> QAT -> convert; ``calib``: float -> calibration -> convert."""

    qat = "qat"
    calib = "calib"


@dataclass
class QuantConf:
    """``conf/quant/<name>.yaml``, selected with ``+quant=<name>``.

    The global qconfigs, the per-module overrides and the knobs of
    :class:`hq_lightning.callbacks.QuantizationCallback`.
    """

    mode: QuantMode = QuantMode.qat
    calibration: QConfigConf = MISSING
    qat: Optional[QConfigConf] = None
    # alias -> QConfigOverrideConf. Typed as Any because OmegaConf refuses to assign a plain dict
    # (what a command-line override is) to a dict of dataclasses; each entry is checked against
    # QConfigOverrideConf when the qconfig trees are built, before anything runs.
    overrides: dict[str, Any] = field(default_factory=dict)
    # the schedule: float_epochs of float training (top-level `float_epochs`), then calibration,
    # then qat_epochs of QAT; trainer.max_epochs is their sum
    qat_epochs: int = 1
    submodule: str = "model"
    calibration_batches: int = 32
    calibration_dataloader: str = "train"
    freeze_observers_at_epoch: Optional[int] = None
    freeze_bn_at_epoch: Optional[int] = None
    qat_mode: str = "with_bn"
    # false: strict, every op between the stubs must run on integers (no float island)
    allow_float_islands: bool = True
    convert_at_end: bool = True
    export: list[str] = field(default_factory=lambda: ["torchscript"])
    # per-layer similarity report + plots in <run dir>/report (docs/profiling.md)
    report: bool = False
    report_batches: int = 4
    # +quant=auto_int16: promote the most sensitive layers to int16 outputs after calibration
    auto_int16: bool = False
    auto_int16_max_layers: int = 3
    auto_int16_sqnr_floor: Optional[float] = None
    # quant.compile=true: torch.compile the prepared model in place (a QAT step is one graph)
    compile: bool = False


@dataclass
class DeployConf:
    """``conf/deploy/<name>.yaml``, selected with ``+deploy=yuv`` and/or ``+deploy=segments``.

    The knobs of :class:`hq_lightning.callbacks.DeploymentCallback` (docs/deployment.md). The
    files and ``manifest.json`` go to ``<run dir>/deploy``.
    """

    yuv: bool = False
    swing: str = "full"
    # RGB normalisation in pixel units (0..255); null: the datamodule's pixel_mean / pixel_std
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    bgr: bool = False
    # null: one stage; "auto": every inner QuantStub and run of wrapped CPU-side calls; or a list
    at: Any = None
    export: list[str] = field(default_factory=lambda: ["torchscript"])
    validate: bool = True


@dataclass
class AppConfig:
    """The root of ``conf/config.yaml``."""

    march: MarchConf = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)
    quant: Optional[QuantConf] = None
    deploy: Optional[DeployConf] = None
    float_epochs: int = 6
    init_from: Optional[str] = None
    resume_from: Optional[str] = None
    seed: int = 0
    output_dir: str = MISSING
    print_config: bool = False
    fix_malloc_thresholds: bool = True


def register_configs(store: ConfigStore | None = None) -> None:
    """Register the root schema as ``app_schema``, the first entry of ``conf/config.yaml``'s
    defaults list; every group merged after it is checked against its field."""
    store = store or ConfigStore.instance()
    store.store(name="app_schema", node=AppConfig)


def check_config(cfg: DictConfig) -> None:
    """Check a composed config against :class:`AppConfig` once more.

    Composition already rejects a misspelled key in a YAML file or in a plain ``key=value``
    override; a key *added* with ``+key=value`` bypasses the struct flag, so this catches it.

    Raises:
        ValueError: naming the unknown key, its full path and the schema class.
    """
    try:
        OmegaConf.merge(OmegaConf.structured(AppConfig), OmegaConf.to_container(cfg, resolve=False))
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines()]
        where = next((line for line in lines if line.startswith("full_key:")), "")
        raise ValueError(
            f"Expected every config key to be one of the schema's (hq_lightning/app/schema.py), "
            f"but: {lines[0]} ({where}). Check the spelling of that key."
        ) from None
