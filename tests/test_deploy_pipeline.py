"""The deployment phase without Lightning (``deploy_converted``): auto split points, YUV patch ==
the chapter's hand edit, stages == whole, the manifest against its schema, and a fresh process
that reproduces the whole model from the manifest alone."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from deploy_detector import TwoStageDetector

from hq_lightning import set_march
from hq_lightning.deploy import (
    auto_split_points,
    deploy_converted,
    load_manifest,
    patch_yuv_input,
    run_manifest,
    run_stages,
    split_stages,
    validate_manifest,
)
from hq_lightning.deploy.manifest import load_schema, validate
from hq_lightning.quantization import convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.chapter_samples import insert_centered_yuv2rgb_by_hand, rgb888_converted


@pytest.fixture(scope="module")
def detector():
    set_march("bayes")
    torch.manual_seed(0)
    qat = prepare_qat_fx(TwoStageDetector(), {"": default_qat_8bit_fake_quant_qconfig})
    for _ in range(3):
        qat(torch.rand(4, 3, 16, 16))
    return convert_fx(qat)


def _yuv(n=4, size=16, seed=0):
    return torch.randint(-128, 128, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).float()


def test_auto_finds_the_chapter_split_points_on_the_two_stage_detector(detector):
    # stage 1 backbone (BPU) | the CPU-side top-k decode and RoIAlign (float) | the head after
    # the chapter's QuantStub(scale=None) split point (BPU)
    assert auto_split_points(detector) == ["decode_topk_boxes", "quant_roi"]
    stages = split_stages(detector, at="auto")
    assert len(stages) == 3
    for seed in range(3):
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        whole, staged = detector(x), run_stages(stages, x)
        assert all(torch.equal(a, b) for a, b in zip(whole, staged))


def test_auto_without_split_points_gives_one_stage():
    model = rgb888_converted()
    assert auto_split_points(model) == []
    (stage,) = split_stages(model, at="auto")
    x = _yuv(2, 28)
    assert torch.equal(run_stages([stage], x), model(x))


def test_yuv_patch_equals_the_chapters_hand_edit_bit_for_bit(tmp_path):
    converted = rgb888_converted()
    converted.quant.scale.fill_(1 / 128)  # the hand edit's q_scale default: a stub trained at 1/128
    hand = copy.deepcopy(converted)
    insert_centered_yuv2rgb_by_hand(hand)
    patched = patch_yuv_input(converted, swing="full")
    result = deploy_converted(converted, (_yuv(4, 28),), tmp_path, yuv={"swing": "full"}, march="bayes")
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    for seed in range(3):
        x = _yuv(2, 28, seed)
        expected = hand(x)
        assert expected.dtype == torch.int8
        for got in (patched(x), result.model(x), scripted(x), run_manifest(result.manifest_path, x)):
            assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_deploy_detector_yuv_segments_manifest(detector, tmp_path):
    check = _yuv(4, 16)
    result = deploy_converted(
        detector, (check,), tmp_path, yuv={"swing": "full", "mean": [123.0, 117.0, 104.0],
                                           "std": [58.0, 57.0, 57.5]},
        at="auto", formats=("torchscript", "onnx"), march="bayes",
        source={"checkpoint": "/ckpt/last.ckpt", "submodule": "model", "epoch": 3, "global_step": 40},
    )
    manifest = load_manifest(result.manifest_path)
    validate_manifest(manifest)
    assert [s["device"] for s in manifest["stages"]] == ["bpu", "cpu", "bpu"]
    assert [s["kind"] for s in manifest["stages"]] == ["integer", "float", "integer"]
    assert manifest["march"] == "bayes" and manifest["package"]["name"] == "hq_lightning"
    assert manifest["source"]["checkpoint"] == "/ckpt/last.ckpt"
    assert manifest["yuv"] == {"swing": "full", "mean": [123.0, 117.0, 104.0],
                               "std": [58.0, 57.0, 57.5], "bgr": False, "inputs": ["quant"]}
    # the YUV input is quantized at scale 1 (the patched stub); stage 2 quantizes roi_align's
    # float output with the split QuantStub's trained scale
    assert manifest["model_inputs"][0]["scale"] == [1.0]
    head_input = next(s for s in manifest["stages"][2]["inputs"] if s["name"] == "roi_align")
    assert head_input["scale"] == [detector.quant_roi.scale.item()]
    assert head_input["quant_dtype"] == "qint8"
    # every stage file exists in both formats; ONNX stages reproduce the whole
    for stage in manifest["stages"]:
        assert set(stage["files"]) == {"torchscript", "onnx"}
    x = check[:1]
    whole = result.model(x)
    onnx = run_manifest(result.manifest_path, x, format="onnx")
    assert torch.equal(onnx[0], whole[0])  # integer head, dequantized: exact
    assert torch.allclose(onnx[1], whole[1], atol=1e-6)


def test_a_fresh_process_reproduces_the_whole_model_from_the_manifest_alone(detector, tmp_path):
    deploy_dir = tmp_path / "deploy"
    result = deploy_converted(detector, (_yuv(4, 16),), deploy_dir, yuv={"swing": "full"},
                              at="auto", march="bayes")
    moved = tmp_path / "elsewhere"
    os.rename(deploy_dir, moved)  # only the directory travels
    x = _yuv(3, 16, seed=5)
    torch.save({"x": x, "expected": result.model(x)}, tmp_path / "io.pt")
    # plain torch + json: no hq_lightning import, nothing but the manifest and its files
    script = textwrap.dedent(
        """
        import json, sys, torch
        from pathlib import Path
        directory = Path(sys.argv[1])
        manifest = json.loads((directory / "manifest.json").read_text())
        io = torch.load(sys.argv[2])
        env = dict(zip([t["name"] for t in manifest["model_inputs"]], [io["x"]]))
        for stage in manifest["stages"]:
            module = torch.jit.load(str(directory / stage["files"]["torchscript"]))
            out = module(*[env[t["name"]] for t in stage["inputs"]])
            if stage["returns_model_output"]:
                result = out
            else:
                env.update(zip([t["name"] for t in stage["outputs"]], out))
        ok = all(torch.equal(a, b) for a, b in zip(result, io["expected"]))
        print("hq_lightning" in sys.modules, ok)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(moved), str(tmp_path / "io.pt")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


def test_stage_mismatch_and_bad_options_are_refused(detector, tmp_path):
    with pytest.raises(ValueError, match="formats"):
        deploy_converted(detector, (_yuv(),), tmp_path, formats=("tflite",))
    with pytest.raises(ValueError, match="`yuv` keys"):
        deploy_converted(detector, (_yuv(),), tmp_path, yuv={"swong": "full"})
    with pytest.raises(ValueError, match="split point"):
        deploy_converted(detector, (_yuv(),), tmp_path, at=["no_such_node"])


# ---------------------------------------------------------------- the schema and its validator
def test_manifest_schema_rejects_what_a_deployment_engineer_could_not_use(detector, tmp_path):
    result = deploy_converted(detector, (_yuv(),), tmp_path, at="auto", march="bayes")
    with open(result.manifest_path) as handle:
        good = json.load(handle)
    assert validate(good, load_schema()) == []
    broken = copy.deepcopy(good)
    del broken["stages"][1]["files"]
    broken["stages"][0]["device"] = "gpu"
    broken["stages"][2]["inputs"][1]["scale"] = [0.0]
    broken["source"]["fingerprint"] = "abc"
    broken["extra"] = 1
    errors = validate(broken, load_schema())
    assert any("stages[1]: missing required property 'files'" in e for e in errors)
    assert any("stages[0].device" in e for e in errors)
    assert any("scale[0]: expected > 0" in e for e in errors)
    assert any("fingerprint: expected to match" in e for e in errors)
    assert any("unexpected property 'extra'" in e for e in errors)
    with pytest.raises(ValueError, match="manifest.schema.json"):
        validate_manifest(broken)


def test_the_small_validator_on_each_keyword():
    schema = {
        "type": "object",
        "required": ["a"],
        "additionalProperties": False,
        "properties": {
            "a": {"type": ["integer", "null"], "minimum": 1},
            "b": {"type": "array", "items": {"$ref": "#/$defs/s"}, "minItems": 1, "maxItems": 2},
            "c": {"oneOf": [{"type": "null"}, {"type": "string", "enum": ["x"]}]},
            "d": {"type": "number", "exclusiveMinimum": 0},
            "e": {"type": "object", "minProperties": 1},
        },
        "$defs": {"s": {"type": "string", "minLength": 2, "pattern": "^q"}},
    }
    assert validate({"a": 1, "b": ["qa"], "c": None, "d": 0.5, "e": {"k": 1}}, schema) == []
    assert validate({"a": None}, schema) == []
    assert validate({"a": True}, schema) == ["$.a: expected type integer or null, got True"]
    assert validate({"a": 0}, schema) == ["$.a: expected >= 1, got 0"]
    assert validate({"a": 1, "b": []}, schema) == ["$.b: expected at least 1 items, got 0"]
    assert validate({"a": 1, "b": ["qa"] * 3}, schema) == ["$.b: expected at most 2 items, got 3"]
    assert validate({"a": 1, "b": ["q", "xa"]}, schema) == [
        "$.b[0]: expected a string of length >= 2",
        "$.b[1]: expected to match '^q', got 'xa'",
    ]
    assert validate({"a": 1, "c": "y"}, schema) == ["$.c: expected exactly one of `oneOf` to match, got 0"]
    assert validate({"a": 1, "d": 0}, schema) == ["$.d: expected > 0, got 0"]
    assert validate({"a": 1, "e": {}}, schema) == ["$.e: expected at least 1 properties"]
    assert validate({}, schema) == ["$: missing required property 'a'"]
    with pytest.raises(ValueError, match="supported keywords"):
        validate({}, {"type": "object", "uniqueItems": True})


def test_the_schema_is_also_valid_for_jsonschema_when_installed(detector, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    result = deploy_converted(detector, (_yuv(),), tmp_path, at="auto", march="bayes")
    with open(result.manifest_path) as handle:
        jsonschema.validate(json.load(handle), load_schema())
