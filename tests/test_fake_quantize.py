"""fake_quantize and FakeQuantize against the formulas of semantics.md (bit for bit)."""

import pickle

import numpy as np
import pytest
import torch

from hq_lightning.march import March, march_context
from hq_lightning.quantization import (
    CalibFakeQuantize,
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    MovingAveragePerTensorMinMaxObserver,
    PercentileObserver,
)
from hq_lightning.quantization.factory import Factory
from hq_lightning.quantization.fake_quantize import (
    _fake_quantize_plain,
    fake_quantize,
)


def _fake_quantize_aten(x, scale, qmin, qmax, axis):
    """torch's fused kernels: the same formula for finite input (their NaN handling differs by
    device, which is why the library does not use them; see test_nonfinite.py)."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, torch.zeros(1, dtype=torch.int32), qmin, qmax)
    shape = [1] * x.dim()
    shape[axis] = scale.numel()
    x = torch.clamp(x, -(scale * 2.0**40).view(shape), (scale * 2.0**40).view(shape))  # int64 wrap
    zero_point = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)

QRANGE = {"qint8": (-128, 127), "qint16": (-32768, 32767)}


def ref_fake_quant(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """The contract: clamp(round_half_even(x * (1 / scale)), qmin, qmax) * scale, all float32."""
    qmin, qmax = QRANGE[dtype]
    inv = (np.float32(1.0) / scale.astype(np.float32)).astype(np.float32)
    q = np.rint((x.astype(np.float32) * inv).astype(np.float32))  # rint: half to even
    return (np.clip(q, qmin, qmax).astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def ref_divide(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """semantics.md's x / scale form."""
    qmin, qmax = QRANGE[dtype]
    q = np.rint((x.astype(np.float32) / scale.astype(np.float32)).astype(np.float32))
    return (np.clip(q, qmin, qmax).astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def inputs(scale: float, dtype: str, n: int = 2000, seed: int = 0) -> torch.Tensor:
    qmin, qmax = QRANGE[dtype]
    g = torch.Generator().manual_seed(seed)
    amax = scale * (qmax - qmin) / 2
    random = (torch.rand(n, generator=g) * 2 - 1) * amax * 1.2
    ties = (torch.arange(-6, 6, dtype=torch.float32) + 0.5) * scale  # half-integer codes
    edges = torch.tensor([0.0, -0.0, amax, -amax, qmax * scale, qmin * scale, 1e30, -1e30, scale / 2])
    return torch.cat([random, ties, edges]).float()


SCALES = [0.1, 1 / 127.5, 2.0**-7, 3.7e-5, 0.013]


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("scale", SCALES)
def test_per_tensor_bit_exact(dtype, scale):
    x = inputs(scale, dtype)
    s = torch.tensor([scale], dtype=torch.float32)
    expected = ref_fake_quant(x.numpy(), s.numpy(), dtype)
    assert np.array_equal(fake_quantize(x, s, dtype).numpy(), expected)
    # both implementations (aten kernels: accelerators; plain ops: CPU) are the formula
    qmin, qmax = QRANGE[dtype]
    assert np.array_equal(_fake_quantize_aten(x, s, qmin, qmax, None).numpy(), expected)
    assert np.array_equal(_fake_quantize_plain(x, s, qmin, qmax, None).numpy(), expected)


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_per_channel_bit_exact(dtype):
    scales = torch.tensor([1e-4, 0.1, 2.0**-5, 7.0], dtype=torch.float32)
    x = torch.stack([inputs(float(s), dtype, n=300, seed=i) for i, s in enumerate(scales)], dim=1)
    for ch_axis, xt in ((1, x), (0, x.t().contiguous()), (-1, x)):
        got = fake_quantize(xt, scales, dtype, ch_axis=ch_axis)
        shape = [1, 1]
        shape[ch_axis] = 4
        expected = ref_fake_quant(xt.numpy(), scales.numpy().reshape(shape), dtype)
        assert np.array_equal(got.numpy(), expected)
        qmin, qmax = QRANGE[dtype]
        axis = ch_axis % 2
        assert np.array_equal(_fake_quantize_aten(xt, scales, qmin, qmax, axis).numpy(), expected)
        assert np.array_equal(_fake_quantize_plain(xt, scales, qmin, qmax, axis).numpy(), expected)


def test_multiply_equals_divide_away_from_ties_and_for_powers_of_two():
    for scale in SCALES:
        x = inputs(scale, "qint8", n=5000, seed=7).numpy()
        s = np.array([scale], dtype=np.float32)
        a, b = ref_fake_quant(x, s, "qint8"), ref_divide(x, s, "qint8")
        codes = x.astype(np.float64) / np.float64(np.float32(scale))
        away = np.abs(codes - np.floor(codes) - 0.5) > 1e-4
        assert np.array_equal(a[away], b[away])
        if np.log2(np.float32(scale)).is_integer():
            assert np.array_equal(a, b)


def test_half_precision_follows_the_float32_formula():
    scale = torch.tensor([0.05])
    x = inputs(0.05, "qint8", n=200).clamp(-100, 100)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xd = x.to(dt)
        got = fake_quantize(xd, scale, "qint8")
        assert got.dtype == dt
        expected = ref_fake_quant(xd.float().numpy(), scale.numpy(), "qint8")
        assert torch.equal(got, torch.from_numpy(expected).to(dt))


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_gradient_is_saturating_ste_per_tensor(dt):
    scale = 0.1
    x = inputs(scale, "qint8", n=500).to(dt).clamp(-30, 30).requires_grad_(True)
    fake_quantize(x, torch.tensor([scale]), "qint8").backward(torch.full_like(x, 3.0))
    inv = np.float32(1.0) / np.float32(scale)
    q = np.rint((x.detach().float().numpy() * inv).astype(np.float32))
    inside = (q >= -128) & (q <= 127)
    assert torch.equal(x.grad, torch.from_numpy(np.where(inside, 3.0, 0.0)).to(dt))
    assert inside.any() and (~inside).any()


@pytest.mark.parametrize("impl", [fake_quantize, "aten", "plain"])
def test_gradient_is_saturating_ste_per_channel(impl):
    scales = torch.tensor([0.01, 1.0, 0.2])
    x = torch.cat([torch.randn(3, 50) * 100, torch.full((3, 1), 1e30)], dim=1).requires_grad_(True)
    if impl == "aten":
        y = _fake_quantize_aten(x, scales, -128, 127, 0)
    elif impl == "plain":
        y = _fake_quantize_plain(x, scales, -128, 127, 0)
    else:
        y = impl(x, scales, "qint8", ch_axis=0)
    y.sum().backward()
    q = torch.round(x.detach() * (1 / scales).view(3, 1))
    expected = ((q >= -128) & (q <= 127)).float()
    assert torch.equal(x.grad, expected)
    assert (expected == 0).any() and (expected == 1).any()


def test_aten_per_tensor_gradient_is_saturating_ste():
    x = (torch.randn(200) * 30).requires_grad_(True)
    _fake_quantize_aten(x, torch.tensor([0.1]), -128, 127, None).sum().backward()
    q = torch.round(x.detach() * np.float32(1 / np.float32(0.1)))
    assert torch.equal(x.grad, ((q >= -128) & (q <= 127)).float())


def test_amax_at_code_boundary_saturates_to_qmax():
    fq = FakeQuantize(averaging_constant=1.0)
    x = torch.tensor([-2.0, 1.0, 2.0])
    y = fq(x)
    scale = fq.scale.item()
    assert scale == np.float32(2.0) / np.float32(127.5)
    # +amax is code 127.5 (to within float32) and saturates to 127
    assert y[2].item() == np.float32(127 * np.float32(scale))
    # -amax: x * fl(1/scale) lands just inside -127.5 here, so it rounds to -127 (x / scale
    # would give the tie -127.5 -> -128): the one-ulp difference the contract documents
    assert np.float32(-2.0) * (np.float32(1) / np.float32(scale)) > np.float32(-127.5)
    assert y[0].item() == np.float32(-127 * np.float32(scale))
    assert np.array_equal(y.numpy(), ref_fake_quant(x.numpy(), fq.scale.numpy(), "qint8"))


def test_fake_quantize_argument_errors():
    with pytest.raises(ValueError, match="one-element `scale`"):
        fake_quantize(torch.randn(3), torch.ones(2), "qint8")
    with pytest.raises(ValueError, match=r"`scale` of shape \[3\]"):
        fake_quantize(torch.randn(3, 2), torch.ones(2), "qint8", ch_axis=0)
    with pytest.raises(ValueError, match="Expected `ch_axis`"):
        fake_quantize(torch.randn(3, 2), torch.ones(3), "qint8", ch_axis=2)
    with pytest.raises(ValueError, match="Expected `dtype`"):
        fake_quantize(torch.randn(3), torch.ones(1), "int8")


# ---------------------------------------------------------------- FakeQuantize module
def test_module_contract_attributes():
    fq = FakeQuantize()
    assert fq.dtype == "qint8" and fq.ch_axis is None and fq.march is March.BAYES
    assert isinstance(fq.activation_post_process, MovingAveragePerTensorMinMaxObserver)
    assert fq.activation_post_process.averaging_constant == 0.01
    assert fq.fake_quant_enabled and fq.observer_enabled
    assert fq.scale.shape == (1,) and fq.zero_point.dtype == torch.int32
    assert set(dict(fq.named_buffers())) >= {"scale", "zero_point"}
    w = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1)
    assert w.ch_axis == 0 and w.scale.shape == (0,)
    # a ch_axis given with a per-tensor observer is ignored, as in the plugin's docs
    assert FakeQuantize(observer=MovingAveragePerTensorMinMaxObserver, ch_axis=0).ch_axis is None


def test_forward_matches_observer_and_formula():
    fq = FakeQuantize(averaging_constant=0.5)
    a, b = torch.randn(64) * 2, torch.randn(64) * 5
    fq(a)
    y = fq(b)
    lo = a.min() + 0.5 * (b.min() - a.min())
    hi = a.max() + 0.5 * (b.max() - a.max())
    scale = torch.maximum(-lo, hi) / 127.5
    assert fq.scale.item() == scale.item()
    assert np.array_equal(y.numpy(), ref_fake_quant(b.numpy(), fq.scale.numpy(), "qint8"))


def test_observer_updates_only_when_enabled_and_training():
    fq = FakeQuantize(averaging_constant=1.0)
    fq(torch.tensor([1.0]))
    s = fq.scale.clone()
    fq.eval()
    fq(torch.tensor([10.0]))
    assert torch.equal(fq.scale, s)
    fq.train()
    fq.disable_observer()
    fq(torch.tensor([10.0]))
    assert torch.equal(fq.scale, s)
    fq.enable_observer()
    fq.disable_fake_quant()
    x = torch.tensor([10.0, 0.123])
    assert torch.equal(fq(x), x)
    assert fq.scale.item() == np.float32(10.0) / np.float32(127.5)


def test_march_captured_at_construction_and_bernoulli_power_of_two():
    with march_context("bernoulli"):
        fq = FakeQuantize(averaging_constant=1.0)
        w = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0)
    assert fq.march is March.BERNOULLI  # stays after the global march changed back
    fq(torch.tensor([-3.0, 1.0]))
    assert fq.scale.item() == 2.0**-5  # 3 / 127.5 = 0.0235 -> floor(5.41) = 5
    w(torch.tensor([[1e-3], [1.0], [1e4]]))
    assert w.scale.tolist() == [2.0**-14, 2.0**-6, 2.0**-1]


@pytest.mark.parametrize("march", ["bernoulli", "bernoulli2"])
def test_int16_rejected_on_bernoulli_family(march):
    with march_context(march), pytest.raises(ValueError, match="Expected march to support qint16"):
        FakeQuantize(dtype="qint16")


def test_int16_on_bayes_and_qint32_rejected():
    fq = FakeQuantize(dtype="qint16", averaging_constant=1.0)
    y = fq(torch.tensor([-1.0, 0.5, 1.0]))
    assert fq.scale.item() == np.float32(1.0) / np.float32(32767.5)
    assert np.array_equal(y.numpy(), ref_fake_quant(np.array([-1, 0.5, 1.0]), fq.scale.numpy(), "qint16"))
    with pytest.raises(ValueError, match="'qint8' or 'qint16'"):
        FakeQuantize(dtype="qint32")


def test_unfed_per_channel_fake_quant_is_a_clear_error():
    w = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver)
    w.eval()
    with pytest.raises(RuntimeError, match="has observed no data yet"):
        w(torch.randn(2, 2))


def test_state_dict_round_trip_never_fed_per_channel_strict():
    never_fed = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0)
    fresh = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0)
    fresh.load_state_dict(never_fed.state_dict(), strict=True)
    assert fresh.scale.shape == (0,) and fresh.activation_post_process.min_val.shape == (0,)


def test_state_dict_round_trip_fed_per_channel_strict():
    fed = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1)
    fed(torch.randn(6, 3))
    fresh = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1)
    fresh.load_state_dict(fed.state_dict(), strict=True)
    assert torch.equal(fresh.scale, fed.scale) and fresh.scale.shape == (6,)
    fresh.eval()
    x = torch.randn(6, 3)
    assert torch.equal(fresh(x), fed.eval()(x))
    model = torch.nn.Sequential(FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver))
    model.load_state_dict(torch.nn.Sequential(fed).state_dict(), strict=True)
    assert model[0].scale.shape == (6,)


# ---------------------------------------------------------------- with_args factories
def test_with_args_factory_equality_repr_pickle():
    make = lambda: FakeQuantize.with_args(  # noqa: E731
        observer=MovingAveragePerTensorMinMaxObserver, dtype="qint8", averaging_constant=0
    )
    f, g = make(), make()
    assert isinstance(f, Factory) and f == g and hash(f) == hash(g)
    assert f != FakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver, dtype="qint16")
    assert f != CalibFakeQuantize.with_args(
        observer=MovingAveragePerTensorMinMaxObserver, dtype="qint8", averaging_constant=0
    )
    assert repr(f) == (
        "FakeQuantize.with_args(observer=MovingAveragePerTensorMinMaxObserver, dtype='qint8', "
        "averaging_constant=0)"
    )
    assert pickle.loads(pickle.dumps(f)) == f
    built = f()
    assert isinstance(built, FakeQuantize) and built.activation_post_process.averaging_constant == 0
    assert f(dtype="qint16").dtype == "qint16"  # call-time override
    assert f.with_args(dtype="qint16")().dtype == "qint16"
    assert f.func is FakeQuantize and f.keywords["averaging_constant"] == 0
    calib = CalibFakeQuantize.with_args(observer=PercentileObserver, percentile=99.9)()
    assert isinstance(calib, CalibFakeQuantize) and calib.activation_post_process.percentile == 99.9
    obs_factory = PercentileObserver.with_args(bins=64)
    assert obs_factory == PercentileObserver.with_args(bins=64) and obs_factory().bins == 64


def test_fake_quantize_accepts_an_observer_factory():
    fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver.with_args(averaging_constant=1.0), ch_axis=1)
    assert fq.ch_axis == 1 and fq.activation_post_process.ch_axis == 1
    fq(torch.randn(2, 5))
    assert fq.scale.shape == (5,)


def test_user_guide_custom_qconfig_snippets():
    from hq_lightning.quantization import (
        FakeQuantize,
        MovingAveragePerChannelMinMaxObserver,
        MovingAveragePerTensorMinMaxObserver,
        QConfig,
    )

    activation_8bit_fake_quant = FakeQuantize.with_args(
        observer=MovingAveragePerTensorMinMaxObserver,
        dtype="qint8",
        ch_axis=0,
        averaging_constant=0,  # 自定义 observer 的参数
    )
    weight_8bit_fake_quant = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        dtype="qint8",
        ch_axis=0,
        averaging_constant=1,  # 自定义 observer 的参数
    )
    qat_8bit_qconfig = QConfig(activation=activation_8bit_fake_quant, weight=weight_8bit_fake_quant)

    assert qat_8bit_qconfig.kind == "qat"
    act, weight = qat_8bit_qconfig.activation(), qat_8bit_qconfig.weight()
    assert act.ch_axis is None and act.activation_post_process.averaging_constant == 0
    assert weight.ch_axis == 0 and weight.activation_post_process.averaging_constant == 1
    act(torch.tensor([1.0]))
    act(torch.tensor([5.0]))
    assert act.scale.item() == np.float32(1.0) / np.float32(127.5)  # c = 0 keeps the first batch


def test_histogram_scale_is_computed_lazily_when_read():
    fq = CalibFakeQuantize(observer=PercentileObserver, bins=64, percentile=100.0)
    fq.disable_fake_quant()
    fq(torch.tensor([1.0, -3.0]))
    assert fq.__dict__["_scale_stale"]  # no search after each calibration batch
    assert fq.scale.item() == np.float32(3.0) / np.float32(127.5)  # reading refreshes it
    assert not fq.__dict__["_scale_stale"]
    fq(torch.tensor([6.0]))
    state = fq.state_dict()  # state_dict refreshes too
    assert state["scale"].item() == np.float32(6.0) / np.float32(127.5)
    fq(torch.tensor([12.0]))
    fresh = CalibFakeQuantize(observer=PercentileObserver, bins=64, percentile=100.0)
    fresh.load_state_dict(fq.state_dict(), strict=True)
    assert fresh.scale.item() == np.float32(12.0) / np.float32(127.5)
    fq.enable_fake_quant()
    y = fq(torch.tensor([24.0, 1.0]))  # fake quant uses the scale after this batch
    assert y[0].item() == np.float32(127 * fq.scale.item())


# ---------------------------------------------------------------- the CPU autograd function's paths
def _expected_mask(x: torch.Tensor, scale: torch.Tensor, dtype: str, shape) -> torch.Tensor:
    qmin, qmax = QRANGE[dtype]
    inv = (np.float32(1.0) / scale.numpy().astype(np.float32)).reshape(shape)
    q = np.rint((x.detach().float().numpy() * inv).astype(np.float32))
    return torch.from_numpy((q >= qmin) & (q <= qmax))


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("ch_axis", [None, 0, 1])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_leaf_recomputed_mask_equals_saved_mask(dtype, ch_axis, dt):
    """A leaf (weight) recomputes the STE mask in backward, any other input saves a bool mask:
    both are the saturating STE of the formula, and the outputs are the formula bit for bit."""
    qmin, qmax = QRANGE[dtype]
    scales = torch.tensor([2.0**-6, 0.013, 3.7e-5]) if ch_axis is not None else torch.tensor([0.013])
    shape = [1, 1]
    if ch_axis is not None:
        shape[ch_axis] = 3
    base = torch.stack([inputs(float(s), dtype, n=97, seed=i) for i, s in enumerate(scales)], dim=1)
    if ch_axis is None:
        base = inputs(0.013, dtype, n=97 * 3).view(-1, 3)
    base = (base if ch_axis != 0 else base.t().contiguous()).to(dt)
    grad = torch.randn(base.shape, dtype=dt)
    leaf = base.clone().requires_grad_(True)
    source = base.clone().requires_grad_(True)
    non_leaf = source * 1.0
    qmin, qmax = QRANGE[dtype]
    check_scale = scales if ch_axis is not None else scales.reshape(1)
    axis = None if ch_axis is None else ch_axis % 2
    y_leaf = _fake_quantize_plain(leaf, check_scale, qmin, qmax, axis)
    y_non_leaf = _fake_quantize_plain(non_leaf, check_scale, qmin, qmax, axis)
    expected = torch.from_numpy(ref_fake_quant(base.float().numpy(), scales.numpy().reshape(shape), dtype)).to(dt)
    assert torch.equal(y_leaf, expected) and torch.equal(y_non_leaf, expected)
    y_leaf.backward(grad)
    y_non_leaf.backward(grad)
    mask = _expected_mask(base, scales, dtype, shape)
    assert mask.any() and (~mask).any()
    assert torch.equal(leaf.grad, grad * mask.to(dt))
    assert torch.equal(source.grad, grad * mask.to(dt))
    assert leaf.grad.dtype == dt


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_ste_mask_at_half_codes_inf_and_nan(dtype):
    """Codes qmin - 0.5 round (half to even) to qmin: inside; qmax + 0.5 rounds to qmax + 1: outside.
    Huge codes (beyond 2**23), infinities and NaN are outside."""
    qmin, qmax = QRANGE[dtype]
    scale = 2.0**-4  # power of two: x * (1 / scale) is exact
    codes = torch.tensor([qmin - 0.5, qmin - 1.5, qmax + 0.5, qmax - 0.5, qmin, qmax, 2.0**24 + 2, -(2.0**30)])
    x = torch.cat([codes * scale, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    for make in (lambda t: t.clone().requires_grad_(True), lambda t: t.clone().requires_grad_(True) * 1.0):
        xin = make(x)
        y = _fake_quantize_plain(xin, torch.tensor([scale]), qmin, qmax, None)
        y.backward(torch.ones_like(y))
        leaf = xin if xin.is_leaf else xin.grad_fn.next_functions[0][0].variable
        assert leaf.grad.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert y[:6].tolist() == [qmin * scale, qmin * scale, qmax * scale, (qmax - 1) * scale, qmin * scale, qmax * scale]


def test_input_without_grad_and_modified_leaf():
    x = torch.randn(50) * 3
    y = fake_quantize(x, torch.tensor([0.05]), "qint8")
    assert not y.requires_grad
    assert np.array_equal(y.numpy(), ref_fake_quant(x.numpy(), np.array([0.05], np.float32), "qint8"))
    # the leaf is kept by reference for the backward: an in-place change before it is refused
    w = torch.randn(4, 3, requires_grad=True)
    y = fake_quantize(w, torch.full((4,), 0.01), "qint8", ch_axis=0)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bernoulli_weight_fake_quant_module_gradient():
    """FakeQuantize on a parameter (the weight path) with power-of-two scales on BERNOULLI."""
    with march_context("bernoulli"):
        fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1)
    w = torch.nn.Parameter(torch.randn(5, 3, 2) * torch.tensor([1e-3, 0.1, 1.0, 4.0, 100.0]).view(5, 1, 1))
    y = fq(w)
    assert all(np.log2(s).is_integer() for s in fq.scale.tolist())
    shape = (5, 1, 1)
    expected = ref_fake_quant(w.detach().numpy(), fq.scale.numpy().reshape(shape), "qint8")
    assert np.array_equal(y.detach().numpy(), expected)
    y.backward(torch.full_like(y, 2.0))
    mask = _expected_mask(w, fq.scale, "qint8", shape)
    assert (~mask).any()  # the shift clamp (scale 2**-1 at |w| ~ 200) saturates
    assert torch.equal(w.grad, 2.0 * mask.float())


@pytest.mark.parametrize("numel", [8192, 8193])
def test_per_tensor_dispatch_either_side_of_the_small_size(numel):
    """Either side of the size where an earlier version switched between implementations."""
    scale = torch.tensor([0.02])
    base = inputs(0.02, "qint8", n=numel - 21, seed=3)
    x = (base.clone().requires_grad_(True) * 1.0)
    x.retain_grad()
    y = fake_quantize(x, scale, "qint8")
    assert np.array_equal(y.detach().numpy(), ref_fake_quant(base.numpy(), scale.numpy(), "qint8"))
    y.backward(torch.full_like(y, 0.5))
    mask = _expected_mask(base, scale, "qint8", (1,))
    assert torch.equal(x.grad, 0.5 * mask.float()) and (~mask).any()


def test_double_backward_through_the_ste():
    """create_graph=True: the STE gradient is itself differentiable in the incoming gradient."""
    for make in (lambda t: t.requires_grad_(True), lambda t: t.requires_grad_(True) * 1.0):
        w = make(torch.randn(300) * 2)
        y = _fake_quantize_plain(w, torch.tensor([0.01]), -128, 127, None)
        (grad,) = torch.autograd.grad((y * y).sum(), w, create_graph=True)
        assert grad.requires_grad
        mask = _expected_mask(w, torch.tensor([0.01]), "qint8", (1,)).float()
        assert torch.equal(grad.detach(), 2 * y.detach() * mask)


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_product_of_leaf_and_constant_recomputes_its_mask(dtype, ch_axis):
    """``weight * factor`` (with_bn's folded weight) keeps the leaf and the factor, no mask; its
    outputs and gradients equal the saved-mask path's bit for bit."""
    qmin, qmax = QRANGE[dtype]
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 40, generator=g) * 3
    factor = torch.rand(6, 1, generator=g) * 2 + 0.1
    scales = (base * factor).abs().amax(dim=1) / (qmax + 0.5) * 0.7  # some codes saturate
    if ch_axis is None:
        scales = scales.max().reshape(1)
    axis = None if ch_axis is None else 0
    grad = torch.randn(6, 40, generator=g)
    outputs, grads = [], []
    for recompute in (True, False):
        w = base.clone().requires_grad_(True)
        x = w * factor if recompute else (w * factor).clone()
        y = _fake_quantize_plain(x, scales, qmin, qmax, axis)
        saved = y.grad_fn.saved_tensors
        if recompute:
            assert len(saved) == 3 and saved[0] is w and saved[1] is factor
        else:
            assert len(saved) == 1 and saved[0].element_size() == 1  # a 1-byte mask
        y.backward(grad)
        outputs.append(y.detach())
        grads.append(w.grad)
    shape = (6, 1) if ch_axis is not None else (1,)
    product = (base * factor)
    assert np.array_equal(outputs[0].numpy(), ref_fake_quant(product.numpy(), scales.numpy().reshape(shape), dtype))
    assert torch.equal(outputs[0], outputs[1])
    mask = _expected_mask(product, scales, dtype, shape)
    assert (~mask).any() and mask.any()
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0], grad * mask.float() * factor)


def test_product_with_a_trainable_factor_keeps_a_mask():
    w = torch.randn(4, 3, requires_grad=True)
    factor = torch.rand(4, 1, requires_grad=True)
    y = _fake_quantize_plain(w * factor, torch.full((4,), 0.01), -128, 127, 0)
    assert len(y.grad_fn.saved_tensors) == 1  # the factor needs its gradient: not a constant
    y.sum().backward()
    assert factor.grad is not None


@pytest.mark.parametrize("producer", [torch.relu, torch.relu_, torch.sigmoid, torch.tanh])
def test_output_its_producer_keeps_recomputes_its_mask(producer):
    """On the CPU an input that its autograd node saved for backward (a ReLU's output) is kept by
    reference, no mask; outputs and gradients equal the saved-mask path's bit for bit."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 300, generator=g) * 2
    grad = torch.randn(4, 300, generator=g)
    scale = torch.tensor([0.005])  # relu: codes past 127 saturate; sigmoid / tanh: in range
    results = []
    for keep in (True, False):
        leaf = base.clone().requires_grad_(True)
        x = producer(leaf * 1.0)
        if not keep:
            x = x * 1.0  # a plain product: its node keeps the factors, not its output
        y = fake_quantize(x, scale, "qint8")
        saved = y.grad_fn.saved_tensors
        if keep:
            assert len(saved) == 2 and saved[0].data_ptr() == x.data_ptr()
        else:
            assert len(saved) == 1 and saved[0].element_size() == 1
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][1] != 0).any()
