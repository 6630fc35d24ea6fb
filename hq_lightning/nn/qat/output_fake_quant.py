"""The QAT form of a float op that changes the value range: the float forward, then a fake quant.

Averaging pools and interpolating upsamples compute new values, so their output needs its own
scale; they have no weights, so the float module's own ``forward`` does the work and only the
output is fake-quantized.

Example:
    >>> import torch
    >>> from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as qc
    >>> class Avg(OutputFakeQuantMixin, torch.nn.AvgPool2d):
    ...     pass
    >>> pool = Avg(2)
    >>> pool.activation_post_process = qc.activation()
    >>> pool(torch.rand(1, 1, 4, 4)).shape
    torch.Size([1, 1, 2, 2])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OutputFakeQuantMixin"]


class OutputFakeQuantMixin:
    """Put before a float module class: its ``forward``, then ``activation_post_process`` if set."""

    activation_post_process: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.activation_post_process is not None:
            out = self.activation_post_process(out)
        return out
