"""Tracer, ``wrap`` and the GraphModule contract (keeps every child, deepcopy, save/load)."""

from __future__ import annotations

import copy
import io
from operator import getitem
from typing import Dict, List, Optional  # noqa: UP035 - the chapter's sample uses these

import numpy as np
import pytest
import torch
from torch import nn
from torch.quantization import DeQuantStub as TorchDeQuantStub

from hq_lightning.nn.quantized import FloatFunctional
from hq_lightning.quantization import DeQuantStub, QuantStub
from hq_lightning.quantization.fx.graph_module import QuantGraphModule
from hq_lightning.quantization.fx.tracer import UntraceableError, symbolic_trace
from hq_lightning.utils.fx_helper import wrap
from hq_lightning.utils.fx_helper import wrap as fx_warp


def _string_wrapped(x, k):
    # Data-dependent Python: untraceable unless wrapped.
    return x * k if float(x.sum()) > 0 else x - k


wrap("_string_wrapped")


@wrap()
def _decorated(x):
    return x.clamp(min=0) if bool((x > 0).any()) else x


@wrap
def _bare_decorated(x):
    return np.tanh(x.detach().numpy()).sum() + x


@wrap()
class DataDependentHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def _ops(gm):
    return [(n.op, n.target) for n in gm.graph.nodes]


def test_wrap_string_form_records_one_call_function():
    class Net(nn.Module):
        def forward(self, x):
            return _string_wrapped(x, 2.0) + 1

    net = Net()
    gm = symbolic_trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _string_wrapped]
    assert len(calls) == 1
    for x in (torch.ones(3), -torch.ones(3)):
        torch.testing.assert_close(gm(x), net(x))
    # the global is restored after tracing
    assert globals()["_string_wrapped"] is _string_wrapped
    # re-tracing the GraphModule keeps it one node
    again = symbolic_trace(gm)
    assert sum(n.target is _string_wrapped for n in again.graph.nodes) == 1


def test_wrap_string_form_must_be_top_level():
    with pytest.raises(RuntimeError, match="top level of a module"):
        wrap("_string_wrapped")


def test_wrap_decorator_on_functions():
    class Net(nn.Module):
        def forward(self, x):
            return _bare_decorated(_decorated(x))

    net = Net()
    gm = symbolic_trace(net)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [_decorated, _bare_decorated]
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), net(x))


def test_wrap_on_module_class_makes_a_leaf():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = DataDependentHead()

        def forward(self, x):
            return self.head(x)

    net = Net()
    gm = symbolic_trace(net)
    assert ("call_module", "head") in _ops(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), net(x))


def test_leaves_stubs_and_hq_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = QuantStub()
            self.ff = FloatFunctional()
            self.seq = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
            self.dq = DeQuantStub()
            self.tdq = TorchDeQuantStub()

        def forward(self, x):
            x = self.q(x)
            x = self.ff.add(self.seq(x), x)
            return self.tdq(self.dq(x))

    gm = symbolic_trace(Net())
    ops = _ops(gm)
    for leaf in ("q", "seq.0", "seq.1", "dq", "tdq"):
        assert ("call_module", leaf) in ops
    assert ("get_attr", "ff") in ops and ("call_method", "add") in ops


def test_keeps_every_child_and_plain_attributes_and_meta_paths():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.conv(x) * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.unused = nn.Tanh()
            self.register_buffer("offset", torch.ones(1))
            self.num_classes = 7

        def forward(self, x):
            return self.inner(x) + self.offset

    net = Net()
    gm = symbolic_trace(net)
    assert isinstance(gm, QuantGraphModule)
    assert [name for name, _ in gm.named_children()] == ["inner", "unused"]
    assert gm.inner is net.inner and gm.num_classes == 7 and "offset" in dict(gm.named_buffers())
    assert str(gm).startswith("Net(\n  (inner): Inner(")
    paths = {n.name: n.meta["hq_module_path"] for n in gm.graph.nodes}
    assert paths["inner_conv"] == "inner" and paths["mul"] == "inner" and paths["add"] == ""


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _Iterating(nn.Module):
    def forward(self, x):
        return torch.stack([row * 2 for row in x])


class _Numpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.tanh(x.numpy()))


@pytest.mark.parametrize(
    ("model", "line"),
    [
        (_Branchy(), "if x.sum() > 0:"),
        (_Iterating(), "return torch.stack([row * 2 for row in x])"),
        (_Numpy(), "return torch.from_numpy(np.tanh(x.numpy()))"),
    ],
)
def test_untraceable_code_names_the_line_and_wrap(model, line):
    with pytest.raises(UntraceableError) as info:
        symbolic_trace(model)
    message = str(info.value)
    assert line in message
    assert "test_tracer_wrap.py:" in message
    assert "hq_lightning.utils.fx_helper.wrap" in message and "@wrap()" in message


# --- the chapter's RetinaNet, with a tiny backbone / head / post process ---------------------
class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


class TinyHead(nn.Module):
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.cls = nn.Conv2d(4, 2, 1)
        self.reg = nn.Conv2d(4, 4, 1)

    def forward(self, feat):
        return [self.cls(feat)], [self.reg(feat)]


class TinyAnchors(nn.Module):
    def forward(self, feat):
        h, w = feat.shape[-2:]
        return torch.arange(h * w, dtype=torch.float32).reshape(-1, 1).repeat(1, 4)


class TinyPostProcess(nn.Module):
    def forward(self, anchors, cls_scores, bbox_preds, shapes):
        out = []
        for cls, box, shape in zip(cls_scores, bbox_preds, shapes):
            keep = cls.flatten(2)[0].amax(0) > 0  # data-dependent: why it must be wrapped
            out.append((anchors[keep] + box.flatten(2)[0].t()[keep]) / shape.float().max())
        return out


class RetinaNet(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        neck: Optional[nn.Module] = None,  # noqa: UP045
        head: Optional[nn.Module] = None,  # noqa: UP045
        anchors: Optional[nn.Module] = None,  # noqa: UP045
        post_process: Optional[nn.Module] = None,  # noqa: UP045
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.anchors = anchors
        self.post_process = post_process

    def rearrange_head_out(self, inputs: List[torch.Tensor], num: int):  # noqa: UP006
        outputs = []
        for t in inputs:
            outputs.append(t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, num))
        return torch.cat(outputs, dim=1)

    def forward(self, data: Dict):  # noqa: UP006
        feat = self.backbone(data["img"])
        feat = self.neck(feat) if self.neck else feat
        cls_scores, bbox_preds = self.head(feat)
        if self.post_process is None:
            return cls_scores, bbox_preds
        return self._post_process(data, feat, cls_scores, bbox_preds)

    @fx_warp()
    def _post_process(self, data, feat, cls_scores, bbox_preds):
        anchors = self.anchors(feat)
        if self.training:
            cls_scores = self.rearrange_head_out(cls_scores, self.head.num_classes)
            return {"cls_sum": cls_scores.sum(), "n_anchors": anchors.shape[0]}
        preds = self.post_process(
            anchors,
            cls_scores,
            bbox_preds,
            [torch.tensor(shape) for shape in data["resized_shape"]],
        )
        data["pred_bboxes"] = preds
        return data


def _retinanet():
    torch.manual_seed(0)
    return RetinaNet(TinyBackbone(), None, TinyHead(), TinyAnchors(), TinyPostProcess()).eval()


def _data():
    torch.manual_seed(1)
    return {"img": torch.randn(1, 3, 4, 4), "resized_shape": [(4, 4)]}


def _assert_same_preds(a, b):
    assert len(a["pred_bboxes"]) == len(b["pred_bboxes"])
    for x, y in zip(a["pred_bboxes"], b["pred_bboxes"]):
        torch.testing.assert_close(x, y)


def test_retinanet_wrapped_method_traces_as_one_node_and_keeps_modules():
    model = _retinanet()
    gm = symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not getitem]
    assert [c.target for c in calls] == [RetinaNet._post_process]
    receiver = calls[0].args[0]
    assert (receiver.op, receiver.target) == ("get_attr", "_hq_root")
    # modules called only inside the wrapped method are still submodules
    assert isinstance(gm.anchors, TinyAnchors) and isinstance(gm.post_process, TinyPostProcess)
    assert isinstance(gm, RetinaNet)
    _assert_same_preds(gm(_data()), model(_data()))
    # the training branch runs the root's helper method
    gm.train()
    model.train()
    out, ref = gm(_data()), model(_data())
    torch.testing.assert_close(out["cls_sum"], ref["cls_sum"])
    # a module swapped after tracing is the one the wrapped method calls (what prepare relies on)
    gm.eval()
    gm.post_process = nn.Module()
    gm.post_process.forward = lambda anchors, *rest: ["swapped"]
    assert gm(_data())["pred_bboxes"] == ["swapped"]


def test_retinanet_graph_module_deepcopy_save_load_and_retrace():
    model = _retinanet()
    gm = symbolic_trace(model)
    copied = copy.deepcopy(gm)
    assert isinstance(copied, RetinaNet) and copied.anchors is not gm.anchors
    _assert_same_preds(copied(_data()), model(_data()))
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, RetinaNet) and isinstance(loaded, QuantGraphModule)
    assert [name for name, _ in loaded.named_children()] == [
        name for name, _ in gm.named_children()
    ]
    _assert_same_preds(loaded(_data()), model(_data()))
    retraced = symbolic_trace(loaded)
    assert [
        n.target
        for n in retraced.graph.nodes
        if n.op == "call_function" and n.target is not getitem
    ] == [RetinaNet._post_process]
    _assert_same_preds(retraced(_data()), model(_data()))


def test_plain_graph_module_deepcopy_and_save_load():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.spare = nn.Linear(2, 2)
            self.ff = FloatFunctional()
            self.scale_note = "keep me"

        def forward(self, x):
            return self.ff.mul(self.conv(x), x)

    net = Net()
    gm = symbolic_trace(net)
    assert not isinstance(gm, Net)
    x = torch.randn(1, 1, 3, 3)
    copied = copy.deepcopy(gm)
    assert copied.conv is not gm.conv and copied.scale_note == "keep me"
    torch.testing.assert_close(copied(x), net(x))
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, QuantGraphModule) and loaded.scale_note == "keep me"
    assert [name for name, _ in loaded.named_children()] == ["conv", "spare", "ff"]
    assert [n.meta["hq_module_path"] for n in loaded.graph.nodes] == [
        n.meta["hq_module_path"] for n in gm.graph.nodes
    ]
    torch.testing.assert_close(loaded(x), net(x))


def test_shallow_copy_keeps_class_children_and_shares_modules():
    model = _retinanet()
    gm = symbolic_trace(model)
    shallow = copy.copy(gm)
    assert isinstance(shallow, RetinaNet) and shallow.anchors is gm.anchors
    assert shallow._hq_root is shallow
    _assert_same_preds(shallow(_data()), model(_data()))


def test_save_load_with_targets_torch_cannot_pickle_by_name():
    # F.max_pool2d has a local qualname and torch.ops overloads are not picklable objects
    class Net(nn.Module):
        def forward(self, x):
            y = torch.nn.functional.max_pool2d(x, 2)
            return torch.ops.aten.relu.default(y) + torch.ops.aten.neg(y)

    net = Net()
    buffer = io.BytesIO()
    torch.save(symbolic_trace(net), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(loaded(x), net(x))
