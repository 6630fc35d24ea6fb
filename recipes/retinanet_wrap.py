"""The chapter's RetinaNet ``wrap`` example, runnable: keep pre/post-processing out of the FX trace.

``RetinaNet.forward`` takes a dict and branches on ``self.training`` inside ``_post_process``;
symbolic tracing cannot follow either, so ``_post_process`` is decorated with ``@fx_wrap()``: FX
keeps it as one call, and the modules it calls (anchors, targets, losses, post-processing) stay
submodules of the traced model. The backbone and head are traced, fused and quantized.

The tiny detector finds one bright square per image (images generated on the fly, one class). It
trains a few QAT steps (training branch: losses), evaluates (inference branch: boxes), converts to
the integer model and evaluates that too.

    python recipes/retinanet_wrap.py
    python recipes/retinanet_wrap.py --steps 3
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning import set_march
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from hq_lightning.utils.fx_helper import wrap as fx_wrap

SIZE, STRIDE, BOX = 32, 4, 8.0


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 2, 1), nn.BatchNorm2d(16)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.quant(x))))
        return F.relu(self.bn2(self.conv2(x)))


class Head(nn.Module):
    num_classes = 1

    def __init__(self) -> None:
        super().__init__()
        self.cls, self.reg = nn.Conv2d(16, self.num_classes, 3, 1, 1), nn.Conv2d(16, 4, 3, 1, 1)
        self.dequant_cls, self.dequant_reg = DeQuantStub(), DeQuantStub()

    def forward(self, feat):
        return [self.dequant_cls(self.cls(feat))], [self.dequant_reg(self.reg(feat))]


class Anchors(nn.Module):
    def forward(self, feat):  # one BOX x BOX anchor per feature-map cell, in image pixels
        h, w = feat.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centre = torch.stack([xs, ys], -1).reshape(-1, 2).float() * STRIDE + STRIDE / 2
        return torch.cat([centre - BOX / 2, centre + BOX / 2], 1)


class Targets(nn.Module):
    def forward(self, anchors, gt_labels: list[torch.Tensor]):
        cls_label, cls_mask, reg_label, reg_mask = [], [], [], []
        for gt in gt_labels:  # rows (x1, y1, x2, y2, class + 1)
            iou = box_iou(anchors, gt[:, :4])
            best, index = iou.max(1)
            positive = best >= 0.4
            cls_label.append((positive[:, None] & (gt[index, 4:5] > 0)).float())
            cls_mask.append(torch.ones_like(cls_label[-1]))
            reg_label.append((gt[index, :4] - anchors) / BOX)
            reg_mask.append(positive[:, None].float().expand(-1, 4))
        stack = lambda xs: torch.stack(xs)  # noqa: E731
        labels = {
            "cls_label": stack(cls_label),
            "cls_label_mask": stack(cls_mask),
            "reg_label": stack(reg_label),
            "reg_label_mask": stack(reg_mask),
        }
        return None, labels


class WeightedLoss(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, pred, target, weight, avg_factor):
        if self.kind == "focal":
            loss = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target, reduction="none")
            loss = loss * (pred - target).abs() ** 2  # focal term, gamma 2
        else:
            loss = F.l1_loss(pred, target, reduction="none")
        return (loss * weight).sum() / avg_factor


class PostProcess(nn.Module):
    def forward(self, anchors, cls_scores, bbox_preds, shapes):
        scores = cls_scores.sigmoid().flatten(1)
        best = scores.argmax(1)
        deltas = bbox_preds[torch.arange(len(best)), best]
        boxes = anchors[best] + deltas * BOX
        return [box.clamp(0, float(s.max())) for box, s in zip(boxes, shapes)]


class RetinaNet(nn.Module):
    """The chapter's class with tiny parts plugged in (and `feat` dequantized, see forward)."""

    def __init__(
        self,
        backbone: nn.Module,
        neck: Optional[nn.Module] = None,  # noqa: UP045
        head: Optional[nn.Module] = None,  # noqa: UP045
        anchors: Optional[nn.Module] = None,  # noqa: UP045
        targets: Optional[nn.Module] = None,  # noqa: UP045
        post_process: Optional[nn.Module] = None,  # noqa: UP045
        loss_cls: Optional[nn.Module] = None,  # noqa: UP045
        loss_reg: Optional[nn.Module] = None,  # noqa: UP045
    ):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.anchors, self.targets, self.post_process = anchors, targets, post_process
        self.loss_cls, self.loss_reg = loss_cls, loss_reg
        self.dequant_feat = DeQuantStub()  # the one addition, see forward

    def rearrange_head_out(self, inputs: list[torch.Tensor], num: int):
        outputs = []
        for t in inputs:
            outputs.append(t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, num))
        return torch.cat(outputs, dim=1)

    def forward(self, data: dict):
        feat = self.backbone(data["img"])
        feat = self.neck(feat) if self.neck else feat
        cls_scores, bbox_preds = self.head(feat)
        if self.post_process is None:
            return cls_scores, bbox_preds
        # FX keeps the wrapped method as one call; the modules it calls are still quantized.
        # The one change to the chapter's code: what enters it leaves the integer region first
        # (after convert_fx an int8 `feat` would reach float code; convert_fx says so).
        return self._post_process(data, self.dequant_feat(feat), cls_scores, bbox_preds)

    @fx_wrap()
    def _post_process(self, data, feat, cls_scores, bbox_preds):
        anchors = self.anchors(feat)
        # the self.training test must be inside the wrapped method, or tracing would drop it
        cls_scores = self.rearrange_head_out(cls_scores, self.head.num_classes)
        bbox_preds = self.rearrange_head_out(bbox_preds, 4)
        if self.training:
            gt_labels = [
                torch.cat([data["gt_bboxes"][i], data["gt_classes"][i][:, None] + 1], dim=-1)
                for i in range(len(data["gt_classes"]))
            ]
            gt_labels = [gt_label.float() for gt_label in gt_labels]
            _, labels = self.targets(anchors, gt_labels)
            avg_factor = labels["reg_label_mask"].sum()
            if avg_factor == 0:
                avg_factor += 1
            cls_loss = self.loss_cls(
                pred=cls_scores.sigmoid(),
                target=labels["cls_label"],
                weight=labels["cls_label_mask"],
                avg_factor=avg_factor,
            )
            reg_loss = self.loss_reg(
                pred=bbox_preds,
                target=labels["reg_label"],
                weight=labels["reg_label_mask"],
                avg_factor=avg_factor,
            )
            return {"cls_loss": cls_loss, "reg_loss": reg_loss}
        else:
            preds = self.post_process(
                anchors,
                cls_scores,
                bbox_preds,
                [torch.tensor(shape) for shape in data["resized_shape"]],
            )
            assert "pred_bboxes" not in data, "pred_bboxes has been in data.keys()"
            data["pred_bboxes"] = preds
            return data


def make_batch(n: int, generator: torch.Generator) -> dict:
    """Images in [-1, 1) with one bright BOX x BOX square each, and its box."""
    corners = torch.randint(0, SIZE - int(BOX), (n, 2), generator=generator).float()
    images = torch.full((n, 1, SIZE, SIZE), -1.0)
    for image, (x, y) in zip(images, corners.long().tolist()):
        image[:, y : y + int(BOX), x : x + int(BOX)] = 0.9
    boxes = torch.cat([corners, corners + BOX], 1)
    return {
        "img": images,
        "gt_bboxes": [b[None] for b in boxes],
        "gt_classes": [torch.zeros(1) for _ in boxes],
        "resized_shape": [(SIZE, SIZE)] * n,
    }


def mean_iou(model: nn.Module, batch: dict) -> float:
    model.eval()
    with torch.no_grad():
        out = model({k: v for k, v in batch.items() if k != "pred_bboxes"})
    predicted = torch.stack(out["pred_bboxes"])
    truth = torch.cat(batch["gt_bboxes"])
    return torch.diag(box_iou(predicted, truth)).mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    set_march("bayes")

    model = RetinaNet(
        Backbone(),
        None,
        Head(),
        Anchors(),
        Targets(),
        PostProcess(),
        WeightedLoss("focal"),
        WeightedLoss("l1"),
    )
    qat_model = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
    called = [
        getattr(n.target, "__name__", "") for n in qat_model.graph.nodes if n.op == "call_function"
    ]
    print("kept out of the trace:", [name for name in called if name != "getitem"])

    optimizer = torch.optim.Adam(qat_model.parameters(), lr=1e-2)
    first = last = None
    for _step in range(args.steps):
        qat_model.train()
        losses = qat_model(make_batch(16, generator))
        loss = losses["cls_loss"] + losses["reg_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        last = loss.item()
    test_batch = make_batch(32, generator)
    result = {
        "first_loss": first,
        "last_loss": last,
        "qat_mean_iou": mean_iou(qat_model, test_batch),
    }
    int_model = convert_fx(qat_model.eval())
    result["converted_mean_iou"] = mean_iou(int_model, test_batch)
    for name, value in result.items():
        print(f"{name:20s} {value:.4f}")
    return result


if __name__ == "__main__":
    main()
