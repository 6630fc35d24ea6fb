"""The Hydra app: ``hq-train`` / ``python train.py``.

``python train.py +quant=qat march=bayes`` trains the default model on digits in float, calibrates,
runs QAT, converts to the integer model, prints the table float / calibration / QAT / converted
and leaves the converted model, its exports, logs and ``metrics.json`` in the run directory.
Without ``+quant`` it trains the float model only. ``-m`` sweeps; the sweep's table lands in
``summary.md`` of the sweep directory.

The config tree is ``hq_lightning/conf`` (the repository's ``conf/`` is a link to it), checked
against the schema in :mod:`hq_lightning.app.schema`; see ``docs/app.md``.

This is the only module of the package that imports Hydra (besides ``hq_lightning.app``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hq_lightning.app.schema import check_config, register_configs

__all__ = ["main", "run"]

log = logging.getLogger(__name__)

# hq_lightning/conf, shipped in the wheel. An absolute path: as a module of a package, a relative
# config_path would be read as the importable package `hq_lightning.conf`.
CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")


def run(cfg: DictConfig, output_dir: str | None = None, multirun: bool = False) -> dict[str, dict]:
    """Train (and quantize, with ``cfg.quant``) as configured; return the metrics table.

    Args:
        cfg: the composed config (``conf/config.yaml`` plus overrides).
        output_dir: where artifacts go; defaults to ``cfg.output_dir``.
        multirun: whether this is one job of a sweep (then DDP relaunching is refused).

    Returns:
        phase -> metrics, e.g. ``{"float": {...}, "calibration": {...}, "qat": {...},
        "quantized": {...}}`` ("quantized": the converted integer model).
    """
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from hq_lightning.app.build import (
        build_callbacks,
        build_loggers,
        build_quantization_callback,
        check_one_device_per_job,
        load_float_weights,
        max_epochs,
    )
    from hq_lightning.app.evaluate import evaluate_test_split, validate_counting_images
    from hq_lightning.app.qconfig_builder import build_qconfig_trees, check_march_supports
    from hq_lightning.app.report import METRICS_FILE, print_table, write_metrics
    from hq_lightning.app.resume import resolve_checkpoint
    from hq_lightning.callbacks._metrics_table import images_note
    from hq_lightning.march import as_march, set_march

    _let_hydra_own_logging()
    _quiet_known_noise()
    output_dir = str(output_dir or cfg.output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg))

    # every check that can fail runs before the first training step
    check_config(cfg)
    if cfg.fix_malloc_thresholds:
        from hq_lightning.utils.malloc import fix_malloc_thresholds

        fixed = fix_malloc_thresholds()
        log.info("malloc thresholds: %s", "fixed (hq_lightning.utils.malloc)" if fixed else "left (not glibc)")
    march = as_march(cfg.march.name)
    set_march(march)
    check_one_device_per_job(cfg.trainer, multirun)
    resume_from = resolve_checkpoint(cfg.resume_from, "resume_from", output_dir)
    init_from = resolve_checkpoint(cfg.init_from, "init_from", output_dir)
    epochs = max_epochs(cfg)
    trees = None
    if cfg.quant is not None:
        trees = build_qconfig_trees(cfg.quant)
        check_march_supports(trees, march)

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    if init_from is not None:
        load_float_weights(module, init_from)
    callbacks = build_callbacks(cfg.callbacks)
    quantization = None
    if trees is not None:
        quantization = build_quantization_callback(cfg, trees, output_dir)
        callbacks.append(quantization)
    if cfg.get("deploy") is not None:
        from hq_lightning.app.build import build_deployment_callback

        callbacks.append(build_deployment_callback(cfg))  # deploys what `quantization` converts
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg.logger), max_epochs=epochs
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    if quantization is not None:
        # the callback has logged its table (metric x phase) at the end of fit
        table = {phase: dict(metrics) for phase, metrics in quantization.metrics_table.items()}
        images = {"validation": max(quantization.metrics_images.values(), default=0)}
        for kind, path in quantization.exported_files.items():
            log.info("%s: %s", kind, path)
    else:
        metrics, count = validate_counting_images(trainer, module, datamodule)
        table = {"float": metrics}
        images = {"validation": count}
        print_table(table, title=f"march={march.value}", note=images_note({"float": count}))
    # the test split, held out until now, once for the model the run delivers
    test = evaluate_test_split(trainer, module, datamodule, quantization)
    if test is not None:
        images["test"] = test.images
        print_table({test.label: test.metrics}, title=test.title, note=test.note)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    extra = {"test": {test.label: test.metrics}} if test is not None else {}
    path = write_metrics(
        Path(output_dir) / METRICS_FILE, table, overrides=overrides, march=march.value,
        images=images, **extra,
    )
    log.info("metrics: %s", path)
    return table


class _DropLightningTips(logging.Filter):
    """Lightning's advertisements for its cloud products ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def _quiet_known_noise() -> None:
    """Silence what says nothing about this run: Lightning's product tips, its own deprecation
    of `LeafSpec` (raised inside Lightning on current torch, on every run), matplotlib's one-off
    font-cache notice (when mlxtend imports it)."""
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _let_hydra_own_logging() -> None:
    """Lightning adds its own console handler to the ``lightning`` logger even when the root
    logger has one (Hydra's, which also writes ``<run dir>/<job>.log``): every line would
    print twice. Leave the console to Hydra's handlers."""
    root = logging.getLogger()
    if not root.handlers:
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> Any:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    return run(cfg, multirun=multirun)


def main() -> None:
    """Console entry point (``hq-train``; ``train.py`` calls it)."""
    import sys

    from hq_lightning.app.build import merge_group_selections
    from hq_lightning.app.overrides import check_override_keys, quote_path_overrides

    register_configs()
    sys.argv = merge_group_selections(sys.argv, "deploy")  # +deploy=yuv +deploy=segments
    # checkpoint paths hold `=`: quoted here so `resume_from=.../epoch=6-step=70.ckpt` parses
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    try:
        check_override_keys(sys.argv[1:])  # a misspelled key gets our did-you-mean, not Hydra's `+`
    except ValueError as err:
        print(f"Error in the command line: {err}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()


if __name__ == "__main__":
    main()
