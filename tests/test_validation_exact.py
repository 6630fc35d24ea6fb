"""VALIDATION is the integer model: ``convert_fx(m)(x)`` equals ``m(x)`` bit for bit (issue 13).

A prepared model wholly in VALIDATION runs the integer model ``convert_fx`` builds from it
(``hq_lightning/quantization/fx/integer_validation.py``). Checked on every model of
``tests/models.py`` and (slow) on torchvision networks with random init at batch 32, 64x64
input, after calibration and two QAT steps that move scales and weights; the trained models of
``tests/test_convert_accuracy.py`` are checked there. Also: the cache follows every change of
the model, never enters a state_dict, copy or pickle; mixed states, training, uncalibrated and
unconvertible models keep the fake-quant path; gradients, autocast and DDP wrapping.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.integer_validation import (
    CACHE_ATTR,
    fake_quant_path,
    runs_integer_model,
)
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig
from tests.calibrate import calibrated
from tests.models import Stubbed, mobilenet_v2, resnet18

QAT8 = default_qat_8bit_fake_quant_qconfig


def _batches(count: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def _calibrated_then_trained(float_model: nn.Module, batches: list[torch.Tensor], steps: int = 2) -> nn.Module:
    """QAT prepare, calibration passes, ``steps`` SGD steps in QAT (scales and weights move), VALIDATION."""
    prepared = prepare_qat_fx(float_model, {"": QAT8}).eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    for x in batches[:steps]:
        loss = prepared(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared


def _assert_exact(prepared: nn.Module, x: torch.Tensor) -> None:
    assert runs_integer_model(prepared)
    with torch.no_grad():
        validation = prepared(x)
        converted = convert_fx(prepared)(x)
        with fake_quant_path():
            fake = prepared(x)
    assert validation.dtype == converted.dtype == torch.float32
    assert torch.equal(validation, converted)
    assert fake.shape == validation.shape  # the per-module path still runs on request


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: resnet18(num_classes=10), id="resnet18", marks=pytest.mark.slow),
        pytest.param(lambda: mobilenet_v2(num_classes=10), id="mobilenet_v2", marks=pytest.mark.slow),
        pytest.param(lambda: resnet18(width=8, num_classes=10), id="resnet18-w8"),
        pytest.param(
            lambda: mobilenet_v2(width_mult=0.35, num_classes=10, last_channel=128), id="mobilenet_v2-0.35"
        ),
    ],
)
def test_every_test_model_validates_as_its_converted_model(build):
    torch.manual_seed(0)
    batches = _batches(3, (8, 3, 32, 32))
    _assert_exact(_calibrated_then_trained(build(), batches), _batches(1, (8, 3, 32, 32), seed=1)[0])


def test_calibrated_model_validates_as_its_converted_model():
    torch.manual_seed(0)
    prepared = calibrated(resnet18(width=8, num_classes=10), _batches(2, (4, 3, 32, 32)))
    _assert_exact(prepared, _batches(1, (4, 3, 32, 32), seed=3)[0])


def _small() -> nn.Module:
    torch.manual_seed(0)
    return calibrated(resnet18(width=4, num_classes=3), _batches(2, (4, 3, 16, 16)))


def test_cache_follows_parameters_buffers_and_states():
    prepared = _small()
    x = _batches(1, (2, 3, 16, 16), seed=5)[0]
    with torch.no_grad():
        prepared(x)
        first = prepared.__dict__[CACHE_ATTR].model
        prepared(x)
        assert prepared.__dict__[CACHE_ATTR].model is first  # reused while nothing changes
        prepared.fc.weight.mul_(-1)  # in place: a new version
        changed = prepared(x)
        assert prepared.__dict__[CACHE_ATTR].model is not first
        assert torch.equal(changed, convert_fx(prepared)(x))
        scale = prepared.quant.activation_post_process.scale
        scale.data.copy_(scale * 2)  # untracked edit, then a state switch (calibration hand-over)
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        assert prepared.__dict__[CACHE_ATTR].model is None  # dropped by the switch
        assert torch.equal(prepared(x), convert_fx(prepared)(x))
        prepared.layer1[0].conv1.bias = None  # a replaced parameter
        assert torch.equal(prepared(x), convert_fx(prepared)(x))


def test_cache_is_never_saved_copied_or_pickled():
    prepared = _small()
    keys = set(prepared.state_dict())
    with torch.no_grad():
        prepared(torch.randn(1, 3, 16, 16))
    assert prepared.__dict__[CACHE_ATTR].model is not None
    assert set(prepared.state_dict()) == keys
    assert CACHE_ATTR not in dict(prepared.named_modules())
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared)), copy.copy(prepared)):
        cache = clone.__dict__.get(CACHE_ATTR)
        assert cache is None or cache.model is None
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), prepared(x))


def test_other_states_and_mixed_states_run_the_fake_quant_path():
    prepared = _small()
    calls = []
    prepared.fc.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        prepared(x)
        assert calls == []  # the integer model ran, not the QAT module
        set_fake_quantize(prepared.fc, FakeQuantState.FLOAT)  # head float, backbone VALIDATION
        assert not runs_integer_model(prepared)
        prepared(x)
        assert calls == [1]
        set_fake_quantize(prepared, FakeQuantState.VALIDATION)
        prepared.layer1.train()  # a submodule in train mode
        assert not runs_integer_model(prepared)
        prepared.eval()
        assert runs_integer_model(prepared)
        set_fake_quantize(prepared, FakeQuantState.FLOAT)
        assert not runs_integer_model(prepared)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    assert not runs_integer_model(prepared)


def test_uncalibrated_model_validates_with_fake_quant_silently():
    torch.manual_seed(0)
    prepared = prepare_qat_fx(resnet18(width=4, num_classes=3), {"": QAT8}).eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)  # e.g. Lightning's sanity check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not runs_integer_model(prepared)  # no integer model before calibration, no warning
        with torch.no_grad(), pytest.raises(RuntimeError, match="has observed no data yet"):
            prepared(torch.randn(1, 3, 16, 16))  # the fake-quant path's own message


def test_unconvertible_model_warns_once_and_keeps_fake_quant(monkeypatch):
    # ops without an integer form become float islands at prepare, so convert_fx rarely fails;
    # when it does (an op registered without an integer builder), VALIDATION says so and goes on
    from hq_lightning.quantization.fx import convert

    def refuse(model):
        raise RuntimeError("Expected every op on an integer tensor to have an integer conversion.")

    prepared = _small()
    monkeypatch.setattr(convert, "convert_fx", refuse)
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="Expected the prepared model to convert.*integer conversion"), torch.no_grad():
        out = prepared(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again while the model is unchanged
        with torch.no_grad():
            again = prepared(x)
        with torch.no_grad(), fake_quant_path():
            assert torch.equal(out, prepared(x))
    assert torch.equal(out, again)
    assert not runs_integer_model(prepared)


def test_gradients_come_from_the_fake_quant_path():
    prepared = _small()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = prepared(x)
    with torch.no_grad():
        assert torch.equal(out, convert_fx(prepared)(x))
    out.square().sum().backward()
    grad_x, grad_w = x.grad.clone(), prepared.fc.weight.grad.clone()
    x.grad = None
    prepared.zero_grad()
    with fake_quant_path():
        fake = prepared(x)
    (fake + (out - fake).detach()).square().sum().backward()  # same upstream gradient
    assert torch.equal(x.grad, grad_x) and torch.equal(prepared.fc.weight.grad, grad_w)


def test_autocast_runs_the_integer_model_in_float32_and_casts_the_output():
    prepared = _small()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = convert_fx(prepared)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prepared(x)
            with fake_quant_path():
                fake = prepared(x)
    assert out.dtype == fake.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))


def test_converted_model_is_exact_under_autocast():
    # the integer kernels switch autocast off themselves: a bf16 float32-conv would round sums
    prepared = _small()
    converted = convert_fx(prepared)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = converted(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(converted(x), expected)


def test_ddp_wrapped_model_validates_as_its_converted_model():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        prepared = _small()
        ddp = nn.parallel.DistributedDataParallel(prepared)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            out = ddp(x)
            assert runs_integer_model(prepared)
            assert torch.equal(out, convert_fx(prepared)(x))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- torchvision (slow)

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_400mf", "resnext50_32x4d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_validate_as_their_converted_model(name):
    torchvision = pytest.importorskip("torchvision")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Stubbed(getattr(torchvision.models, name)(num_classes=10))
        prepared = _calibrated_then_trained(model, _batches(2, (32, 3, 64, 64)))
        x = _batches(1, (32, 3, 64, 64), seed=7)[0]
        _assert_exact(prepared, x)
    finally:
        torch.set_num_threads(threads)


def test_functional_relu_model_in_graph():
    # F.relu6 has an integer builder: one more op kind through the same machinery
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.conv, self.dequant = QuantStub(), nn.Conv2d(3, 4, 3), DeQuantStub()

        def forward(self, x):
            return self.dequant(F.relu6(self.conv(self.quant(x))))

    prepared = calibrated(Net(), [torch.randn(4, 3, 8, 8)])
    _assert_exact(prepared, torch.randn(2, 3, 8, 8))


@pytest.mark.slow
def test_compiled_model_validates_as_its_converted_model():
    # Module.compile (what QuantizationCallback(compile=...) does): the VALIDATION check and the
    # integer model run eagerly at a graph break; QAT stays compiled
    prepared = _small()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = convert_fx(prepared)(x)
    prepared.compile(backend="eager")
    with torch.no_grad():
        assert torch.equal(prepared(x), expected)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    prepared(x).sum().backward()
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    with torch.no_grad():
        assert torch.equal(prepared(x), convert_fx(prepared)(x))
    converted = torch.compile(convert_fx(prepared), backend="eager", fullgraph=True)  # no break
    with torch.no_grad():
        assert torch.equal(converted(x), prepared(x))
