"""Turn the composed config into Lightning objects: loggers, callbacks, the epoch schedule and the
quantization callback.

Example:
    >>> from omegaconf import OmegaConf
    >>> from hq_lightning.app.build import max_epochs
    >>> max_epochs(OmegaConf.create({"float_epochs": 6, "quant": None, "trainer": {}}))
    6
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from hq_lightning.app.qconfig_builder import QConfigTrees
from hq_lightning.app.schema import QuantMode

__all__ = [
    "build_callbacks",
    "build_deployment_callback",
    "build_loggers",
    "build_quantization_callback",
    "check_one_device_per_job",
    "load_float_weights",
    "max_epochs",
    "merge_group_selections",
]

log = logging.getLogger(__name__)

_IF_INSTALLED = "_if_installed_"


def build_loggers(logger_cfg: DictConfig) -> list[Any] | bool:
    """Instantiate every logger of the ``logger`` group; those whose ``_if_installed_`` module is
    missing are skipped. No logger at all gives ``False`` (Lightning's "no logging")."""
    loggers = []
    for name, node in (logger_cfg or {}).items():
        node = OmegaConf.to_container(node, resolve=True)
        requirement = node.pop(_IF_INSTALLED, None)
        if requirement is not None and importlib.util.find_spec(requirement) is None:
            log.info("logger %r skipped: %r is not installed", name, requirement)
            continue
        try:
            loggers.append(instantiate(node))
        except Exception as err:
            raise RuntimeError(
                f"Expected `logger.{name}` to build a Lightning logger, but it failed: {err}. "
                f"Install what it needs or pick another one, e.g. logger=csv."
            ) from err
    return loggers or False


def build_callbacks(callbacks_cfg: DictConfig) -> list[Any]:
    """Instantiate every callback of the ``callbacks`` group (a name -> node mapping)."""
    return [instantiate(node) for node in (callbacks_cfg or {}).values() if node is not None]


def max_epochs(cfg: DictConfig) -> int:
    """``float_epochs`` plus ``quant.qat_epochs`` in ``qat`` mode.

    Raises:
        ValueError: if ``trainer.max_epochs`` is set to something else, since the callback's
            schedule would then disagree with the trainer's.
    """
    total = int(cfg.float_epochs)
    quant = cfg.get("quant")
    if quant is not None and QuantMode(_mode_value(quant.mode)) is QuantMode.qat:
        total += int(quant.qat_epochs)
    elif quant is not None and total == 0:
        total = 1  # PTQ of given weights: calibration opens epoch 0, then training stops
    requested = cfg.trainer.get("max_epochs")
    if requested is not None and int(requested) != total:
        raise ValueError(
            f"Expected `trainer.max_epochs` to be unset (the app sets it to float_epochs"
            f"{' + quant.qat_epochs' if quant is not None else ''} = {total}), but got {requested}. "
            f"Set `float_epochs` and `quant.qat_epochs` instead."
        )
    return total


def _mode_value(mode: Any) -> str:
    return mode.value if isinstance(mode, QuantMode) else str(mode)


def check_one_device_per_job(trainer_cfg: DictConfig, multirun: bool) -> None:
    """In a sweep, refuse a DDP strategy that relaunches the script (it would re-run the sweep)."""
    if not multirun:
        return
    strategy = str(trainer_cfg.get("strategy", "auto") or "auto")
    devices = trainer_cfg.get("devices", 1)
    relaunches = strategy.startswith("ddp") and "spawn" not in strategy
    if relaunches or (strategy == "auto" and devices not in (1, "1")):
        raise ValueError(
            f"Expected one device per job in a sweep (-m), but got trainer.strategy={strategy!r}, "
            f"trainer.devices={devices!r}: Lightning's DDP relaunch re-passes the sweep's arguments. "
            f"Use trainer.devices=1 (or strategy=ddp_spawn)."
        )


def build_quantization_callback(
    cfg: DictConfig, trees: QConfigTrees, output_dir: str | None
) -> Any:
    """The :class:`hq_lightning.callbacks.QuantizationCallback` of ``cfg.quant``."""
    from hq_lightning.callbacks import QuantizationCallback

    quant = cfg.quant
    calibration_tree, qat_tree = trees
    return QuantizationCallback(
        submodule=quant.submodule,
        march=cfg.march.name,
        calibration_qconfig=calibration_tree,
        qat_qconfig=qat_tree,
        float_epochs=int(cfg.float_epochs),
        calibration_batches=int(quant.calibration_batches),
        calibration_dataloader=quant.calibration_dataloader,
        freeze_observers_at_epoch=quant.freeze_observers_at_epoch,
        freeze_bn_at_epoch=quant.freeze_bn_at_epoch,
        qat_mode=quant.qat_mode,
        allow_float_islands=bool(quant.get("allow_float_islands", True)),
        convert_at_end=bool(quant.convert_at_end),
        output_dir=output_dir,
        export=tuple(quant.export),
        report=bool(quant.get("report", False)),
        report_batches=int(quant.get("report_batches", 4)),
        auto_int16=bool(quant.get("auto_int16", False)),
        auto_int16_max_layers=int(quant.get("auto_int16_max_layers", 3)),
        auto_int16_sqnr_floor=quant.get("auto_int16_sqnr_floor"),
        compile=bool(quant.get("compile", False)),
        plan_labels=override_labels(quant),
    )


def override_labels(quant: DictConfig) -> dict[str, str]:
    """Sources of the quantization plan named after the ``quant.overrides`` alias that made them.

    Example:
        >>> from omegaconf import OmegaConf
        >>> override_labels(OmegaConf.create({"overrides": {
        ...     "out": {"module": "classifier"}, "lin": {"type": "torch.nn.Linear"}}}))
        {'name classifier': 'override out', 'type Linear': 'override lin'}
    """
    labels = {}
    for alias, entry in (quant.get("overrides") or {}).items():
        if entry.get("module") is not None:
            labels[f"name {entry['module']}"] = f"override {alias}"
        elif entry.get("type") is not None:
            labels[f"type {str(entry['type']).rsplit('.', 1)[-1]}"] = f"override {alias}"
    return labels


def build_deployment_callback(cfg: DictConfig) -> Any:
    """The :class:`hq_lightning.callbacks.DeploymentCallback` of ``cfg.deploy`` (needs ``+quant``)."""
    from hq_lightning.callbacks import DeploymentCallback

    deploy = cfg.deploy
    if cfg.get("quant") is None:
        raise ValueError(
            "Expected +quant=<name> with +deploy (the deployment phase deploys the converted "
            "model), but got no quant group: add e.g. +quant=qat."
        )
    at = deploy.at
    if at is not None and not isinstance(at, str):
        at = [str(point) for point in at]
    return DeploymentCallback(
        yuv=bool(deploy.yuv),
        swing=deploy.swing,
        mean=None if deploy.mean is None else list(deploy.mean),
        std=None if deploy.std is None else list(deploy.std),
        bgr=bool(deploy.bgr),
        segments=at,
        export=tuple(deploy.export),
        validate=bool(deploy.validate),
    )


def merge_group_selections(argv: list[str], group: str = "deploy") -> list[str]:
    """``+deploy=yuv +deploy=segments`` -> ``+deploy=[yuv,segments]`` (Hydra takes one selection
    per group on the command line, a list selects several options of one group).

    Example:
        >>> merge_group_selections(["train.py", "+deploy=yuv", "x=1", "+deploy=segments"])
        ['train.py', '+deploy=[yuv,segments]', 'x=1']
    """
    prefix = f"+{group}="
    chosen = [a for a in argv if a.startswith(prefix)]
    if len(chosen) < 2:
        return list(argv)
    options: list[str] = []
    for arg in chosen:
        value = arg[len(prefix):].strip()
        parts = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
        options.extend(p.strip() for p in parts if p.strip() and p.strip() not in options)
    merged = f"{prefix}[{','.join(options)}]"
    result, placed = [], False
    for arg in argv:
        if arg.startswith(prefix):
            if not placed:
                result.append(merged)
                placed = True
            continue
        result.append(arg)
    return result


def load_float_weights(module: Any, path: str) -> None:
    """Load float weights into the LightningModule (strict): a Lightning checkpoint's
    ``state_dict`` or a plain state dict saved with ``torch.save``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Expected `init_from` to be an existing checkpoint file, but got {path!r}."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"Expected `init_from` to hold a state dict or a Lightning checkpoint, but {path!r} "
            f"holds a {type(state).__name__}."
        )
    module.load_state_dict(state, strict=True)
