"""``DeploymentCallback``: the deployment phase after ``QuantizationCallback``'s conversion.

At the end of fit (and in ``trainer.validate``/``test`` from a finished checkpoint) it takes the
converted model from the :class:`~hq_lightning.callbacks.QuantizationCallback` of the same
trainer and runs :func:`hq_lightning.deploy.deploy_converted`: the YUV input patch, the split into
stages (points named, or ``"auto"``), the bit-for-bit check of stages against the whole model on a
validation batch, the TorchScript/ONNX files (each checked against eager) and ``manifest.json``.
With the YUV patch, the deployed model is also validated with the module's own
``validation_step`` (``test_step`` under ``trainer.test``) on the same images converted to
centered YUV by ``rgb2centered_yuv`` (logged as ``deployed/<metric>``, a column of the final table
beside ``quantized``), through :meth:`QuantizationCallback.evaluate_with`: at the end of fit, and
in ``trainer.validate``/``test`` (as a second pass of their loop, even where the files of these
weights already exist).

Resume: the phase's status lives in :meth:`state_dict`. A run resumed after the phase failed
(full disk, no permission) runs it again; a run resumed after it succeeded finds the manifest of
the same converted weights (same fingerprint, every file present) and does not redo it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from hq_lightning.callbacks.quantization import QuantizationCallback, batch_inputs

__all__ = ["DeploymentCallback", "YuvFeed"]

_FORMATS = ("torchscript", "onnx")
_STATUSES = ("pending", "done")


class YuvFeed(nn.Module):
    """Feeds a YUV-input model from normalised RGB batches, as the chip's camera pipeline would.

    ``forward(x)``: ``rgb = round(x * std + mean)`` (back to 0..255), then
    ``rgb2centered_yuv(rgb, swing)`` (``bgr2centered_yuv`` for a BGR model), then the deployed
    model. So the module's own ``validation_step`` validates the deployed model on the same
    images as the converted one.

    Args:
        model: the YUV-input (patched) model.
        mean: per-channel normalisation mean in pixel units (0..255), 1 or 3 values.
        std: per-channel normalisation std in pixel units.
        swing: ``"full"`` or ``"studio"``.
        bgr: the images are BGR.

    Example:
        >>> feed = YuvFeed(nn.Identity(), mean=128.0, std=128.0, swing="full")
        >>> feed(torch.zeros(1, 3, 1, 1)).flatten().tolist()  # grey 128 -> Y 0, U 0, V 0
        [0.0, 0.0, 0.0]
    """

    def __init__(self, model: nn.Module, mean: Any, std: Any, swing: str = "full",
                 bgr: bool = False) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1))
        self.swing = swing
        self.bgr = bool(bgr)

    def forward(self, x: torch.Tensor) -> Any:
        from hq_lightning.functional import bgr2centered_yuv, rgb2centered_yuv

        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(
                f"Expected normalised {'BGR' if self.bgr else 'RGB'} images with 3 channels at dim "
                f"-3, but got shape {tuple(x.shape)}: the YUV input patch needs a 3-channel model "
                "and data (e.g. data=colour_digits model.model.in_channels=3)."
            )
        pixels = (x.float() * self.std + self.mean).round().clamp(0, 255)
        convert = bgr2centered_yuv if self.bgr else rgb2centered_yuv
        return self.model(convert(pixels, swing=self.swing))


class DeploymentCallback(Callback):
    """YUV-input and segmented deployment of the model a ``QuantizationCallback`` converted.

    Args:
        yuv: patch the input for the chip's centered YUV (``patch_yuv_input``).
        swing: ``"full"`` (the chip) or ``"studio"``.
        mean: RGB normalisation mean in pixel units (0..255), 1 or 3 values; ``None``: the
            datamodule's ``pixel_mean``.
        std: RGB normalisation std in pixel units; ``None``: the datamodule's ``pixel_std``.
        bgr: the model was trained on BGR images.
        input_names: the input QuantStubs to patch (default: every one reading a model input).
        segments: ``None`` (one stage), ``"auto"`` (every inner QuantStub and every run of wrapped
            CPU-side calls) or a list of split points for ``split_stages``.
        export: formats of the files, any of ``"torchscript"``, ``"onnx"``.
        output_dir: directory of the files and ``manifest.json`` (default: the
            QuantizationCallback's output directory + ``/deploy``).
        validate: validate the YUV-deployed model with the module's ``validation_step`` (fit,
            validate) or ``test_step`` (test).
        export_batch_size: batch size of the exported example (the manifest's shapes).
        onnx_atol: tolerance for float outputs of ONNX files (integer outputs must be equal).

    Attributes:
        deployment: the :class:`hq_lightning.deploy.Deployment` of the last run (None before).
        manifest_path: path of the manifest written (restored from checkpoints).
        status: ``"pending"`` or ``"done"``.

    Example:
        >>> callback = DeploymentCallback(yuv=True, mean=128.0, std=128.0, segments="auto")
        >>> callback.status
        'pending'
    """

    def __init__(
        self,
        yuv: bool = False,
        swing: str = "full",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        bgr: bool = False,
        input_names: Sequence[str] | None = None,
        segments: str | Sequence[str] | None = None,
        export: Sequence[str] = ("torchscript",),
        output_dir: str | os.PathLike | None = None,
        validate: bool = True,
        export_batch_size: int = 1,
        onnx_atol: float = 1e-6,
    ) -> None:
        super().__init__()
        if swing not in ("full", "studio"):
            raise ValueError(f"Expected `swing` to be 'full' or 'studio', but got {swing!r}.")
        if isinstance(segments, str) and segments != "auto":
            segments = [segments]
        if segments is not None and not isinstance(segments, str):
            segments = [str(point) for point in segments]
            if not segments:
                raise ValueError(
                    "Expected `segments` to be None, 'auto' or a non-empty list of split points, "
                    "but got an empty list."
                )
        export = (export,) if isinstance(export, str) else tuple(export or ())
        unknown = [e for e in export if e not in _FORMATS]
        if not export or unknown:
            raise ValueError(f"Expected `export` to be a non-empty subset of {_FORMATS}, but got {export}.")
        if not yuv and segments is None:
            rank_zero_warn(
                "DeploymentCallback: neither `yuv` nor `segments` is set; the deployment is the "
                "converted model as one stage (with its manifest)."
            )
        self.yuv = bool(yuv)
        self.swing = swing
        self.mean = mean
        self.std = std
        self.bgr = bool(bgr)
        self.input_names = None if input_names is None else list(input_names)
        self.segments = segments
        self.export = export
        self.output_dir = output_dir
        self.validate = bool(validate)
        self.export_batch_size = int(export_batch_size)
        self.onnx_atol = float(onnx_atol)

        self.status = "pending"
        self.manifest_path: str | None = None
        self.fingerprint: str | None = None
        self.deployment: Any = None
        self._quantization: QuantizationCallback | None = None
        self._ran_this_fit = False
        self._evaluating = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(yuv=self.yuv, segments=str(self.segments))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "status": self.status,
            "manifest_path": self.manifest_path,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        status = state_dict.get("status")
        if status not in _STATUSES:
            raise ValueError(f"Expected a checkpointed `status` in {_STATUSES}, but got {status!r}.")
        self.status = status
        self.manifest_path = state_dict.get("manifest_path")
        self.fingerprint = state_dict.get("fingerprint")

    # ------------------------------------------------------------------ wiring
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._ran_this_fit = False
        quantization = [cb for cb in trainer.callbacks if isinstance(cb, QuantizationCallback)]
        if len(quantization) != 1:
            raise ValueError(
                "Expected exactly one QuantizationCallback in the trainer's callbacks beside the "
                f"DeploymentCallback (it deploys what that one converts), but got {len(quantization)}."
            )
        self._quantization = quantization[0]
        # run after the QuantizationCallback's hooks (its conversion comes first at the end of
        # fit); a new list, so that Lightning's loop over the current one is undisturbed
        callbacks = [cb for cb in trainer.callbacks if cb is not self]
        callbacks.insert(callbacks.index(self._quantization) + 1, self)
        trainer.callbacks = callbacks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ran_this_fit = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deploy(trainer, pl_module, in_fit=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a fit resumed from the last epoch's checkpoint skips the training loop (and on_train_end)
        if not self._ran_this_fit:
            self._deploy(trainer, pl_module, in_fit=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not again at the end of the deployed model's own pass
        if trainer.state.fn == "validate" and not trainer.sanity_checking and not self._evaluating:
            self._deploy(trainer, pl_module, in_fit=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._evaluating:
            self._deploy(trainer, pl_module, in_fit=False)

    # ------------------------------------------------------------------ the phase
    def resolve_output_dir(self, trainer: pl.Trainer) -> str:
        """The directory of the deployment files."""
        if self.output_dir is not None:
            return os.fspath(self.output_dir)
        return os.path.join(self._quantization.resolve_output_dir(trainer), "deploy")

    def _normalisation(self, trainer: pl.Trainer) -> tuple[list[float], list[float]]:
        datamodule = getattr(trainer, "datamodule", None)
        values = []
        for name, given in (("mean", self.mean), ("std", self.std)):
            if given is None:
                given = getattr(datamodule, f"pixel_{name}", None)
                if given is None:
                    raise ValueError(
                        f"Expected `{name}` (the RGB normalisation {name} in pixel units 0..255) to "
                        f"be given, or the datamodule to have `pixel_{name}`, but got neither: pass "
                        f"DeploymentCallback({name}=...)."
                    )
            given = given.flatten().tolist() if isinstance(given, torch.Tensor) else given
            values.append([float(given)] if isinstance(given, (int, float)) else [float(v) for v in given])
        return values[0], values[1]

    def _check_batch(self, trainer: pl.Trainer) -> tuple:
        loaders = trainer.val_dataloaders
        if loaders is None:
            datamodule = getattr(trainer, "datamodule", None)
            loaders = datamodule.val_dataloader() if datamodule is not None else None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise RuntimeError(
                "Expected validation data to check the deployment on, but the trainer has none: "
                "pass val_dataloaders (or a datamodule with val_dataloader) to fit/validate."
            )
        batch = next(iter(loaders))
        inputs = batch_inputs(batch)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        return tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in inputs)

    def _source(self, trainer: pl.Trainer) -> dict[str, Any]:
        checkpoint = getattr(trainer, "ckpt_path", None)
        last = None
        for callback in trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", None) or getattr(callback, "best_model_path", None) or last
        return {
            "checkpoint": checkpoint,
            "last_checkpoint": last or None,
            "submodule": self._quantization.submodule,
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
        }

    def _already_deployed(self, fingerprint: str, directory: str) -> bool:
        from hq_lightning.deploy import load_manifest
        from hq_lightning.deploy.manifest import MANIFEST_NAME

        path = os.path.join(directory, MANIFEST_NAME)  # where this run would write it
        try:
            manifest = load_manifest(path)  # validates it and checks every file exists
        except (OSError, ValueError):
            return False
        return manifest["source"]["fingerprint"] == fingerprint

    def _deploy(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool) -> None:
        # validate/test hooks run under inference mode: conversion and tracing need real tensors
        with torch.inference_mode(False):
            self._deploy_phase(trainer, pl_module, in_fit)

    def _deploy_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool) -> None:
        from hq_lightning.deploy import deploy_converted
        from hq_lightning.deploy.pipeline import model_fingerprint

        quantization = self._quantization
        if quantization.phase == "float" and quantization.quantized_model is None:
            rank_zero_warn("DeploymentCallback: nothing was converted; nothing is deployed.")
            return
        converted = copy.deepcopy(quantization.converted_model()).cpu().eval()
        fingerprint = model_fingerprint(converted)
        directory = self.resolve_output_dir(trainer)
        yuv = None
        if self.yuv:
            mean, std = self._normalisation(trainer)
            yuv = {"swing": self.swing, "mean": mean, "std": std, "bgr": self.bgr,
                   "input_names": self.input_names}
        if self._already_deployed(fingerprint, directory):
            self.status, self.fingerprint = "done", fingerprint
            self.manifest_path = os.path.join(directory, "manifest.json")
            rank_zero_info(
                f"DeploymentCallback: {self.manifest_path} already deploys these "
                "weights (same fingerprint, every file present); not redone."
            )
            if not in_fit:  # validate/test still measure the deployed model
                self._validate_deployed(trainer, pl_module, converted, yuv)
            return
        self.status = "pending"
        check = self._check_batch(trainer)
        if yuv is not None:
            check = (YuvFeed(nn.Identity(), yuv["mean"], yuv["std"], self.swing, self.bgr)(check[0]),
                     *check[1:])
        if trainer.is_global_zero:
            self.deployment = deploy_converted(
                converted, check, directory, yuv=yuv, at=self.segments, formats=self.export,
                march=quantization.march, source=self._source(trainer),
                export_batch_size=self.export_batch_size, onnx_atol=self.onnx_atol,
            )
            self.manifest_path = self.deployment.manifest_path
            stages = self.deployment.manifest["stages"]
            rank_zero_info(
                f"DeploymentCallback: {len(stages)} stage(s) "
                f"[{', '.join(s['device'] for s in stages)}], stages == whole on a validation batch; "
                f"manifest: {self.manifest_path}"
            )
        # every rank validates (the loop synchronises metrics); only rank 0 wrote files
        deployed = self.deployment.model if self.deployment is not None else None
        self._validate_deployed(trainer, pl_module, converted, yuv, deployed)
        self.status, self.fingerprint = "done", fingerprint

    def _validate_deployed(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           converted: nn.Module, yuv: dict | None, deployed: nn.Module | None = None) -> None:
        """The module's own validation (or test) step on the YUV-patched model, as ``deployed/``."""
        from hq_lightning.deploy import patch_yuv_input

        if yuv is None or not self.validate:
            return
        if deployed is None:
            deployed = patch_yuv_input(converted, **yuv)
        feed = YuvFeed(copy.deepcopy(deployed), yuv["mean"], yuv["std"], self.swing, self.bgr)
        self._evaluating = True
        try:
            self._quantization.evaluate_with(trainer, pl_module, feed.to(pl_module.device), "deployed")
        finally:
            self._evaluating = False
