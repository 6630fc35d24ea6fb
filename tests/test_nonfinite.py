"""Non-finite values: one rule on every path and size, nothing silent, nothing lost (issue 12, 3 and 5).

The rule (docs/integer-arithmetic.md, "Non-finite input"):

* fake quant: NaN stays NaN with gradient 0; +-inf saturate to ``qmax * s`` / ``qmin * s`` with
  gradient 0 - per tensor and per channel, every size, leaf / product / other inputs, eager and
  compiled (torch's aten kernels, which the library no longer calls, give ``qmin * s`` on CPU);
* the integer model's ``quantize``: NaN -> code 0, +-inf -> qmax / qmin; the ``Quantize`` stub
  counts such batches;
* observers skip a non-finite batch; a learnable scale left non-finite by a step is restored;
  every case is counted on the device and raised by ``check_nonfinite``, which ``convert_fx`` and
  ``set_fake_quantize`` call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hq_lightning.functional.integer import quantize
from hq_lightning.march import March, march_context
from hq_lightning.nn.quantized.quantize import Quantize
from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantize,
    FakeQuantState,
    LearnableFakeQuantize,
    QConfig,
    QuantStub,
    check_nonfinite,
    convert_fx,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fake_quantize import _TracedFakeQuantize, fake_quantize
from hq_lightning.quantization.observer import MovingAveragePerChannelMinMaxObserver

QRANGE = {"qint8": (-128, 127), "qint16": (-32768, 32767)}
NAN, INF = float("nan"), float("inf")


def _with_specials(shape, scale_view, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale_view * 50
    flat = x.view(-1)
    flat[[0, 3, 7]] = torch.tensor([NAN, INF, -INF])
    flat[-1] = NAN  # also in the vectorised loops' tail
    return x


def _expected(x, scale_view, dtype):
    qmin, qmax = QRANGE[dtype]
    codes = torch.round(x * torch.reciprocal(scale_view))
    inside = (codes >= qmin) & (codes <= qmax)  # NaN compares False: outside
    out = torch.clamp(codes, qmin, qmax) * scale_view  # clamp keeps NaN, saturates +-inf
    return out, inside


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("numel", [40, 8192, 70000])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", ["leaf", "product", "activation", "traced"])
def test_fake_quantize_rule_on_every_path_and_size(dtype, numel, per_channel, kind):
    scale = torch.tensor([0.02, 0.5, 1e-3, 2.0**-6]) if per_channel else torch.tensor([0.05])
    shape = (4, numel // 4) if per_channel else (numel,)
    view = scale.view(-1, 1) if per_channel else scale
    base = _with_specials(shape, view, seed=numel)
    leaf = base.clone().requires_grad_(True)
    if kind == "traced":  # the formula torch.compile traces, run eagerly
        qmin, qmax = QRANGE[dtype]
        y = _TracedFakeQuantize.apply(leaf * 1.0, view, torch.reciprocal(view), qmin, qmax)
    else:
        x = {"leaf": leaf, "product": leaf * torch.tensor(1.0), "activation": leaf * 1.0 + 0.0}[kind]
        y = fake_quantize(x, scale, dtype, 0 if per_channel else None)
    y.backward(torch.full(shape, 2.0))
    expected, inside = _expected(base, view, dtype)
    assert torch.allclose(y.detach(), expected, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(y.detach().view(-1)[[0, -1]]).all()
    qmin, qmax = QRANGE[dtype]
    assert y.detach().view(-1)[3] == qmax * view.view(-1)[0] and y.detach().view(-1)[7] == qmin * view.view(-1)[0]
    assert torch.equal(leaf.grad, 2.0 * inside.float())
    assert leaf.grad.view(-1)[[0, 3, 7, -1]].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_compiled_fake_quantize_follows_the_rule():
    torch._dynamo.reset()
    x = _with_specials((3000,), torch.tensor(0.05), seed=1)
    compiled = torch.compile(lambda t: fake_quantize(t, torch.tensor([0.05]), "qint8"), fullgraph=True, backend="aot_eager")
    expected, _ = _expected(x, torch.tensor(0.05), "qint8")
    assert torch.allclose(compiled(x), expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("numel", [5, 8192, 70000])
@pytest.mark.parametrize("ch_axis", [None, 1])
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_integer_quantize_maps_nan_to_zero_and_saturates_inf(numel, ch_axis, dtype):
    qmin, qmax = QRANGE[dtype]
    scale = torch.tensor([0.1, 0.02]) if ch_axis == 1 else torch.tensor([0.1])
    x = torch.randn(2 if ch_axis == 1 else 1, 2, numel).transpose(0, 1).contiguous() if ch_axis == 1 else torch.randn(1, numel)
    x.view(-1)[[0, 1, 2]] = torch.tensor([NAN, INF, -INF])
    x.view(-1)[-1] = NAN
    q = quantize(x, scale, dtype, ch_axis)
    assert q.view(-1)[[0, 1, 2, -1]].tolist() == [0, qmax, qmin, 0]
    finite = torch.isfinite(x)
    inv = torch.reciprocal(scale).view(1, -1, 1) if ch_axis == 1 else torch.reciprocal(scale)
    reference = torch.clamp(torch.round(x * inv), qmin, qmax)
    assert torch.equal(q[finite].long(), reference[finite].long())


def test_quantize_stub_counts_nonfinite_batches_and_fake_quant_agrees_on_finite_values():
    quant = Quantize(0.25, "qint8")
    assert quant(torch.tensor([1.0, NAN, 3.0])).tolist() == [4, 0, 12]
    quant(torch.tensor([1.0, 2.0]))
    quant(torch.tensor([-INF]))
    with pytest.raises(ValueError, match=r"Quantize .* 2 batch\(es\) contained NaN \(1\) or \+-inf\. NaN became code 0"):
        check_nonfinite(quant)
    assert check_nonfinite(quant) == {}


def _qat_model():
    with march_context(March.BAYES):
        model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), DeQuantStub())
        return prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig}).train()


def test_a_nan_batch_in_qat_is_skipped_and_raised_at_set_fake_quantize_and_convert_fx():
    torch.manual_seed(0)
    model = _qat_model()
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    scales = {name: m.scale.clone() for name, m in model.named_modules() if isinstance(m, FakeQuantize)}
    bad = x.clone()
    bad[1, 2, 3, 4] = NAN
    out = model(bad)  # no host read: the step runs on
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()  # NaN stays NaN, visibly
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize) and name in scales and name.split(".")[0] == "0":
            assert torch.equal(m.scale, scales[name])  # the input stub's range kept its last value
    model.eval()
    with pytest.raises(ValueError, match=r"Expected the input of MovingAveragePerTensorMinMaxObserver \(`.*`\) to be finite"):
        set_fake_quantize(model, FakeQuantState.VALIDATION)
    model.train()
    model(bad)
    model.eval()  # the report above reset the counts: this NaN batch is a new one
    with pytest.raises(ValueError, match="check_nonfinite\\(model, action='warn'\\) first"):
        convert_fx(model)
    assert torch.isfinite(convert_fx(model)(x)).all()  # each batch is reported once
    model.train()
    model(bad)
    model.eval()
    with pytest.warns(UserWarning, match="to be finite"):
        check_nonfinite(model, action="warn")  # acknowledged as a warning: convert goes on
    assert torch.isfinite(convert_fx(model)(x)).all()


def _lsq_model():
    lsq = LearnableFakeQuantize.with_args(averaging_constant=1.0)
    weight = LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1.0)
    with march_context(March.BAYES):
        model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.ReLU(), DeQuantStub())
        return prepare_qat_fx(model, {"": QConfig(activation=lsq, weight=weight)}).train()


def test_a_nan_step_does_not_poison_learnable_scales_and_is_reported():
    torch.manual_seed(0)
    model = _lsq_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()  # seeds every scale from its observer
    optimizer.step()
    learned = {name: m for name, m in model.named_modules() if isinstance(m, LearnableFakeQuantize)}
    good = {name: m.scale.clone() for name, m in learned.items()}
    for m in learned.values():  # a NaN gradient (an overflow, a bad loss) hits every scale
        m._parameters["scale"].grad = torch.full_like(m._parameters["scale"], NAN)
    optimizer.step()
    assert all(torch.isnan(m._parameters["scale"].detach()).all() for m in learned.values())
    out = model(x)  # the projection restores the last good scale before the forward
    assert torch.isfinite(out).all()
    assert all(torch.equal(m.scale, good[name]) for name, m in learned.items())
    optimizer.zero_grad()
    out.sum().backward()  # and learning goes on from there
    optimizer.step()
    assert all(torch.isfinite(m._parameters["scale"]).all() for m in learned.values())
    assert not all(torch.equal(m.scale, good[name]) for name, m in learned.items())
    with pytest.raises(ValueError, match=r"Expected the learned scale of LearnableFakeQuantize \(`.*`\) to stay finite, but 1 step\(s\) left it NaN\..*restored to its last finite value"):
        check_nonfinite(model)
    assert check_nonfinite(model) == {}


def test_infinite_learnable_scale_is_restored_too():
    with march_context(March.BAYES):
        fq = LearnableFakeQuantize(averaging_constant=1.0)
    fq(torch.tensor([-1.0, 2.0]))
    before = fq.scale.clone()
    fq._parameters["scale"].data.fill_(INF)
    assert torch.equal(fq.scale, before)
    assert check_nonfinite(fq, action="ignore") == {"": (1, 0)}
    fq._parameters["scale"].data.fill_(-3.0)  # negative: projected to eps as before, not counted
    assert fq.scale.item() == torch.finfo(torch.float32).eps
    assert check_nonfinite(fq) == {}


@pytest.mark.gpu
def test_cuda_follows_the_same_rule_and_a_qat_step_never_synchronises():
    x = _with_specials((4, 5000), torch.tensor(0.05), seed=2)
    scale = torch.tensor([0.05])
    leaf_cpu = x.clone().requires_grad_(True)
    leaf_cuda = x.cuda().requires_grad_(True)
    y_cpu = fake_quantize(leaf_cpu * 1.0, scale, "qint8")
    y_cuda = fake_quantize(leaf_cuda * 1.0, scale.cuda(), "qint8")
    y_cpu.sum().backward()
    y_cuda.sum().backward()
    assert torch.allclose(y_cuda.detach().cpu(), y_cpu.detach(), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(leaf_cuda.grad.cpu(), leaf_cpu.grad)
    assert torch.equal(quantize(x.cuda(), scale.cuda(), "qint8").cpu(), quantize(x, scale, "qint8"))
    model = _qat_model().cuda()
    batch = torch.randn(4, 3, 8, 8, device="cuda")
    model(batch).sum().backward()  # first step: initialises the observers' buffers
    torch.cuda.synchronize()
    bad = batch.clone()
    bad[0, 0, 0, 0] = NAN
    torch.cuda.set_sync_debug_mode("error")
    try:
        for inputs in (batch, bad, batch):
            model(inputs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="to be finite, but 1 batch"):
        check_nonfinite(model)
