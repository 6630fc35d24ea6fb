"""A tiny two-stage detector for segmented deployment (the chapter's "模型分段部署" scenario).

Stage 1 (BPU): backbone -> feature map and objectness scores (both dequantized).
CPU step: top-k of the scores -> boxes (``decode_topk_boxes``, float, kept out of the trace).
Stage 2 (BPU): RoIAlign-like bilinear pooling of the features in each box (float, kept out of the
trace), then ``quant_roi = QuantStub(scale=None)`` (the split point: it records stage 2's input
scale during QAT) -> conv head -> class logits.

Split it with ``split_stages(converted, at=["decode_topk_boxes", "roi_align"])`` into backbone /
CPU step / head, or ``at=["quant_roi"]`` into two stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hq_lightning.quantization import DeQuantStub, QuantStub
from hq_lightning.utils.fx_helper import wrap


@wrap()
def decode_topk_boxes(scores: Tensor, k: int, box_size: float) -> Tensor:
    """Boxes of side ``box_size`` around the ``k`` best-scoring positions of each image.

    Returns:
        ``[N * k, 5]`` float rows ``(batch_index, x1, y1, x2, y2)`` in feature-map pixels.
    """
    n, _, h, w = scores.shape
    # Dequantized scores tie often; top-k's choice among ties is unspecified (onnxruntime and
    # torch differ), so ties go to the lower index. The nudge is far below one score step.
    flat = scores.reshape(n, h * w)
    order = torch.arange(h * w, dtype=scores.dtype, device=scores.device)
    step = flat.abs().max().clamp(min=1e-6) * 2.0**-20
    _, index = (flat - order * step).topk(k, dim=1)
    cy = torch.div(index, w, rounding_mode="floor").to(scores.dtype)
    cx = (index % w).to(scores.dtype)
    half = box_size / 2
    x1 = (cx - half).clamp(0, w - 1)
    y1 = (cy - half).clamp(0, h - 1)
    x2 = (cx + half).clamp(0, w - 1)
    y2 = (cy + half).clamp(0, h - 1)
    batch = torch.arange(n, dtype=scores.dtype, device=scores.device)[:, None].expand(n, k)
    return torch.stack([batch, x1, y1, x2, y2], dim=2).reshape(n * k, 5)


@wrap()
def roi_align(features: Tensor, rois: Tensor, size: int) -> Tensor:
    """Bilinear sample ``size x size`` bin centres of each box (one sample per bin).

    Returns:
        ``[R, C, size, size]`` pooled features.
    """
    n, _, h, w = features.shape
    steps = (torch.arange(size, dtype=features.dtype, device=features.device) + 0.5) / size
    x = rois[:, 1:2] + (rois[:, 3:4] - rois[:, 1:2]) * steps  # [R, size]
    y = rois[:, 2:3] + (rois[:, 4:5] - rois[:, 2:3]) * steps
    # pixel centres sit at integer coordinates; grid_sample(align_corners=False) wants [-1, 1]
    gx = (x + 0.5) / w * 2 - 1
    gy = (y + 0.5) / h * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    picked = features.index_select(0, rois[:, 0].to(torch.long))
    return F.grid_sample(picked, grid, mode="bilinear", align_corners=False)


class TwoStageDetector(nn.Module):
    """Backbone -> top-k box decode (CPU) -> RoIAlign -> quantized head."""

    def __init__(self, num_rois: int = 3, pool: int = 3, box_size: float = 3.0) -> None:
        super().__init__()
        self.num_rois = num_rois
        self.pool = pool
        self.box_size = box_size
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.score = nn.Conv2d(8, 1, 1)
        self.dequant_feat = DeQuantStub()
        self.dequant_score = DeQuantStub()
        self.quant_roi = QuantStub(scale=None)
        self.head = nn.Conv2d(8, 16, pool)
        self.head_relu = nn.ReLU()
        self.cls = nn.Conv2d(16, 2, 1)
        self.dequant_out = DeQuantStub()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = self.quant(image)
        feat = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        scores = self.dequant_score(self.score(feat))
        feat = self.dequant_feat(feat)
        rois = decode_topk_boxes(scores, self.num_rois, self.box_size)
        pooled = roi_align(feat, rois, self.pool)
        y = self.quant_roi(pooled)
        y = self.cls(self.head_relu(self.head(y)))
        return self.dequant_out(y), rois
