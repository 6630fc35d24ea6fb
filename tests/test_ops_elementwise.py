"""Elementwise table ops, clamp and division: integer == fake-quant op (int8), within one step (int16),
every spelling reaches the op, gradients flow (docs/integer-arithmetic.md, section 9)."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning.march import March, march_context
from hq_lightning.nn import elementwise as fm
from hq_lightning.nn import qat
from hq_lightning.nn.qat import elementwise as qe
from hq_lightning.nn.quantized.clamp import QuantizedClamp
from hq_lightning.nn.quantized.lookup import QuantizedDiv, QuantizedLookup
from hq_lightning.quantization import DeQuantStub, QuantStub, convert_fx, prepare_qat_fx
from hq_lightning.quantization.fake_quantize import fake_quantize
from hq_lightning.quantization.ops import lookup_module
from hq_lightning.quantization.qconfig import (
    default_qat_8bit_fake_quant_qconfig as QC8,
)
from hq_lightning.quantization.qconfig import (
    default_qat_16bit_fake_quant_qconfig as QC16,
)
from tests.reference.table_ref import (
    ref_clamp,
    ref_div,
    ref_segmented,
    ref_segmented_lookup,
    ref_table,
)

# (name, float module, calibration inputs' range): every table op, at representative ranges
OPS = [
    ("hardswish", lambda: nn.Hardswish(), (-6.0, 6.0)),
    ("hardsigmoid", lambda: nn.Hardsigmoid(), (-4.0, 4.0)),
    ("silu", lambda: nn.SiLU(), (-8.0, 8.0)),
    ("sigmoid", lambda: nn.Sigmoid(), (-8.0, 8.0)),
    ("tanh", lambda: nn.Tanh(), (-3.0, 3.0)),
    ("gelu", lambda: nn.GELU(), (-5.0, 5.0)),
    ("gelu_tanh", lambda: nn.GELU(approximate="tanh"), (-5.0, 5.0)),
    ("leaky_relu", lambda: nn.LeakyReLU(0.1), (-4.0, 4.0)),
    ("elu", lambda: nn.ELU(0.5), (-4.0, 4.0)),
    ("softplus", lambda: nn.Softplus(2.0, 5.0), (-4.0, 4.0)),
    ("mish", lambda: nn.Mish(), (-5.0, 5.0)),
    ("exp", lambda: fm.Exp(), (-4.0, 2.0)),
    ("log", lambda: fm.Log(), (0.05, 4.0)),
    ("sqrt", lambda: fm.Sqrt(), (0.0, 9.0)),
    ("rsqrt", lambda: fm.Rsqrt(), (0.1, 9.0)),
    ("reciprocal", lambda: fm.Reciprocal(), (0.25, 4.0)),
    ("abs", lambda: fm.Abs(), (-3.0, 3.0)),
    ("pow2", lambda: fm.Pow(2), (-3.0, 3.0)),
    ("pow3", lambda: fm.Pow(3.0), (-2.0, 2.0)),
    ("pow_half", lambda: fm.Pow(0.5), (0.0, 4.0)),
    ("div_const", lambda: fm.Div(3.0), (-6.0, 6.0)),
    ("prelu", lambda: _prelu(), (-4.0, 4.0)),
]


def _prelu() -> nn.PReLU:
    module = nn.PReLU(3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.25, -0.5, 1.5]))
    return module


def _calibrated(make, span, qconfig, march=March.BAYES, stretch=1.0):
    """(QAT module, input scale, input dtype): the op's output observer has seen its range."""
    lo, hi = span
    with march_context(march):
        float_module = make()
        module = lookup_module(float_module).qat.from_float(float_module, qconfig)
        stub = qat.QuantStub.from_float(QuantStub(), qconfig)
    x = torch.linspace(lo * stretch, hi * stretch, 3000)
    x = x[:, None].expand(-1, 3).contiguous() if isinstance(module, nn.PReLU) else x
    module.train(), stub.train()
    for _ in range(3):
        module(stub(x))
    module.eval(), stub.eval()
    fq = stub.activation_post_process
    return module, fq.scale.detach().clone(), fq.dtype


def _codes(dtype):
    info = torch.iinfo(dtype)
    return torch.arange(info.min, info.max + 1, dtype=dtype)


def _fake_quant_codes(module, q, s_in):
    """The fake-quant op's output as codes, on the values ``q * s_in`` the previous fake quant gives."""
    x = q.to(torch.float32) * s_in
    if isinstance(module, nn.PReLU):
        x = x[:, None].expand(-1, module.num_parameters).contiguous()
    with torch.no_grad():
        y = module(x)
    return torch.round(y / module.activation_post_process.scale), x


def _converted(module, s_in, dtype):
    channels = module.num_parameters if isinstance(module, nn.PReLU) else 1
    return QuantizedLookup.from_function(
        module.float_forward, s_in, dtype, module.activation_post_process.scale,
        module.activation_post_process.dtype, channels=channels, ch_axis=1 if channels > 1 else None,
    )  # fmt: skip


@pytest.mark.parametrize("march", [March.BAYES, March.BERNOULLI])
@pytest.mark.parametrize("name,make,span", OPS, ids=[o[0] for o in OPS])
def test_int8_table_equals_the_fake_quant_op_on_every_code(name, make, span, march):
    for stretch in (0.5, 1.0, 3.0):  # several input (and output) scales
        module, s_in, dtype = _calibrated(make, span, QC8, march, stretch)
        q = _codes(torch.int8)
        expected, x = _fake_quant_codes(module, q, s_in)
        lut = _converted(module, s_in, dtype)
        got = lut(x.div(s_in).round().to(torch.int8) if x.dim() > 1 else q).to(torch.float32)
        defined = ~torch.isnan(expected)
        assert torch.equal(got[defined], expected[defined]), (name, march, stretch)
        if march is March.BERNOULLI:
            assert float(torch.log2(module.activation_post_process.scale)) == int(
                torch.log2(module.activation_post_process.scale)
            )


@pytest.mark.parametrize("name", ["sigmoid", "exp", "prelu", "abs"])
def test_int8_table_matches_the_reference(name):
    make, span = next((m, s) for n, m, s in OPS if n == name)
    module, s_in, _ = _calibrated(make, span, QC8)
    lut = _converted(module, s_in, "qint8")
    s_out = float(module.activation_post_process.scale)
    xs = _codes(torch.int8).to(torch.float32) * s_in
    if isinstance(module, nn.PReLU):
        values = module.float_forward(xs[:, None].expand(-1, 3).contiguous()).t().detach()
        for c in range(3):
            assert lut.table[c].tolist() == ref_table(values[c].numpy(), s_out, "qint8")
    else:
        values = module.float_forward(xs).detach()
        assert lut.table[0].tolist() == ref_table(values.numpy(), s_out, "qint8")


@pytest.mark.parametrize("name,make,span", OPS, ids=[o[0] for o in OPS])
def test_int16_segmented_table_within_one_step_of_the_fake_quant_op(name, make, span):
    module, s_in, dtype = _calibrated(make, span, QC16)
    assert str(dtype) == "qint16"
    q = _codes(torch.int16)
    expected, x = _fake_quant_codes(module, q, s_in)
    lut = _converted(module, s_in, "qint16")
    got = lut(x.div(s_in).round().to(torch.int16) if x.dim() > 1 else q).to(torch.float32)
    defined = ~torch.isnan(expected)
    error = (got - expected)[defined].abs()
    assert error.max() <= 1, (name, float(error.max()))
    # the knots are a fraction of a full table: the blocks are coarse where the function is smooth
    assert lut.knots.numel() < (65536 * (3 if isinstance(module, nn.PReLU) else 1)), name


@pytest.mark.parametrize("name", ["sigmoid", "reciprocal", "hardswish"])
def test_int16_segmented_table_matches_the_reference(name):
    make, span = next((m, s) for n, m, s in OPS if n == name)
    module, s_in, _ = _calibrated(make, span, QC16)
    s_out = float(module.activation_post_process.scale)
    lut = _converted(module, s_in, "qint16")
    xs = torch.arange(-32768, 32769, dtype=torch.float32) * s_in
    values = module.float_forward(xs).detach().numpy()
    levels, blocks = ref_segmented(values, s_out, "qint16")
    assert lut.levels[0].tolist() == levels
    assert lut.knots.tolist() == [k for block in blocks for k in block]
    q = _codes(torch.int16)
    got = lut(q).tolist()
    rng = np.random.default_rng(0)
    sample = (
        list(range(-32768, -32768 + 600))
        + list(rng.integers(-32768, 32768, 3000))
        + list(range(32000, 32768))
    )
    for code in sample:
        assert got[code + 32768] == ref_segmented_lookup(int(code), levels, blocks, "qint16"), code


def test_int16_segmented_bound_holds_at_a_pole_and_a_kink():
    # reciprocal across 0 (a pole) and abs (a kink) at a fine input scale: the blocks there
    # fall back to short segments, the bound still holds everywhere
    for fn in (torch.reciprocal, torch.abs, lambda v: torch.where(v < 0.3, v, v * 4)):
        s_in, s_out = torch.tensor([1e-3]), torch.tensor([0.05])
        lut = QuantizedLookup.from_function(fn, s_in, "qint16", s_out, "qint16")
        q = _codes(torch.int16)
        y = fn(q.to(torch.float32) * s_in)
        expected = fake_quantize(y, s_out, "qint16") / s_out
        assert (lut(q).to(torch.float32) - torch.round(expected)).abs().max() <= 1


def _graph(body, qconfig=QC8, act=None):
    """A prepared ``QuantStub -> body -> DeQuantStub`` (``self.act`` = ``act``), one QAT step taken.

    Strict: every op between the stubs must have an integer form (no float island).
    """

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.act = act if act is not None else nn.Identity()

        def forward(self, x):
            return self.dequant(body(self, self.quant(x)))

    model = prepare_qat_fx(Net(), {"": qconfig}, allow_float_islands=False)
    model.train()
    model(torch.randn(16, 3, 4, 4))
    return model


SPELLINGS = [
    ("silu", lambda s, x: F.silu(x, inplace=True), qe.SiLU),
    ("silu_module", lambda s, x: nn.SiLU(inplace=True)(x), None),
    ("hardswish", lambda s, x: F.hardswish(x, True), qe.Hardswish),
    ("hardsigmoid", lambda s, x: F.hardsigmoid(x), qe.Hardsigmoid),
    ("sigmoid", lambda s, x: torch.sigmoid(x), qe.Sigmoid),
    ("sigmoid_method", lambda s, x: x.sigmoid(), qe.Sigmoid),
    ("sigmoid_", lambda s, x: x.sigmoid_(), qe.Sigmoid),
    ("F.sigmoid", lambda s, x: F.sigmoid(x), qe.Sigmoid),
    ("tanh", lambda s, x: x.tanh(), qe.Tanh),
    ("gelu", lambda s, x: F.gelu(x, approximate="tanh"), qe.GELU),
    ("leaky_relu", lambda s, x: F.leaky_relu(x, 0.2, inplace=True), qe.LeakyReLU),
    ("leaky_relu_", lambda s, x: F.leaky_relu_(x, 0.2), qe.LeakyReLU),
    ("elu", lambda s, x: F.elu(x, alpha=0.7), qe.ELU),
    ("softplus", lambda s, x: F.softplus(x, beta=2.0), qe.Softplus),
    ("mish", lambda s, x: F.mish(x), qe.Mish),
    ("exp", lambda s, x: torch.exp(x), qe.Exp),
    ("exp_", lambda s, x: x.exp_(), qe.Exp),
    ("log", lambda s, x: (x.abs() + 1.0).log(), qe.Log),
    ("sqrt", lambda s, x: torch.sqrt(x.abs() + 1.0), qe.Sqrt),
    ("rsqrt", lambda s, x: (x.abs() + 1.0).rsqrt(), qe.Rsqrt),
    ("reciprocal", lambda s, x: torch.reciprocal(x.abs() + 1.0), qe.Reciprocal),
    ("abs", lambda s, x: torch.abs(x), qe.Abs),
    ("pow", lambda s, x: x**2, qe.Pow),
    ("pow_fn", lambda s, x: torch.pow(x, 3), qe.Pow),
    ("pow_method", lambda s, x: (x.abs() + 1.0).pow(0.5), qe.Pow),
    ("square", lambda s, x: x.square(), qe.Pow),
    ("div_const", lambda s, x: x / 4.0, qe.Div),
]


@pytest.mark.parametrize("name,body,cls", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_every_spelling_becomes_the_op_and_converts_to_a_table(name, body, cls):
    act = nn.SiLU(inplace=True) if name == "silu_module" else None
    model = _graph((lambda s, x: s.act(x)) if act is not None else body, act=act)
    assert any(isinstance(m, cls or qe.SiLU) for m in model.modules()), name
    model.eval()
    converted = convert_fx(model)
    assert any(isinstance(m, QuantizedLookup) for m in converted.modules()), name
    out = converted(torch.randn(2, 3, 4, 4))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


CLAMPS = [
    ("clamp", lambda s, x: torch.clamp(x, -0.5, 1.25), (-0.5, 1.25)),
    ("clamp_min", lambda s, x: x.clamp(min=0.3), (0.3, None)),
    ("clamp_max_kw", lambda s, x: torch.clamp(x, max=0.7), (None, 0.7)),
    ("clamp_", lambda s, x: x.clamp_(0.0, 6.0), (0.0, 6.0)),
    ("clip", lambda s, x: x.clip(-1.0, 1.0), (-1.0, 1.0)),
    ("hardtanh", lambda s, x: F.hardtanh(x), (-1.0, 1.0)),
    ("hardtanh_args", lambda s, x: F.hardtanh(x, -0.25, 0.5, True), (-0.25, 0.5)),
    ("clamp_min_method", lambda s, x: x.clamp_min(0.1), (0.1, None)),
]


@pytest.mark.parametrize("name,body,bounds", CLAMPS, ids=[c[0] for c in CLAMPS])
def test_clamp_spellings_clamp_at_the_codes_of_the_bounds(name, body, bounds):
    model = _graph(body)
    model.eval()
    converted = convert_fx(model)
    clamps = [m for m in converted.modules() if isinstance(m, QuantizedClamp)]
    assert len(clamps) == 1, name
    module = clamps[0]
    scale = float(module.scale)
    q = _codes(torch.int8)
    got = module(q).tolist()
    assert got == [ref_clamp(int(v), scale, "qint8", *bounds) for v in q.tolist()]
    # equals the fake quant of the float clamp of every input value (rounding is monotone)
    x = q.to(torch.float32) * module.scale
    lo, hi = bounds
    expected = fake_quantize(torch.clamp(x, lo, hi), module.scale, "qint8")
    assert torch.equal(module(q).to(torch.float32) * module.scale, expected)


def test_nn_hardtanh_module_and_int16():
    module = QuantizedClamp(1e-3, "qint16", min=-2.0, max=3.0)
    got = module(_codes(torch.int16))
    assert got.dtype == torch.int16 and int(got.min()) == -2000 and int(got.max()) == 3000
    model = _graph(lambda s, x: s.act(x), act=nn.Hardtanh(-0.5, 0.5)).eval()
    clamps = [m for m in convert_fx(model).modules() if isinstance(m, QuantizedClamp)]
    assert len(clamps) == 1 and (clamps[0].min, clamps[0].max) == (-0.5, 0.5)


def test_division_by_an_activation_matches_the_reference_and_the_fake_quant_op():
    torch.manual_seed(0)
    module = qe.Div(qconfig=QC8)
    stub_x = qat.QuantStub.from_float(QuantStub(), QC8)
    stub_y = qat.QuantStub.from_float(QuantStub(), QC8)
    x, y = torch.randn(4000) * 2, torch.rand(4000) * 3 + 0.5
    for _ in range(3):
        module(stub_x(x), stub_y(y))
    module.eval(), stub_x.eval(), stub_y.eval()
    s_x, s_y = stub_x.activation_post_process.scale, stub_y.activation_post_process.scale
    s_r = module.reciprocal_post_process.scale
    s_out = module.activation_post_process.scale
    reciprocal = QuantizedLookup.from_function(torch.reciprocal, s_y, "qint8", s_r, "qint8")
    div = QuantizedDiv(s_x, "qint8", reciprocal, s_out, "qint8")
    qx = _codes(torch.int8).repeat_interleave(256)
    qy = _codes(torch.int8).repeat(256)
    got = div(qx, qy)
    r_codes = reciprocal(_codes(torch.int8)).tolist()
    for i in range(0, qx.numel(), 37):
        a, b = int(qx[i]), int(qy[i])
        assert int(got[i]) == ref_div(
            a, r_codes[b + 128], float(s_x), float(s_r), float(s_out), "qint8"
        )
    # against the fake-quant op (reciprocal fake quant, product, output fake quant)
    with torch.no_grad():
        expected = module(qx.float() * s_x, qy.float() * s_y) / s_out
    defined = torch.isfinite(expected)
    assert (got.float()[defined] - torch.round(expected[defined])).abs().max() <= 1


GRADIENT_OPS = [o for o in OPS if o[0] != "prelu"]


@pytest.mark.parametrize("name,make,span", GRADIENT_OPS, ids=[o[0] for o in GRADIENT_OPS])
def test_gradients_are_the_float_derivative_through_the_output_fake_quant(name, make, span):
    module, s_in, _ = _calibrated(make, span, QC8)
    module.train()
    module.activation_post_process.disable_observer()
    lo, hi = span
    x = torch.linspace(lo, hi, 101).requires_grad_(True)
    out = module(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_(True)
    y = module.float_forward(x_ref)
    (true_grad,) = torch.autograd.grad(y.sum(), x_ref)
    fq = module.activation_post_process
    codes = torch.round(y.detach() * torch.reciprocal(fq.scale))
    info = torch.iinfo(torch.int8)
    inside = (codes >= info.min) & (codes <= info.max)
    expected = torch.where(inside, true_grad, torch.zeros_like(true_grad))
    finite = torch.isfinite(expected)
    assert torch.equal(grad[finite], expected[finite]), name


def test_gradients_of_prelu_div_and_clamp():
    module, _, _ = _calibrated(_prelu, (-4.0, 4.0), QC8)
    module.train()
    x = torch.linspace(-1, 1, 30).reshape(10, 3).requires_grad_(True)
    module(x).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert torch.equal(x.grad[x.detach() > 0], torch.ones_like(x.grad[x.detach() > 0]))

    div = qe.Div(qconfig=QC8).train()
    a = torch.linspace(-1, 1, 20).requires_grad_(True)
    b = torch.linspace(0.5, 2, 20).requires_grad_(True)
    div(a, b).sum().backward()
    # straight through the reciprocal's fake quant
    assert torch.allclose(a.grad, 1 / b.detach(), rtol=0.05)
    assert torch.allclose(b.grad, -a.detach() / b.detach() ** 2)  # true derivative of 1 / b

    model = _graph(lambda s, x: x.clamp(-0.5, 0.5) * 2.0)
    x = torch.linspace(-1, 1, 48).reshape(1, 3, 4, 4).requires_grad_(True)
    model(x).sum().backward()
    assert (x.grad.abs() > 0).any() and (x.grad == 0).any()  # zero outside the clamp bounds


def test_table_errors_name_the_problem():
    with pytest.raises(ValueError, match="Expected `values` of shape"):
        QuantizedLookup(torch.zeros(10), 0.1, "qint8", 0.1)
    lut = QuantizedLookup.from_function(torch.sigmoid, 0.1, "qint8", 0.01)
    with pytest.raises(TypeError, match="Expected `input` to be a torch.int8"):
        lut(torch.zeros(3, dtype=torch.int16))
    with pytest.raises(ValueError, match="Expected `min` or `max`"):
        fm.Clamp()
    with pytest.raises(TypeError, match="Expected `exponent`"):
        fm.Pow(torch.tensor(2.0))


def test_operator_pow_spelling_is_registered():
    from hq_lightning.quantization.ops import lookup_spelling

    assert [s.name for s, _ in lookup_spelling(operator.pow)] == ["pow"]
    assert [s.name for s, _ in lookup_spelling("clamp_")] == ["clamp"]


def test_division_spellings_of_two_activations_convert_to_reciprocal_table_and_product():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.qx, self.qy, self.dequant = QuantStub(), QuantStub(), DeQuantStub()

        def forward(self, x, y):
            x, y = self.qx(x), self.qy(y)
            return self.dequant(
                torch.cat([x / y, x.div(y), torch.div(x, y), torch.true_divide(x, 2.0)])
            )

    model = prepare_qat_fx(Net(), {"": QC8}, allow_float_islands=False)
    assert sum(isinstance(m, qe.Div) for m in model.modules()) == 4
    x, y = torch.randn(64), torch.rand(64) + 0.5
    model.train()
    for _ in range(3):
        model(x, y)
    converted = convert_fx(model.eval())
    assert sum(isinstance(m, QuantizedDiv) for m in converted.modules()) == 3
    out = converted(x, y)
    assert torch.allclose(out[:64], x / y, atol=0.1) and torch.equal(out[:64], out[64:128])


def test_table_ops_outside_the_quantized_region_stay_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.head = nn.Sigmoid()

        def forward(self, x):
            x = self.quant(torch.tanh(x))  # pre-processing in float
            x = F.silu(x)
            return self.head(self.dequant(x)).exp()  # post-processing in float

    model = prepare_qat_fx(Net(), {"": QC8})
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["head"] is nn.Sigmoid and kinds["_generated_tanh_0"] is nn.Tanh
    assert kinds["_generated_exp_0"] is fm.Exp and kinds["_generated_silu_0"] is qe.SiLU
    model.train()
    model(torch.randn(8, 4))
    converted = convert_fx(model.eval())
    assert isinstance(converted._generated_silu_0, QuantizedLookup)
    assert type(converted.head) is nn.Sigmoid
    x = torch.randn(3, 4)
    assert converted(x).dtype == torch.float32 and (converted(x) > 1).all()
