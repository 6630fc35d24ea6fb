"""``hq-report ckpt=<checkpoint> [data=<name>] [out=<dir>] [batches=<n>] [<override> ...]``.

Rebuilds the per-layer report (docs/profiling.md) from a checkpoint that ``QuantizationCallback``
wrote during ``python train.py +quant=...``: the run's config is read back from the run
directory's ``.hydra/overrides.yaml`` (found by walking up from the checkpoint), the model is
prepared as the callback prepared it, the checkpoint's weights, scales, phase and int16 layers are
loaded, and ``batches`` validation batches of the data (``data=digits|mnist|...`` picks another
dataset; any other ``key=value`` is a Hydra override) go through the float, fake-quant and
converted models. Files: ``<out>/checkpoint.md``, ``.json``, ``_sqnr.png``, ``_histograms.png``
(``out`` defaults to ``<run dir>/report``).

Example:
    >>> parse_arguments(["ckpt=run/logs/checkpoints/last.ckpt", "data=mnist", "batches=2"])
    ('run/logs/checkpoints/last.ckpt', None, 2, ['data=mnist'])
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_report", "main", "parse_arguments"]

_OWN = ("ckpt", "out", "batches")


def parse_arguments(argv: Sequence[str]) -> tuple[str, str | None, int, list[str]]:
    """``(ckpt, out, batches, hydra_overrides)`` from ``key=value`` arguments.

    Raises:
        ValueError: no ``ckpt=``, an argument without ``=``, or a bad ``batches``.
    """
    own: dict[str, str] = {}
    overrides: list[str] = []
    for argument in argv:
        key, sep, value = argument.partition("=")
        if not sep:
            raise ValueError(f"Expected arguments of the form key=value, but got {argument!r}.")
        if key in _OWN:
            own[key] = value
        else:
            overrides.append(argument)
    if "ckpt" not in own:
        raise ValueError(
            "Expected `ckpt=<path to a checkpoint written by QuantizationCallback>`, but got none: "
            "e.g. hq-report ckpt=outputs/<date>/<time>/logs/checkpoints/epoch=6-step=77.ckpt"
        )
    try:
        batches = int(own.get("batches", 4))
    except ValueError:
        batches = 0
    if batches < 1:
        raise ValueError(f"Expected `batches` to be an int >= 1, but got {own.get('batches')!r}.")
    return own["ckpt"], own.get("out"), batches, overrides


def _run_dir(ckpt: Path) -> Path | None:
    for parent in ckpt.resolve().parents:
        if (parent / ".hydra" / "overrides.yaml").is_file():
            return parent
    return None


def _compose(run_dir: Path | None, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from hq_lightning.app.schema import register_configs
    from hq_lightning.cli import CONFIG_PATH

    saved: list[str] = []
    if run_dir is not None:
        saved = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    # a later override of the same key wins; a group chosen again (data=...) replaces the saved one
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    merged = [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in keys] + list(overrides)
    if not any(o.lstrip("+").startswith("quant=") for o in merged):
        merged.append("+quant=qat")
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(config_name="config", overrides=merged)
    with open_dict(cfg):
        cfg.output_dir = str(run_dir) if run_dir is not None else "."
    return cfg


def build_report(ckpt: str, out: str | None = None, batches: int = 4, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Write the per-layer report of checkpoint ``ckpt``; returns the written files."""
    import copy

    import torch
    from hydra.utils import instantiate

    from hq_lightning.app.build import build_quantization_callback
    from hq_lightning.app.qconfig_builder import build_qconfig_trees
    from hq_lightning.callbacks.quantization import batch_inputs
    from hq_lightning.march import as_march, march_context, set_march
    from hq_lightning.quantization import FakeQuantState, convert_fx, set_fake_quantize
    from hq_lightning.quantization.profiler import check_model, layer_similarity, write_report

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"Expected `ckpt` to be an existing checkpoint file, but got {ckpt!r}.")
    run_dir = _run_dir(path)
    cfg = _compose(run_dir, list(overrides))
    march = as_march(cfg.march.name)
    set_march(march)
    callback = build_quantization_callback(cfg, build_qconfig_trees(cfg.quant), None)
    module = instantiate(cfg.model)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # a checkpoint this app wrote
    live = callback.load_for_report(module, checkpoint).cpu().eval()

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    inputs: list[tuple] = []
    hook = live.register_forward_pre_hook(lambda m, args: inputs.append(tuple(a.detach() for a in args)))
    module.eval()
    set_fake_quantize(live, FakeQuantState.FLOAT)
    with torch.no_grad():
        for index, batch in enumerate(datamodule.val_dataloader()):
            if index >= batches:
                break
            module(batch_inputs(batch))
    hook.remove()
    if not inputs:
        raise ValueError(f"Expected the validation data of `{cfg.data._target_}` to yield batches, but it yielded none.")

    converted = None
    if callback.calibrated:
        with march_context(march):
            converted = convert_fx(copy.deepcopy(live))
    report = layer_similarity(
        live, live, inputs, converted=converted, float_layers=callback._float_layers,
        title=f"Checkpoint {path.name} (phase {callback.phase})",
    )
    directory = Path(out) if out else (run_dir / "report" if run_dir is not None else path.parent / "report")
    sections = []
    if callback.int16_decision:
        sections.append(f"Int16 layers (auto int16): {', '.join(f'`{p}`' for p in callback.int16_layers) or 'none'}.")
    return write_report(
        report, directory, name="checkpoint", check=check_model(live, march=march), sections=sections,
        extra={"checkpoint": str(path), "phase": callback.phase, "int16_layers": callback.int16_layers},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``hq-report``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("Example:")[0].strip())
        return 0
    try:
        ckpt, out, batches, overrides = parse_arguments(argv)
    except ValueError as err:
        print(f"hq-report: {err}", file=sys.stderr)
        return 2
    files = build_report(ckpt, out, batches, overrides)
    for kind, file in files.items():
        print(f"{kind}: {file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
