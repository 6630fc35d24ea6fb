"""QuantizationCallback(report=True, auto_int16=True): the per-layer report in the run directory,
images for loggers that take them, the five worst layers under the table, int16 kept in checkpoints."""

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from hq_lightning.callbacks import QuantizationCallback
from tests.test_callbacks import classifier, digits, make_trainer

torch.set_num_threads(1)


class ImageLogger(Logger):
    """A logger whose experiment takes images, like TensorBoard's SummaryWriter."""

    class _Writer:
        def __init__(self):
            self.images = []

        def add_image(self, tag, picture, step, dataformats="CHW"):
            self.images.append((tag, tuple(picture.shape), dataformats))

    def __init__(self):
        super().__init__()
        self._writer = self._Writer()

    @property
    def experiment(self):
        return self._writer

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.slow
def test_report_and_auto_int16_end_to_end(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    pl.seed_everything(0)
    callback = QuantizationCallback(
        "model", float_epochs=1, calibration_batches=2, report=True, report_batches=2,
        auto_int16=True, auto_int16_max_layers=1, export=(),
    )
    logger = ImageLogger()
    trainer = make_trainer(
        tmp_path, [callback], max_epochs=2, logger=logger, limit_train_batches=3, limit_val_batches=2
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(classifier(), datamodule=digits())

    directory = Path(callback.resolve_report_dir(trainer))
    assert directory == tmp_path / "report"  # the run directory (this logger has no log dir)
    for name in ("calibration", "quantized"):
        for suffix in (".md", ".json", "_sqnr.png", "_histograms.png"):
            assert (directory / f"{name}{suffix}").is_file(), f"{name}{suffix}"
    assert (directory / "calibration_int8.md").is_file()  # the before of auto int16
    calibration = (directory / "calibration.md").read_text()
    assert "## Auto int16" in calibration and "## Before / after auto int16" in calibration
    promoted = callback.int16_layers
    assert len(promoted) == 1 and f"`{promoted[0]}`" in calibration
    assert "auto_int16" in callback.metrics_table
    live = callback._live
    assert live.get_submodule(promoted[0]).activation_post_process.dtype.value == "qint16"
    quantized = (directory / "quantized.md").read_text()
    assert "SQNR int" in quantized and "Worst layer:" in quantized and "## Model check" in quantized
    tags = {tag for tag, _, _ in logger.experiment.images}
    assert tags == {f"hq_report/{n}/{k}" for n in ("calibration", "quantized") for k in ("sqnr_plot", "histogram_plot")}
    assert all(shape[-1] == 3 and form == "HWC" for _, shape, form in logger.experiment.images)
    assert "Worst layers (vs float)" in caplog.text
    state = callback.state_dict()
    assert state["int16_layers"] == promoted and state["int16_decision"]["promoted"] == promoted

    # a fresh callback restoring that state makes the same layers int16 again
    restored = QuantizationCallback("model", report=True)
    module = classifier()
    restored.setup(make_trainer(tmp_path, [restored], max_epochs=1), module, "validate")
    restored.load_state_dict(state)
    assert restored._live.get_submodule(promoted[0]).activation_post_process.dtype.value == "qint16"


def test_report_options_are_checked():
    with pytest.raises(ValueError, match="report_batches"):
        QuantizationCallback(report=True, report_batches=0)
    with pytest.raises(ValueError, match="march with int16"):
        QuantizationCallback(march="bernoulli2", auto_int16=True)
    with pytest.raises(ValueError, match="calibration_qconfig"):
        QuantizationCallback(calibration_qconfig=None, auto_int16=True)
    with pytest.raises(TypeError, match="`report`"):
        QuantizationCallback(report="yes")
