"""Segmented deployment: split a converted two-stage detector; stages in sequence equal the whole."""

import pytest
import torch
from deploy_detector import TwoStageDetector
from torch import fx

from hq_lightning import set_march
from hq_lightning.deploy import export_torchscript, run_stages, split_stages
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig


@pytest.fixture(scope="module")
def detector():
    set_march("bayes")
    torch.manual_seed(0)
    qat = prepare_qat_fx(TwoStageDetector(), {"": default_qat_8bit_fake_quant_qconfig})
    for _ in range(3):
        qat(torch.rand(4, 3, 16, 16))
    return qat, convert_fx(qat)


def test_split_quant_stub_records_the_next_stage_scale(detector):
    qat, converted = detector
    # the QuantStub(scale=None) at the split point observed stage 2's input during QAT ...
    observed = qat.quant_roi.activation_post_process.scale
    assert converted.quant_roi.scale.item() == observed.item() != 1.0
    _, stage2 = split_stages(converted, at=["quant_roi"])
    # ... and stage 2 quantizes its float input with it
    assert torch.equal(stage2.quant_roi.scale, converted.quant_roi.scale)


@pytest.mark.parametrize(
    "at", [["quant_roi"], ["decode_topk_boxes", "roi_align"], ["decode_topk_boxes", "quant_roi"]]
)
def test_stages_in_sequence_equal_the_whole_model(detector, at):
    _, converted = detector
    stages = split_stages(converted, at=at)
    assert len(stages) == len(at) + 1
    for seed in range(3):
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        whole_logits, whole_rois = converted(x)
        logits, rois = run_stages(stages, x)
        assert torch.equal(logits, whole_logits) and torch.equal(rois, whole_rois)
    assert all(stage.stage_inputs for stage in stages)
    # split_stages leaves the model alone
    assert [n.name for n in converted.graph.nodes][-1] == "output"
    assert len(list(converted.graph.nodes)) == 14


def test_each_stage_traces_with_float_inputs(detector):
    _, converted = detector
    backbone, cpu_step, head = split_stages(converted, at=["decode_topk_boxes", "roi_align"])
    x = torch.rand(2, 3, 16, 16)
    scores, feat = backbone(x)
    assert scores.is_floating_point() and feat.is_floating_point()
    (rois,) = cpu_step(scores)
    values = {"image": x, "dequant_score": scores, "dequant_feat": feat, "decode_topk_boxes": rois}
    for stage in (backbone, cpu_step, head):
        args = tuple(values[name] for name in stage.stage_inputs)
        assert all(a.is_floating_point() for a in args)
        traced = export_torchscript(stage, args)  # checks bit-exactness on args
        other = tuple(a + 0 for a in args)
        assert len(traced(*other)) == len(stage(*other))


def test_bad_split_points_raise(detector):
    _, converted = detector
    with pytest.raises(ValueError, match="split point"):
        split_stages(converted, at=["no_such_node"])
    with pytest.raises(ValueError, match="forward order"):
        split_stages(converted, at=["quant_roi", "decode_topk_boxes"])


@pytest.mark.parametrize("where", ["score", "backbone_end", "two_cuts"])
def test_split_inside_the_integer_part_crosses_as_float(detector, where):
    _, converted = detector
    # node names of the fused backbone come from fusion; find them through the graph
    score = next(n for n in converted.graph.nodes if n.target == "score")
    backbone_end = score.args[0]  # the fused conv2+relu2, int8
    backbone_start = next(iter(converted.graph.find_nodes(op="call_module", target="quant"))).next
    at = {
        "score": ["score"],
        "backbone_end": [backbone_end.name],
        "two_cuts": [backbone_start.name, "dequant_feat"],
    }[where]
    stages = split_stages(converted, at=at)
    x = torch.rand(2, 3, 16, 16)
    env = {"image": x}
    for stage in stages[:-1]:
        out = stage(*(env[name] for name in stage.stage_inputs))
        assert all(t.is_floating_point() for t in out)  # a DeQuantize ends the stage
        env.update(zip(stage.stage_outputs, out))
    whole = converted(x)
    got = run_stages(stages, x)
    assert all(torch.equal(a, b) for a, b in zip(whole, got))
    for stage in stages:
        args = tuple(env[name] for name in stage.stage_inputs)
        export_torchscript(stage, args)


def test_integer_value_without_a_known_scale_is_refused():
    class Net(torch.nn.Module):
        def forward(self, x):
            q = x.round().to(torch.int8)
            return q.to(torch.float32) * 2

    gm = fx.symbolic_trace(Net())
    first, second = split_stages(gm, at=["to_1"])
    with pytest.raises(TypeError, match="crossing a stage boundary to be a float tensor"):
        run_stages([first, second], torch.rand(2, 3) * 10)


@pytest.mark.parametrize("dequant_before_split", [True, False])
def test_split_at_an_inserted_quant_stub(dequant_before_split):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
            self.split, self.dequant2 = QuantStub(scale=None), DeQuantStub()

        def forward(self, x):
            y = self.conv1(self.quant(x))
            if dequant_before_split:
                y = self.dequant(y)
            return self.dequant2(self.conv2(self.split(y)))

    qat = prepare_qat_fx(Net(), {"": default_qat_8bit_fake_quant_qconfig})
    qat(torch.rand(2, 3, 4, 4))
    converted = convert_fx(qat)
    first, second = split_stages(converted, at="split")
    x = torch.rand(3, 3, 4, 4)
    (boundary,) = first(x)
    assert boundary.is_floating_point()
    assert torch.equal(second(boundary), converted(x))
    assert torch.equal(run_stages([first, second], x), converted(x))
