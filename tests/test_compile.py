"""A QAT step compiles as one graph: no host synchronisation, no graph break (issue 15).

``torch.compile(model, fullgraph=True)`` raises on any graph break, so these tests fail if a
fake quant, an observer or a scale update reads a tensor on the host (``.item()``, ``bool()``),
looks at autograd nodes, or otherwise leaves the traceable subset. Graph breaks are found by
dynamo's tracing (which also traces each autograd.Function's backward), so the torchvision models
use the ``eager`` backend; the small model uses ``aot_eager``, which traces forward and backward
like inductor (AOTAutograd) without inductor's code generation (minutes on a small CPU machine).
The VALIDATION state (the integer arithmetic path) is not covered here.
"""

import pytest
import torch
import torch.nn.functional as F

from hq_lightning.march import March, march_context
from hq_lightning.qconfig import default_qat_8bit_fake_quant_qconfig
from hq_lightning.quantization import DeQuantStub, FakeQuantize, QuantStub, prepare_qat_fx
from hq_lightning.quantization.nonfinite import check_nonfinite
from tests.models import Stubbed

torchvision = pytest.importorskip("torchvision")


def _prepared(name):
    torch.manual_seed(0)
    with march_context(March.BAYES):
        model = Stubbed(getattr(torchvision.models, name)(num_classes=10))
        return prepare_qat_fx(model, {"": default_qat_8bit_fake_quant_qconfig}).train()


def _step(model, x, target):
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_qat_step_compiles_without_graph_break_observers_on_and_frozen(name):
    torch._dynamo.reset()
    model = _prepared(name)
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    _step(model, x, target)  # eager: every observer initialised (compiling from scratch: below)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = [_step(compiled, x, target) for _ in range(2)]  # observers on
    assert all(torch.isfinite(loss) for loss in losses)
    scales = [m.scale.clone() for m in model.modules() if isinstance(m, FakeQuantize)]
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            module.disable_observer()
    torch._dynamo.reset()
    frozen = torch.compile(model, fullgraph=True, backend="eager")
    _step(frozen, x * 100, target)  # frozen: a wider input leaves every scale as it was
    assert all(torch.equal(a, m.scale) for a, m in zip(scales, (m for m in model.modules() if isinstance(m, FakeQuantize))))
    assert check_nonfinite(model) == {}


def test_compiled_step_counts_a_nan_batch_and_reports_it_afterwards():
    """A non-finite batch inside a compiled step is skipped and counted on the device; the report
    comes from check_nonfinite, outside the step."""
    torch._dynamo.reset()
    with march_context(March.BAYES):
        model = prepare_qat_fx(
            torch.nn.Sequential(QuantStub(), torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), DeQuantStub()),
            {"": default_qat_8bit_fake_quant_qconfig},
        ).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    compiled(x).sum().backward()
    stub = next(m for m in model.modules() if isinstance(m, FakeQuantize))  # the input stub's
    before = stub.scale.clone()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    compiled(bad)
    assert torch.equal(stub.scale, before)  # the NaN batch left the input range as it was
    with pytest.raises(ValueError, match=r"Expected the input of .* to be finite, but 1 batch\(es\) contained NaN"):
        check_nonfinite(model)
    assert check_nonfinite(model) == {}  # reported once


def _edge_inputs(shape, scale_view, seed):
    """Codes on both sides of every edge: half-integer ties at qmin - 0.5 / qmax + 0.5, far beyond
    the range, beyond 2**24, NaN and +-inf, also in the vectorised loops' tail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale_view * 60
    flat = x.view(-1)
    edges = torch.tensor([-128.5, -128.0, -127.5, 126.5, 127.0, 127.5, 128.0, 3.0e7, -3.0e7])
    flat[: len(edges)] = edges * scale_view.reshape(-1)[0]
    flat[[11, 12, 13]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    flat[-1] = float("nan")
    return x


def _assert_same_bits(a, b):
    """NaN at the same places (its payload and sign are not specified), every other value with
    the same bits (``-0.0`` differs from ``0.0``)."""
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("per_channel", [False, True])
def test_inductor_fake_quant_matches_eager_bit_for_bit(per_channel):
    """The formula inductor compiles (float-only in-range mask) gives the eager path's outputs and
    gradients bit for bit: at the range edges, beyond 2**24, for NaN and +-inf, for a leaf and for
    a computed input, and a NaN incoming gradient stays NaN where the mask is 0 (as ``grad * 0``)."""
    from hq_lightning.quantization.fake_quantize import fake_quantize

    torch._dynamo.reset()
    scale = torch.tensor([0.02, 0.5, 2.0**-6]) if per_channel else torch.tensor([0.05])
    view = scale.view(-1, 1) if per_channel else scale
    ch_axis = 0 if per_channel else None
    shape = (3, 37) if per_channel else (111,)
    base = _edge_inputs(shape, view, seed=3)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    grad.view(-1)[[0, 5, 11, 20]] = torch.tensor([float("nan"), float("inf"), float("nan"), -float("inf")])

    def run(fn, computed):
        leaf = base.clone().requires_grad_(True)
        x = leaf * 1.0 + 0.0 if computed else leaf
        y = fn(x)
        y.backward(grad)
        return y.detach(), leaf.grad

    def fq(x):
        return fake_quantize(x, scale, "qint8", ch_axis)

    compiled = torch.compile(fq, backend="inductor", fullgraph=True)
    for computed in (False, True):
        (y_eager, g_eager), (y_comp, g_comp) = run(fq, computed), run(compiled, computed)
        _assert_same_bits(y_eager, y_comp)
        _assert_same_bits(g_eager, g_comp)
    # a NaN / inf incoming gradient where the mask is 0 (NaN input; code 128) gives NaN, as grad * 0
    assert torch.isnan(g_comp.view(-1)[[0, 5, 11]]).all()
    assert g_comp.view(-1)[12] == 0 and g_comp.view(-1)[3] == grad.view(-1)[3]  # +inf: 0; code 127: grad


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_fake_quant_keeps_its_gradient(backend):
    """torch.compile before 2.12 dropped the custom backward of a Function whose float32 output
    went through a no-op ``.to()``: every gradient through a fake quant was 0 (seen on 2.11)."""
    torch._dynamo.reset()
    from hq_lightning.quantization.fake_quantize import fake_quantize

    leaf = torch.randn(3, 5, requires_grad=True)
    grad = torch.randn(3, 5)

    def run(fn):
        leaf.grad = None
        fn(leaf * 1.0).backward(grad)
        return leaf.grad.clone()

    def fq(x):
        return fake_quantize(x, torch.tensor([0.05]), "qint8")

    expected = run(fq)
    assert torch.equal(run(torch.compile(fq, backend=backend, fullgraph=True)), expected)
    assert expected.abs().sum() > 0



def test_inductor_recomputes_the_fake_quant_mask_in_backward():
    """The backward recomputes the STE mask from the saved input. AOTAutograd's CSE must not merge
    that recomputation into the forward's identical ops: the partitioner then keeps the masks for
    backward (the fake quant's as float, ReLU6's as ``bool``, both written transposed out of the
    channels-last layout) instead of the convolution output, and MobileNetV2's compiled QAT step
    cost 1.57x compiled float instead of 0.84x (bench/results/qat_step.md)."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    block = torch.nn.Sequential(
        torch.nn.Conv2d(32, 8, 1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 32, 1, bias=False), torch.nn.BatchNorm2d(32), torch.nn.AdaptiveAvgPool2d(1),
    )
    model = prepare_qat_fx(Stubbed(block), {"": default_qat_8bit_fake_quant_qconfig})
    x = torch.randn(2, 32, 4, 4)
    model(x)  # the observers' first batch shapes their buffers: one compile below
    compiled = torch.compile(model)
    _, (forward, backward) = run_and_get_code(lambda: compiled(x).sum().backward())
    kernels = {
        name: re.findall(r"^(cpp_fused\w*) = async_compile", code, re.M)
        for name, code in (("forward", forward), ("backward", backward))
    }
    masks = {name: [k for k in found if "fmin" in k or "hardtanh_backward" in k] for name, found in kernels.items()}
    assert kernels["forward"] and masks["backward"], kernels  # the check looks at real kernels
    assert not masks["forward"], f"the forward computes masks for backward: {masks['forward']}"
