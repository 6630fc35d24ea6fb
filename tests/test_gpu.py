"""GPU checks: the CUDA paths compute exactly what the CPU paths compute.

Skipped without CUDA (see conftest.py). On a machine with a GPU: ``pytest -m gpu``.
"""

import copy

import pytest
import torch

from hq_lightning.qconfig import (
    default_qat_8bit_fake_quant_qconfig,
)
from hq_lightning.quantization import (
    FakeQuantState,
    convert_fx,
    copy_calibration_state,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fake_quantize import fake_quantize
from tests.calibrate import calibrated
from tests.models import mobilenet_v2, resnet18

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("ch_axis", [None, 1])
def test_fake_quantize_on_cuda_equals_cpu(dtype, ch_axis):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12) * 4
    scale = torch.rand(16 if ch_axis is not None else 1) * 0.05 + 1e-3
    x_cuda = x.detach().cuda().requires_grad_()
    y_cuda = fake_quantize(x_cuda, scale.cuda(), dtype, ch_axis)
    y_cuda.sum().backward()
    x_cpu = x.detach().clone().requires_grad_()
    y_cpu = fake_quantize(x_cpu, scale, dtype, ch_axis)
    y_cpu.sum().backward()
    assert torch.equal(y_cuda.cpu(), y_cpu)
    assert torch.equal(x_cuda.grad.cpu(), x_cpu.grad)


def _calibrated_qat(model, batches):
    calib = calibrated(model, batches, validate=False)
    qat = prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig})
    copy_calibration_state(calib, qat)
    return qat


@pytest.mark.parametrize("build", [lambda: resnet18(width=16, num_classes=10),
                                   lambda: mobilenet_v2(width_mult=0.25, num_classes=10)])
def test_qat_trains_on_cuda_and_converted_model_is_bit_exact_across_devices(build):
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    qat = _calibrated_qat(build().eval(), batches).cuda()
    qat.train()
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    for x in batches:
        loss = qat(x.cuda()).logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, buffer in qat.named_buffers():
        if name.endswith("scale"):
            assert buffer.dtype == torch.float32, name
    qat.eval()
    set_fake_quantize(qat, FakeQuantState.VALIDATION)
    converted_cpu = convert_fx(copy.deepcopy(qat).cpu())
    converted_cuda = copy.deepcopy(converted_cpu).cuda()
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(converted_cuda(x.cuda()).cpu(), converted_cpu(x))
