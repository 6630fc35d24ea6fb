"""Graph coverage (issue 11, item 1): run-time sizes, pools in 1/2/3-D, shape ops, in-place ReLU.

Integer kernels are tested bit for bit against ``tests/reference/pooling_ref.py``; models go
prepare -> calibrate -> QAT step -> convert and the converted model is compared with the
fake-quant path (VALIDATION's per-module arithmetic) within one output step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_lightning import set_march
from hq_lightning.nn import quantized as nnq
from hq_lightning.quantization import (
    DeQuantStub,
    FakeQuantState,
    FloatIslandWarning,
    QuantStub,
    convert_fx,
    float_islands,
    prepare_qat_fx,
    set_fake_quantize,
)
from hq_lightning.quantization.fx.fuse import fuse_fx
from hq_lightning.quantization.fx.integer_validation import fake_quant_path
from hq_lightning.quantization.qconfig import default_qat_8bit_fake_quant_qconfig as QC
from tests.reference.pooling_ref import (
    ref_adaptive_avg_pool,
    ref_adaptive_max_pool,
    ref_avg_pool,
    ref_bilinear,
    ref_max_pool,
    ref_nearest,
)

S_IN, S_OUT = float(np.float32(3e-3)), float(np.float32(2e-2))


@pytest.fixture(autouse=True)
def _bayes():
    set_march("bayes")
    yield
    set_march("bayes")


def _ints(shape, dtype=torch.int8, seed=0):
    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(info.min, info.max + 1, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pool_kernels_match_the_reference(dims):
    shape = {1: (2, 3, 11), 2: (2, 3, 7, 6), 3: (1, 2, 5, 4, 6)}[dims]
    x = _ints(shape, torch.int16, seed=dims)
    xs = x.long().numpy()
    kernel, stride, padding = (3,) * dims, (2,) * dims, (1,) * dims
    avg = {1: nnq.QuantizedAvgPool1d, 2: nnq.QuantizedAvgPool2d, 3: nnq.QuantizedAvgPool3d}[dims]
    got = avg(kernel, stride, padding, input_scale=S_IN, output_scale=S_OUT)(x)
    assert got.tolist() == ref_avg_pool(xs, kernel, stride, padding, S_IN, S_OUT).tolist()
    adaptive = {1: nnq.QuantizedAdaptiveAvgPool1d, 2: nnq.QuantizedAdaptiveAvgPool2d, 3: nnq.QuantizedAdaptiveAvgPool3d}[dims]
    out_size = (3, 2, 4)[:dims]
    got = adaptive(out_size, input_scale=S_IN, output_scale=S_OUT)(x)
    assert got.tolist() == ref_adaptive_avg_pool(xs, out_size, S_IN, S_OUT).tolist()
    dilation = (2,) * dims
    got = nnq.QuantizedMaxPool(f"max_pool{dims}d", kernel_size=2, stride=1, padding=1, dilation=2)(x)
    assert got.dtype == torch.int16
    assert got.tolist() == ref_max_pool(xs, (2,) * dims, (1,) * dims, (1,) * dims, dilation).tolist()
    got = nnq.QuantizedMaxPool(f"adaptive_max_pool{dims}d", output_size=out_size)(x)
    assert got.tolist() == ref_adaptive_max_pool(xs, out_size).tolist()


@pytest.mark.parametrize(
    ("kwargs", "scale_factors"),
    [
        ({"scale_factor": 1.5, "mode": "bilinear"}, (1.5, 1.5)),
        ({"scale_factor": (3, 0.5), "mode": "bilinear"}, (3.0, 0.5)),
        ({"size": (9, 4), "mode": "bilinear", "align_corners": True}, None),
        ({"size": (9, 4), "mode": "bilinear", "align_corners": False}, None),
        ({"scale_factor": 1.5, "mode": "nearest"}, (1.5, 1.5)),
        ({"scale_factor": 3, "mode": "nearest"}, (3.0, 3.0)),
        ({"size": (11, 3), "mode": "nearest"}, None),
    ],
)
def test_interpolate_kernels_match_the_reference(kwargs, scale_factors):
    x = _ints((2, 2, 5, 6), seed=3)
    xs = x.long().numpy()
    bilinear = kwargs["mode"] == "bilinear"
    extra = {"input_scale": S_IN, "output_scale": S_OUT} if bilinear else {}
    got = nnq.QuantizedInterpolate(**kwargs, **extra)(x)
    size = tuple(got.shape[-2:])
    assert size == tuple(F.interpolate(x.float(), **kwargs).shape[-2:])
    if bilinear:
        expected = ref_bilinear(xs, size, kwargs.get("align_corners", False), S_IN, S_OUT, scale_factors)
    else:
        expected = ref_nearest(xs, size, scale_factors)
        assert got.tolist() == F.interpolate(x.float(), **kwargs).long().tolist()
    assert got.tolist() == expected.tolist()
    if "size" in kwargs:  # the same module built without a size takes it when it runs
        rest = {k: v for k, v in kwargs.items() if k != "size"}
        dynamic = nnq.QuantizedInterpolate(**rest, **extra)
        assert dynamic(x, size=torch.Size(kwargs["size"])).tolist() == expected.tolist()


def _through(model, *inputs, qconfig=QC, **prepare_kwargs):
    """prepare -> calibrate -> one QAT step -> convert; returns (prepared in VALIDATION, converted)."""
    torch.manual_seed(0)
    prepared = prepare_qat_fx(model, {"": qconfig}, **prepare_kwargs)
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        prepared(*inputs)
    prepared.train()
    set_fake_quantize(prepared, FakeQuantState.QAT)
    out = prepared(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    sum(o.float().square().mean() for o in outs).backward()
    prepared.eval()
    set_fake_quantize(prepared, FakeQuantState.VALIDATION)
    return prepared, convert_fx(prepared)


def _steps(converted, prepared, *inputs):
    """Largest difference, in output steps, between the integer model and the fake-quant path."""
    with torch.no_grad():
        got = converted(*inputs)
        with fake_quant_path():
            want = prepared(*inputs)
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = max(
        float(((a - b).abs() / s).max()) if s is not None else (0.0 if torch.equal(a, b) else float("inf"))
        for a, b, s in zip(got, want, output_steps(converted))
    )  # a float output (of an island) must be equal
    return round(worst, 4)  # float32 division of a multiple of the step


def output_steps(converted):
    """The scale (one step) of each output of a converted model, read from its DeQuantize."""
    (out,) = [n for n in converted.graph.nodes if n.op == "output"]
    nodes = torch.fx.node.map_aggregate(out.args[0], lambda n: n)
    nodes = nodes if isinstance(nodes, (tuple, list)) else (nodes,)
    modules = [converted.get_submodule(str(n.target)) if n.op == "call_module" else None for n in nodes]
    return [m.scale if isinstance(m, nnq.DeQuantize) else None for m in modules]


class RuntimeSizes(nn.Module):
    """Sizes from other tensors' shapes, as FPN / DeepLab / LR-ASPP resize."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fine = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.quant(x)
        fine, coarse = self.fine(x), self.coarse(x)
        h, w = coarse.shape[-2:]
        a = F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        b = F.interpolate(coarse, size=fine.size()[2:], mode="bilinear", align_corners=False)
        c = F.interpolate(coarse, size=(h * 2, w * 2), mode="bilinear", align_corners=True)
        d = F.interpolate(coarse, scale_factor=1.5, mode="bilinear")
        return self.dequant(a + fine), self.dequant(b), self.dequant(c), self.dequant(d)


def test_sizes_computed_at_run_time_are_kept_and_follow_the_input():
    x = torch.randn(8, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatIslandWarning)  # no float island
        prepared, converted = _through(RuntimeSizes(), x)
    assert float_islands(prepared) == []
    resizes = [m for m in converted.modules() if isinstance(m, nnq.QuantizedInterpolate)]
    assert len(resizes) == 4 and sum(m.size is None and m.scale_factor is None for m in resizes) == 3
    assert _steps(converted, prepared, x) <= 1.0
    # another input size: the sizes are read when the model runs, in both models
    y = torch.randn(2, 3, 14, 12)
    shapes = [tuple(o.shape) for o in converted(y)]
    assert shapes == [(2, 4, 14, 12), (2, 4, 14, 12), (2, 4, 14, 12), (2, 4, 10, 9)]
    assert _steps(converted, prepared, y) <= 1.0
    assert all(torch.equal(a, b) for a, b in zip(converted(y), prepared(y)))  # VALIDATION = integer


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv1d(2, 4, 3)
        self.conv3 = nn.Conv3d(2, 4, 1)
        self.pool1 = nn.MaxPool1d(2)
        self.apool3 = nn.AdaptiveMaxPool3d((1, 2, 2))
        self.avg3 = nn.AvgPool3d(2)

    def forward(self, s, v):
        s, v = self.conv1(self.quant(s)), self.conv3(self.quant(v))
        a = F.avg_pool1d(s, 3, stride=2) + F.max_pool1d(s, 3, stride=2)
        b = F.adaptive_avg_pool1d(self.pool1(s), 2) + F.adaptive_max_pool1d(s, 2)
        c = self.apool3(v) + F.adaptive_avg_pool3d(v, (1, 2, 2))
        d = self.avg3(v) + F.max_pool3d(v, 2)
        e = F.adaptive_max_pool2d(v[:, :, 0], 3) + F.avg_pool2d(v[:, :, 0], 2, 1)[..., :3, :3]
        return self.dequant(a), self.dequant(b), self.dequant(c), self.dequant(d), self.dequant(e)


def test_pools_in_one_two_and_three_dims_convert():
    s, v = torch.randn(8, 2, 17), torch.randn(8, 2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatIslandWarning)
        prepared, converted = _through(Pools(), s, v)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert {"QuantizedAvgPool1d", "QuantizedAvgPool3d", "QuantizedAdaptiveAvgPool1d",
            "QuantizedAdaptiveAvgPool3d", "QuantizedMaxPool"} <= kinds  # fmt: skip
    assert _steps(converted, prepared, s, v) <= 1.0


def test_pool_calls_without_an_integer_form_run_as_islands_with_their_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant, self.conv = QuantStub(), DeQuantStub(), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            x = self.conv(self.quant(x))
            a = F.avg_pool2d(x, 3, 2, ceil_mode=True)
            b, _ = F.max_pool2d(x, 2, return_indices=True)
            c = F.pad(x, (1, 1), value=0.5)
            d = F.avg_pool2d(x, x.shape[-1])  # kernel from the shape: cannot be a constant
            return self.dequant(self.conv(a)), self.dequant(b), self.dequant(c), self.dequant(d)

    x = torch.randn(4, 2, 7, 7)
    with pytest.warns(UserWarning, match="float island"):
        prepared, converted = _through(Net(), x)
    ops = {op.node: (op.kind, op.detail) for island in float_islands(prepared) for op in island.ops}
    assert ops["_generated_avg_pool2d_0"][0] == "no_integer_form" and "ceil_mode" in ops["_generated_avg_pool2d_0"][1]
    assert ops["max_pool2d_with_indices"][0] == "no_integer_form"
    assert ops["pad"][0] == "no_integer_form" and "value=0.5" in ops["pad"][1]
    assert ops["avg_pool2d_1"] == ("runtime_argument", "argument `kernel_size` is computed at run time and cannot be kept")
    assert _steps(converted, prepared, x) <= 1.0


class ShapeOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x):
        x = self.conv(self.quant(x))
        a, b = x.chunk(2, dim=1)
        c, d = torch.split(x, [1, 3], dim=1)
        rows = x.unbind(2)
        e = torch.stack([rows[0], rows[-1]], dim=2)
        f = F.pad(x, (1, 0, 0, 1)) + F.pad(x, (1, 0, 0, 1), mode="replicate")
        g = torch.flip(a, [2]).roll(1, 3) + b[:, :, ::2].repeat(1, 1, 2, 1)
        h = c.expand(-1, 3, -1, -1) + d + x[:, 1:, 1:-1].tile(1, 1, 1, 1)[:, :, :, :].repeat_interleave(1, dim=1)[:, :, :1].expand(-1, -1, 6, -1)
        return tuple(self.dequant(t) for t in (e, f, g, h, self.pad(x)))


def test_shape_ops_run_on_integers():
    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatIslandWarning)
        prepared, converted = _through(ShapeOps(), x)
    assert float_islands(prepared) == []
    assert _steps(converted, prepared, x) <= 1.0


def test_inplace_relu_spellings_fuse():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return F.relu(self.a(x), True) + self.b(x).relu_() + torch.relu_(self.c(x))

    fused = fuse_fx(Net().eval())
    assert {type(getattr(fused, n)).__name__ for n in "abc"} == {"ConvReLU2d"}
    assert not [n for n in fused.graph.nodes if "relu" in str(n.target)]
