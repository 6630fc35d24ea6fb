"""The host path of per-tensor observers: float32 arithmetic on Python floats, bit for bit the
tensor ops it replaces (the moving average, the scale formula, the fake quant that follows)."""

from __future__ import annotations

import pytest
import torch

from hq_lightning.quantization import FakeQuantize, MinMaxObserver, check_nonfinite
from hq_lightning.quantization.host_float32 import FLOAT32_MIN_NORMAL, moving_average, to_float32
from hq_lightning.quantization.qparams import compute_scale, compute_scale_on_host


def _float32_values(count: int, seed: int) -> torch.Tensor:
    """Magnitudes from 1e-30 to 1e30, both signs, and a few exact edges."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.pow(10.0, torch.rand(count, generator=g, dtype=torch.float64) * 60 - 30)
    signs = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).double()
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 127.5, 3.0e38, -3.0e38, 2.0**-125], dtype=torch.float64)
    return torch.cat([edges, magnitudes * signs]).float()


@pytest.mark.parametrize("constant", [1.0, 0.01, 0.3, 0.999, 1e-6])
def test_moving_average_equals_the_float32_tensor_ops(constant):
    values, currents = _float32_values(4000, 0), _float32_values(4000, 1)
    # the observers' tensor path: (current - value), * constant unless it is 1, + value
    steps = currents - values
    if constant != 1.0:
        steps = steps * constant
    expected = values + steps
    checked = 0
    for value, current, want in zip(values.tolist(), currents.tolist(), expected.tolist()):
        got = moving_average(value, current, constant)
        if got is None:  # a step left float32's normal range: the tensor path decides
            continue
        assert torch.tensor(got).float().view(torch.int32) == torch.tensor(want).view(torch.int32), (value, current)
        checked += 1
    assert checked > 3500


def test_to_float32_rounds_to_nearest_even_and_refuses_what_float32_cannot_hold():
    assert to_float32(1.0 + 2.0**-24) == 1.0  # a tie: to even
    assert to_float32(1.0 + 3 * 2.0**-24) == 1.0 + 2.0**-22
    assert to_float32(3.4028234663852886e38) == 3.4028234663852886e38
    for value in (1e39, -1e39, float("inf"), float("nan"), 1e-40, -1e-40):
        assert to_float32(value) is None
    assert to_float32(0.0) == 0.0 and str(to_float32(-0.0)) == "-0.0"


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_scale_on_host_equals_compute_scale(dtype):
    amaxes = _float32_values(4000, 2).abs()
    expected = compute_scale(amaxes, dtype, "bayes")
    for amax, want in zip(amaxes.tolist(), expected.tolist()):
        got = compute_scale_on_host(amax, dtype, "bayes")
        if got is None:  # a quotient below float32's normal range
            assert amax / 127.5 < 2 * FLOAT32_MIN_NORMAL
            continue
        assert torch.tensor(got).float().view(torch.int32) == torch.tensor(want).view(torch.int32), amax
    assert compute_scale_on_host(1.0, dtype, "bernoulli") is None  # power of two: torch's log2


def _run(fq: FakeQuantize, batches, host: bool, monkeypatch):
    """Outputs, input gradients and buffers after each batch, the host path on or off."""
    if not host:
        monkeypatch.setattr(FakeQuantize, "_observe_on_host", lambda self, observer, x: (False, None))
    trace = []
    for batch, relu in batches:
        leaf = batch.clone().requires_grad_(True)
        x = torch.relu(leaf) if relu else leaf * 1.0
        y = fq(x)
        y.backward(torch.linspace(-2, 2, y.numel()).view_as(y))
        observer = fq.activation_post_process
        trace.append([y.detach(), leaf.grad, observer.min_val.clone(), observer.max_val.clone(), fq.scale.clone()])
    monkeypatch.undo()
    return trace


@pytest.mark.parametrize("averaging_constant", [0.01, 1.0, 0.0, 0.37])
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_fake_quantize_steps_on_the_host_equal_the_tensor_path(averaging_constant, dtype, monkeypatch):
    """Several observed batches (one with NaN: skipped and counted on either path; growing and
    shrinking ranges; ReLU inputs, whose masks are recomputed) give the same outputs,
    gradients, ranges and scales bit for bit, and the host path is the one taken."""
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4, 3, 5, 5, generator=g) * scale, i % 2 == 1) for i, scale in enumerate((1, 3, 0.2, 5, 1))]
    batches.insert(3, (batches[0][0].clone().index_fill_(0, torch.tensor([1]), float("nan")), False))
    taken = []
    original = MinMaxObserver.update_on_host
    monkeypatch.setattr(MinMaxObserver, "update_on_host", lambda self, x: taken.append(original(self, x)) or taken[-1])
    host = _run(FakeQuantize(averaging_constant=averaging_constant, dtype=dtype).train(), batches, True, monkeypatch)
    tensor = _run(FakeQuantize(averaging_constant=averaging_constant, dtype=dtype).train(), batches, False, monkeypatch)
    for step, (a, b) in enumerate(zip(host, tensor)):
        for got, want in zip(a, b):
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)) or (
                torch.isnan(got).any() and torch.equal(torch.isnan(got), torch.isnan(want))
                and torch.equal(got.nan_to_num(), want.nan_to_num())
            ), step
    assert sum(result is not None for result in taken) == 4  # after the first batch, but the NaN one


def test_the_host_path_counts_a_nan_batch_like_the_tensor_path():
    fq = FakeQuantize(averaging_constant=0.5).train()
    fq(torch.tensor([1.0, -2.0]))
    fq(torch.tensor([1.0, float("nan")]))
    fq(torch.tensor([4.0, -2.0]))  # host path again
    assert fq.activation_post_process.max_val.item() == 2.5
    with pytest.raises(ValueError, match="1 batch"):
        check_nonfinite(fq)


def test_the_host_path_steps_aside_where_it_would_differ():
    """Hooks on the observer, a float64 range, a float16 input and a range not yet initialised
    take the tensor path (``update_on_host`` changes nothing and returns None)."""
    x = torch.tensor([1.0, -2.0])
    fresh = MinMaxObserver(averaging_constant=0.5)
    assert fresh.update_on_host(x) is None and fresh.min_val.numel() == 0
    hooked = MinMaxObserver(averaging_constant=0.5)
    hooked(x)
    hooked.register_forward_hook(lambda module, args, out: None)
    assert hooked.update_on_host(x * 3) is None and hooked.max_val.item() == 1.0
    wide = MinMaxObserver(averaging_constant=0.5)
    wide(x)
    wide.double()  # float64 ranges, computed in float64 by the tensor path
    assert wide.update_on_host(x * 3) is None
    half = MinMaxObserver(averaging_constant=0.5)
    half(x)
    assert half.update_on_host((x * 3).half()) is None and half.max_val.item() == 1.0
    frozen = MinMaxObserver(averaging_constant=0.0)
    frozen(x)
    assert frozen.update_on_host(x * 3) == (-2.0, 1.0) and frozen.max_val.item() == 1.0
