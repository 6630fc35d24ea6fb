"""On a GPU an eager QAT step is launch-bound: every small op of an observer and a fake quant is a
kernel launch (bench/results/gpu.md: 45 per activation fake quant made eager ResNet-18 QAT 3.7x
float on an H200). These tests count the kernels one ``FakeQuantize`` forward dispatches on the
device path (what CUDA, compiled and distributed steps run), so a change that adds launches fails
here, on the CPU, before it reaches a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hq_lightning.quantization.observer as observer_module
from hq_lightning.march import March, march_context
from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig

# ops that only make a view or a reference: no kernel on any device
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "detach", "permute", "expand", "alias", "select", "t",
              "unsqueeze", "squeeze", "movedim", "slice", "as_strided"}


class _KernelCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("which", "forward_limit", "backward_limit"), [
    ("activation", 26, 2),  # backward: grad * mask, and the test's own `leaf * 1.0`
    ("weight", 24, 6),  # backward: the in-range mask recomputed from the weight (no 1-byte mask kept)
])
def test_one_observed_fake_quant_dispatches_few_kernels(which, forward_limit, backward_limit, monkeypatch):
    monkeypatch.setattr(observer_module, "_host_reads_are_free", lambda x: False)
    with march_context(March.BAYES):
        fake_quant = getattr(default_qat_8bit_fake_quant_qconfig, which)()
    shape = (2, 4, 3, 3) if which == "activation" else (4, 4, 3, 3)
    leaf = torch.randn(shape, requires_grad=True)

    def batch():
        return leaf * 1.0 if which == "activation" else leaf

    fake_quant(batch())  # the first batch allocates the range; count a steady-state step
    x = batch()
    with _KernelCount() as forward:
        y = fake_quant(x)
    grad = torch.ones_like(y)
    with _KernelCount() as backward:
        y.backward(grad)
    assert len(forward.ops) <= forward_limit, forward.ops
    assert len(backward.ops) <= backward_limit, backward.ops
    assert "_local_scalar_dense" not in forward.ops + backward.ops  # no host read: no synchronisation
