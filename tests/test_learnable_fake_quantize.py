"""LearnableFakeQuantize (LSQ): forward bit for bit against the formula, the LSQ gradients of x and
scale against the hand formula and the paper's surrogate, states, positivity, strict state_dict
round trips, end-to-end QAT -> convert parity, and the BERNOULLI error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.march import march_context
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    LearnableFakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    QConfig,
    QuantStub,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fake_quantize import fake_quantize
from hq_lightning.quantization.learnable_fake_quantize import lsq_fake_quantize
from hq_lightning.quantization.observer import FixedScaleObserver
from hq_lightning.quantization.qparams import SCALE_EPS

QMIN, QMAX = -128, 127


def _view(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _hand_grads(x, scale, upstream, axis, qmax=QMAX, qmin=QMIN, grad_scale=True):
    """The LSQ gradients written out elementwise in float64 from the float32 codes."""
    s = _view(scale.detach(), x, axis)
    v = (x.detach() * torch.reciprocal(s)).double()
    r = torch.round(v)
    inside = (r >= qmin) & (r <= qmax)
    grad_x = upstream.double() * inside.double()
    per_elem = torch.where(inside, r - v, r.clamp(qmin, qmax)) * upstream.double()
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    grad_s = per_elem.sum(dim=dims).reshape(scale.shape)
    if grad_scale:
        grad_s = grad_s / math.sqrt(x.numel() / scale.numel() * qmax)
    return grad_x, grad_s


def _paper_surrogate(x, scale, axis, grad_scale=True):
    """The LSQ paper's reference code: gradscale(s, g) and roundpass(v), built from torch ops."""
    g = 1.0 / math.sqrt(x.numel() / scale.numel() * QMAX) if grad_scale else 1.0
    s = scale * g + (scale - scale * g).detach()
    s = _view(s, x, axis)
    v = x * torch.reciprocal(s)
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v, QMIN, QMAX) * s


# --------------------------------------------------------------------------- functional


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_forward_is_bit_exact_to_the_formula_and_to_fake_quantize(axis):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5) * 3
    scale = torch.rand(1 if axis is None else x.shape[axis]) * 0.05 + 0.01
    got = lsq_fake_quantize(x, scale, "qint8", axis)
    s = _view(scale, x, axis)
    expected = torch.clamp(torch.round(x * torch.reciprocal(s)), QMIN, QMAX) * s
    assert torch.equal(got, expected)
    assert torch.equal(got, fake_quantize(x, scale, "qint8", axis))
    # x / s (semantics.md) gives the same codes except within one ulp of a half-integer tie
    v = x / s
    away_from_ties = ((v - v.floor()) - 0.5).abs() > 1e-4
    divided = torch.clamp(torch.round(v), QMIN, QMAX) * s
    assert torch.equal(got[away_from_ties], divided[away_from_ties])
    assert not (got > QMAX * s).any() and not (got < QMIN * s).any()  # saturates, never beyond
    assert (got == QMAX * s).any() if axis is None else True


@pytest.mark.parametrize("grad_scale", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 2])
def test_gradients_match_the_hand_formula_and_the_papers_surrogate(axis, grad_scale):
    torch.manual_seed(1)
    x = (torch.randn(4, 3, 5) * 2).requires_grad_()
    # small scales so that a good share of elements saturates on both sides
    scale = (torch.rand(1 if axis is None else x.shape[axis]) * 0.02 + 0.01).requires_grad_()
    upstream = torch.randn(4, 3, 5)
    y = lsq_fake_quantize(x, scale, "qint8", axis, grad_scale=grad_scale)
    grad_x, grad_s = torch.autograd.grad(y, (x, scale), upstream)

    hand_x, hand_s = _hand_grads(x, scale, upstream, axis, grad_scale=grad_scale)
    v = x.detach() * torch.reciprocal(_view(scale.detach(), x, axis))
    assert (v.round() > QMAX).any() and (v.round() < QMIN).any() and (v.round().abs() < 50).any()
    assert torch.equal(grad_x, hand_x.float())
    torch.testing.assert_close(grad_s.double(), hand_s, rtol=1e-5, atol=1e-5)

    x2 = x.detach().clone().requires_grad_()
    s2 = scale.detach().clone().requires_grad_()
    y2 = _paper_surrogate(x2, s2, axis, grad_scale)
    assert torch.equal(y.detach(), y2.detach())
    sx, ss = torch.autograd.grad(y2, (x2, s2), upstream)
    # torch.clamp's backward at a value equal to a bound changed between torch releases (2.14
    # gives 0 there); the paper's clamp is only a surrogate, so compare away from the bounds,
    # where every release agrees. Our rule keeps r == qmin / qmax inside (semantics: saturating STE).
    r = v.round()
    off_bounds = (r != QMIN) & (r != QMAX)
    torch.testing.assert_close(grad_x[off_bounds], sx[off_bounds])  # x path: s * (1 / s)
    assert torch.equal(grad_x[~off_bounds], upstream[~off_bounds])
    if bool(off_bounds.all()):
        torch.testing.assert_close(grad_s, ss, rtol=1e-5, atol=1e-5)


def test_scale_gradient_of_saturated_inputs_equals_the_finite_difference():
    # every element saturated: y = qmax * s or qmin * s, linear in s, so the difference is exact
    x = torch.tensor([[50.0, -60.0], [70.0, 80.0]], dtype=torch.float64).float()
    scale = torch.tensor([0.1, 0.2], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    loss = (lsq_fake_quantize(x, scale, "qint8", 1, grad_scale=False) * weights).sum()
    (grad,) = torch.autograd.grad(loss, scale)
    h = 1e-3
    for c in range(2):
        up, down = scale.detach().clone(), scale.detach().clone()
        up[c] += h
        down[c] -= h
        fd = ((fake_quantize(x, up, "qint8", 1) - fake_quantize(x, down, "qint8", 1)) * weights).sum() / (2 * h)
        assert float(grad[c]) == pytest.approx(float(fd), rel=1e-3)
    assert grad.tolist() == [1.0 * 127 - 1.0 * 127, 2.0 * -128 + 0.5 * 127]


def test_non_float32_inputs_keep_their_dtype():
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.02], requires_grad=True)
    y = lsq_fake_quantize(x, scale)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert x.grad.dtype == torch.float64 and scale.grad.dtype == torch.float32


# --------------------------------------------------------------------------- module


def test_scale_is_a_parameter_seeded_by_the_first_qat_batch_then_learned():
    fq = LearnableFakeQuantize(observer=MovingAveragePerTensorMinMaxObserver, averaging_constant=1)
    param = dict(fq.named_parameters())["scale"]
    assert isinstance(param, nn.Parameter) and "scale" not in dict(fq.named_buffers())
    x = torch.tensor([-1.0, 2.55])
    fq(x)
    assert torch.equal(fq.scale, torch.tensor([2.55 / 127.5]))
    # later batches do not move the scale nor the observer: only the optimizer does
    fq(torch.tensor([-10.0, 20.0]))
    assert torch.equal(fq.scale, torch.tensor([2.55 / 127.5]))
    assert float(fq.activation_post_process.max_val) == pytest.approx(2.55)
    with torch.no_grad():
        param.mul_(2)
    assert torch.equal(fq.scale, torch.tensor([2.55 / 127.5]) * 2)
    # re-arming seeds it again from the observer's next update
    fq.reinitialize_scale()(torch.tensor([-1.0, 5.1]))
    assert torch.equal(fq.scale, torch.tensor([5.1 / 127.5]))
    assert fq.scale.requires_grad is False  # what convert reads: detached


def test_calibration_batches_keep_following_the_observer_until_qat():
    model = nn.Sequential(LearnableFakeQuantize(averaging_constant=1))
    fq = model[0]
    model.eval()
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    for amax in (1.0, 3.0, 2.0):
        model(torch.tensor([-amax, 0.5]))
        assert torch.equal(fq.scale, torch.tensor([amax / 127.5]))
    model.eval()
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    model(torch.tensor([-9.0]))
    assert torch.equal(fq.scale, torch.tensor([2.0 / 127.5]))
    model.train()
    set_fake_quantize(model, FakeQuantState.QAT)
    model(torch.tensor([-4.0]))  # the seeding batch: observer moves to 4.0 (c = 1)
    model(torch.tensor([-8.0]))
    assert torch.equal(fq.scale, torch.tensor([4.0 / 127.5]))


def test_per_channel_keeps_one_parameter_object_and_an_optimizer_trains_it():
    fq = LearnableFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1)
    param = fq._parameters["scale"]
    assert param.shape == (0,)
    optimizer = torch.optim.SGD(fq.parameters(), lr=1e-3)
    w = torch.randn(3, 4, requires_grad=True)
    for _ in range(3):
        optimizer.zero_grad()
        (fq(w) - w.detach() * 1.5).pow(2).sum().backward()
        optimizer.step()
    assert fq._parameters["scale"] is param and param.shape == (3,)
    seeded = MovingAveragePerChannelMinMaxObserver(ch_axis=0)
    seeded(w.detach())
    assert not torch.equal(fq.scale, seeded.calculate_qparams()[0])


def test_scale_stays_positive_by_projection():
    fq = LearnableFakeQuantize(averaging_constant=1)
    fq(torch.tensor([-1.0, 1.0]))
    with torch.no_grad():
        fq._parameters["scale"].fill_(-0.5)  # as an overshooting step would
    assert torch.equal(fq.scale, torch.tensor([SCALE_EPS]))
    x = torch.tensor([1.0, -1.0])
    y = fq(x)
    assert torch.equal(y, torch.tensor([127, -128]) * torch.tensor(SCALE_EPS))
    y.sum().backward()
    # saturated on both sides: the gradient points the scale back up (sum of qmax, qmin scaled)
    assert torch.allclose(fq._parameters["scale"].grad, torch.tensor([(127 - 128) / math.sqrt(2 * 127)]))


def test_fixed_scale_observer_pins_the_scale():
    fq = LearnableFakeQuantize(observer=FixedScaleObserver.with_args(scale=1 / 128))
    assert not fq._parameters["scale"].requires_grad
    with torch.no_grad():
        fq.scale.copy_(fq.calculate_qparams()[0])  # as fake_quant_builders does: shares storage
    assert torch.equal(fq._parameters["scale"].detach(), torch.tensor([1 / 128]))
    fq(torch.randn(5))
    assert torch.equal(fq.scale, torch.tensor([1 / 128]))


def test_bernoulli_is_rejected_at_construction():
    with march_context("bernoulli"), pytest.raises(ValueError, match="Expected a march with free float scales"):
        LearnableFakeQuantize()
    with march_context("bernoulli"):
        FakeQuantize()  # the default class is unaffected


# --------------------------------------------------------------------------- end to end


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = F.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(torch.flatten(x, 1)))


QCONFIG = QConfig(
    activation=LearnableFakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver, averaging_constant=0.01),
    weight=LearnableFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1
    ),
)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    prepared = prepare_qat_fx(SmallNet(), {"": QCONFIG})
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.05)  # right after prepare
    x = torch.randn(8, 2, 4, 4)
    target = torch.randn(8, 3)
    prepared.train()
    prepared(x)  # seeds every scale (shape [C] for the weights) before we look at them
    learnable = {n: p for n, p in prepared.named_parameters() if n.endswith("scale")}
    before = {n: p.detach().clone() for n, p in learnable.items()}
    for _ in range(4):
        optimizer.zero_grad()
        F.mse_loss(prepared(x), target).backward()
        optimizer.step()
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared, x, learnable, before


def test_qat_trains_the_scales_and_convert_uses_the_learned_values():
    prepared, x, learnable, before = _trained()
    fqs = [m for m in prepared.modules() if isinstance(m, LearnableFakeQuantize)]
    assert len(learnable) == len(fqs) >= 4
    changed = [n for n in learnable if not torch.equal(learnable[n].detach(), before[n])]
    assert changed == list(learnable), f"unchanged scales: {set(learnable) - set(changed)}"
    # the learned value is what convert reads, not the observer's
    stub_fq = prepared.quant.activation_post_process
    assert not torch.equal(stub_fq.scale, stub_fq.calculate_qparams()[0])

    fake = prepared(x)
    converted = convert_fx(prepared)
    step = converted.dequant.scale
    got = converted(x)
    assert ((got - fake).abs() <= step + 1e-6).float().mean() >= 0.99
    assert torch.equal(converted.quant.scale.reshape(-1), stub_fq.scale.reshape(-1))


def test_strict_state_dict_round_trip_into_a_fresh_prepare():
    prepared, x, _, _ = _trained()
    state = prepared.state_dict()
    assert any(k.endswith("weight_fake_quant.scale") for k in state)
    torch.manual_seed(123)
    fresh = prepare_qat_fx(SmallNet(), {"": QCONFIG})
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    set_fake_quantize(fresh, FakeQuantState.VALIDATION)
    assert torch.equal(fresh(x), prepared(x))
    # loaded scales count as seeded: a QAT forward keeps them
    fresh.train()
    set_fake_quantize(fresh, FakeQuantState.QAT)
    with torch.no_grad():
        fresh(x * 10)
    after = fresh.state_dict()
    for key in state:
        if key.endswith(".scale"):
            assert torch.equal(after[key], state[key]), key
    assert torch.equal(convert_fx(fresh)(x), convert_fx(prepared)(x))


def test_calibrated_scales_hand_over_to_learnable_scales():
    from hq_lightning.qconfig import default_calib_8bit_fake_quant_qconfig
    from hq_lightning.quantization import (
        DeQuantStub,
        FakeQuantState,
        QConfig,
        QuantStub,
        copy_calibration_state,
        prepare_qat_fx,
        set_fake_quantize,
    )
    from hq_lightning.quantization.observer import (
        MovingAveragePerChannelMinMaxObserver,
        MovingAveragePerTensorMinMaxObserver,
    )

    torch.manual_seed(0)
    float_model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), DeQuantStub())
    calib = prepare_qat_fx(float_model, {"": default_calib_8bit_fake_quant_qconfig})
    calib.eval()
    set_fake_quantize(calib, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        calib(torch.randn(8, 3, 8, 8))
    learnable = QConfig(
        activation=LearnableFakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver),
        weight=LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0),
    )
    qat = prepare_qat_fx(float_model, {"": learnable})
    parameters_before = {id(p) for p in qat.parameters()}
    names = copy_calibration_state(calib, qat)
    assert names and {id(p) for p in qat.parameters()} == parameters_before
    for name in names:
        assert torch.equal(qat.get_submodule(name).scale, calib.get_submodule(name).scale), name
    # the first QAT batch keeps the calibrated scales instead of re-seeding from its observer
    calibrated = {name: qat.get_submodule(name).scale.clone() for name in names}
    qat.train()
    set_fake_quantize(qat, FakeQuantState.QAT)
    qat(torch.randn(8, 3, 8, 8) * 10)
    for name in names:
        assert torch.equal(qat.get_submodule(name).scale, calibrated[name]), name
