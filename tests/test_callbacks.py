"""QuantizationCallback (issue 6): phases, metrics, export, module shapes and bad inputs.

Everything runs the embedded default (digits upscaled to 16x16, TinyMobileNetV2) on one CPU
thread with few batches. Resume and DDP live in test_callbacks_resume.py / test_callbacks_ddp.py.
"""

import logging
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from hq_lightning.callbacks import QuantizationCallback
from hq_lightning.data import DigitsDataModule
from hq_lightning.deploy import run_onnx
from hq_lightning.models import ClassificationModule, TinyMobileNetV2
from hq_lightning.qconfig import (
    default_calib_8bit_fake_quant_qconfig,
    default_qat_8bit_fake_quant_qconfig,
)
from hq_lightning.quantization import DeQuantStub, FakeQuantize, QuantStub

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers (shared by the other files)
def digits(batch_size=64):
    return DigitsDataModule(batch_size=batch_size, image_size=16)


def classifier(width=8, lr=1e-2):
    return ClassificationModule(TinyMobileNetV2(image_size=16, width=width), lr=lr)


def make_trainer(tmp_path, callbacks, max_epochs, **kwargs):
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(
        max_epochs=max_epochs, default_root_dir=tmp_path, callbacks=callbacks, **options
    )


class Recorder(Callback):
    """Records training losses per step and the callback phase at every epoch start."""

    def __init__(self, quant_callback=None):
        self.quant_callback = quant_callback
        self.losses = {}
        self.phases = []
        self.parameter_names = []

    def on_fit_start(self, trainer, pl_module):
        if self.quant_callback is not None:
            self.phase_at_fit_start = self.quant_callback.phase

    def on_train_epoch_start(self, trainer, pl_module):
        if self.quant_callback is not None:
            self.phases.append(self.quant_callback.phase)
        self.parameter_names.append(
            [(name, p.data_ptr()) for name, p in trainer.model.named_parameters()]
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def scales(module):
    return {
        name: m.scale.detach().clone()
        for name, m in module.named_modules()
        if isinstance(m, FakeQuantize)
    }


# ---------------------------------------------------------------- the main workflow
def test_digits_through_all_phases(tmp_path, caplog):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=3, calibration_batches=8)
    recorder = Recorder(callback)
    module = classifier()
    trainer = make_trainer(tmp_path, [callback, recorder], max_epochs=5)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, digits())

    assert recorder.phases == ["float", "float", "float", "qat", "qat"]
    assert callback.phase == "done"
    # phases toggle states only: the parameters DDP and the optimizer see never change
    assert all(names == recorder.parameter_names[0] for names in recorder.parameter_names)
    assert type(module).forward is ClassificationModule.forward  # never patched
    assert isinstance(module.model, fx.GraphModule)

    table = callback.metrics_table
    assert list(table) == ["float", "calibration", "qat", "quantized"]
    for phase in table:
        assert f"{phase}/val/acc" in trainer.callback_metrics
        assert float(trainer.callback_metrics[f"{phase}/val/acc"]) == pytest.approx(table[phase]["val/acc"])
    float_acc, quantized_acc = table["float"]["val/acc"], table["quantized"]["val/acc"]
    assert float_acc > 0.9
    # within 1 point of float (QAT may also recover beyond it), and the integer model keeps the
    # fake-quant model's accuracy
    assert quantized_acc >= float_acc - 0.01, table
    assert abs(quantized_acc - table["qat"]["val/acc"]) <= 0.01, table
    assert "Quantization phases" in caplog.text and "quantized" in caplog.text

    # the converted model is integer inside and exported
    quantized = callback.quantized_model
    assert isinstance(quantized, fx.GraphModule)
    assert not any(isinstance(m, FakeQuantize) for m in quantized.modules())
    out_dir = tmp_path / "quantized"
    assert (out_dir / "quantized_state_dict.pt").is_file()
    scripted = torch.jit.load(str(out_dir / "quantized.pt"))
    dm = digits()
    dm.setup()
    images, labels = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(scripted(images), quantized(images))
        accuracy = (quantized(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.85
    state = torch.load(out_dir / "quantized_state_dict.pt", weights_only=False)
    assert state.keys() == quantized.state_dict().keys()


def test_float_phase_trains_exactly_like_the_float_model(tmp_path):
    def run(callbacks):
        pl.seed_everything(0)
        recorder = Recorder()
        module = classifier()
        make_trainer(tmp_path, [*callbacks, recorder], max_epochs=1, limit_train_batches=6,
                     limit_val_batches=2).fit(module, digits())
        return recorder.losses

    plain = run([])
    with_callback = run([QuantizationCallback(float_epochs=1, calibration_qconfig=None,
                                              convert_at_end=False)])
    assert plain.keys() == with_callback.keys()
    for step in plain:
        assert with_callback[step] == pytest.approx(plain[step], abs=1e-6)


class ScaleWatcher(Callback):
    """Scales and BN statistics before/after each validation and each training step."""

    def __init__(self, quant_callback):
        self.quant_callback = quant_callback
        self.validation_pairs = []
        self.train_scales = {}
        self.bn_means = {}

    def on_validation_epoch_start(self, trainer, pl_module):
        self._before = scales(pl_module.model)

    def on_validation_epoch_end(self, trainer, pl_module):
        self.validation_pairs.append((self._before, scales(pl_module.model)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_scales[(trainer.current_epoch, batch_idx)] = scales(pl_module.model)
        self.bn_means[(trainer.current_epoch, batch_idx)] = [
            m.running_mean.clone() for m in pl_module.model.modules() if isinstance(m, nn.BatchNorm2d)
        ]


def test_validation_never_moves_observers_and_freezes_follow_the_schedule(tmp_path):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=0, calibration_batches=4,
                                    freeze_observers_at_epoch=1, freeze_bn_at_epoch=2,
                                    convert_at_end=False)
    watcher = ScaleWatcher(callback)
    trainer = make_trainer(tmp_path, [callback, watcher], max_epochs=3, limit_train_batches=4,
                           limit_val_batches=2, num_sanity_val_steps=2)
    trainer.fit(classifier(), digits())
    assert len(watcher.validation_pairs) == 1 + 1 + 3  # sanity, calibration, 3 epochs
    for before, after in watcher.validation_pairs:
        assert before.keys() == after.keys() and len(before) > 0
        assert all(torch.equal(before[k], after[k]) for k in before)
    s = watcher.train_scales
    moved = [k for k in s[(0, 0)] if not torch.equal(s[(0, 0)][k], s[(0, 3)][k])]
    assert moved, "observers should update during QAT epoch 0"
    for key in s[(1, 0)]:
        assert torch.equal(s[(1, 0)][key], s[(2, 3)][key]), key
    bn = watcher.bn_means
    assert any(not torch.equal(a, b) for a, b in zip(bn[(1, 0)], bn[(1, 3)]))
    assert all(torch.equal(a, b) for a, b in zip(bn[(2, 0)], bn[(2, 3)]))


def test_post_training_quantization_only(tmp_path):
    pl.seed_everything(0)
    callback = QuantizationCallback(qat_qconfig=None, float_epochs=3, calibration_batches=8,
                                    export=())
    trainer = make_trainer(tmp_path, [callback], max_epochs=10)
    trainer.fit(classifier(), digits())
    assert trainer.current_epoch <= 4 and trainer.global_step == 3 * 20  # stopped at calibration
    assert list(callback.metrics_table) == ["float", "calibration", "quantized"]
    table = callback.metrics_table
    assert abs(table["quantized"]["val/acc"] - table["float"]["val/acc"]) <= 0.03, table
    assert (tmp_path / "quantized" / "quantized_state_dict.pt").is_file()


def test_works_beside_checkpoint_early_stopping_and_lr_monitor(tmp_path):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=1, calibration_batches=2, export=())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    module = ClassificationModule(TinyMobileNetV2(image_size=16, width=8), cosine_epochs=3)
    trainer = make_trainer(
        tmp_path, [callback, checkpoint, EarlyStopping("val/loss", patience=5),
                   LearningRateMonitor()], max_epochs=3,
        limit_train_batches=3, limit_val_batches=2, logger=pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=True,
    )
    trainer.fit(module, digits())
    phases = [
        torch.load(tmp_path / "ckpt" / f"epoch={e}-step={3 * (e + 1)}.ckpt", weights_only=False)[
            "callbacks"][callback.state_key]["phase"]
        for e in range(3)
    ]
    assert phases == ["float", "qat", "qat"]
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for name in ("float/val/acc", "calibration/val/acc", "qat/val/acc", "quantized/val/acc", "lr-Adam"):
        assert name in logged
    assert os.path.isdir(os.path.join(trainer.log_dir, "quantized"))


# ---------------------------------------------------------------- module shapes
class KeywordModule(ClassificationModule):
    """A module whose forward takes keyword arguments the callback must pass through."""

    def forward(self, images, *, temperature=1.0, return_features=False):
        logits = self.model(images) / temperature
        return (logits, images.mean()) if return_features else logits

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits, _ = self(images, temperature=2.0, return_features=True)
        return F.cross_entropy(logits, labels)


def test_forward_keyword_arguments_keep_working(tmp_path):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=1, calibration_batches=2, export=())
    module = KeywordModule(TinyMobileNetV2(image_size=16, width=8))
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=3,
                           limit_val_batches=2)
    trainer.fit(module, digits())
    x = torch.randn(2, 1, 16, 16)
    module.eval()
    logits, mean = module(x, temperature=4.0, return_features=True)
    assert logits.shape == (2, 10) and torch.allclose(logits * 4.0, module(x), atol=1e-6)
    assert "quantized" in callback.metrics_table


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU6()
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(torch.flatten(x, 1)))


class Parts(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Backbone()
        self.post = nn.LogSoftmax(dim=1)  # float post-processing, never quantized


class PartlyQuantized(pl.LightningModule):
    """Only ``parts.net`` is quantized; a float input transform, post-processing and loss stay."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(1, 1, 1)  # float, not traced
        self.parts = Parts()
        self.loss_fn = nn.NLLLoss()

    def forward(self, x):
        # data-dependent Python control flow: untraceable, which is fine outside the submodule
        if x.abs().max() > 0:
            x = self.pre(x)
        return self.parts.post(self.parts.net(x))

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        acc = (self(batch[0]).argmax(1) == batch[1]).float().mean()
        self.log("val/acc", acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_only_the_chosen_submodule_is_quantized(tmp_path):
    pl.seed_everything(0)
    module = PartlyQuantized()
    pre, post = module.pre, module.parts.post
    callback = QuantizationCallback("parts.net", float_epochs=1, calibration_batches=2,
                                    export=("torchscript", "onnx"))
    trainer = make_trainer(tmp_path, [callback], max_epochs=3)
    trainer.fit(module, digits())
    assert module.pre is pre and module.parts.post is post
    assert isinstance(module.parts.net, fx.GraphModule)
    assert any(isinstance(m, FakeQuantize) for m in module.parts.net.modules())
    assert not any(isinstance(m, FakeQuantize) for m in module.pre.modules())
    assert set(callback.metrics_table) == {"float", "calibration", "qat", "quantized"}
    table = callback.metrics_table
    assert table["quantized"]["val/acc"] >= table["qat"]["val/acc"] - 0.02, table
    assert (tmp_path / "quantized" / "quantized.pt").is_file()

    # ONNX through hq_lightning.deploy: onnxruntime agrees with the converted model within one
    # step of its output (the scale of the last fake quant), on inputs other than the traced one
    onnx_path = tmp_path / "quantized" / "quantized.onnx"
    assert callback.exported_files["onnx"] == str(onnx_path) and onnx_path.is_file()
    step = float(module.parts.net.fc.activation_post_process.scale)
    dm = digits()
    dm.setup()
    images, _ = next(iter(dm.val_dataloader()))
    quantized = callback.quantized_model
    with torch.no_grad():
        for image in images[:16].split(1):  # the exported graph has the traced input's shape
            (got,) = run_onnx(onnx_path, image)
            expected = quantized(image)
            assert expected.abs().max() > 10 * step
            assert (got - expected).abs().max() <= step * (1 + 1e-6)


def test_calibration_step_override_and_dict_batches(tmp_path):
    seen = []

    def step(pl_module, batch):
        seen.append(batch[0].shape[0])
        pl_module(batch[0])

    callback = QuantizationCallback(float_epochs=0, calibration_batches=3, calibration_step=step,
                                    convert_at_end=False)
    make_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2,
                 limit_val_batches=1).fit(classifier(), digits(batch_size=16))
    assert seen == [16, 16, 16]
    from hq_lightning.callbacks.quantization import batch_inputs

    x = torch.zeros(1)
    assert batch_inputs({"img": x, "label": 1}) is x and batch_inputs((x, 1)) is x
    with pytest.raises(KeyError, match="calibration_step"):
        batch_inputs({"image": x})


# ---------------------------------------------------------------- bad inputs, before training
class FailOnTrainStep(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("training started although the configuration is invalid")


def test_missing_submodule_lists_candidates(tmp_path):
    callback = QuantizationCallback("modle")
    trainer = make_trainer(tmp_path, [callback, FailOnTrainStep()], max_epochs=1)
    with pytest.raises(AttributeError, match=r"`modle`.*Candidates: `model`, `model.quant`"):
        trainer.fit(classifier(), digits())
    with pytest.raises(AttributeError, match="has no child module `missing`"):
        make_trainer(tmp_path, [QuantizationCallback("model.missing")], max_epochs=1).fit(
            classifier(), digits())


def test_empty_calibration_loader(tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="`calibration_dataloader` to yield batches"):
        QuantizationCallback(calibration_dataloader=empty)

    class EmptyVal(DigitsDataModule):
        def val_dataloader(self):
            return empty

    # calibrating on the (empty) validation loader fails before the float epochs, not after them
    callback = QuantizationCallback(float_epochs=1, calibration_dataloader="val")
    trainer = make_trainer(tmp_path, [callback, FailOnTrainStep()], max_epochs=2)
    with pytest.raises(ValueError, match="calibration dataloader \\(val\\) to yield batches"):
        trainer.fit(classifier(), EmptyVal(image_size=16))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc = nn.Linear(256, 10)

    def forward(self, x):
        x = self.quant(x).flatten(1)
        if x.sum() > 0:  # data-dependent branch: torch.fx cannot trace it
            x = -x
        return self.dequant(self.fc(x))


def test_untraceable_submodule_names_the_path(tmp_path):
    module = ClassificationModule(Untraceable())
    trainer = make_trainer(tmp_path, [QuantizationCallback(), FailOnTrainStep()], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"submodule `model` \(Untraceable\) to be traceable") as info:
        trainer.fit(module, digits())
    assert "fx_helper.wrap" in str(info.value)


def test_mixed_qconfigs_are_rejected():
    with pytest.raises(ValueError, match="`calibration_qconfig` to be a calibration qconfig"):
        QuantizationCallback(calibration_qconfig=default_qat_8bit_fake_quant_qconfig)
    with pytest.raises(ValueError, match="`qat_qconfig` to be a qat qconfig"):
        QuantizationCallback(qat_qconfig=default_calib_8bit_fake_quant_qconfig)
    tree = {"": default_qat_8bit_fake_quant_qconfig,
            "module_name": {"head": default_calib_8bit_fake_quant_qconfig}}
    with pytest.raises(ValueError, match=r"qat_qconfig\['module_name'\]\['head'\]"):
        QuantizationCallback(qat_qconfig=tree)
    with pytest.raises(TypeError, match="Expected `qat_qconfig` to be a QConfig"):
        QuantizationCallback(qat_qconfig="qat")
    with pytest.raises(ValueError, match="at least one of"):
        QuantizationCallback(calibration_qconfig=None, qat_qconfig=None)
    with pytest.raises(ValueError, match="Expected `float_epochs`"):
        QuantizationCallback(float_epochs=-1)
    with pytest.raises(ValueError, match="Expected `export`"):
        QuantizationCallback(export=("tflite",))


def test_qconfig_attributes_on_modules_are_rejected(tmp_path):
    module = classifier()
    module.model.stem.qconfig = default_qat_8bit_fake_quant_qconfig
    trainer = make_trainer(tmp_path, [QuantizationCallback(), FailOnTrainStep()], max_epochs=1)
    with pytest.raises(ValueError, match=r"`model.stem`"):
        trainer.fit(module, digits())


def test_bf16_mixed_precision_keeps_scales_fp32(tmp_path):
    pl.seed_everything(0)
    callback = QuantizationCallback(float_epochs=1, calibration_batches=2, export=())
    module = classifier()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, limit_train_batches=4,
                           limit_val_batches=2, precision="bf16-mixed")
    trainer.fit(module, digits())
    assert set(callback.metrics_table) == {"float", "calibration", "qat", "quantized"}
    fq_scales = scales(module.model)
    assert fq_scales and all(s.dtype == torch.float32 and s.numel() > 0 for s in fq_scales.values())
    observers = [m.activation_post_process for m in module.model.modules() if isinstance(m, FakeQuantize)]
    assert all(b.dtype == torch.float32 for o in observers for b in o.buffers() if b.is_floating_point())


# ---------------------------------------------------------------- compiling (issue 15)
class _BatchRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


@pytest.mark.slow
def test_compiled_training_has_the_losses_of_eager(tmp_path):
    """``compile=`` compiles the prepared submodule in place; calibration, QAT steps, validation
    and conversion go through it with the losses of the eager run (aot_eager: AOTAutograd's
    forward/backward graphs without inductor's code generation, so the step's arithmetic is the
    same ops), and checkpoints keep their keys."""
    losses = []
    for compile_option in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        torch.manual_seed(0)
        callback = QuantizationCallback("model", calibration_batches=2, export=(), compile=compile_option)
        recorder = _BatchRecorder()
        trainer = make_trainer(tmp_path / str(bool(compile_option)), [callback, recorder], max_epochs=1,
                               limit_train_batches=3, limit_val_batches=1)
        module = classifier()
        torch._dynamo.utils.counters.clear()
        trainer.fit(module, digits())
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == bool(compile_option)
        losses.append(torch.stack(recorder.losses))
        keys = sorted(module.state_dict())
        assert callback.quantized_model is not None
    assert torch.equal(losses[0], losses[1])
    assert not any("_orig_mod" in key for key in keys)


@pytest.mark.slow
def test_compiled_qat_without_calibration_compiles_the_first_batch_eagerly(tmp_path, monkeypatch):
    """Without calibration the first QAT batch shapes the observers' buffers; it runs eagerly, so
    the compiled step is traced once instead of twice, with the losses of the eager run."""
    import hq_lightning.callbacks.quantization as callback_module

    losses, graphs = [], []
    for option, first_batch_eager in ((False, True), ({"backend": "aot_eager"}, True), ({"backend": "aot_eager"}, False)):
        if not first_batch_eager:
            monkeypatch.setattr(callback_module, "_observers_await_data", lambda model: False)
        torch._dynamo.reset()
        torch.manual_seed(0)
        callback = QuantizationCallback("model", calibration_qconfig=None, export=(), compile=option)
        recorder = _BatchRecorder()
        trainer = make_trainer(tmp_path / f"{bool(option)}{first_batch_eager}", [callback, recorder],
                               max_epochs=1, limit_train_batches=3, limit_val_batches=0)
        torch._dynamo.utils.counters.clear()
        trainer.fit(classifier(), digits())
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        losses.append(torch.stack(recorder.losses))
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    assert graphs[0] == 0 and 0 < graphs[1] < graphs[2], graphs
    torch._dynamo.utils.counters.clear()  # the stance is back to compiling: a new function traces
    torch.compile(lambda t: t + 1, backend="eager")(torch.ones(1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="Expected `compile` to be a bool or a dict"):
        QuantizationCallback("model", compile="yes")


class WithErf(nn.Module):
    """A classifier with an op that has no integer form (erf) between its stubs."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.fc2 = nn.Linear(256, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.dequant(self.fc2(torch.erf(self.fc1(self.quant(x).flatten(1)))))


def test_strict_mode_fails_at_setup_and_islands_run_by_default(tmp_path):
    from hq_lightning.quantization.fx.prepare import UnsupportedOperationError

    module = ClassificationModule(WithErf())
    strict = QuantizationCallback(allow_float_islands=False)
    trainer = make_trainer(tmp_path, [strict, FailOnTrainStep()], max_epochs=1)
    with pytest.raises(UnsupportedOperationError, match="erf"):
        trainer.fit(module, digits())  # FailOnTrainStep: nothing trained before the error
    with pytest.raises(TypeError, match="`allow_float_islands` to be a bool"):
        QuantizationCallback(allow_float_islands="no")

    lenient = QuantizationCallback(calibration_batches=2, export=())
    trainer = make_trainer(tmp_path, [lenient], max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    with pytest.warns(UserWarning, match="erf"):
        trainer.fit(ClassificationModule(WithErf()), digits())
    assert lenient.quantized_model is not None  # the island runs in float inside the integer model
