"""The per-layer report and sensitivity-driven int16 of :class:`QuantizationCallback`.

A mixin: ``QuantizationCallback(report=True)`` writes, into ``<run dir>/report/``, the per-layer
similarity report (Markdown, JSON, PNG plots; :mod:`hq_lightning.quantization.profiler`) of the
calibrated model and again of the converted one, logs the plots to TensorBoard when a logger can
take images, and prints the five worst layers under the final table.
``auto_int16=True`` measures layer sensitivity right after calibration, promotes the most
sensitive layers to int16 outputs (:func:`hq_lightning.quantization.sensitivity.auto_int16`)
before QAT, validates once more (phase ``auto_int16``) and records the decision in the
checkpoint and the report.

The inputs of both reports (and of the sensitivity measurement) are the same few batches of the
calibration dataloader, captured at the submodule's input while it runs in float.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from hq_lightning.callbacks._metrics_table import render_worst_layers
from hq_lightning.callbacks._submodule import get_submodule
from hq_lightning.quantization.state import FakeQuantState, set_fake_quantize

__all__ = ["LayerReportMixin"]

REPORT_DIR = "report"
AUTO_INT16_PHASE = "auto_int16"


class LayerReportMixin:
    """Report and auto-int16 state and hooks; the callback calls the ``_layer_report_*`` methods."""

    def _init_layer_report(
        self,
        report: bool,
        report_batches: int,
        auto_int16: bool,
        auto_int16_max_layers: int,
        auto_int16_sqnr_floor: float | None,
    ) -> None:
        for name, value in (("report", report), ("auto_int16", auto_int16)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected `{name}` to be True or False, but got {value!r}.")
        for name, value, minimum in (("report_batches", report_batches, 1), ("auto_int16_max_layers", auto_int16_max_layers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")
        if auto_int16_sqnr_floor is not None and (
            isinstance(auto_int16_sqnr_floor, bool) or not isinstance(auto_int16_sqnr_floor, (int, float))
        ):
            raise ValueError(
                f"Expected `auto_int16_sqnr_floor` to be a number of dB or None, but got {auto_int16_sqnr_floor!r}."
            )
        if auto_int16 and self.calibration_qconfig is None:
            raise ValueError(
                "Expected a `calibration_qconfig` with `auto_int16=True` (the layers are ranked on "
                "the calibrated model), but got None."
            )
        if auto_int16 and self.march is not None:
            from hq_lightning.march import supports_int16

            if not supports_int16(self.march):
                raise ValueError(
                    f"Expected a march with int16 (bayes, bayes_e, nash) for `auto_int16=True`, but got "
                    f"{self.march.value!r}: use march=bayes, or layer_sensitivity(...).fallback_qconfig_dict() "
                    "to keep the sensitive layers float."
                )
        self.report = report
        self.report_batches = report_batches
        self.auto_int16 = auto_int16
        self.auto_int16_max_layers = auto_int16_max_layers
        self.auto_int16_sqnr_floor = None if auto_int16_sqnr_floor is None else float(auto_int16_sqnr_floor)
        #: prepared paths promoted to int16 (restored from checkpoints)
        self.int16_layers: list[str] = []
        #: the auto-int16 decision (``Int16Decision.to_dict()``), restored from checkpoints
        self.int16_decision: dict[str, Any] | None = None
        #: ``{"calibration" | "quantized": {kind: path}}`` written by rank 0
        self.report_files: dict[str, dict[str, str]] = {}
        self._report_inputs: list[tuple] = []
        self._float_layers: dict[str, tuple[str, ...]] | None = None
        self._worst_layers: tuple[list[str], list[list[str]]] | None = None
        self._int16_sections: list[str] = []
        self._before_int16: Any = None

    # ------------------------------------------------------------------ state
    def _layer_report_state(self) -> dict[str, Any]:
        return {"int16_layers": list(self.int16_layers), "int16_decision": copy.deepcopy(self.int16_decision)}

    def _load_layer_report_state(self, state: dict[str, Any]) -> None:
        from hq_lightning.quantization.sensitivity import promote_to_int16

        self.int16_layers = list(state.get("int16_layers", []))
        self.int16_decision = copy.deepcopy(state.get("int16_decision"))
        if self.int16_layers and self._live is not None:
            # the checkpoint holds the int16 scales; only the dtypes are not in a state_dict
            promote_to_int16(self._live, self.int16_layers, recompute_scale=False)

    def _layer_report_installed(self, live: nn.Module) -> None:
        """A freshly prepared live model gets the int16 layers already decided (ddp_spawn hand-over)."""
        if self.int16_layers:
            from hq_lightning.quantization.sensitivity import promote_to_int16

            promote_to_int16(live, self.int16_layers, recompute_scale=False)
        live.register_load_state_dict_pre_hook(self._int16_before_load)

    def _int16_before_load(self, module: nn.Module, state_dict, prefix, *args: Any) -> None:
        """Lightning restores the weights before the callbacks' states: make the checkpoint's int16
        layers int16 before their scales are loaded (a fake quant's dtype is not in a state_dict)."""
        from hq_lightning.quantization.sensitivity import promote_to_int16

        trainer = getattr(self._module, "_trainer", None)
        checkpoint = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        state = ((checkpoint or {}).get("callbacks") or {}).get(self.state_key) or {}
        layers = [p for p in state.get("int16_layers") or [] if p not in self.int16_layers]
        if layers:
            promote_to_int16(module, layers, recompute_scale=False)

    def _layer_report_setup(self, float_module: nn.Module) -> None:
        if not self.report or self._float_layers is not None:
            return
        from hq_lightning.quantization.profiler import float_layer_map

        try:
            self._float_layers = float_layer_map(float_module, fold_bn=self.qat_mode == "fuse_bn")
        except Exception:  # the prepare that follows names any tracing problem
            self._float_layers = {}

    def load_for_report(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> nn.Module:
        """Outside a Trainer: prepare ``pl_module``'s submodule as fit does, load a checkpoint this
        callback wrote (weights, scales, phase, int16 layers) and return the prepared submodule.

        Raises:
            KeyError: the checkpoint has no ``state_dict``.
        """
        float_module = get_submodule(pl_module, self.submodule)
        report, self.report = self.report, True
        try:
            self._layer_report_setup(float_module)
        finally:
            self.report = report
        self._install_live(pl_module, float_module)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is not None:
            self._load_layer_report_state(state)  # int16 layers before their scales are loaded
        pl_module.load_state_dict(checkpoint["state_dict"], strict=True)
        if state is not None:
            self.load_state_dict(state)
        return self._live

    def resolve_report_dir(self, trainer: pl.Trainer) -> str:
        """``<output_dir>/report`` when ``output_dir`` is set, else ``<log dir>/report``."""
        if self.output_dir is not None:
            return os.path.join(os.fspath(self.output_dir), REPORT_DIR)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, REPORT_DIR)

    # ------------------------------------------------------------------ inputs
    def _collect_report_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple]:
        """The submodule's inputs for the first ``report_batches`` calibration batches (CPU)."""
        if self._report_inputs:
            return self._report_inputs
        loader = self._calibration_loader(trainer)
        step = self._calibration_step_fn(pl_module)
        live = get_submodule(pl_module, self.submodule)
        captured: list[tuple] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not kwargs and len(captured) < self.report_batches:
                captured.append(tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args))

        modes = {module: module.training for module in pl_module.modules()}
        flags = [(fq, fq.fake_quant_enabled, fq.observer_enabled) for fq in _fake_quants(live)]
        hook = live.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            pl_module.eval()
            set_fake_quantize(live, FakeQuantState.FLOAT)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= self.report_batches:
                        break
                    step(pl_module, pl_module._apply_batch_transfer_handler(batch, device=pl_module.device))
        finally:
            hook.remove()
            for module, training in modes.items():
                module.train(training)
            for fq, fake_quant_enabled, observer_enabled in flags:
                fq.fake_quant_enabled, fq.observer_enabled = fake_quant_enabled, observer_enabled
        if not captured:
            rank_zero_warn(
                f"QuantizationCallback: no input of `{self.submodule}` was captured (called with "
                "keyword arguments?); the per-layer report and auto int16 are skipped."
            )
        self._report_inputs = captured
        return captured

    # ------------------------------------------------------------------ after calibration
    def _layer_report_after_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.report or self.auto_int16):
            return
        inputs = self._collect_report_inputs(trainer, pl_module)
        if not inputs:
            return
        if self.auto_int16:
            if self.report and trainer.is_global_zero:
                self._before_int16 = self._similarity(self._live, inputs, "calibration (int8, before auto int16)")
            self._run_auto_int16(trainer, inputs)
            self._evaluate(trainer, AUTO_INT16_PHASE)
        if self.report and trainer.is_global_zero:
            self._write_phase_report(trainer, "calibration", self._live, inputs, converted=True)

    def _run_auto_int16(self, trainer: pl.Trainer, inputs: list[tuple]) -> None:
        from hq_lightning.quantization.sensitivity import auto_int16, promote_to_int16

        live = self._live
        paths: list[str] | None = None
        decision = None
        if trainer.is_global_zero:
            device = next((t.device for t in live.buffers()), torch.device("cpu"))
            batches = [tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in batch) for batch in inputs]
            decision = auto_int16(
                live, batches, max_layers=self.auto_int16_max_layers, sqnr_floor=self.auto_int16_sqnr_floor
            )
            paths = list(decision.promoted)
        paths = trainer.strategy.broadcast(paths, src=0)  # every rank promotes the same layers
        if not trainer.is_global_zero:
            promote_to_int16(live, paths)
        self.int16_layers = list(paths)
        if decision is not None:
            self.int16_decision = decision.to_dict()
            self._int16_sections = [decision.to_markdown()]
            rank_zero_info(
                f"QuantizationCallback: auto int16 promoted {paths or 'no layer'} "
                f"(model-output SQNR {decision.sqnr_before:.2f} -> {decision.sqnr_after:.2f} dB)."
            )
        self._state_dirty = True

    # ------------------------------------------------------------------ after conversion
    def _layer_report_after_conversion(self, trainer: pl.Trainer) -> None:
        if not self.report or not trainer.is_global_zero or not self._report_inputs:
            return
        self._write_phase_report(trainer, "quantized", self._live, self._report_inputs, converted=self.quantized_model)

    # ------------------------------------------------------------------ writing
    def _similarity(self, live: nn.Module, inputs: list[tuple], title: str, converted: Any = None):
        from hq_lightning.quantization.profiler import layer_similarity

        prepared = copy.deepcopy(live).cpu()
        if converted is True:
            converted = self._convert_copy(prepared)
        return layer_similarity(
            prepared, prepared, inputs, converted=converted, float_layers=self._float_layers, title=title
        )

    def _convert_copy(self, prepared: nn.Module) -> Any:
        from hq_lightning.march import march_context
        from hq_lightning.quantization import convert_fx

        try:
            if self.march is not None:
                with march_context(self.march):
                    return convert_fx(prepared)
            return convert_fx(prepared)
        except Exception as err:  # the report still shows the fake-quant model
            rank_zero_warn(f"QuantizationCallback: the report's converted model could not be built: {err}")
            return None

    def _write_phase_report(self, trainer: pl.Trainer, name: str, live: nn.Module, inputs: list[tuple], converted: Any) -> None:
        from hq_lightning.quantization.profiler import check_model, write_report

        titles = {"calibration": "Calibrated model", "quantized": "After QAT and conversion"}
        try:
            report = self._similarity(live, inputs, titles.get(name, name), converted=converted)
            prepared = copy.deepcopy(live).cpu()
            check = check_model(prepared, march=self.march)
        except Exception as err:  # a report must never cost the training run
            rank_zero_warn(f"QuantizationCallback: the per-layer report `{name}` failed: {type(err).__name__}: {err}")
            return
        sections = list(self._int16_sections) if name == "calibration" else []
        if name == "calibration" and self._before_int16 is not None:
            sections.append(_before_after(self._before_int16, report))
        extra = {"phase": name, "int16_layers": list(self.int16_layers)}
        if self.int16_decision is not None:
            extra["auto_int16"] = self.int16_decision
        directory = self.resolve_report_dir(trainer)
        files = write_report(report, directory, name=name, check=check, sections=sections, extra=extra)
        if self._before_int16 is not None and name == "calibration":
            write_report(self._before_int16, directory, name="calibration_int8", plots="auto")
        self.report_files[name] = files
        self._worst_layers = _worst_rows(report)
        _log_images(trainer, name, files)
        worst = report.rows[0].path if report.rows else "-"
        rank_zero_info(f"QuantizationCallback: per-layer report ({name}, worst layer `{worst}`): {files['markdown']}")

    def _worst_layers_text(self) -> str:
        if self._worst_layers is None:
            return ""
        header, rows = self._worst_layers
        return render_worst_layers(header, rows)


def _fake_quants(module: nn.Module) -> list[Any]:
    from hq_lightning.quantization.fake_quantize import FakeQuantize

    return [m for m in module.modules() if isinstance(m, FakeQuantize)]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) and value > 0 else f"{value:.2f}"


def _worst_rows(report: Any, k: int = 5) -> tuple[list[str], list[list[str]]]:
    names = {"fake_quant": "SQNR fq (dB)", "converted": "SQNR int (dB)"}
    header = ["layer", "type", "dtype", *(names[m] for m in report.models), "clipped"]
    rows = []
    for row in report.worst(k):
        saturation = max((s.saturation for s in row.stats.values() if not math.isnan(s.saturation)), default=math.nan)
        rows.append(
            [
                row.path,
                row.module_type,
                row.dtype,
                *(_fmt(row.stats[m].sqnr) if m in row.stats else "-" for m in report.models),
                "-" if math.isnan(saturation) else f"{100 * saturation:.2f}%",
            ]
        )
    return header, rows


def _before_after(before: Any, after: Any) -> str:
    """Per-layer SQNR of the calibrated model before and after the int16 promotions."""
    model = "converted" if "converted" in after.models else "fake_quant"
    lines = [
        "## Before / after auto int16",
        "",
        f"Per-layer SQNR (dB, {model.replace('_', '-')} vs float), worst layers after the promotion first.",
        "",
        "| layer | dtype before | dtype after | SQNR before | SQNR after |",
        "|---|---|---|---:|---:|",
    ]
    earlier = {row.path: row for row in before.layers}
    for row in after.rows:
        old = earlier.get(row.path)
        if old is None:
            continue
        old_sqnr = old.stats.get(model, old.stats.get("fake_quant"))
        new_sqnr = row.stats.get(model)
        lines.append(
            f"| `{row.path}` | {old.dtype} | {row.dtype} | "
            f"{_fmt(old_sqnr.sqnr) if old_sqnr else '-'} | {_fmt(new_sqnr.sqnr) if new_sqnr else '-'} |"
        )
    for label, report in (("before", before), ("after", after)):
        output = report.output.get(model)
        if output is not None:
            lines.append(f"\nModel output SQNR {label}: {_fmt(output.sqnr)} dB.")
    return "\n".join(lines)


def _log_images(trainer: pl.Trainer, name: str, files: dict[str, str]) -> None:
    """Every logger whose experiment takes images (TensorBoard's SummaryWriter) gets the plots."""
    writers = [getattr(logger, "experiment", None) for logger in trainer.loggers]
    writers = [w for w in writers if callable(getattr(w, "add_image", None))]
    if not writers:
        return
    try:
        from matplotlib import image
    except ImportError:
        return
    for kind in ("sqnr_plot", "histogram_plot"):
        if kind not in files:
            continue
        picture = image.imread(files[kind])[..., :3]
        for writer in writers:
            writer.add_image(f"hq_report/{name}/{kind}", picture, trainer.global_step, dataformats="HWC")
