"""``QuantizationCallback``: float -> calibration -> QAT -> converted, inside one ``trainer.fit``.

How it stays compatible with Lightning (each point fixes a complaint users have about QAT
callbacks):

* Only a chosen submodule (``submodule="model"``, dotted paths allowed) is traced and replaced;
  the LightningModule and its ``forward`` are never touched, so keyword arguments, the loss and
  post-processing keep working.
* The replacement happens in ``setup``, the one hook before weights are restored, the model is
  moved and wrapped by DDP and the optimizer is built. The submodule is replaced by its QAT
  prepare from the start (``qat_mode="with_bn"`` keeps BN exactly float), and the float phase runs
  it in ``FakeQuantState.FLOAT``. Phases then only switch fake-quant states and fill buffers: no
  parameter is ever added or removed, so DDP, optimizers and strict checkpoint loading work in
  every phase.
* Calibration uses its own prepare (calibration qconfig) of a copy of the float submodule with the
  live weights, and copies the calibrated scales and statistics into the QAT model afterwards;
  the two qconfig kinds are never mixed in one prepared model.
* Validation (including sanity checks) runs in ``VALIDATION`` state: observers never move.
* The prepared structure does not depend on the phase, so ``setup`` needs nothing from a checkpoint:
  Lightning restores the weights and scales into it, then this callback's phase with its state
  (for fit, validate, test and predict alike). A checkpoint without that state (a float one, or
  ``save_weights_only=True``) is refused with a message saying what to do instead.
* Under ``strategy="ddp_spawn"`` rank 0 hands its state to the main process, which rebuilds the
  prepared structure before Lightning loads the trained weights into it (see ``_spawn_handoff``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hq_lightning.callbacks._checkpoint_file import guard_checkpoint_loading
from hq_lightning.callbacks._layer_report import AUTO_INT16_PHASE, LayerReportMixin
from hq_lightning.callbacks._metrics_table import render_metrics_table
from hq_lightning.callbacks._qconfig_checks import (
    check_factories_build,
    check_no_qconfig_attributes,
    check_qconfig_kind,
)
from hq_lightning.callbacks._spawn_handoff import install_handoff, new_token
from hq_lightning.callbacks._stub_check import check_has_quant_stub
from hq_lightning.callbacks._submodule import get_submodule, set_submodule
from hq_lightning.deploy.atomic_write import (
    ArtefactWriteError,
    save_atomically,
    write_bytes_atomically,
)
from hq_lightning.march import as_march, march_context
from hq_lightning.quantization.calibration_state import copy_calibration_state, copy_float_state
from hq_lightning.quantization.fake_quantize import FakeQuantize
from hq_lightning.quantization.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
)
from hq_lightning.quantization.state import FakeQuantState, set_fake_quantize

__all__ = ["QuantizationCallback", "default_calibration_step"]

PHASES = ("float", "calibration", "qat", "done")
_EXPORTS = ("torchscript", "onnx")
_INPUT_KEYS = ("img", "x", "input")
_PREFIXES = ("float/", "calibration/", f"{AUTO_INT16_PHASE}/", "qat/", "quantized/", "deployed/")


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: ``batch[0]`` of a tuple/list, ``batch["img"|"x"|"input"]`` of a dict."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("Expected a non-empty tuple/list batch, but got an empty one.")
        return batch[0]
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise KeyError(
            f"Expected a dict batch to hold the input under one of {_INPUT_KEYS}, but got keys "
            f"{sorted(batch)}: pass `calibration_step=` or define `calibration_step` on the module."
        )
    return batch


def default_calibration_step(pl_module: pl.LightningModule, batch: Any) -> None:
    """Runs ``pl_module(inputs)`` where ``inputs`` comes from :func:`batch_inputs`."""
    pl_module(batch_inputs(batch))


def _observers_await_data(model: nn.Module) -> bool:
    """Whether a training forward of ``model`` would feed an observer its first batch."""
    return model.training and any(
        module.observer_enabled and not module.activation_post_process.initialized
        for module in model.modules()
        if isinstance(module, FakeQuantize)
    )


class QuantizationCallback(LayerReportMixin, Callback):
    """Quantize one submodule of a LightningModule through float, calibration, QAT and conversion.

    Schedule (epochs count from 0): epochs ``< float_epochs`` train float; at the start of epoch
    ``float_epochs`` the submodule is calibrated over ``calibration_batches`` batches (unless
    ``calibration_qconfig`` is None) and evaluated once; the remaining epochs train in QAT
    (``qat_qconfig=None``: no QAT, training stops after calibration); at the end of fit a copy is
    converted, validated with the module's own ``validation_step`` and exported.

    Args:
        submodule: dotted attribute path of the part to quantize (it must be traceable by torch.fx
            and usually holds the QuantStub/DeQuantStub pair).
        march: march the fake quants are built for; ``None`` keeps ``get_march()``.
        calibration_qconfig: QConfig or qconfig tree of calibration kind; ``None`` skips calibration.
        qat_qconfig: QConfig or qconfig tree of QAT kind; ``None`` is post-training quantization.
        float_epochs: float epochs before calibration.
        calibration_batches: number of batches fed during calibration.
        calibration_dataloader: ``"train"``, ``"val"`` or an iterable of batches.
        freeze_observers_at_epoch: from this epoch on, QAT keeps its scales fixed.
        freeze_bn_at_epoch: from this epoch on, BN running statistics stop updating.
        qat_mode: passed to ``prepare_qat_fx``; ``"with_bn"`` is needed for float epochs.
        allow_float_islands: passed to ``prepare_qat_fx``: ``True`` (default) runs ops with no
            integer form in float between an inserted DeQuantStub and QuantStub (listed in a
            warning and in the plan); ``False`` (strict, the whole submodule on the chip) fails at
            setup, naming each such op, why, and what makes it integer.
        convert_at_end: convert, validate and export at the end of fit.
        output_dir: directory of the exported files (default ``<trainer.log_dir>/quantized``).
        export: any of ``"torchscript"``, ``"onnx"``: written by ``hq_lightning.deploy``'s
            ``export_torchscript`` / ``export_onnx`` (traced at the example input's shape), each
            checked against the converted model on that input before fit returns.
        example_input: input(s) of the submodule for tracing; default: the first input it sees
            while the converted model is validated.
        calibration_step: ``fn(pl_module, batch)`` running one calibration forward; default: the
            module's ``calibration_step`` method if it has one, else :func:`default_calibration_step`.
        metrics: names of the validation metrics copied under each phase prefix; ``None``: every
            metric logged by the validation run.
        plan_labels: renames qconfig sources in the quantization plan (printed and saved as
            ``plan.md`` / ``plan.json`` in the output directory before training), e.g.
            ``{"name classifier": "override out"}``; see :func:`hq_lightning.quantization.plan.quantization_plan`.
        report: write the per-layer similarity report (Markdown, JSON, PNG plots; see
            docs/profiling.md) of the calibrated model and of the converted one into
            :meth:`resolve_report_dir`, log the plots to TensorBoard when a logger takes images,
            and print the five worst layers under the final table.
        report_batches: calibration batches whose submodule inputs feed the report and auto int16.
        auto_int16: after calibration, promote the most sensitive layers to int16 outputs (BAYES
            family) until ``auto_int16_sqnr_floor`` or ``auto_int16_max_layers``, then run QAT;
            validated once more as phase ``auto_int16``; the layers are kept in the checkpoint.
        auto_int16_max_layers: the most layers auto int16 promotes.
        auto_int16_sqnr_floor: stop promoting once the model-output SQNR (dB) reaches it.
        compile: compile the prepared submodule in place with ``torch.compile``
            (``Module.compile``, so parameter names and checkpoints are unchanged): ``True``, or a
            dict of ``torch.compile`` arguments (e.g. ``{"mode": "max-autotune"}``). A QAT step
            compiles as one graph (no host synchronisation); each phase change recompiles once. A
            training batch that gives observers their first data (QAT without calibration) runs
            eagerly, since observers shape their buffers on it and compiling it would compile twice.

    Attributes:
        phase: ``"float"``, ``"calibration"``, ``"qat"`` or ``"done"``.
        metrics_table: ``{phase: {metric: value}}`` of the last validation of each phase.
        evaluation_table: ``{column: {metric: value}}`` of the last ``trainer.validate``/``test``:
            its scheduled pass (column ``validate``/``test``) and each extra pass of
            :meth:`evaluate_with` (e.g. ``deployed``); not checkpointed.
        calibrated: whether the calibration has run (restored from checkpoints).
        quantized_model: the converted submodule (a GraphModule) after fit.
        exported_files: ``{"state_dict" | "torchscript" | "onnx": path}`` written by rank 0.

    Example:
        >>> from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
        >>> callback = QuantizationCallback("model", float_epochs=2,
        ...                                 qat_qconfig=default_qat_8bit_fake_quant_qconfig)
        >>> callback.phase
        'float'
    """

    def __init__(
        self,
        submodule: str = "model",
        march: Any = None,
        calibration_qconfig: Any = default_calib_8bit_fake_quant_qconfig,
        qat_qconfig: Any = default_qat_8bit_fake_quant_qconfig,
        float_epochs: int = 0,
        calibration_batches: int = 32,
        calibration_dataloader: str | Iterable = "train",
        freeze_observers_at_epoch: int | None = None,
        freeze_bn_at_epoch: int | None = None,
        qat_mode: str = "with_bn",
        convert_at_end: bool = True,
        output_dir: str | os.PathLike | None = None,
        export: Sequence[str] = ("torchscript",),
        example_input: Any = None,
        calibration_step: Callable[[pl.LightningModule, Any], Any] | None = None,
        metrics: Sequence[str] | None = None,
        plan_labels: Mapping[str, str] | None = None,
        report: bool = False,
        report_batches: int = 4,
        auto_int16: bool = False,
        auto_int16_max_layers: int = 3,
        auto_int16_sqnr_floor: float | None = None,
        compile: bool | Mapping[str, Any] = False,
        allow_float_islands: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(submodule, str) or not submodule:
            raise ValueError(f"Expected `submodule` to be a non-empty attribute path, but got {submodule!r}.")
        self.submodule = submodule
        self.march = None if march is None else as_march(march)
        if calibration_qconfig is None and qat_qconfig is None:
            raise ValueError(
                "Expected at least one of `calibration_qconfig` and `qat_qconfig` to be set, but got "
                "None for both: there would be nothing to quantize."
            )
        check_qconfig_kind(calibration_qconfig, "calibration_qconfig", "calibration")
        check_qconfig_kind(qat_qconfig, "qat_qconfig", "qat")
        with march_context(self.march) if self.march is not None else contextlib.nullcontext():
            check_factories_build(calibration_qconfig, "calibration_qconfig")
            check_factories_build(qat_qconfig, "qat_qconfig")
        self.calibration_qconfig = calibration_qconfig
        self.qat_qconfig = qat_qconfig
        self.float_epochs = _check_int(float_epochs, "float_epochs", 0)
        self.calibration_batches = _check_int(calibration_batches, "calibration_batches", 1)
        if isinstance(calibration_dataloader, str):
            if calibration_dataloader not in ("train", "val"):
                raise ValueError(
                    "Expected `calibration_dataloader` to be 'train', 'val' or an iterable of batches, "
                    f"but got {calibration_dataloader!r}."
                )
        elif not isinstance(calibration_dataloader, Iterable):
            raise TypeError(
                "Expected `calibration_dataloader` to be 'train', 'val' or an iterable of batches, but "
                f"got {type(calibration_dataloader).__name__}."
            )
        elif hasattr(calibration_dataloader, "__len__") and len(calibration_dataloader) == 0:
            raise ValueError("Expected `calibration_dataloader` to yield batches, but it is empty.")
        self.calibration_dataloader = calibration_dataloader
        self.freeze_observers_at_epoch = _check_optional_int(freeze_observers_at_epoch, "freeze_observers_at_epoch")
        self.freeze_bn_at_epoch = _check_optional_int(freeze_bn_at_epoch, "freeze_bn_at_epoch")
        if qat_mode != "with_bn" and self.float_epochs > 0:
            raise ValueError(
                f"Expected `qat_mode='with_bn'` when `float_epochs > 0` (only then the prepared model "
                f"trains exactly like the float one in the float phase), but got {qat_mode!r}."
            )
        self.qat_mode = qat_mode
        if not isinstance(allow_float_islands, bool):
            raise TypeError(f"Expected `allow_float_islands` to be a bool, but got {allow_float_islands!r}.")
        self.allow_float_islands = allow_float_islands
        self.convert_at_end = bool(convert_at_end)
        self.output_dir = output_dir
        export = (export,) if isinstance(export, str) else tuple(export or ())
        unknown = [e for e in export if e not in _EXPORTS]
        if unknown:
            raise ValueError(f"Expected `export` entries from {_EXPORTS}, but got {unknown}.")
        self.export = export
        self.example_input = example_input
        if calibration_step is not None and not callable(calibration_step):
            raise TypeError(f"Expected `calibration_step` to be callable or None, but got {calibration_step!r}.")
        self.calibration_step = calibration_step
        self.metrics = None if metrics is None else tuple(metrics)
        self.plan_labels = dict(plan_labels or {})
        self.plan: list[Any] = []
        self._init_layer_report(report, report_batches, auto_int16, auto_int16_max_layers, auto_int16_sqnr_floor)
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(
                f"Expected `compile` to be a bool or a dict of torch.compile arguments (e.g. "
                f"{{'mode': 'max-autotune'}}), but got {type(compile).__name__}."
            )
        self.compile = dict(compile) if isinstance(compile, Mapping) else compile

        self.phase = "float"
        self.calibrated = False
        self.finished = False
        self.metrics_table: dict[str, dict[str, float]] = {}
        self.metrics_images: dict[str, int] = {}
        self.evaluation_table: dict[str, dict[str, float]] = {}
        self.evaluation_images: dict[str, int] = {}
        self._images_seen = 0
        self.quantized_model: nn.Module | None = None
        self.exported_files: dict[str, str] = {}
        self._live: nn.Module | None = None
        self._float_template: nn.Module | None = None
        self._metrics_label: str | None = None
        self._metrics_before: dict[str, Any] = {}
        self._state_dirty = False
        self._eager_stance = None  # torch.compiler stance while observers see their first batch
        self._first_batch_of_state = False  # the next batch is the first in a newly applied state
        self._captured_input: tuple | None = None
        self._module: pl.LightningModule | None = None
        self._state_restored = False
        self._refusal_hook: Any = None
        self._handoff_token = new_token()
        self._train_loop_ran = False
        self._table_pending = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(submodule=self.submodule)

    @property
    def ptq_only(self) -> bool:
        return self.qat_qconfig is None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "phase": self.phase,
            "calibrated": self.calibrated,
            # the whole workflow ran, conversion and export included (version 1: phase == "done")
            "finished": self.finished,
            "float_epochs": self.float_epochs,
            "metrics_table": copy.deepcopy(self.metrics_table),
            **self._layer_report_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        phase = state_dict.get("phase")
        if phase not in PHASES:
            raise ValueError(f"Expected a checkpointed `phase` in {PHASES}, but got {phase!r}.")
        # a checkpoint written during calibration holds the pre-calibration weights: redo it
        self.phase = "float" if phase == "calibration" else phase
        self.calibrated = bool(state_dict.get("calibrated", False))
        self.finished = bool(state_dict.get("finished", phase == "done"))
        self.metrics_table = copy.deepcopy(state_dict.get("metrics_table", {}))
        self._load_layer_report_state(state_dict)
        self._state_restored = True
        if self.calibrated:
            self._float_template = None  # only a calibration still to come needs the float copy

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._state_restored = False
        self._train_loop_ran = False
        guard_checkpoint_loading(trainer.strategy.checkpoint_io)  # a truncated ckpt_path is named
        if stage == "fit":
            install_handoff(trainer, self.state_key, self._handoff_token, self._handoff_payload)
        current = get_submodule(pl_module, self.submodule)
        converted = self.quantized_model is not None and current is self.quantized_model
        if not converted and (self._live is None or current is not self._live):
            # else prepared already (test after fit), or the converted model put in place to test it
            check_no_qconfig_attributes(current, self.submodule)
            if stage == "fit" and self.calibration_qconfig is not None and not self.calibrated:
                # dropped again if a checkpoint being restored says calibration is done
                self._float_template = copy.deepcopy(current)
            self._layer_report_setup(current)
            self._install_live(pl_module, current)
            if stage == "fit":
                self._announce_plan(trainer, current)
        if self._refusal_hook is None:  # armed for Lightning's restore only, see _check_state_restored
            self._refusal_hook = self._live.register_load_state_dict_pre_hook(_refuse_float_state)

    def _announce_plan(self, trainer: pl.Trainer, float_module: nn.Module) -> None:
        """Print, before training, what the prepare applied, and save it in the output directory."""
        from hq_lightning.quantization.plan import format_plan, plan_to_json, quantization_plan

        qconfig = self.calibration_qconfig if self.ptq_only else self.qat_qconfig
        self.plan = quantization_plan(float_module, self._live, qconfig, self.plan_labels)
        text = format_plan(self.plan, f"Quantization plan of `{self.submodule}`")
        rank_zero_info(text)
        directory = self.resolve_output_dir(trainer)  # a collective under DDP: every rank calls it
        if trainer.is_global_zero:
            write_bytes_atomically(os.path.join(directory, "plan.md"), (text + "\n").encode())
            write_bytes_atomically(os.path.join(directory, "plan.json"), plan_to_json(self.plan).encode())

    def _install_live(self, pl_module: pl.LightningModule, current: nn.Module) -> None:
        live_qconfig = self.calibration_qconfig if self.ptq_only else self.qat_qconfig
        with warnings.catch_warnings():
            # prepare's warning about a missing QuantStub: refused below, with the place to put it
            warnings.filterwarnings("ignore", "Expected the model to contain a QuantStub")
            live = self._prepare(current, live_qconfig)
        check_has_quant_stub(live, current, self.submodule)
        set_submodule(pl_module, self.submodule, live)
        if self.compile is not False:
            # in place (Module.compile): parameter names, checkpoints and DDP see the same module
            live.compile(**(self.compile if isinstance(self.compile, dict) else {}))
        self._live = live
        self._layer_report_installed(live)
        self._module = pl_module
        set_fake_quantize(live, FakeQuantState.FLOAT)

    def _check_state_restored(self, trainer: pl.Trainer) -> None:
        """Raises when this run restored a checkpoint that carried no state of this callback."""
        if self._refusal_hook is not None:  # the restore is over: converted copies must not carry it
            self._refusal_hook.remove()
            self._refusal_hook = None
        ckpt_path = trainer.ckpt_path  # set by Lightning when it restores, i.e. after ``setup``
        if ckpt_path and not self._state_restored:
            raise RuntimeError(
                f"Expected checkpoint {str(ckpt_path)!r} to hold the state of {self.state_key}, but it "
                "has none: it was saved without this callback (or with save_weights_only=True). Load "
                "float weights into the module before `trainer.fit(module)` instead of passing ckpt_path."
            )

    # ------------------------------------------------------------------ ddp_spawn
    def _handoff_payload(self) -> dict[str, Any]:
        quantized = self.quantized_model
        return {
            "state": self.state_dict(),
            "quantized_model": None if quantized is None else quantized.cpu(),
            "exported_files": dict(self.exported_files),
        }

    def _restore_from_worker(self, trainer: pl.Trainer, payload: dict[str, Any]) -> None:
        """Main process of a spawn launcher: take rank 0's state and rebuild the prepared structure.

        Called before Lightning loads rank 0's trained weights into ``trainer.lightning_module``.
        """
        self.load_state_dict(payload["state"])
        self.quantized_model = payload["quantized_model"]
        self.exported_files = dict(payload["exported_files"])
        pl_module = trainer.lightning_module
        current = get_submodule(pl_module, self.submodule)
        if current is not self._live:
            self._install_live(pl_module, current)
        self._float_template = None
        live = self._live
        live.eval()
        set_fake_quantize(live, FakeQuantState.FLOAT if self.phase == "float" else FakeQuantState.VALIDATION)

    def _prepare(self, module: nn.Module, qconfig: Any) -> nn.Module:
        from hq_lightning.quantization import prepare_qat_fx
        from hq_lightning.quantization.fx.prepare import UnsupportedOperationError

        context = march_context(self.march) if self.march is not None else contextlib.nullcontext()
        try:
            with context:
                return prepare_qat_fx(
                    module, qconfig, qat_mode=self.qat_mode, allow_float_islands=self.allow_float_islands
                )
        except UnsupportedOperationError:
            raise  # traced fine; each op is listed with why and its remedy (strict mode)
        except (ValueError, TypeError) as err:
            if not str(err).startswith("Expected"):
                raise _not_traceable(self.submodule, module, err) from err
            # our own message about the configuration (a module name, a dtype, ...): it names the
            # problem and its fix; tracing advice would mislead
            kind = type(err) if type(err) in (ValueError, TypeError) else ValueError
            raise kind(f"QuantizationCallback(submodule={self.submodule!r}): {err}") from err
        except Exception as err:
            raise _not_traceable(self.submodule, module, err) from err

    # ------------------------------------------------------------------ fit
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_loop_ran = True
        self._check_state_restored(trainer)
        if self.phase == "float" and self.calibration_qconfig is not None:
            self._calibration_loader(trainer)  # fail now, not after the float epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == "float" and trainer.current_epoch >= self.float_epochs:
            self._leave_float_phase(trainer, pl_module)
            if self.ptq_only:
                trainer.should_stop = True  # post-training quantization: no QAT epochs
        self._apply_training_state(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state_dirty:
            self._apply_training_state(trainer)
        first, self._first_batch_of_state = self._first_batch_of_state, False
        # an observer shapes its buffers on its first batch, so compiling that batch would compile
        # the step twice (QAT without calibration): it runs eagerly instead. Observers only start
        # in a newly applied state, so later batches skip the scan.
        if first and self.compile is not False and _observers_await_data(self._live):
            self._eager_stance = torch.compiler.set_stance("force_eager")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._restore_compile_stance()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_compile_stance()

    def _restore_compile_stance(self) -> None:
        if self._eager_stance is not None:
            self._eager_stance.__exit__(None, None, None)  # back to the stance before the batch
            self._eager_stance = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_workflow(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint of the last epoch skips the training loop (Lightning
        # calls neither on_train_start nor on_train_end): what did not happen at the end of the
        # interrupted run (a crash or a full disk during conversion or export) happens now.
        if not self._train_loop_ran and not self.finished:
            self._check_state_restored(trainer)
            self._finish_workflow(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # fit; or validate/test where an extra pass (evaluate_with) added a column
        if self._table_pending:
            self._table_pending = False
            # the table comes last: after the progress bar's final frame, not under it
            bar = trainer.progress_bar_callback
            if isinstance(bar, RichProgressBar):
                bar.teardown(trainer, pl_module, stage)  # stops its live display (idempotent)
            if stage != "fit":
                split = "test" if stage == "test" else "validation"
                rank_zero_info(render_metrics_table(self.evaluation_table, self.evaluation_images, split))
                return
            rank_zero_info(render_metrics_table(self.metrics_table, self.metrics_images))
            if self._worst_layers_text():
                rank_zero_info(self._worst_layers_text())

    def _finish_workflow(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate (if still due), convert, validate and export; then the workflow is finished."""
        if self.phase == "float":
            if self.calibration_qconfig is None:
                rank_zero_warn(
                    "QuantizationCallback: training ended in the float phase without calibration; "
                    "nothing is converted. Set max_epochs > float_epochs or give a calibration_qconfig."
                )
                self.finished = True
                return
            self._leave_float_phase(trainer, pl_module)
        if self.convert_at_end:
            try:
                self._convert_evaluate_export(trainer, pl_module)
            except ArtefactWriteError as err:
                raise ArtefactWriteError(err.errno, f"{err.strerror}\n{_resume_hint(trainer)}") from err
        self.phase = "done"
        self.finished = True
        self._table_pending = bool(self.metrics_table)

    def _leave_float_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.calibration_qconfig is not None:
            self.phase = "calibration"
            self._calibrate(trainer, pl_module)
            self.calibrated = True
            self._evaluate(trainer, "calibration")
            self._layer_report_after_calibration(trainer, pl_module)
        self.phase = "calibration" if self.ptq_only else "qat"

    def _apply_training_state(self, trainer: pl.Trainer) -> None:
        live = self._live
        self._state_dirty = False
        if live is None:
            return
        self._first_batch_of_state = True
        if self.phase == "float":
            set_fake_quantize(live, FakeQuantState.FLOAT)
            return
        if not live.training:  # the user froze the whole submodule: keep it evaluating
            set_fake_quantize(live, FakeQuantState.VALIDATION)
            return
        set_fake_quantize(live, FakeQuantState.QAT)
        epoch = trainer.current_epoch
        if self.freeze_observers_at_epoch is not None and epoch >= self.freeze_observers_at_epoch:
            for module in live.modules():
                if isinstance(module, FakeQuantize):
                    module.disable_observer()
        if self.freeze_bn_at_epoch is not None and epoch >= self.freeze_bn_at_epoch:
            for module in live.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()

    # ------------------------------------------------------------------ calibration
    def _calibration_loader(self, trainer: pl.Trainer) -> Iterable:
        source = self.calibration_dataloader
        if source == "train":
            loader = trainer.train_dataloader
        elif source == "val":
            loop = trainer.fit_loop.epoch_loop.val_loop
            loop.setup_data()
            loader = trainer.val_dataloaders
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
        else:
            loader = source
        length = _safe_len(loader)
        if loader is None or length == 0:
            raise ValueError(
                f"Expected the calibration dataloader ({source if isinstance(source, str) else 'given'}) "
                "to yield batches, but it is empty: check the datamodule or pass "
                "`calibration_dataloader=` a loader with data."
            )
        return loader

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = self._calibration_loader(trainer)
        if self.ptq_only:
            model = self._live
        else:
            model = self._prepare(copy.deepcopy(self._float_template), self.calibration_qconfig)
            copy_float_state(self._live, model)
            model.to(pl_module.device)
        step = self._calibration_step_fn(pl_module)
        modes = {module: module.training for module in pl_module.modules()}
        total = min(self.calibration_batches, _safe_len(loader) or self.calibration_batches)
        seen = 0
        try:
            if model is not self._live:
                set_submodule(pl_module, self.submodule, model)
            pl_module.eval()
            set_fake_quantize(model, FakeQuantState.CALIBRATION)
            bar = _progress(trainer, total)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= total:
                        break
                    batch = pl_module._apply_batch_transfer_handler(batch, device=pl_module.device)
                    step(pl_module, batch)
                    seen += 1
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
        finally:
            set_submodule(pl_module, self.submodule, self._live)
            for module, training in modes.items():
                module.train(training)
        if seen == 0:
            raise ValueError("Expected the calibration dataloader to yield batches, but it yielded none.")
        if model is not self._live:
            copy_calibration_state(model, self._live)
        self._float_template = None

    def _calibration_step_fn(self, pl_module: pl.LightningModule) -> Callable:
        if self.calibration_step is not None:
            return self.calibration_step
        method = getattr(pl_module, "calibration_step", None)
        if callable(method):
            return lambda module, batch: method(batch)
        return default_calibration_step

    # ------------------------------------------------------------------ validation / test
    def _set_eval_state(self) -> None:
        live = self._live
        if live is None or get_submodule(self._module, self.submodule) is not live:
            return  # the converted model is being evaluated
        live.eval()
        state = FakeQuantState.FLOAT if self.phase == "float" else FakeQuantState.VALIDATION
        set_fake_quantize(live, state)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        self._check_state_restored(trainer)
        self._start_pass(trainer)
        self._set_eval_state()

    def _start_pass(self, trainer: pl.Trainer) -> None:
        self._metrics_before = dict(trainer.callback_metrics)
        self._images_seen = 0
        if trainer.state.fn != "fit" and self._metrics_label is None:  # a new validate/test
            self.evaluation_table, self.evaluation_images = {}, {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._images_seen += batch_length(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state_dirty = True
        if trainer.sanity_checking:
            return
        self._record_metrics(trainer)

    def _record_metrics(self, trainer: pl.Trainer) -> None:
        # fit: the phases' table; validate/test: their own table (the scheduled pass unprefixed)
        in_fit = trainer.state.fn == "fit"
        label = self._metrics_label or (
            ("float" if self.phase == "float" else self.phase) if in_fit else trainer.state.fn.value
        )
        table, images_table = (
            (self.metrics_table, self.metrics_images) if in_fit
            else (self.evaluation_table, self.evaluation_images)
        )
        # every rank takes part (a collective under DDP): the images behind this phase's figures
        images = int(trainer.strategy.reduce(torch.tensor(float(self._images_seen)), reduce_op="sum").item())
        before = self._metrics_before
        new = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if (name not in before or before[name] is not value)
            and not name.startswith(_PREFIXES)
        }
        if self.metrics is not None:
            new = {name: value for name, value in new.items() if name in self.metrics}
        if not new:
            return
        table[label] = {name: float(value) for name, value in new.items()}
        images_table[label] = images
        if not in_fit and self._metrics_label is None:
            return  # the scheduled pass: Lightning logs it
        prefixed = {f"{label}/{name}": value for name, value in new.items()}
        trainer.callback_metrics.update(prefixed)
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in prefixed.items()}, step=trainer.global_step)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        self._check_state_restored(trainer)
        self._start_pass(trainer)
        self._set_eval_state()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._images_seen += batch_length(batch)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_metrics(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        self._check_state_restored(trainer)
        self._set_eval_state()

    def _evaluate(self, trainer: pl.Trainer, label: str) -> None:
        """Runs the validation loop once outside the schedule, its metrics under ``label``.

        In fit, the fit's validation loop. In ``trainer.validate``/``test`` (called from the end
        hook of their loop), that loop once more: its results are cleared first, its printout and
        loggers muted (the metrics are logged as ``<label>/<name>``), and the unprefixed callback
        metrics put back to the scheduled pass's values afterwards.
        """
        if trainer.state.fn != "fit":
            self._evaluate_again(trainer, label)
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        callbacks = trainer.callbacks
        # a checkpoint or early stop must not act on an extra, out-of-schedule validation
        trainer.callbacks = [cb for cb in callbacks if not isinstance(cb, (Checkpoint, EarlyStopping))]
        first_loop_iter = trainer._logger_connector._first_loop_iter
        self._metrics_label = label
        try:
            trainer.validating = True
            loop.run()
        finally:
            self._metrics_label = None
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter
            trainer.callbacks = callbacks

    def _evaluate_again(self, trainer: pl.Trainer, label: str) -> None:
        loop = trainer.test_loop if trainer.testing else trainer.validate_loop
        connector = trainer._logger_connector
        before = dict(trainer.callback_metrics)
        verbose, loggers = loop.verbose, trainer.loggers
        connector.reset_results()  # the scheduled pass's results are already in callback_metrics
        self._metrics_label = label
        try:
            loop.verbose, trainer.loggers = False, []
            loop.run()
        finally:
            self._metrics_label = None
            loop.verbose, trainer.loggers = verbose, loggers
        measured = self.evaluation_table.get(label, {})
        prefixed = {f"{label}/{name}": value for name, value in measured.items()}
        trainer.callback_metrics.update(before)
        for logger in trainer.loggers:
            logger.log_metrics(prefixed, step=trainer.global_step)

    # ------------------------------------------------------------------ conversion
    def converted_model(self) -> nn.Module:
        """The converted submodule (a GraphModule, eval mode), for deployment.

        After ``trainer.fit`` it is :attr:`quantized_model`. In ``trainer.validate``/``test``
        from a finished checkpoint (weights and scales restored, nothing converted in this process)
        the restored model is converted once here.

        Raises:
            RuntimeError: nothing is trained to convert (no setup yet, or still in the float phase).
        """
        if self.quantized_model is None:
            if self._live is None or self.phase == "float":
                raise RuntimeError(
                    f"Expected {self.state_key} to hold a calibrated or QAT-trained `{self.submodule}` "
                    f"to convert, but it is in phase {self.phase!r}"
                    f"{' and was never set up' if self._live is None else ''}: run trainer.fit first, "
                    "or validate/test from a checkpoint saved after calibration."
                )
            self.quantized_model = self._convert_live()
        return self.quantized_model

    def evaluate_with(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, label: str
    ) -> dict[str, float]:
        """Validate with ``model`` in place of the submodule, once: during fit (e.g. at its end),
        or from the end hook of ``trainer.validate``/``test``.

        The module's own ``validation_step`` (``test_step`` under test) runs on the same data as
        the loop; the metrics go to ``metrics_table[label]`` (``evaluation_table[label]`` in
        validate/test, beside the scheduled pass's column): a column of the final table, printed
        at teardown; they are logged as ``<label>/<name>``.
        """
        set_submodule(pl_module, self.submodule, model)
        try:
            self._evaluate(trainer, label)
        finally:
            set_submodule(pl_module, self.submodule, self._live)
        if trainer.state.fn == "fit":
            return dict(self.metrics_table.get(label, {}))
        self._table_pending = label in self.evaluation_table
        return dict(self.evaluation_table.get(label, {}))

    def _convert_live(self) -> nn.Module:
        from hq_lightning.quantization import convert_fx

        qat_model = copy.deepcopy(self._live)
        qat_model.eval()
        set_fake_quantize(qat_model, FakeQuantState.VALIDATION)
        context = march_context(self.march) if self.march is not None else contextlib.nullcontext()
        with context:
            quantized = convert_fx(qat_model)
        return quantized.eval()

    def _convert_evaluate_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantized = self._convert_live()
        self.quantized_model = quantized
        hook = quantized.register_forward_pre_hook(self._capture_input, with_kwargs=True)
        set_submodule(pl_module, self.submodule, quantized)
        try:
            self._evaluate(trainer, "quantized")
        finally:
            hook.remove()
            set_submodule(pl_module, self.submodule, self._live)
        quantized.cpu()
        self._layer_report_after_conversion(trainer)
        directory = self.resolve_output_dir(trainer)  # a collective under DDP: every rank calls it
        if trainer.is_global_zero:
            self._export(directory)

    def _capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._captured_input is None and not kwargs:
            self._captured_input = tuple(
                a.detach().cpu()[:1] if isinstance(a, torch.Tensor) else a for a in args
            )

    def _example_inputs(self) -> tuple:
        example = self.example_input if self.example_input is not None else self._captured_input
        if example is None:
            raise RuntimeError(
                "Expected an example input to trace the converted model, but the validation run saw "
                "none: pass `example_input=` (a tensor or tuple of tensors)."
            )
        return example if isinstance(example, tuple) else (example,)

    def resolve_output_dir(self, trainer: pl.Trainer) -> str:
        """The directory the exports go to."""
        if self.output_dir is not None:
            return os.fspath(self.output_dir)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "quantized")

    def _export(self, directory: str) -> None:
        from hq_lightning.deploy import export_onnx, export_torchscript

        model = self.quantized_model
        state_path = os.path.join(directory, "quantized_state_dict.pt")
        save_atomically(model.state_dict(), state_path)  # the whole file or none of it
        self.exported_files["state_dict"] = state_path
        if not self.export:
            return
        inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in self._example_inputs())
        exporters = {"torchscript": (export_torchscript, "quantized.pt"), "onnx": (export_onnx, "quantized.onnx")}
        for kind in self.export:
            exporter, name = exporters[kind]
            path = os.path.join(directory, name)
            try:
                exporter(model, inputs, path)  # each checks the file's output against the model
            except ArtefactWriteError:
                raise  # names the file and the fix; _finish_workflow adds how to resume
            except Exception as err:
                raise RuntimeError(
                    f"Expected the converted `{self.submodule}` to export to {kind}, but it failed: {err}\n"
                    f"Fix: drop {kind!r} from `export` (the converted model is kept in "
                    f"`quantized_model` and {state_path!r}), or deploy it with hq_lightning.deploy."
                ) from err
            self.exported_files[kind] = path


def _not_traceable(submodule: str, module: nn.Module, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"Expected submodule `{submodule}` ({type(module).__name__}) to be traceable and "
        f"preparable by prepare_qat_fx, but it failed with {type(err).__name__}: {err}\nFix: "
        "wrap untraceable code with hq_lightning.utils.fx_helper.wrap, or point `submodule` at "
        "the traceable part (e.g. the backbone)."
    )


def _resume_hint(trainer: pl.Trainer) -> str:
    """What to do after the end of fit failed: the checkpoints hold everything to redo it."""
    directories = sorted({cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
    if not directories:
        return (
            "No checkpoint was written (checkpointing is off): the trained model is still in this "
            "process; enable checkpointing to be able to resume after such a failure."
        )
    return (
        f"The checkpoints in {', '.join(map(repr, directories))} are kept: once there is space, resume "
        "from the newest one (trainer.fit(module, ckpt_path=<it>); the app: resume_from=last) and "
        "the conversion, validation and export run again."
    )


def _refuse_float_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Load pre-hook of the prepared submodule: a strict load of a state with none of its scales is a
    float checkpoint (saved without QuantizationCallback), which would otherwise fail on shapes."""
    if not strict:
        return
    expected = [prefix + name + ".scale" for name, m in module.named_modules() if isinstance(m, FakeQuantize)]
    if expected and not any(key in state_dict for key in expected):
        raise RuntimeError(
            f"Expected the state loaded into the prepared `{prefix.rstrip('.') or 'submodule'}` to hold "
            "its fake-quant scales, but it has none: it was saved without this callback (a float "
            "checkpoint). Load float weights into the module before `trainer.fit(module)` instead of "
            "passing ckpt_path."
        )


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")
    return value


def _check_optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _check_int(value, name, 0)


def batch_length(batch: Any) -> int:
    """The number of samples of a batch (0 when its input is not a tensor with a batch dimension)."""
    try:
        inputs = batch_inputs(batch)
    except (KeyError, ValueError):
        return 0
    if isinstance(inputs, (tuple, list)) and inputs:
        inputs = inputs[0]
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 else 0


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


class _RichTask:
    """A calibration bar in the style of the trainer's RichProgressBar: a task of its live display
    while it runs (two live displays cannot coexist), else a transient display of its own."""

    def __init__(self, bar: RichProgressBar, total: int) -> None:
        from rich.progress import Progress

        progress = bar.progress
        self._own = progress is None or not getattr(progress.live, "is_started", False)
        self.progress = Progress(transient=True) if self._own else progress
        if self._own:
            self.progress.start()
        self.task = self.progress.add_task("Calibration", total=total)

    def update(self, advance: int) -> None:
        self.progress.update(self.task, advance=advance)

    def close(self) -> None:
        if self._own:
            self.progress.stop()
        else:
            self.progress.update(self.task, visible=False)


def _progress(trainer: pl.Trainer, total: int):
    """A progress bar for calibration in the style of the trainer's (rich, tqdm, or none)."""
    bar = trainer.progress_bar_callback
    if not trainer.is_global_zero or bar is None or not bar.is_enabled:
        return None
    if isinstance(bar, RichProgressBar):
        return _RichTask(bar, total)
    import sys

    from tqdm.auto import tqdm

    # the same stream as Lightning's TQDMProgressBar
    return tqdm(total=total, desc="Calibration", leave=False, dynamic_ncols=True, file=sys.stdout)
