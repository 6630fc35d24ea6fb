"""TorchScript and ONNX export of converted models and stages: parity and loading in a fresh process."""

import subprocess
import sys
import textwrap

import pytest
import torch
from deploy_detector import TwoStageDetector
from torch import fx

from hq_lightning import set_march
from hq_lightning.deploy import (
    export_onnx,
    export_torchscript,
    patch_yuv_input,
    run_onnx,
    run_stages,
    split_stages,
)
from hq_lightning.functional import rgb2centered_yuv
from hq_lightning.quantization import convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig


@pytest.fixture(scope="module")
def converted():
    set_march("bayes")
    torch.manual_seed(0)
    qat = prepare_qat_fx(TwoStageDetector(), {"": default_qat_8bit_fake_quant_qconfig})
    for _ in range(3):
        qat(torch.rand(4, 3, 16, 16) * 2 - 1)
    return convert_fx(qat)


def _stage_args(stages, x):
    """The float inputs of each stage when the stages run in sequence on ``x``."""
    env, per_stage = {"image": x}, []
    for stage in stages:
        args = tuple(env[name] for name in stage.stage_inputs)
        per_stage.append(args)
        out = stage(*args)
        if stage.stage_outputs:
            env.update(zip(stage.stage_outputs, out))
    return per_stage


def test_torchscript_whole_model_is_bit_exact(converted, tmp_path):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    traced = export_torchscript(converted, (x,), tmp_path / "whole.pt")
    for seed in range(3):
        y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        expected, got = converted(y), traced(y)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_onnx_integer_stages_are_bit_exact_and_load_in_a_fresh_process(converted, tmp_path):
    # backbone | CPU decode + RoIAlign | quantized head: the two BPU stages are integer-only
    stages = split_stages(converted, at=["decode_topk_boxes", "quant_roi"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    args = _stage_args(stages, x)
    files = {}
    for k in (0, 2):
        # checks parity; the optimizer (constant folding) is exercised by the other tests
        files[k] = export_onnx(stages[k], args[k], tmp_path / f"stage{k}.onnx", optimize=False)
        export_torchscript(stages[k], args[k], tmp_path / f"stage{k}.pt")
    # other inputs than the example: still bit-exact
    other = _stage_args(stages, torch.rand(2, 3, 16, 16) * 2 - 1)
    for k in (0, 2):
        expected = stages[k](*other[k])
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = run_onnx(files[k], *other[k])
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    # a fresh interpreter loads both formats and reproduces the outputs
    torch.save({k: other[k] for k in (0, 2)}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import torch, onnxruntime as ort
        inputs = torch.load(r"{tmp_path}/inputs.pt")
        results = {{}}
        for k, args in inputs.items():
            ts = torch.jit.load(r"{tmp_path}/stage%d.pt" % k)(*args)
            ts = list(ts) if isinstance(ts, (tuple, list)) else [ts]
            s = ort.InferenceSession(r"{tmp_path}/stage%d.onnx" % k)
            feeds = {{i.name: a.numpy() for i, a in zip(s.get_inputs(), args)}}
            results[k] = (ts, [torch.from_numpy(o) for o in s.run(None, feeds)])
        torch.save(results, r"{tmp_path}/outputs.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    results = torch.load(tmp_path / "outputs.pt")
    for k in (0, 2):
        expected = stages[k](*other[k])
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        ts, ort_out = results[k]
        assert all(torch.equal(a, b) for a, b in zip(expected, ts))
        assert all(torch.equal(a, b) for a, b in zip(expected, ort_out))


def test_onnx_of_a_yuv_patched_model_is_bit_exact(converted, tmp_path):
    stages = split_stages(patch_yuv_input(converted, swing="full"), at=["decode_topk_boxes"])
    yuv = rgb2centered_yuv(torch.randint(0, 256, (2, 3, 16, 16)).float(), "full")
    path = export_onnx(stages[0], (yuv,), tmp_path / "yuv_backbone.onnx")
    got = run_onnx(path, yuv)
    assert all(torch.equal(a, b) for a, b in zip(stages[0](yuv), got))


@pytest.mark.slow
def test_onnx_whole_detector_within_float_ulps(converted, tmp_path):
    # the CPU-side RoIAlign (grid_sample) differs from onnxruntime's GridSample by float ulps;
    # everything else is exact. atol 1e-6 of float logits (steps are ~1e-2): exact in practice.
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    path = export_onnx(converted, (x,), tmp_path / "whole.onnx", atol=1e-6, optimize=False)
    logits, rois = run_onnx(path, x)
    expected_logits, expected_rois = run_stages(split_stages(converted, "quant_roi"), x)
    assert torch.equal(rois, expected_rois)
    assert torch.allclose(logits, expected_logits, rtol=0, atol=1e-6)


def test_unexportable_op_is_named(tmp_path):
    @torch.library.custom_op("hq_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    class Net(torch.nn.Module):
        def forward(self, x):
            return twice(x) + 1

    gm = fx.symbolic_trace(Net())
    with pytest.raises(RuntimeError, match=r"`hq_test(\.|::)twice(\.default)?` is not"):
        export_onnx(gm, (torch.rand(2, 2),), tmp_path / "bad.onnx")
